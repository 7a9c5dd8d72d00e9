"""Declared, typed options: one owner per option, parsed once.

Every link class declares its options as a tuple of :class:`Option` (name, parser,
default, one-line doc); the offload wrapper declares its own the same way. A
transport URL's query string and ``offload(**kwargs)`` are merged and parsed ONCE by
:func:`split_options`: the wrapper keeps its keys, the link gets a parsed
:class:`Options` mapping with every default filled in. An unknown name fails there,
naming both option lists. The option tables in ``docs/links/*.md`` are checked
against these declarations by the test suite (:func:`markdown_table` renders one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

SIZE_UNITS_HELP = ("a number of bytes (1048576) or with a unit: KiB/MiB/GiB/TiB = 1024^n "
                   "(k/m/g/t alone too: '16G' is 16 GiB), KB/MB/GB/TB = 1000^n ('16GB' is "
                   "16 * 10^9 bytes)")
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}


@dataclass(frozen=True)
class Option:
    """One declared option: ``parse(raw) -> value``; ``default`` is a parsed value."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    doc: str
    #: how the default reads in docs (defaults to ``str(default)``)
    shown: str | None = None

    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return str(self.default)


class Options(dict):
    """Parsed options (every declared name present); also readable as attributes.
    Immutable: parsed once, then only read."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *_a: Any, **_k: Any) -> None:
        raise TypeError("parsed options are immutable (parse again with the new values)")

    __setitem__ = __delitem__ = _readonly  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return id(self)


# -- parsers ---------------------------------------------------------------------------

def parse_size(value: Any) -> int:
    """Parse '64MiB', '1GB', '512k', 1048576 into bytes.

    Binary: KiB/MiB/GiB/TiB = 1024**n, and k/m/g/t ALONE are binary too ('16G' = 16 GiB);
    decimal: KB/MB/GB/TB = 1000**n ('16GB' = 16 * 10**9 bytes, 7 % less than '16G').
    Case does not matter; a plain number is bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid size {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"invalid size {value!r}")
        return int(value)
    s = str(value).strip().replace("_", "")
    num = s.rstrip("bBkKmMgGtTiI")
    unit = s[len(num):].lower()
    try:
        n = float(num)
    except ValueError:
        raise ConfigError(f"invalid size {value!r}: {SIZE_UNITS_HELP}") from None
    if unit not in _UNITS or n < 0:
        raise ConfigError(f"invalid size {value!r}: {SIZE_UNITS_HELP}")
    return int(n * _UNITS[unit])


def parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in {"1", "true", "yes", "on"}:
        return True
    if s in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"not a boolean: {v!r} (use true/false)")


def parse_duration(v: Any) -> float:
    """'3600', '90s', '30m', '2h', '1d', 0.5 -> seconds."""
    if isinstance(v, bool):
        raise ConfigError(f"invalid duration {v!r}")
    if isinstance(v, int | float):
        return float(v)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smhd]?)\s*", str(v).lower())
    if not m:
        raise ConfigError(f"invalid duration {v!r} (use e.g. 3600, 90s, 30m, 2h, 1d)")
    mult = {"": 1, "s": 1, "ms": 0.001, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * mult


def integer(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool):
            raise ConfigError(f"not an integer: {v!r}")
        try:
            n = int(str(v).strip()) if not isinstance(v, int) else v
        except ValueError:
            raise ConfigError(f"not an integer: {v!r}") from None
        if not lo <= n <= hi:
            raise ConfigError(f"{n} is not between {lo} and {hi}")
        return n
    parse.__doc__ = f"integer in [{lo}, {hi}]"
    return parse


def size(lo: int = 0, hi: int = 2**62) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        n = parse_size(v)
        if not lo <= n <= hi:
            raise ConfigError(f"{n} bytes is not between {lo} and {hi}")
        return n
    return parse


def duration(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        s = parse_duration(v)
        if not lo <= s <= hi:
            raise ConfigError(f"{s} s is not between {lo} and {hi} seconds")
        return s
    return parse


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in allowed:
            raise ConfigError(f"{v!r} is not one of {', '.join(allowed)}")
        return s
    return parse


def optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``None`` / ``''`` stay None; anything else goes through ``inner``."""
    def parse(v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return inner(v)
    return parse


def text(v: Any) -> str | None:
    return None if v is None else str(v)


def octal_mode(v: Any) -> int:
    s = str(v).strip()
    if not re.fullmatch(r"0?[0-7]{3}", s):
        raise ConfigError(f"invalid file mode {v!r} (use e.g. 600 or 640)")
    return int(s, 8)


# -- parsing ---------------------------------------------------------------------------

def parse_options(spec: Iterable[Option], raw: Mapping[str, Any], *, what: str) -> Options:
    """Parse ``raw`` against ``spec`` (unknown names are an error); defaults filled in."""
    spec = tuple(spec)
    names = {o.name for o in spec}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) for {what}: {', '.join(unknown)} "
                          f"(known: {', '.join(o.name for o in spec) or 'none'})")
    out: dict[str, Any] = {}
    for o in spec:
        if o.name in raw:
            try:
                out[o.name] = o.parse(raw[o.name])
            except ConfigError as exc:
                raise ConfigError(f"option {o.name} of {what}: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"option {o.name}={raw[o.name]!r} of {what}: {exc}") from None
        else:
            out[o.name] = o.default
    return Options(out)


def split_options(raw: Mapping[str, Any], wrapper_spec: Iterable[Option],
                  link_spec: Iterable[Option], *, scheme: str | None) -> tuple[Options, Options]:
    """Split merged URL-query + keyword options into (wrapper options, link options).

    Each name belongs to exactly one owner; an unknown name raises ``ConfigError``
    naming the link's options and the wrapper's options.
    """
    wrapper_spec, link_spec = tuple(wrapper_spec), tuple(link_spec)
    wnames = {o.name for o in wrapper_spec}
    lnames = {o.name for o in link_spec}
    unknown = sorted(set(raw) - wnames - lnames)
    if unknown:
        where = f"{scheme}://" if scheme else "transport 'inband'"
        raise ConfigError(
            f"unknown option(s) for {where}: {', '.join(unknown)} "
            f"(link options: {', '.join(o.name for o in link_spec) or 'none'}; "
            f"wrapper options: {', '.join(o.name for o in wrapper_spec)})")
    w = parse_options(wrapper_spec, {k: v for k, v in raw.items() if k in wnames},
                      what="offload()")
    link = parse_options(link_spec, {k: v for k, v in raw.items() if k in lnames},
                         what=f"the {scheme}:// link")
    return w, link


def markdown_table(spec: Iterable[Option]) -> str:
    """The docs' option table for ``spec`` (name | default | meaning)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for o in spec:
        rows.append(f"| `{o.name}` | `{o.default_text()}` | {o.doc} |")
    return "\n".join(rows)


# -- the transport URL -------------------------------------------------------------------

#: transport values meaning "no link: payloads stay in Flower's messages"
INBAND = frozenset({"inband", "in-band", "none", ""})


@dataclass(frozen=True)
class TransportSpec:
    """A transport URL and its options, parsed ONCE (:func:`parse_transport`) where the
    user gives them (``offload()``, ``offload_grid()``, ``flwr-transports cleanup``);
    everything downstream (the wrapper, the link, a second wrapper for a strategy with
    its own loop) receives this value, never the raw string.

    ``host``/``port`` are the URL's authority read as ``host:port`` (``None`` where
    there is none); ``wrapper`` and ``link`` the typed options of each owner, with
    defaults filled in; ``given`` the option names set explicitly (URL or keyword),
    ``keywords`` those given as keywords (they win over the URL's)."""

    url: str
    scheme: str | None
    netloc: str = ""
    path: str = ""
    fragment: str = ""
    host: str | None = None
    port: int | None = None
    query: Mapping[str, str] = field(default_factory=dict)
    wrapper: Options = field(default_factory=lambda: Options({}))
    link: Options = field(default_factory=lambda: Options({}))
    given: frozenset[str] = frozenset()
    keywords: Mapping[str, Any] = field(default_factory=dict)

    @property
    def inband(self) -> bool:
        return self.scheme is None

    def __str__(self) -> str:  # the URL as given (logs, messages, older link code)
        return self.url

    def source(self, name: str) -> str:
        """Where an option's value came from: ``keyword``, ``url`` or ``default``."""
        if name in self.keywords:
            return "keyword"
        return "url" if name in self.query else "default"

    def describe(self) -> str:
        """One log line: every option set explicitly, and where it was set."""
        parts = [f"{n}={v!r} ({self.source(n)})" for owner in (self.wrapper, self.link)
                 for n, v in owner.items() if n in self.given]
        return ", ".join(parts) or "defaults only"


def split_transport(url: str) -> TransportSpec:
    """THE one place a transport URL is split: scheme, authority, path, query (options
    not parsed yet; :func:`parse_transport` does that). ``inband`` and its aliases give
    ``scheme=None``."""
    from urllib.parse import parse_qsl, urlsplit

    url = (url or "inband").strip()
    if url.lower() in INBAND:
        return TransportSpec(url=url, scheme=None)
    u = urlsplit(url)
    if not u.scheme:
        raise ConfigError(f"transport {url!r} is not a URL (e.g. 'shm://', 'tcp://host:0', "
                          "'s3://bucket/prefix') and not 'inband'")
    try:
        port = u.port
    except ValueError:
        raise ConfigError(f"transport URL {url!r} has an invalid port") from None
    query = dict(parse_qsl(u.query, keep_blank_values=True))
    return TransportSpec(url=url, scheme=u.scheme.lower(), netloc=u.netloc, path=u.path,
                         fragment=u.fragment, host=u.hostname, port=port, query=query)


def parse_transport(url: str | TransportSpec, *, wrapper_spec: Iterable[Option] = (),
                    link_spec: Iterable[Option] | Callable[[str], Iterable[Option]] = (),
                    keywords: Mapping[str, Any] | None = None) -> TransportSpec:
    """Split ``url`` and parse its query merged with ``keywords`` (keywords win) against
    the wrapper's and the link's declared options: one owner per name, an unknown name
    is a ``ConfigError`` naming both lists. ``link_spec``: the link's options, or a
    function of the scheme that returns them (the link registry)."""
    base = url if isinstance(url, TransportSpec) else split_transport(url)
    kw = dict(keywords or {})
    raw = {**base.query, **kw} if base.scheme else dict(kw)
    lspec = (tuple(link_spec(base.scheme)) if callable(link_spec) else tuple(link_spec)
             ) if base.scheme else ()
    wopts, lopts = split_options(raw, wrapper_spec, lspec, scheme=base.scheme)
    return TransportSpec(
        url=base.url, scheme=base.scheme, netloc=base.netloc, path=base.path,
        fragment=base.fragment, host=base.host, port=base.port, query=dict(base.query),
        wrapper=wopts, link=lopts, given=frozenset(raw), keywords=kw)

