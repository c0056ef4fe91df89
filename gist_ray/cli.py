"""The ``gist-ray`` command line: ``train``, ``config``.

User errors print as one line (``gist-ray: error: ...``) and exit 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gist_ray.errors import GistRayError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-5 (repeatable)",
    )
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gist-ray",
        description="Fine-tune text-embedding models with the GISTEmbed loss on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a student with a guide (default: offline demo)")
    _add_config_args(train)
    cfg = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(cfg)
    return parser


def _cmd_config(args: argparse.Namespace) -> int:
    from gist_ray.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gist_ray.config import load_config
    from gist_ray.run import train

    train(load_config(args.config, args.overrides))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": _cmd_train, "config": _cmd_config}
    try:
        return handlers[args.command](args)
    except GistRayError as e:
        if args.debug:
            raise
        print(f"gist-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gist-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users, traceback with --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"gist-ray: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
