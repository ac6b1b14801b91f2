"""``anylens demo``: the same experiments on four architectures, one HTML report.

For every model it runs the logit lens and a layer x position residual patching sweep on a
factual-recall prompt, and component-level patching, attribution patching and an EAP-IG circuit
with its faithfulness curve on IOI prompts. The component role is chosen from what the model has —
per-head ``z`` where there are heads, ``mixer_out`` per layer for an SSM — and the circuit's level
from what the component graph offers, never from the architecture's name.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_MODELS: tuple[str, ...] = ("zoo:gpt2", "zoo:llama", "zoo:mistral", "zoo:mamba")
#: Component roles for the IOI sweep, in order of preference, with the dims to sweep.
COMPONENT_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("z", ("layer", "head")),
    ("mixer_out", ("layer",)),
    ("attn_out", ("layer",)),
)
N_IOI = 8
#: Models below this many parameters run on one torch thread (see ``_threads_for``).
SMALL_MODEL_PARAMETERS = 10_000_000
#: The IOI circuit: EAP-IG steps (on the zoo more add nothing, docs/circuits.md), the share of the
#: logit difference a circuit must keep, the most sizes tried between the last doubling below that
#: share and the first above it, and the edges drawn in the report.
CIRCUIT_STEPS = 5
CIRCUIT_TARGET = 0.8
CIRCUIT_REFINE = 7
CIRCUIT_PLOT_EDGES = 20
#: Progress steps per model: logit lens, residual patching, component patching, attribution,
#: circuit, faithfulness, summary.
STEPS_PER_MODEL = 7


def component_role(model: Any) -> tuple[str, tuple[str, ...]]:
    for role, over in COMPONENT_ROLES:
        if role in model.roles:
            return role, over
    return "resid_post", ("layer",)


def _factual_pair(model: Any) -> Any:
    from .datasets import factual_pairs

    pairs = factual_pairs(model.tokenizer, relations=("capital",))
    if not pairs:
        raise RuntimeError(f"no factual prompt works with {model.name}'s tokenizer")
    return next((p for p in pairs if p.subject == "France"), pairs[0])


def demo_ioi_pairs(tokenizer: Any) -> list:
    """IOI pairs from one template, so that every pair has the same token positions."""
    from .datasets import IOI_TEMPLATES, ioi_pairs

    return ioi_pairs(tokenizer, N_IOI, seed=0, templates=IOI_TEMPLATES[:1])


def circuit_level(model: Any) -> str:
    """The finest component graph ``model`` has: "head" where the head-level graph builds and has
    heads, else "layer" (an SSM's head-level graph is its layer-level one). An adapter without the
    roles of any graph gets the graph's ``CircuitGraphError``, naming the roles to add."""
    import anylens as al

    try:
        if any(node.kind == "head" for node in al.component_graph(model, "head").senders):
            return "head"
    except al.CircuitGraphError:
        pass
    al.component_graph(model, "layer")
    return "layer"


def ioi_circuit(model: Any, clean: list[str], corrupt: list[str], metric: Any) -> Any:
    """An EAP-IG circuit on the IOI pairs at the finest level the model's graph offers."""
    import anylens as al

    level = circuit_level(model)
    return al.circuit(model, clean, corrupt, metric=metric, method="eap-ig", level=level, steps=CIRCUIT_STEPS)


def faithful_size(result: Any, target: float = CIRCUIT_TARGET) -> int | None:
    """Measure ``result``'s faithfulness curve (corrupt ablation) at 1, 2, 4, ... edges and every
    edge, then at up to ``CIRCUIT_REFINE`` sizes between the last size below ``target`` and the first
    reaching it; return the smallest size tried that reaches ``target`` (None if none does). The
    curve stays in ``result.meta["faithfulness"]``."""
    curve = result.faithfulness()  # every size in one batched run of edge-ablated forwards
    k = result.smallest_faithful(target)
    if k is None:
        return None
    low = max((int(size) for size in curve["k"] if size < k), default=0)
    between = {int(size) for size in np.linspace(low + 1, k - 1, CIRCUIT_REFINE).round()} if k - low > 1 else set()
    if not between:
        return k
    result.faithfulness(ks=sorted({int(size) for size in curve["k"]} | between))
    return result.smallest_faithful(target)


def _component_label(row: pd.Series) -> str:
    if "head" in row and not pd.isna(row.get("head")):
        return f"head {int(row['layer'])}.{int(row['head'])}"
    return f"layer {int(row['layer'])}"


def study(source: str, progress: Any = None) -> tuple[dict[str, Any], list[tuple[Any, str]]]:
    """Run the demo's experiments on one model: its summary row and its figures with captions."""
    import anylens as al

    def step(label: str) -> None:
        if progress is not None:
            progress.set_postfix_str(f"{source}: {label}")
            progress.update(1)

    model = al.load(source)
    with _threads_for(model):
        return _experiments(model, source, step)


@contextmanager
def _threads_for(model: Any) -> Iterator[None]:
    """One torch thread for a small model, restored afterwards: its forwards are per-operation
    overhead, where a second thread only contends (on a busy 2-core machine the demo's circuit
    steps took 55 s with two threads, 2 s with one)."""
    import torch

    threads = torch.get_num_threads()
    if sum(p.numel() for p in model.hf.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _experiments(model: Any, source: str, step: Callable[[str], None]) -> tuple[dict[str, Any], list[tuple[Any, str]]]:
    import anylens as al

    fact = _factual_pair(model)
    ioi = demo_ioi_pairs(model.tokenizer)
    figures: list[tuple[Any, str]] = []

    lens = al.logit_lens(model, fact.clean, metric=[fact.answer])
    step("logit lens")
    frame = lens.to_frame()
    at_answer = frame[(frame["pos"] == frame["pos"].max()) & (frame["target"] == fact.answer)].sort_values("layer")
    top1_layers = at_answer.loc[at_answer["rank"] == 0, "layer"]
    figures.append(
        (lens.plot(), f"Logit lens on {fact.clean!r}: probability of {fact.answer!r} per layer and position")
    )

    resid = al.patch(
        model,
        fact.clean,
        fact.corrupt,
        role="resid_pre",
        over=("layer", "pos"),
        metric=al.metrics.logit_diff(fact.answer, fact.corrupt_answer),
    )
    step("residual patching")
    figures.append(
        (resid.plot(), f"resid_pre patching, {fact.corrupt!r} -> {fact.clean!r}: normalised logit difference")
    )
    best_resid = resid.frame.loc[resid.frame[resid.value].idxmax()]

    role, over = component_role(model)
    metric = al.metrics.logit_diff([p.answer for p in ioi], [p.distractor for p in ioi])
    clean, corrupt = [p.clean for p in ioi], [p.corrupt for p in ioi]
    patched = al.patch(model, clean, corrupt, role=role, over=over, metric=metric)
    step(f"{role} patching")
    attributed = al.attribute(model, clean, corrupt, role=role, over=over, metric=metric)
    step(f"{role} attribution")
    figures.append((patched.plot(), f"IOI: {role} patching over {' x '.join(over)} (normalised logit difference)"))
    figures.append((attributed.plot(), f"IOI: attribution patching estimate for {role} over {' x '.join(over)}"))

    try:
        circuit, no_circuit = ioi_circuit(model, clean, corrupt, metric), ""
    except al.CircuitGraphError as error:  # the adapter lacks branch inputs: the rest of the demo still runs
        circuit, no_circuit = None, str(error)
    step("circuit (EAP-IG)")
    k_target = faithful_size(circuit) if circuit is not None else None
    step("faithfulness")
    top_edge = circuit.top(1).iloc[0] if circuit is not None else None

    exact = patched.frame.sort_values(list(over))["metric"].to_numpy()
    estimate = attributed.frame.sort_values(list(over))["metric"].to_numpy()
    correlation = float(np.corrcoef(exact, estimate)[0, 1]) if exact.std() > 0 and estimate.std() > 0 else float("nan")
    best_component = patched.frame.loc[patched.frame[patched.value].idxmax()]

    summary = {
        "model": source,
        "adapter": model.adapter.name,
        "parameters": sum(p.numel() for p in model.hf.parameters()),
        "layers": model.n_layers,
        "p(answer) last layer": float(at_answer["prob"].iloc[-1]),
        "answer top-1 from layer": int(top1_layers.min()) if len(top1_layers) else None,
        "resid patching peak": f"layer {int(best_resid['layer'])}, {best_resid['token']!r}",
        "IOI logit diff clean": patched.clean_metric,
        "IOI logit diff corrupt": patched.corrupt_metric,
        "component role": role,
        "top component": _component_label(best_component),
        "top component score": float(best_component[patched.value]),
        "attribution vs patching r": correlation,
        "circuit level": circuit.meta["level"] if circuit is not None else None,
        "graph edges": circuit.meta["graph_edges"] if circuit is not None else None,
        f"circuit edges for {CIRCUIT_TARGET:.0%}": k_target,
        "top circuit edge": f"{top_edge['sender']}->{top_edge['receiver']}" if top_edge is not None else None,
    }
    summary["_prompts"] = (
        f"Factual prompt {fact.clean!r} (answer {fact.answer!r}; counterfactual {fact.corrupt!r}). "
        f"IOI: {len(ioi)} pairs such as {ioi[0].clean!r} -> {ioi[0].answer!r}, corrupted to {ioi[0].corrupt!r}."
    )
    if circuit is not None:
        circuit.model = None  # the report needs only the scores and the curve: let the model go
    summary["_circuit"], summary["_no_circuit"] = circuit, no_circuit
    step("summary")
    return summary, figures


def versions() -> dict[str, str]:
    import nnsight
    import torch
    import transformers

    import anylens

    return {
        "anylens": anylens.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"),
        "python": platform.python_version(),
    }


def run_demo(models: Sequence[str] = DEFAULT_MODELS, out: str | Path = "anylens-demo", quiet: bool = False) -> Path:
    """Run the demo on ``models``; print the comparison table; write ``out/report.html``."""
    from tqdm.auto import tqdm

    from .viz.report import Report

    start = time.perf_counter()
    report = Report(
        "anylens demo: one set of experiments, several architectures",
        intro=(
            "The same role-based experiments — logit lens, residual-stream patching, component patching, "
            "attribution patching and an edge-level IOI circuit (EAP-IG) with its faithfulness curve — run "
            "unchanged on every model below. Patching scores and faithfulness are normalised: 0 is the "
            "corrupt run's behaviour, 1 the clean run's."
        ),
    )
    summaries, studies = [], []
    with tqdm(total=STEPS_PER_MODEL * len(models), desc="anylens demo", disable=quiet, unit="step") as progress:
        for source in models:
            summary, figures = study(source, progress)
            summaries.append(summary)
            studies.append((source, summary, figures))
    table = pd.DataFrame([{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries])
    report.section("Across architectures", anchor="summary")
    report.table(table, table_id="summary-table")
    for source, summary, figures in studies:
        report.section(f"{source} ({summary['adapter']} adapter, {summary['layers']} layers)", anchor=source)
        report.paragraph(summary.pop("_prompts"), css="note")
        for figure, caption in figures:
            report.figure(figure, caption)
        circuit, no_circuit = summary.pop("_circuit"), summary.pop("_no_circuit")
        if circuit is not None:
            report.circuit(
                circuit,
                k=CIRCUIT_PLOT_EDGES,
                heading=f"{source}: IOI circuit ({circuit.meta['level']} level, EAP-IG)",
                anchor=f"{source}-circuit",
            )
        else:
            report.paragraph(f"No circuit for {source}: {no_circuit}", css="note")
    elapsed = time.perf_counter() - start
    report.section("Versions")
    report.table(pd.DataFrame([versions()]), table_id="versions")
    report.paragraph(f"Generated in {elapsed:.1f} s.", css="note")
    path = report.write(Path(out) / "report.html")
    if not quiet:
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        print(f"\nreport: {path}  ({elapsed:.1f} s)")
    return path


# -- command line: anylens demo -------------------------------------------------------------------
def add_arguments(parser: Any) -> None:
    parser.add_argument("--out", default="anylens-demo", help="directory for report.html (default: anylens-demo)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help=f"models to compare (default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def run(args: Any) -> int:
    run_demo(args.models, args.out, args.quiet)
    return 0
