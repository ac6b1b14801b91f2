"""``anylens run EXPERIMENT ...``: a sweep from the command line.

Self-contained: the main command line adds it with :func:`add_run_parser` (or, through
``module_command``, with :func:`add_arguments` and :func:`run`). Exit status: 0 when the sweep
finished, 2 when it was refused (a changed configuration, bad arguments, a model that does not
load), 130 when interrupted; finished chunks stay on disk in every case.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

HELP = "run one experiment over many models and prompts, resumably, into a directory"


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to an ``add_subparsers()`` object; it dispatches to :func:`run_cli`."""
    parser = subparsers.add_parser("run", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(run=run_cli)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .experiments import EXPERIMENTS, METRIC_FIELDS
    from .runner import DATASETS

    parser.add_argument(
        "experiment", metavar="EXPERIMENT", choices=sorted(EXPERIMENTS), help=f"one of: {', '.join(EXPERIMENTS)}"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="MODEL",
        help="model sources, loaded one at a time: zoo:NAME, tiny:FAMILY, a named source, a model directory",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=DATASETS, help="generate prompt pairs for each model's tokenizer")
    source.add_argument(
        "--prompts",
        metavar="FILE",
        type=Path,
        help="prompts from a file: .json (a list of strings or of pairs) or text, one per line, "
        "pairs as tab-separated clean, corrupt[, answer[, distractor]]",
    )
    parser.add_argument("--n", type=int, metavar="N", help="number of prompts (ioi default 50; factual: all)")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="sweep directory (rerun into it to resume)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=8, metavar="K", help="prompts per chunk written to disk (default 8)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the sweep already in --out (its manifest and chunks) and start over, instead of resuming it",
    )
    parser.add_argument(
        "--metric", choices=sorted(METRIC_FIELDS), help="metric built per prompt from its answer/distractor"
    )
    parser.add_argument("--role", help="role to patch, ablate or read (e.g. resid_pre, z)")
    parser.add_argument(
        "--over", metavar="DIMS", help="comma-separated dimensions to sweep, e.g. layer,pos or layer,head"
    )
    parser.add_argument("--method", help="ablation method: zero, mean or resample")
    parser.add_argument("--corruption", help="IOI corruption: swap_subject or random_names")
    parser.add_argument("--device", help="device to run on (e.g. cuda); default: where the model loads")
    parser.add_argument("--dtype", default="float32", help="weights dtype (default float32)")
    parser.add_argument(
        "--memory-budget",
        type=parse_size,
        metavar="SIZE",
        help="memory for the batched runs of patch and ablate, e.g. 512MiB or 4GB (default: fixed for the machine)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="settings",
        help="any other experiment option; VALUE is read as JSON when it parses, else as a string (repeatable)",
    )


class _ArgumentError(Exception):
    pass


def experiment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments the command line gives the experiment."""
    options: dict[str, Any] = {}
    if args.metric:
        options["metric"] = args.metric
    if args.role:
        options["role"] = args.role
    if args.over:
        options["over"] = [d.strip() for d in args.over.split(",") if d.strip()]
    if args.method:
        options["method"] = args.method
    if getattr(args, "memory_budget", None) is not None:
        options["memory_budget"] = args.memory_budget
    for setting in args.settings:
        key, sep, text = setting.partition("=")
        if not sep or not key.strip():
            raise _ArgumentError(f"--set {setting!r}: write KEY=VALUE")
        try:
            options[key.strip()] = json.loads(text)
        except ValueError:
            options[key.strip()] = text
    return options


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``"512MiB"``, ``"4GB"``, ``"1.5gib"`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 512MiB, 4GB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the memory budget must be positive")
    return size


def read_prompts(path: Path) -> list[Any]:
    """Prompts or pairs from a ``.json`` list or a text file (tab-separated fields for pairs)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise _ArgumentError(f"cannot read --prompts {path}: {error}") from None
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as error:
            raise _ArgumentError(f"--prompts {path} is not valid JSON: {error}") from None
        if not isinstance(prompts, list):
            raise _ArgumentError(f"--prompts {path} must hold a JSON list of prompts or pairs")
    else:
        lines = [line.rstrip("\r\n") for line in text.splitlines()]
        prompts = [tuple(line.split("\t")) if "\t" in line else line for line in lines if line.strip()]
    if not prompts:
        raise _ArgumentError(f"--prompts {path} holds no prompts: write one prompt per line, or a JSON list")
    return prompts


def run_cli(args: argparse.Namespace) -> int:
    """Run the sweep the parsed arguments describe; print a summary; return the exit status."""
    from ..core.errors import AnylensError
    from .runner import run as run_sweep

    try:
        if args.n is not None and args.n < 1:
            raise _ArgumentError(f"--n {args.n}: give a positive number of prompts, or leave --n out to take them all")
        options = experiment_options(args)
        prompts = read_prompts(args.prompts) if args.prompts is not None else None
        dataset_options = {"corruption": args.corruption} if args.corruption else {}
        if dataset_options and args.dataset != "ioi":
            raise _ArgumentError("--corruption applies to --dataset ioi only")
        result = run_sweep(
            args.experiment,
            args.models,
            prompts,
            dataset=args.dataset,
            n=args.n,
            dataset_options=dataset_options,
            out=args.out,
            chunk_size=args.chunk_size,
            quiet=args.quiet,
            dtype=args.dtype,
            device=args.device,
            fresh=getattr(args, "fresh", False),
            **options,
        )
    except (_ArgumentError, AnylensError) as error:
        print(f"anylens run: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            f"anylens run: interrupted; finished chunks are kept in {args.out}: rerun the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    frame = result.frame
    print(
        f"{result.experiment}: {len(result.models)} models, {len(result.computed)} chunks computed, "
        f"{len(result.skipped)} already done, {len(result.recomputed)} recomputed; {len(frame)} rows in {args.out}"
    )
    return EXIT_OK


#: ``module_command("anylens.sweep.cli", ...)`` looks for ``add_arguments`` and ``run``.
run = run_cli

__all__ = ["add_arguments", "add_run_parser", "experiment_options", "parse_size", "read_prompts", "run", "run_cli"]
