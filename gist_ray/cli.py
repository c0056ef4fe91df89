"""The ``gist-ray`` command line: ``train``, ``cache-guide``, ``mine``, ``init``, ``config``,
``eval``, ``doctor``.

The terminal shows gist-ray's own lines (the ``gist_ray`` logger; for ``eval`` on stderr) and a
command's result on stdout. ``train``, ``cache-guide`` and ``mine`` send everything else (Ray,
MLflow, transformers, datasets) to ``<output_dir>/gist-ray.log``, shown live with ``--verbose``;
its path is printed at the end and with an error.

Exit status: 0 success; 1 an unexpected error (the traceback is in the log, or shown with
``--debug``) or a failed ``doctor`` check; 2 a user error (bad config, data, model or cluster:
one line saying what to change; also a bad command line); 130 interrupted (Ctrl-C, SIGINT); 141
the output pipe was closed; 143 terminated (SIGTERM: a scheduler, ``ray job stop``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from gist_ray.core import log
from gist_ray.core.errors import ConfigError, GistRayError, Interrupted

_log = logging.getLogger(__name__)
EXIT_OK, EXIT_ERROR, EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141
# Shown with the version: what a bug report needs.
VERSIONS_OF = ("ray", "torch", "transformers", "sentence-transformers", "mlflow", "datasets")


def version_text() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {of(name)}" for name in VERSIONS_OF)
    return f"gist-ray {of('gist-ray')} (Python {platform.python_version()}; {deps})"


class _Version(argparse.Action):
    """--version, computed only when asked for (it reads several packages' metadata)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


class _Poolings:
    """gist_ray.config.POOLINGS, imported when --pooling is given: importing it (torch) would
    cost every command, --help and --version included, seconds."""

    def _values(self) -> tuple[str, ...]:
        from gist_ray.config import POOLINGS

        return tuple(POOLINGS)

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self):
        return iter(self._values())


def _add_common_args(p: argparse.ArgumentParser, top: bool = False, verbose: bool = True) -> None:
    """--debug, and --verbose where there is a log file to show, before or after the command
    (``gist-ray -v train`` or ``gist-ray train -v``)."""
    default = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors", **default
    )
    if verbose:
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="train, cache-guide: also show the output of Ray, MLflow and the libraries "
            "live (it is always in <output_dir>/gist-ray.log)",
            **default,
        )


def _add_config_args(p: argparse.ArgumentParser, verbose: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-5 (repeatable)",
    )
    _add_common_args(p, verbose=verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gist-ray",
        description="Fine-tune text-embedding models with the GISTEmbed loss on Ray.",
    )
    parser.add_argument("--version", action=_Version)
    _add_common_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser(
        "init",
        help="write a commented starter config for your own training data",
        description="Inspect a data file (.csv, .json, .jsonl, .parquet or a save_to_disk "
        "folder), map its columns to anchor / positive / negative, and write a commented "
        "starter config. By default it also holds out a share of the queries (by anchor: no "
        "anchor in both halves) as a BEIR eval folder next to the config, writes the rest as "
        "the training file, and points eval.source at the folder, so training reports "
        "retrieval before and after on queries it never saw.",
    )
    init.add_argument("data", help="your training data")
    init.add_argument(
        "-o", "--output", default="gist-ray.yaml", help="the file to write (default: %(default)s)"
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing config file (and the held-out files init writes)",
    )
    init.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        metavar="F",
        help="share of the distinct anchors to hold out for eval, 0 to 0.5 (default: 0.1, at "
        "most 1,000 anchors; no split below 20 distinct anchors); 0 = no held-out set: train "
        "on the file as it is, eval off",
    )
    init.add_argument(
        "--seed", type=int, default=0, help="which anchors are held out (default: %(default)s)"
    )
    _add_common_args(init, verbose=False)
    train = sub.add_parser(
        "train",
        help="fine-tune a student with a guide (no --config: the offline demo, ~13 min on CPU)",
        description="Fine-tune the student embedding model with the GISTEmbed loss: the frozen "
        "guide masks likely false negatives out of each global batch. Runs on Ray workers "
        "(a local cluster unless ray.address or RAY_ADDRESS names one), tracks the run in "
        "MLflow, evaluates before and after on eval.source, and writes the model to "
        "<output_dir>/model. Without --config it runs the offline demo: all-MiniLM-L6-v2 "
        "guided by all-mpnet-base-v2 on 1,024 InsuranceQA rows with 2 CPU workers, about 13 "
        "minutes on a 2-core CPU machine the first time (most of it building the guide "
        "cache), less once the cache exists. Start your own with: gist-ray init DATA.",
    )
    _add_config_args(train)
    train.add_argument(
        "--fresh",
        action="store_true",
        help="start over from step 0: remove the checkpoints of the run in output_dir (by "
        "default a rerun resumes it); its MLflow run stays",
    )
    cache = sub.add_parser(
        "cache-guide",
        help="embed every training text with the guide once (sharded on Ray)",
        description="Build the guide cache: every unique training text embedded once by the "
        "guide, as a Ray Data job, fingerprinted and stored beside the data (or in "
        "data.guide_cache_dir). `train` builds it itself when it is missing; this builds it "
        "ahead of training.",
    )
    _add_config_args(cache)
    _add_mine_parser(sub)
    cfg = sub.add_parser(
        "config",
        help="print the resolved config as YAML",
        description="Print the configuration a command would run with: the defaults, then "
        "--config, then every --set, checked. Without --config: the demo's.",
    )
    _add_config_args(cfg, verbose=False)
    _add_eval_parser(sub)
    _add_doctor_parser(sub)
    return parser


def _add_doctor_parser(sub) -> None:
    doc = sub.add_parser(
        "doctor",
        help="check this machine (or every GPU node of a Ray cluster) before a long job",
        description="Check that the loss works on this hardware before a long job: versions, "
        "GPUs, the Triton kernel's tile plans for the config's dtypes, Matryoshka widths and "
        "hardness, each against the reference loss (forward and backward, on a small size and "
        "on sizes that cross the kernel's column splits and backward chunks), a speed figure "
        "on each GPU, and with two or more GPUs the all-gather against one process. Without "
        "CUDA it checks the chunked backend and says that the kernel was not checked. Exit "
        "status 1 when a check fails.",
    )
    _add_config_args(doc, verbose=False)
    doc.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    doc.add_argument(
        "--address",
        metavar="ADDR",
        help="a Ray cluster (HOST:6379, ray://HOST:10001 or auto): check every GPU node of it "
        "(every node on a cluster without GPUs), one table per node",
    )
    doc.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="processes of the all-gather check (default: one per GPU with two or more GPUs, "
        "else none); on a machine without CUDA, N gloo processes; 0 skips it",
    )
    doc.add_argument("--no-speed", action="store_true", help="skip the speed figure on GPUs")
    doc.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="--address: how long to wait for the nodes' checks (default: %(default)g)",
    )


def _add_mine_parser(sub) -> None:
    mine = sub.add_parser(
        "mine",
        help="mine k hard negatives per row with the (cached) guide; writes negative_1..k",
        description="Mine hard negatives for data.train with the guide's cached embeddings: "
        "the k most similar positives of other anchors that score below mine.perc x the "
        "row's own positive (or below it - mine.margin). The output is a training file.",
    )
    _add_config_args(mine)
    mine.add_argument("--k", type=int, metavar="K", help="negatives per row (mine.k)")
    mine.add_argument("--out", metavar="PATH", help="output file (mine.output)")


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
    ev.add_argument(
        "--pooling",
        choices=_Poolings(),
        metavar="POOLING",
        help="mean, cls, last_token, max, mean_sqrt_len_tokens or weightedmean; "
        "default: the model's own",
    )
    ev.add_argument("--max-seq-length", type=int, help="tokens; default: the model's own or 128")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda")
    ev.add_argument("--seed", type=int, default=0, help="query and corpus sampling seed")
    ev.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=[],
        metavar="W",
        help="Matryoshka widths: retrieval also on the embeddings truncated to each",
    )
    ev.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    _add_common_args(ev, verbose=False)


def _cmd_eval(args: argparse.Namespace) -> int:
    from gist_ray.commands.eval import evaluate
    from gist_ray.core import storage
    from gist_ray.launch.paths import check_locations

    for name in ("max_queries", "max_corpus", "batch_size", "max_seq_length"):
        value = getattr(args, name)
        if value is not None and value < (1 if name in ("batch_size", "max_seq_length") else 0):
            raise ConfigError(f"--{name.replace('_', '-')} = {value} is not allowed")
    if any(w < 1 for w in args.dims):
        raise ConfigError(f"--dims {' '.join(map(str, args.dims))}: widths must be >= 1")
    reads = {"model": args.model, "--compare": args.compare, "--data": args.data}
    found = [(key, value, False) for key, value in {**reads, "--sts": args.sts}.items()]
    if args.output:  # a file: its folder is probed (a probe object under it makes it a folder)
        found.append(("--output", storage.parent(args.output), True))
    check_locations(found)
    options = ("compare", "data", "split", "sts", "max_queries", "max_corpus", "pooling")
    options += ("max_seq_length", "batch_size", "device", "seed", "output", "dims")
    evaluate(args.model, **{k: getattr(args, k) for k in options})
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from gist_ray.commands.doctor import doctor
    from gist_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout:g}: must be > 0")
    return doctor(cfg, address=args.address, json_path=args.json, processes=args.processes,
                  speed=not args.no_speed, timeout=args.timeout)  # fmt: skip


def _cmd_config(args: argparse.Namespace) -> int:
    from gist_ray.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from gist_ray.commands.init import write_starter
    from gist_ray.data.heldout import DEFAULT_FRACTION
    from gist_ray.launch.paths import check_locations

    fraction = DEFAULT_FRACTION if args.eval_fraction is None else args.eval_fraction
    check_locations([("data", args.data, False)])
    done = write_starter(args.data, args.output, args.force, fraction, args.seed)
    print(f"wrote {done.path} for {args.data} ({done.rows:,} rows):")
    roles = done.mapping.roles
    width, cwidth = max(map(len, roles)), max(map(len, roles.values()))
    for role, column in roles.items():
        print(f"  {role:<{width}} <- {column:<{cwidth}}  {done.mapping.why[role]}")
    if done.mapping.unused:
        print(f"  not used: {', '.join(done.mapping.unused)}")
    held = done.held
    if held is not None and held.eval_path is not None:
        split = held.split
        print(
            f"  held out: {split.eval_anchors:,} of {split.anchors:,} distinct anchors "
            f"({len(split.eval_rows):,} rows) as {held.eval_path} (BEIR: {held.queries:,} "
            f"queries, {held.documents:,} documents), eval.source; no anchor in both halves"
        )
        print(f"  training: the other {len(split.train_rows):,} rows as {held.train_path}")
    elif held is not None and held.split.skipped:
        print(f"  no held-out set: {held.split.skipped}; eval is off")
    if done.problem:
        _log.warning("training would refuse the data as it is: %s", done.problem)
    print(f"next: check {done.path}, then  gist-ray train --config {done.path}")
    return 0


def _open_log(cfg, args: argparse.Namespace) -> str | Path:
    """The command's log file in the output folder, announced with what is being run. First
    every storage location the command uses is checked (the log may go to one of them)."""
    from gist_ray.launch.paths import check_command, check_job_paths

    check_job_paths(cfg, "")  # not in a Ray job's doomed working dir (run.py checks the rest)
    check_command(cfg, args.command)
    try:
        path = log.start_log_file(cfg.output_dir, args.verbose, f"gist-ray {args.command}")
    except OSError as e:
        raise ConfigError(
            f"output_dir = {cfg.output_dir!r}: cannot write {log.LOG_NAME} there "
            f"({e.strerror or e})"
        ) from e
    m = cfg.model
    if args.command == "mine":
        _log.info("mining hard negatives for %s with guide %s", cfg.data.train, m.guide)
    else:
        _log.info(
            "loading student %s, guide %s and data %s (%d %s worker(s))",
            m.student,
            m.guide,
            cfg.data.train,
            cfg.ray.num_workers,
            "GPU" if cfg.ray.use_gpu else "CPU",
        )
    where = log.log_location() or path
    _log.info("full log: %s%s", where, "" if args.verbose else " (--verbose shows it here)")
    return where


def _cmd_train(args: argparse.Namespace) -> int:
    from gist_ray.commands.train import train

    return _logged(args, lambda cfg: train(cfg, fresh=args.fresh))


def _cmd_cache_guide(args: argparse.Namespace) -> int:
    from gist_ray.commands.train import cache_guide

    return _logged(args, cache_guide)


def _cmd_mine(args: argparse.Namespace) -> int:
    from gist_ray.commands.mine import mine, print_summaries

    # --k / --out are shorthands for --set, applied last so they win
    args.overrides += [f"mine.k={args.k}"] if args.k is not None else []
    args.overrides += [f"mine.output={args.out}"] if args.out is not None else []
    return _logged(args, lambda cfg: print_summaries(mine(cfg), cfg, args.config))


def _logged(args: argparse.Namespace, command) -> int:
    """Run a command on Ray with its log file open; the log's path ends the output."""
    from gist_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    _SIGNALLED.clear()
    signal.signal(signal.SIGTERM, _terminate)  # a scheduler's stop: an interrupt, not a kill
    path = _open_log(cfg, args)
    command(cfg)
    log.console.end_status()
    print(f"full log:    {path}")
    return 0


_SIGNALLED: list[int] = []  # the termination signal received (Ray's ray.get re-raises what a
# signal handler raised as a plain KeyboardInterrupt, losing which signal it was)


def _terminate(signum: int, frame) -> None:
    _SIGNALLED.append(signum)
    raise Interrupted(signum=signum)


def _one_line(e: BaseException) -> str:
    """An unexpected error in one line: its type, where (a Ray worker), its first line."""
    text = str(e).strip()
    where = getattr(e, "gist_ray_origin", None)
    return f"{type(e).__name__}{f' on {where}' if where else ''}: " + (
        text.splitlines()[0] if text else "(no message)"
    )


def _report(message: str, debug_hint: bool) -> None:
    """The error line on the terminal's stderr, naming the log when there is one."""
    path = log.log_location()
    if path is not None:
        message += f" (full log: {path})"
    elif debug_hint:
        message += " (rerun with --debug for the traceback)"
    log.to_file(message)
    log.console.end_status()
    log.console.line(message, "stderr")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # eval prints its table on stdout: its progress goes to stderr, out of a pipe's way.
    log.configure(stream="stderr" if args.command == "eval" else "stdout")
    handlers = {
        "train": _cmd_train,
        "cache-guide": _cmd_cache_guide,
        "mine": _cmd_mine,
        "init": _cmd_init,
        "config": _cmd_config,
        "eval": _cmd_eval,
        "doctor": _cmd_doctor,
    }
    try:
        return handlers[args.command](args)
    except GistRayError as e:
        log.to_file(traceback.format_exc())
        if args.debug:
            raise
        _report(f"gist-ray: error: {e}", debug_hint=False)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        log.to_file(traceback.format_exc())
        _report(f"gist-ray: {str(e) or 'interrupted'}", debug_hint=False)
        signum = getattr(e, "signum", None) or (_SIGNALLED or [signal.SIGINT])[-1]
        return 128 + signum
    except BrokenPipeError:
        # The reader went away (`gist-ray eval ... | head`): stop quietly, as `cat` would.
        # Python's last flush of stdout at exit would fail again and print a traceback.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (an embedding caller's)
            pass
        return EXIT_PIPE
    except Exception as e:  # noqa: BLE001 - one line for users, traceback with --debug
        log.to_file(traceback.format_exc())
        if args.debug:
            raise
        _report(f"gist-ray: error: {_one_line(e)}", debug_hint=True)
        return EXIT_ERROR
    finally:
        if log.log_file() is not None:
            from gist_ray.launch import cluster

            try:
                cluster.shutdown()  # Ray's last words go to the log, not the terminal
            finally:
                log.stop_log_file()


if __name__ == "__main__":
    sys.exit(main())
