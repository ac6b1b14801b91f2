"""Which transformers causal-LM architectures anylens serves, measured on tiny random instances.

For every class in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this script builds a tiny
random model from the config class (see ``anylens.tiny.arch``), then records one status:

* ``hand``: a registered hand-written adapter claims it and ``anylens check`` passes;
* ``hand-failing``: a hand-written adapter claims it but an invariant fails;
* ``inferred``: no adapter claims it; the inferred adapter passes every invariant;
* ``inferred-failing``: inference placed the pieces but every candidate failed an invariant;
* ``not-inferable``: the structure defeats inference (the reason is recorded);
* ``not-built``: no tiny instance builds and runs on this CPU (encoder-decoder, extra inputs,
  custom kernels, configs that reject shrinking, over the time box).

It writes ``docs/coverage.md``. Run it from the repository root:

    python benchmarks/coverage.py                 # everything (about 10-15 minutes on 2 cores)
    python benchmarks/coverage.py --only Qwen3ForCausalLM OlmoForCausalLM --out /tmp/c.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVED = ("hand", "inferred")


@dataclass
class Row:
    architecture: str
    model_types: list[str]
    status: str = "not-built"
    roles: list[str] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0


class TimeBox(BaseException):
    """Raised by the alarm; a BaseException so that no library code swallows it as an error."""


def _alarm(signum, frame):
    raise TimeBox()


def _one_line(text: object, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def measure(task: tuple[str, list[str], int]) -> Row:
    """Build, resolve and check one architecture, inside the time box."""
    name, model_types, box = task
    row = Row(name, model_types)
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(box)
    try:
        _measure(row)
    except TimeBox:
        if row.status == "not-built":
            row.note = f"building or running it tiny takes over {box} s on this CPU"
        else:  # built, but resolving and checking it did not finish: not served
            row.status = "not-inferable" if row.status == "building" else row.status
            row.note = f"inference and check did not finish within the {box} s time box"
    except Exception as error:  # a crash is recorded, never fatal for the run
        row.note = _one_line(f"{type(error).__name__}: {error}")
    finally:
        signal.alarm(0)
    row.seconds = round(time.perf_counter() - started, 1)
    return row


def _measure(row: Row) -> None:
    import anylens as al
    from anylens.inference.infer import infer_outcome
    from anylens.tiny import tiny_tokenizer
    from anylens.tiny.arch import TinyBuildError, tiny_model

    try:
        model = tiny_model(row.architecture)
    except TinyBuildError as error:
        row.note = _one_line(str(error).removeprefix(f"cannot build a tiny {row.architecture}: "))
        return
    row.status, row.note = "building", "built"
    claim = al.registry().claims.get(row.architecture)
    if claim is not None:
        wrapped = al.wrap(model, tiny_tokenizer(), adapter=claim.adapter)
        report = al.check(wrapped)
        row.roles = list(wrapped.roles)
        row.status = "hand" if report.passed else "hand-failing"
        row.note = f"adapter {claim.adapter.name}"
        if not report.passed:
            row.note += f"; fails {report.failures[0].invariant}"
        return
    outcome = infer_outcome(model)
    if outcome.spec is not None:
        row.status, row.roles = "inferred", list(outcome.spec.roles)
        row.note = _one_line("; ".join(_short_notes(outcome.anatomy.notes)))
    elif outcome.anatomy is None or not outcome.attempts:
        row.status = "not-inferable"
        row.note = _one_line(str(outcome.error).split("\n")[0].split(": ", 1)[-1])
    else:
        row.status = "inferred-failing"
        failure = next((f for a in outcome.attempts for f in a.failures), "")
        row.note = _one_line(f"fails {failure}")


def _short_notes(notes: list[str]) -> list[str]:
    """The first clause of each inference note (what is absent and why)."""
    return [note.split(" (")[0].split("; ")[0] for note in notes]


# -- running ---------------------------------------------------------------------------------
def _prepare() -> None:
    """Import and build everything shared once, before forking: each task then forks a fresh,
    already-warm process, so that one architecture's side effects never reach another's run."""
    import torch
    from transformers.utils import logging

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.set_verbosity_error()
    torch.set_num_threads(1)

    import nnsight.modeling.transformers  # noqa: F401

    import anylens as al
    import anylens.inference.infer
    from anylens.tiny import tiny_tokenizer

    al.registry()
    tiny_tokenizer()
    # one whole inference, so that lazy imports and first-use set-up happen once, here
    from anylens.inference.infer import infer_outcome
    from anylens.tiny.arch import tiny_model

    infer_outcome(tiny_model("LlamaForCausalLM"))


def _worker_init() -> None:
    warnings.filterwarnings("ignore")


def run_all(tasks: list[tuple[str, list[str], int]], jobs: int) -> list[Row]:
    """Run each task in a fresh forked process, ``jobs`` at a time; a stuck one is replaced."""
    _prepare()
    rows: dict[str, Row] = {}
    pending = list(tasks)
    while pending:
        with mp.get_context("fork").Pool(jobs, initializer=_worker_init, maxtasksperchild=1) as pool:
            results = {task[0]: pool.apply_async(measure, (task,)) for task in pending}
            stuck = False
            for task in pending:
                name, model_types, box = task
                try:
                    rows[name] = results[name].get(timeout=box + 120)
                except mp.TimeoutError:
                    rows[name] = Row(name, model_types, note=f"did not stop within its {box} s time box")
                    stuck = True
                    break
                _progress(rows[name], len(rows), len(tasks))
            if stuck:
                pool.terminate()
            pending = [t for t in pending if t[0] not in rows]
            if stuck:
                # results already finished by other workers are kept
                for task in list(pending):
                    result = results[task[0]]
                    if result.ready():
                        rows[task[0]] = result.get()
                        _progress(rows[task[0]], len(rows), len(tasks))
                pending = [t for t in pending if t[0] not in rows]
    return [rows[t[0]] for t in tasks]


def _progress(row: Row, done: int, total: int) -> None:
    print(
        f"[{done:3d}/{total}] {row.architecture:45s} {row.status:17s} {row.seconds:6.1f}s {row.note[:90]}", flush=True
    )


# -- the report ---------------------------------------------------------------------------------
def write_report(rows: list[Row], out: Path, seconds: float, box: int) -> str:
    import transformers

    from anylens.core.roles import ALL_ROLES

    counts = {
        status: sum(r.status == status for r in rows)
        for status in ("hand", "hand-failing", "inferred", "inferred-failing", "not-inferable", "not-built")
    }
    built = len(rows) - counts["not-built"]
    served = counts["hand"] + counts["inferred"]
    full = sum(
        1 for r in rows if r.status in SERVED and ({"attn_out", "mlp_out"} <= set(r.roles) or "mixer_out" in r.roles)
    )
    percent = 100.0 * served / built if built else 0.0
    lines = [
        "# Architecture coverage",
        "",
        "Generated by `python benchmarks/coverage.py` (do not edit by hand). Every causal-LM class that",
        f"transformers {transformers.__version__} lists in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` was built as a tiny",
        "random model (2-4 layers, width 64, 4 heads over 2 KV heads where the config allows, vocabulary 400,",
        "eager attention) and served through the registry: a hand-written adapter where one claims the class,",
        "otherwise the inferred adapter, which is used only when `anylens check` passes every invariant.",
        f"Each architecture had a {box} s time box; the whole run took {seconds / 60:.1f} minutes.",
        "",
        "## Totals",
        "",
        "| | count |",
        "|---|---|",
        f"| causal-LM classes | {len(rows)} |",
        f"| build tiny on CPU | {built} |",
        f"| served by a hand-written adapter (all invariants pass) | {counts['hand']} |",
        f"| served by an inferred adapter (all invariants pass) | {counts['inferred']} |",
        f"| hand-written adapter failing an invariant | {counts['hand-failing']} |",
        f"| inferred, failing an invariant | {counts['inferred-failing']} |",
        f"| not inferable | {counts['not-inferable']} |",
        f"| not built tiny | {counts['not-built']} |",
        f"| **served, among those that build tiny** | **{served} / {built} = {percent:.1f}%** |",
        f"| served with the residual stream decomposed (attn_out + mlp_out, or mixer_out) | {full} |",
        "",
        "A served adapter provides only roles that pass the invariants: where a role could not be placed or",
        "verified it is absent (the note says why), never approximated. `roles` counts the roles provided",
        f"(there are {len(ALL_ROLES)} roles; `pos_embed` exists only with learned absolute positions, `mixer_out` only",
        "in state-space blocks).",
        "",
        "## Architectures",
        "",
        "Status: `hand` (a hand-written adapter claims the class and passes), `inferred` (inferred and",
        "passing every invariant), `inferred-failing` (placed, but every candidate fails an invariant),",
        "`not-inferable` (the structure defeats inference), `not-built` (no tiny instance runs on this CPU).",
        "See [inference.md](inference.md) for what the notes mean.",
        "",
        "| architecture | model types | status | roles | seconds | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: r.architecture.lower()):
        roles = f"{len(row.roles)}" if row.roles else "-"
        note = row.note.replace("|", "\\|")
        lines.append(
            f"| {row.architecture} | {', '.join(row.model_types)} | {row.status} | {roles} | {row.seconds} | {note} |"
        )
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--box", type=int, default=60, help="seconds per architecture (default 60)")
    parser.add_argument("--only", nargs="*", help="only these causal-LM class names")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    args = parser.parse_args(argv)

    from anylens.tiny.arch import causal_lm_classes

    types_of: dict[str, list[str]] = {}
    for model_type, name in causal_lm_classes().items():
        types_of.setdefault(name, []).append(model_type)
    names = sorted(types_of) if not args.only else args.only
    tasks = [(name, types_of.get(name, []), args.box) for name in names]
    started = time.perf_counter()
    rows = run_all(tasks, args.jobs)
    text = write_report(rows, args.out, time.perf_counter() - started, args.box)
    print("\n".join(text.split("\n")[9:22]))
    if args.only:
        for row in rows:
            print(asdict(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
