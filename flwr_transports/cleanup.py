"""``flwr-transports cleanup URL...``: remove what crashed runs left on a link.

Every object a link creates is named ``ftx-<server pid>-<run>-<nonce>...``. A live run
removes its own objects when it ends; after a crash (kill -9, power loss) they stay.
This command finds them. By default it keeps objects whose owner pid still runs on
this host; ``--all`` removes every flwr-transports object under the URL.
"""

from __future__ import annotations

import argparse

from .errors import ConfigError
from .links import LinkError, link_classes, schemes
from .options import split_transport


def cleanup(url: str, *, dry_run: bool = False, all_: bool = False) -> list[str]:
    spec = split_transport(url)  # parsed once; the link reads its location from it
    if spec.scheme is None:
        raise ConfigError("'inband' leaves nothing on a link to clean up: give a link URL")
    srv, _ = link_classes(spec.scheme)
    return srv.cleanup(spec, dry_run=dry_run, all_=all_)


def default_urls() -> list[str]:
    """The URLs of registered links that can be scanned without a location."""
    urls = []
    for scheme in schemes():
        try:
            url = link_classes(scheme)[0].default_cleanup_url
        except LinkError:
            continue  # not installed here: nothing of it can be here either
        if url:
            urls.append(url)
    return urls


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="flwr-transports cleanup",
        description="Remove payloads/objects left behind by crashed flwr-transports runs.",
    )
    p.add_argument("urls", nargs="*",
                   help="link URLs to scan, e.g. shm:// file:///shared/dir "
                        "s3://bucket/prefix?endpoint_url=... (default: every registered link "
                        "that needs no location, i.e. shm://)")
    p.add_argument("--dry-run", "-n", action="store_true", help="only list what would be removed")
    p.add_argument("--all", dest="all_", action="store_true",
                   help="also remove objects of runs that still seem alive")
    a = p.parse_args(argv)
    total = 0
    for url in a.urls or default_urls():
        try:
            found = cleanup(url, dry_run=a.dry_run, all_=a.all_)
        except (ValueError, RuntimeError) as exc:
            print(f"{url}: error: {exc}")
            return 1
        verb = "would remove" if a.dry_run else "removed"
        for f in found:
            print(f"{verb} {f}")
        print(f"{url}: {verb} {len(found)} object(s)")
        total += len(found)
    return 0
