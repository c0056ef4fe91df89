"""The ``gist-ray`` command line: ``train``, ``cache-guide``, ``config``, ``eval``.

Progress lines come from the ``gist_ray`` logger (configured here, once); results go to stdout.
User errors print as one line (``gist-ray: error: ...``) and exit 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gist_ray import log
from gist_ray.errors import GistRayError
from gist_ray.models import POOLINGS


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
    cache = sub.add_parser(
        "cache-guide", help="embed every training text with the guide once (sharded on Ray)"
    )
    _add_config_args(cache)
    cfg = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(cfg)
    _add_eval_parser(sub)
    return parser


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="retrieval (nDCG, recall, MRR, MAP) and STS metrics of a model; --compare another",
        description="Evaluate a model (path, hub name or alias: minilm, mpnet). Without --data "
        "and --sts, retrieval runs on the built-in insuranceqa test split.",
    )
    ev.add_argument("model", help="model folder, hub name or built-in alias")
    ev.add_argument("--compare", metavar="MODEL", help="a second model, shown side by side")
    ev.add_argument(
        "--data",
        metavar="SOURCE",
        help="retrieval set: 'insuranceqa' or a BEIR folder (queries.jsonl, corpus.jsonl, "
        "qrels/<split>.tsv or qrels.tsv)",
    )
    ev.add_argument("--split", default="test", help="qrels split (default: test)")
    ev.add_argument(
        "--sts", metavar="FILE", help="scored pairs (.csv/.tsv/.jsonl: sentence1, sentence2, score)"
    )
    ev.add_argument("--max-queries", type=int, default=200, help="0 = all (default: 200)")
    ev.add_argument("--max-corpus", type=int, default=2000, help="0 = all (default: 2000)")
    ev.add_argument("--pooling", choices=POOLINGS, help="default: the model's own")
    ev.add_argument("--max-seq-length", type=int, help="tokens; default: the model's own or 128")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda")
    ev.add_argument("--seed", type=int, default=0, help="query and corpus sampling seed")
    ev.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    ev.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    from gist_ray.errors import ConfigError
    from gist_ray.eval.command import evaluate

    for name in ("max_queries", "max_corpus", "batch_size", "max_seq_length"):
        value = getattr(args, name)
        if value is not None and value < (1 if name in ("batch_size", "max_seq_length") else 0):
            raise ConfigError(f"--{name.replace('_', '-')} = {value} is not allowed")
    options = ("compare", "data", "split", "sts", "max_queries", "max_corpus", "pooling")
    options += ("max_seq_length", "batch_size", "device", "seed", "output")
    evaluate(args.model, **{k: getattr(args, k) for k in options})
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from gist_ray.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gist_ray.config import load_config
    from gist_ray.run import train

    train(load_config(args.config, args.overrides))
    return 0


def _cmd_cache_guide(args: argparse.Namespace) -> int:
    from gist_ray.config import load_config
    from gist_ray.run import cache_guide

    cache_guide(load_config(args.config, args.overrides))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # eval prints its table on stdout: its progress goes to stderr, out of a pipe's way.
    log.configure(stream="stderr" if args.command == "eval" else "stdout")
    handlers = {
        "train": _cmd_train,
        "cache-guide": _cmd_cache_guide,
        "config": _cmd_config,
        "eval": _cmd_eval,
    }
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
