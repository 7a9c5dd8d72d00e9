"""The ``flwr-transports`` command line.

Each subcommand lives in its own module and is imported only when used, so optional
dependencies stay optional.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help). The module exposes ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flwr_transports.demo", "run a local Flower deployment in-band and over each link"),
    "cleanup": ("flwr_transports.cleanup", "remove payloads left behind by crashed runs"),
    "doctor": ("flwr_transports.doctor", "report which links can run on this machine"),
    "inspect": ("flwr_transports.inspect", "show the arrays inside a payload file"),
    "mpi": ("flwr_transports.mpi.launcher", "run a Flower app under mpiexec"),
}

# commands that left this package: the message says where they are now
MOVED: dict[str, str] = {
    "bench": (
        "the benchmark harness is no longer part of the flwr-transports package.\n"
        "From a clone of the repository:\n"
        "    pip install -e benchmarks      # the ftx-bench package (benchmarks/pyproject.toml)\n"
        "    ftx-bench {args}\n"
        "(scripts/test.sh installs it; see docs/benchmarks.md)"
    ),
}


def _usage() -> str:
    lines = ["usage: flwr-transports COMMAND [ARGS...]", "", "commands:"]
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<9} {help_}")
    lines.append("")
    lines.append("Run 'flwr-transports COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from . import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in MOVED:
        args = " ".join(rest) if rest else "p2p|e2e|wan|plot|flood ..."
        print(f"flwr-transports {cmd}: " + MOVED[cmd].format(args=args), file=sys.stderr)
        return 2
    if cmd not in COMMANDS:
        print(f"flwr-transports: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
