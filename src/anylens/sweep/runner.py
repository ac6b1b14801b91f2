"""One experiment over many models and prompts, written to disk as it goes and resumable.

``run`` splits the prompts of each model into chunks, computes the chunks one by one and writes
each as soon as it is done (see :mod:`anylens.sweep.store` for the layout). Run it again with
the same arguments and it skips every chunk whose file still matches its checksum, recomputes
damaged ones with a warning, and finishes the rest; run it with different arguments into the
same directory, or on a model whose weights changed, and it refuses, naming what differs. A lost
or damaged manifest is rebuilt from the chunks, which verify themselves.

Within a chunk, patching, ablation and attribution take every group of prompts of the same token
lengths in one call (:meth:`~anylens.sweep.experiments.ExperimentSpec.run_chunk`), and the rows
are split back per prompt. A resumed sweep's results are bit for bit those of an uninterrupted
one: a chunk is always computed whole, so its groups are the same, and patched runs are batched
from a memory budget fixed for the machine (:func:`anylens.engine.steady_budget`), not from the
memory free at the moment.
"""

from __future__ import annotations

import gc
import inspect
import math
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import SweepModelError
from . import experiments as experiments_
from .checks import check_models, check_out, check_roles, explicit_items
from .experiments import Item, as_items
from .fingerprint import weights_fingerprint
from .identity import describe, differences, environment, model_identity, normalize, prompts_sha256
from .results import SweepResult
from .store import (
    FORMAT,
    Store,
    SweepConfigError,
    SweepWarning,
    SweepWeightsChangedError,
    canonical_json,
    chunk_key,
    frame_to_payload,
    model_dirname,
    rebuild_manifest,
    remove_stale_temporaries,
    sha256_bytes,
)

if TYPE_CHECKING:
    from ..core.model import AnyModel


# -- models -------------------------------------------------------------------------------------
def load_source(source: str, dtype: str | None = "float32", device: str | None = None) -> AnyModel:
    """Anything ``al.load`` takes, ``tiny:FAMILY`` (a random test model) included."""
    try:
        from ..loading import load

        return load(source, dtype=dtype, device=device)
    except Exception as error:
        raise SweepModelError(
            f"cannot load model {source!r}: {type(error).__name__}: {error}. Finished chunks are kept; fix the source and rerun"
        ) from error


def _release(model: Any) -> None:
    del model
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # releasing memory must never fail a sweep
        pass


def _dataset_items(name: str, model: AnyModel, n: int | None, options: dict[str, Any]) -> list[Item]:
    from .. import datasets

    if name == "ioi":
        pairs = datasets.ioi_pairs(model.tokenizer, 50 if n is None else n, **options)
    else:
        pairs = datasets.factual_pairs(model.tokenizer, **options)
        pairs = pairs if n is None else pairs[:n]
    return as_items(pairs)


# -- the sweep ----------------------------------------------------------------------------------
#: Options that change how a sweep runs but not its results: not part of its configuration, so a
#: resumed sweep may use other values (a smaller memory budget after running out of memory).
EXECUTION_OPTIONS = ("memory_budget", "batch_size")


def run(
    experiment: str,
    models: Sequence[str],
    prompts: Sequence[Any] | None = None,
    *,
    dataset: str | None = None,
    n: int | None = None,
    dataset_options: dict[str, Any] | None = None,
    out: str | Path = "sweep",
    chunk_size: int = 8,
    quiet: bool = False,
    dtype: str | None = "float32",
    device: str | None = None,
    fresh: bool = False,
    **experiment_options: Any,
) -> SweepResult:
    """Run ``experiment`` on every model of ``models`` over ``prompts`` (or a ``dataset``), into ``out``.

    * ``models``: sources for :func:`anylens.load` (``"zoo:gpt2"``, ``"smollm2-135m"``, a directory)
      or ``"tiny:FAMILY"``; loaded one at a time and released before the next.
    * ``prompts``: strings, or clean/corrupt pairs (tuples, dicts, dataset pairs); or
      ``dataset="ioi"`` / ``"factual"`` to generate ``n`` pairs for each model's tokenizer
      (``dataset_options`` go to the generator, e.g. ``{"corruption": "random_names"}``).
    * ``chunk_size`` prompts are computed and written together; a chunk is the unit of resumption.
    * other keyword arguments go to the experiment (``role``, ``over``, ``metric``, ...); a metric
      given by name (``metric="logit_diff"``) is built per prompt from its answer and distractor.
      ``memory_budget`` (bytes) and ``batch_size`` only change how patching and ablation sweeps
      are batched, so a resumed sweep may change them (its new chunks may then differ from an
      uninterrupted run's in the last bits; by default the budget is fixed for the machine).
    * ``fresh=True`` discards what ``out`` holds of an earlier sweep (with a warning) and starts
      over; without it, a sweep in ``out`` is resumed, and a manifest that is missing or damaged
      is rebuilt from the chunk files.

    Raises :class:`SweepConfigError` when ``out`` holds a sweep with another configuration (or the
    arguments are inconsistent), :class:`SweepWeightsChangedError` (a subclass) when a model's
    weights changed since its finished chunks, :class:`SweepBusyError` when another process is
    writing ``out``, :class:`SweepModelError` when a model does not load, and
    :class:`anylens.OutputPathError` when ``out`` cannot be written (it lies under a file, or its
    directory is not writable).
    """
    spec = experiments_.experiment(experiment)
    models = check_models(models)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise SweepConfigError(f"chunk_size must be a positive integer, not {chunk_size!r}")
    spec.check_options(experiment_options)
    check_roles(models, experiment_options)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise SweepConfigError(f"n must be a positive number of prompts, not {n!r}: leave it out to take them all")
    check_out(out)
    dataset_options = dict(dataset_options or {})
    explicit = explicit_items(spec, prompts, dataset, n)
    if explicit is not None:
        spec.check_metric(experiment_options, explicit)
    config = {
        "experiment": spec.name,
        "options": describe({k: v for k, v in experiment_options.items() if k not in EXECUTION_OPTIONS}),
        "models": list(models),
        "prompts": (
            {"kind": "explicit", "count": len(explicit), "sha256": prompts_sha256(explicit)}
            if explicit is not None
            else {"kind": "dataset", "dataset": dataset, "n": n, "options": describe(dataset_options)}
        ),
        "chunk_size": chunk_size,
        "dtype": dtype,
    }
    config = normalize(config)
    store = Store(out)
    with store.locked():
        sweep = _Sweep(spec, store, config, explicit, experiment_options, dataset_options, quiet, dtype, device)
        return sweep.run(fresh=fresh)


@dataclass
class _ModelPlan:
    index: int
    source: str
    dirname: str
    n_chunks: int | None  # None: a dataset not generated yet for this model
    pending: list[int]


class _Sweep:
    """One invocation of ``run``: open or create the manifest, then compute what is missing."""

    def __init__(
        self,
        spec: experiments_.ExperimentSpec,
        store: Store,
        config: dict[str, Any],
        explicit: list[Item] | None,
        options: dict[str, Any],
        dataset_options: dict[str, Any],
        quiet: bool,
        dtype: str | None,
        device: str | None,
    ):
        self.spec = spec
        self.store = store
        self.config = config
        self.explicit = explicit
        self.options = options
        self.dataset_options = dataset_options
        self.quiet = quiet
        self.dtype = dtype
        self.device = device
        self.result = SweepResult(store.root, spec.name, list(config["models"]))
        #: Written into every chunk, so that a chunk can show which sweep it belongs to.
        self.config_sha256 = sha256_bytes(canonical_json(config))
        #: The fingerprint of the current model's weights while it is being taken (register_model).
        self.weights: Future[dict[str, Any]] | None = None

    # manifest
    def open_manifest(self, fresh: bool = False) -> dict[str, Any]:
        now = _now()
        env = dict(environment(), device=str(self.device or "default"))
        if fresh and self.store.holds_sweep():
            warnings.warn(
                f"fresh=True: discarding the sweep in {self.store.root} ({len(self.store.chunk_files())} chunk files) "
                "and starting over",
                SweepWarning,
                stacklevel=4,
            )
            self.store.discard()
        manifest = self.existing_manifest()
        if manifest is None:
            if self.store.root.exists() and any(p.name != ".lock" for p in self.store.root.iterdir()):
                raise SweepConfigError(
                    f"{self.store.root} already holds files but no sweep manifest; choose another out or empty the directory"
                )
            manifest = {
                "format": FORMAT,
                "config": self.config,
                "models": {},
                "chunks": {},
                "runs": [],
                "created": now,
                "complete": False,
            }
        else:
            lines = differences(manifest.get("config"), self.config)
            if lines:
                raise SweepConfigError(
                    f"{self.store.root} holds a sweep with a different configuration:\n  "
                    + "\n  ".join(lines)
                    + "\nResume it with its own arguments, choose another out, or start over: fresh=True "
                    + f"(anylens run --fresh) or delete {self.store.root}."
                )
            remove_stale_temporaries(self.store.root)
            previous = manifest["runs"][-1]["environment"] if manifest.get("runs") else None
            if previous is not None:
                changed = {k: (previous.get(k), v) for k, v in env.items() if k != "device" and previous.get(k) != v}
                if changed:
                    shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                    warnings.warn(
                        f"resuming {self.store.root} with other library versions or torch threads ({shown}): finished "
                        "chunks are kept, so results may mix versions and differ from an uninterrupted run in the "
                        "last bits (each chunk records the run that computed it)",
                        SweepWarning,
                        stacklevel=4,
                    )
        manifest["complete"] = False  # until every chunk of this invocation is written
        manifest["runs"].append({"started": now, "environment": env})
        self.run_index = len(manifest["runs"]) - 1
        self.store.write_manifest(manifest)
        return manifest

    def existing_manifest(self) -> dict[str, Any] | None:
        """The manifest on disk; rebuilt from the chunk files if it is missing or cannot be read
        while chunks are there; None when ``out`` holds no sweep."""
        if self.store.exists():
            try:
                return self.store.read_manifest()
            except SweepConfigError:
                if not self.store.chunk_files():
                    raise
                return self.rebuilt_manifest("is damaged (not a readable sweep manifest)")
        return self.rebuilt_manifest("is missing") if self.store.chunk_files() else None

    def rebuilt_manifest(self, problem: str) -> dict[str, Any]:
        manifest, skipped = rebuild_manifest(self.store, self.config, self.config_sha256)
        warnings.warn(
            f"the manifest of {self.store.root} {problem}: rebuilt it from the {len(manifest['chunks'])} chunk files "
            "that verify themselves and record this configuration"
            + (f"; recomputing {len(skipped)} that do not ({'; '.join(skipped)})" if skipped else ""),
            SweepWarning,
            stacklevel=6,
        )
        return manifest

    def save(self) -> None:
        self.manifest["updated"] = _now()
        self.store.write_manifest(self.manifest)

    # planning
    def plan(self) -> list[_ModelPlan]:
        plans = []
        for index, source in enumerate(self.config["models"]):
            dirname = model_dirname(index, source)
            entry = self.manifest["models"].get(dirname)
            n_chunks = None
            if self.explicit is not None:
                n_chunks = math.ceil(len(self.explicit) / self.config["chunk_size"])
            elif entry is not None:
                n_chunks = entry["n_chunks"]
            pending = [] if n_chunks is None else [j for j in range(n_chunks) if not self._finished(dirname, j)]
            plans.append(_ModelPlan(index, source, dirname, n_chunks, pending))
        return plans

    def _finished(self, dirname: str, chunk: int) -> bool:
        key = chunk_key(dirname, chunk)
        entry = self.manifest["chunks"].get(key)
        if entry is None:
            return False
        problem = self.store.check_chunk(entry)
        if problem is None:
            self.result.skipped.append(key)
            return True
        warnings.warn(f"chunk {entry['file']} is damaged ({problem}); recomputing it", SweepWarning, stacklevel=5)
        self.result.recomputed.append(key)
        del self.manifest["chunks"][key]
        return False

    # running
    def run(self, fresh: bool = False) -> SweepResult:
        from tqdm.auto import tqdm

        self.manifest = self.open_manifest(fresh)
        plans = self.plan()
        estimate = self._chunks_per_model_estimate()
        total = sum(len(p.pending) if p.n_chunks is not None else estimate for p in plans)
        done = len(self.result.skipped)
        overall = tqdm(
            total=total,
            desc=f"{self.spec.name} sweep",
            unit="chunk",
            disable=self.quiet,
            position=0,
            postfix={"done before": done} if done else None,
        )
        try:
            for plan in plans:
                if plan.n_chunks is not None and not plan.pending:
                    continue  # everything verified: the model is not even loaded
                self.run_model(plan, overall, estimate)
        finally:
            overall.close()
        self.manifest["complete"] = True
        self.manifest["runs"][self.run_index]["finished"] = _now()
        self.save()
        return self.result

    def _chunks_per_model_estimate(self) -> int:
        n = self.config["prompts"].get("n")
        return math.ceil((50 if n is None else n) / self.config["chunk_size"])

    def run_model(self, plan: _ModelPlan, overall: Any, estimate: int) -> None:
        from tqdm.auto import tqdm

        model = load_source(plan.source, self.dtype, self.device)
        try:
            items = self.register_model(plan, model)
            self.model_options = self.options_for(plan, model)
            context = self.spec.context(model, items, self.model_options)
            if plan.n_chunks is None:  # now the dataset is known: fix the overall estimate
                plan.n_chunks = math.ceil(len(items) / self.config["chunk_size"])
                plan.pending = [j for j in range(plan.n_chunks) if not self._finished(plan.dirname, j)]
                overall.total += len(plan.pending) - estimate
                overall.refresh()
            bar = tqdm(
                total=len(plan.pending), desc=plan.source, unit="chunk", leave=False, disable=self.quiet, position=1
            )
            try:
                for chunk in plan.pending:
                    self.run_chunk(plan, model, items, chunk, context)
                    bar.update()
                    overall.update()
            finally:
                bar.close()
            self.record_weights(plan)
        finally:
            if self.weights is not None:  # interrupted: let the hashing finish, record nothing
                self.weights.exception()
                self.weights = None
            _release(model)

    def register_model(self, plan: _ModelPlan, model: AnyModel) -> list[Item]:
        """Record the model's identity and prompts, or refuse if they changed since the chunks on disk.

        The weights of a model with finished chunks are checked here, before anything is computed.
        A new model's fingerprint is taken on a thread while its first chunk computes (hashing
        releases the GIL; on GPT-2 small it takes about half a second) and recorded before that
        chunk is written (:meth:`record_weights`), since every chunk file carries it.
        """
        recorded = self.manifest["models"].get(plan.dirname)
        check_now = recorded is not None and recorded.get("weights") is not None
        identity = model_identity(model, plan.source, weights=check_now)
        if self.explicit is not None:
            items = self.explicit
        else:
            items = _dataset_items(
                self.config["prompts"]["dataset"], model, self.config["prompts"]["n"], self.dataset_options
            )
        identity.update(
            n_prompts=len(items),
            prompts_sha256=prompts_sha256(items),
            n_chunks=math.ceil(len(items) / self.config["chunk_size"]),
        )
        if recorded is not None:
            described = {k: v for k, v in identity.items() if k != "weights"}  # weights: checked apart
            lines = differences({k: recorded.get(k) for k in described}, described)
            if lines:
                raise SweepConfigError(
                    f"model {plan.source!r} is not the model the finished chunks in {self.store.root} were computed with:\n  "
                    + "\n  ".join(lines)
                    + f"\nchoose another out, or start over: fresh=True (anylens run --fresh) or delete {self.store.root}."
                )
        else:
            self.manifest["models"][plan.dirname] = identity
            self.save()
        if check_now:
            self._check_weights(plan, recorded, identity["weights"])
        else:  # a new model, or one recorded without a fingerprint (by an older anylens, or killed early)
            hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anylens-fingerprint")
            self.weights = hashing.submit(weights_fingerprint, model)
            hashing.shutdown(wait=False)  # its thread ends with the hashing
        return items

    def record_weights(self, plan: _ModelPlan) -> None:
        """The fingerprint begun by :meth:`register_model`, waited for and recorded."""
        if self.weights is not None:
            weights, self.weights = self.weights.result(), None
            self.manifest["models"][plan.dirname]["weights"] = weights
            self.save()

    def _check_weights(self, plan: _ModelPlan, recorded: dict[str, Any], weights: dict[str, Any]) -> None:
        before = recorded.get("weights")
        if before != weights:
            raise SweepWeightsChangedError(
                f"the weights of model {plan.source!r} changed since its finished chunks in {self.store.root} were "
                f"computed ({before.get('method')} {str(before.get('sha256'))[:16]} on disk, {weights['method']} "
                f"{weights['sha256'][:16]} now): resuming would mix results of the old and the new weights. "
                "Choose another out, or start over with fresh=True (anylens run --fresh), which discards the finished chunks."
            )

    def options_for(self, plan: _ModelPlan, model: AnyModel) -> dict[str, Any]:
        """The experiment's options for this model. Patching and ablation batch their runs from a
        memory budget: unless one is given, a sweep fixes it for the machine
        (:func:`~anylens.engine.steady_budget`), so that a resumed sweep batches
        every prompt as an uninterrupted one does, not by the memory free at the moment. The
        budget each model's chunks were computed with is recorded; changing it warns."""
        options = dict(self.options)
        if "memory_budget" not in inspect.signature(self.spec.function()).parameters:
            return options
        from ..engine import steady_budget

        if options.get("memory_budget") is None:
            options["memory_budget"] = steady_budget(model)
        execution = {k: options.get(k) for k in EXECUTION_OPTIONS}
        entry = self.manifest["models"][plan.dirname]
        before = entry.get("execution")
        finished = any(chunk["model_index"] == plan.index for chunk in self.manifest["chunks"].values())
        if before is None or not finished:
            entry["execution"] = execution
            self.save()
        elif before != execution:
            warnings.warn(
                f"model {plan.source!r}: its finished chunks were batched with {before}, these with {execution}; "
                "the new chunks may differ from an uninterrupted run's in the last bits (float32 rounding)",
                SweepWarning,
                stacklevel=5,
            )
        return options

    def run_chunk(self, plan: _ModelPlan, model: AnyModel, items: Sequence[Item], chunk: int, context: Any) -> None:
        size = self.config["chunk_size"]
        start, stop = chunk * size, min((chunk + 1) * size, len(items))
        began = time.perf_counter()
        output = self.spec.run_chunk(model, items[start:stop], self.model_options, context)
        self.record_weights(plan)  # every chunk file carries the model's identity, weights included
        frame = output.frame
        frame["prompt"] = frame["prompt"] + start
        frame.insert(0, "chunk", chunk)
        frame.insert(0, "model", plan.source)
        key = chunk_key(plan.dirname, chunk)
        payload = {
            "model": plan.source,
            "model_index": plan.index,
            "chunk": chunk,
            "prompts": [start, stop],
            "frame": frame_to_payload(frame),
            "meta": output.metas,
            # What a chunk needs to verify itself should the manifest be lost (store.rebuild_manifest).
            "config_sha256": self.config_sha256,
            "identity": {k: v for k, v in self.manifest["models"][plan.dirname].items() if k != "execution"},
        }
        entry = self.store.write_chunk(key, payload)
        entry.update(
            model=plan.source,
            model_index=plan.index,
            chunk=chunk,
            prompts=[start, stop],
            rows=len(frame),
            seconds=round(time.perf_counter() - began, 3),
            run=self.run_index,
        )
        self.manifest["chunks"][key] = entry
        self.save()
        self.result.computed.append(key)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["SweepModelError", "SweepResult", "load_source", "run"]
