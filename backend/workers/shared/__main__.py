"""Command line of the shared package: ``python -m backend.workers.shared check``."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigurationError, WorkerConfig


def check(*, backend: bool = True) -> int:
    """Print the effective configuration (secrets masked); 0 when valid, 2 when not.

    ``backend=False`` (``--no-backend``) validates the configuration only.
    """
    try:
        config = WorkerConfig()
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(config.public_settings(), indent=2, default=str))
    print("configuration OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch the sub-command named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m backend.workers.shared")
    sub = parser.add_subparsers(dest="command", required=True)
    check_parser = sub.add_parser(
        "check", help="validate the configuration and print it, secrets masked"
    )
    check_parser.add_argument(
        "--no-backend", action="store_true", help="skip the backend connectivity check"
    )
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(backend=not args.no_backend)
    return 2


if __name__ == "__main__":
    sys.exit(main())
