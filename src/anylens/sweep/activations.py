"""``anylens.extract``: activations over a dataset, streamed into a resumable directory of shards.

The rows themselves come from :mod:`anylens.experiments.activations` (positions, batches, shards
by memory budget) and the directory layout from :mod:`anylens.experiments.activation_store`;
this module writes them with the sweep store's atomic files, checksums and lock.

A shard is written atomically and counts as finished once the manifest lists it with its sha256.
A killed run resumes after its last finished shard; since shard boundaries depend only on the
configuration, it ends with the bytes an uninterrupted run writes. A directory holding another
configuration (another model, weights, prompts, roles, layers, positions, dtype, batch size or
budget) is refused and left as it is, unless ``fresh=True`` asks to discard it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import ActivationsBusyError, ActivationsConfigError
from ..core.operations import only_role_operations
from ..experiments import activation_store as files
from ..experiments.activations import ExtractionJob, Positions, plan
from ..experiments.prompts import Prompts
from .checks import check_out
from .identity import environment, model_identity
from .store import Store, SweepBusyError, canonical_json, remove_stale_temporaries, sha256_bytes, write_atomic

if TYPE_CHECKING:
    from ..core.model import AnyModel


@only_role_operations("roles")
def extract(
    model: AnyModel,
    prompts: Prompts,
    *,
    roles: Iterable[str] | str = ("resid_post",),
    layers: Iterable[int] | int | None = None,
    positions: Positions = None,
    out: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 16,
    memory_budget: int | str = "512MiB",
    labels: Sequence[Any] | None = None,
    fresh: bool = False,
    quiet: bool = False,
) -> files.Activations:
    """Activations of ``roles`` at ``layers`` and ``positions`` for every prompt, one row per
    (prompt, position).

    * ``prompts``: strings, prompt pairs (their clean prompt, e.g. ``factual_pairs(...)``) or
      token ids ``[n, pos]``.
    * ``roles``: role names (``pattern`` is refused: its key axis differs between prompts);
      ``layers``: layer indices for per-layer roles (all when None).
    * ``positions``: ``"last"``, ``"all"``/None (every real token), an int or a list of ints
      (the same positions of every prompt, negative ones from its end), or one list per prompt;
      positions count each prompt's real tokens, padding is never stored.
    * ``out``: a directory to write (resumable, see the module docs); None keeps everything in memory.
    * ``dtype``: what to store (the model's dtype when None); ``batch_size``: prompts per forward;
      ``memory_budget``: bytes of rows held before a shard is written (``"512MiB"`` or an int;
      the rows of the batch being computed come on top).
    * ``labels``: one label per prompt (JSON values), stored with the activations.
    * ``fresh``: discard the extraction ``out`` holds (its manifest and shards) and start over.
    * ``quiet``: no progress bar.

    Returns :class:`~anylens.experiments.activation_store.Activations` (memory-mapped when on disk).
    """
    planned = plan(
        model,
        prompts,
        roles=roles,
        layers=layers,
        positions=positions,
        dtype=dtype,
        batch_size=batch_size,
        memory_budget=memory_budget,
        labels=labels,
        quiet=quiet,
    )
    identity = model_identity(model, model.name)
    manifest = {
        "format": files.FORMAT,
        "config": planned.config,
        "model": {"name": identity.pop("source"), "n_layers": model.n_layers, **identity},
        "labels": planned.labels,
        "tensors": {},
        "shards": [],
        "complete": False,
        "environment": environment(),
    }
    if out is None:
        shards = planned.job.run(manifest, 0, lambda tensors, stop: None)
        manifest["complete"] = True
        return files.Activations(shards, manifest)
    return _extract_to(Path(out), planned.job, manifest, fresh)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_atomic(root / files.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode() + b"\n")


def _extract_to(root: Path, job: ExtractionJob, manifest: dict[str, Any], fresh: bool) -> files.Activations:
    check_out(root, "the activations")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(Store(root).locked())
        except SweepBusyError:
            raise ActivationsBusyError(
                f"another process is writing the extraction in {root}; wait for it or choose another out"
            ) from None
        remove_stale_temporaries(root)
        manifest, start = _open(root, manifest, fresh)

        def write(tensors: dict[str, torch.Tensor], stop: int) -> bool:
            index = len(manifest["shards"])
            begin = manifest["shards"][-1]["prompts"][1] if manifest["shards"] else 0
            data = files.shard_bytes(tensors)
            name = files.shard_file(index)
            write_atomic(root / name, data)
            entry = {"file": name, "sha256": sha256_bytes(data), "bytes": len(data), "prompts": [begin, stop]}
            entry["rows"] = int(tensors["prompt"].shape[0])
            manifest["shards"].append(entry)
            manifest["complete"] = stop == manifest["config"]["n_prompts"]
            write_manifest(root, manifest)  # the shard counts as finished from here on
            return True

        if not manifest["complete"]:
            job.run(manifest, start, write)
            if not manifest["complete"]:  # nothing to do: e.g. zero prompts left
                manifest["complete"] = True
                write_manifest(root, manifest)
    return files.load_activations(root, verify=False)


def _open(root: Path, manifest: dict[str, Any], fresh: bool) -> tuple[dict[str, Any], int]:
    """The manifest to continue and the first prompt to compute; refuses another configuration."""
    if not (root / files.MANIFEST).exists():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in (".lock", files.SHARDS))
        shards_dir = root / files.SHARDS
        if shards_dir.is_dir() and any(shards_dir.iterdir()):
            foreign.append(files.SHARDS)
        if foreign and not fresh:
            raise ActivationsConfigError(
                f"out={str(root)!r} holds files that are not an extraction ({', '.join(foreign[:5])}); "
                "extract into a new out"
            )
        write_manifest(root, manifest)
        return manifest, 0
    recorded = files.read_manifest(root)
    lines = differences(recorded, manifest)
    if lines or fresh:
        if not fresh:
            shown = "; ".join(lines[:8]) + ("; ..." if len(lines) > 8 else "")
            raise ActivationsConfigError(
                f"out={str(root)!r} holds an extraction with another configuration ({shown}); "
                f"its {len(recorded['shards'])} finished shards are kept: extract into a new out, "
                "or pass fresh=True to discard them and start over"
            )
        _discard(root, recorded)
        write_manifest(root, manifest)
        return manifest, 0
    # Same configuration: keep the longest run of intact shards; later ones are recomputed.
    manifest = dict(recorded, environment=manifest["environment"])
    for index, entry in enumerate(recorded["shards"]):
        problem = files.shard_problem(root, entry)
        if problem is not None:
            warnings.warn(
                f"shard {entry['file']} in {root} is damaged ({problem}); recomputing it and the shards after it",
                files.ActivationsWarning,
                stacklevel=4,
            )
            manifest["shards"] = recorded["shards"][:index]
            manifest["complete"] = False
            write_manifest(root, manifest)
            break
    start = manifest["shards"][-1]["prompts"][1] if manifest["shards"] else 0
    return manifest, start


def differences(recorded: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """What differs between the configuration on disk and the one asked for, one line per item."""
    lines: list[str] = []
    for section in ("config", "model"):
        _compare(recorded.get(section, {}), manifest[section], "", lines)
    if canonical_json(recorded.get("labels")) != canonical_json(manifest["labels"]):
        lines.append("labels differ")
    return lines


def _compare(old: Any, new: Any, where: str, lines: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if not where and key == "name":
                continue  # the same weights loaded from elsewhere are the same model
            if key == "positions_sha256" and any(line.startswith("positions:") for line in lines):
                continue  # already said: the positions differ
            _compare(old.get(key), new.get(key), f"{where}.{key}" if where else key, lines)
    elif canonical_json(old) != canonical_json(new):
        lines.append(f"{where}: {_short(old)} on disk, {_short(new)} now")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _discard(root: Path, recorded: dict[str, Any]) -> None:
    """Remove an extraction's own files (shards first: a crash leaves a manifest, never orphans)."""
    for entry in recorded.get("shards", []):
        with contextlib.suppress(FileNotFoundError):
            (root / entry["file"]).unlink()
    for leftover in (root / files.SHARDS).glob("*.safetensors") if (root / files.SHARDS).is_dir() else ():
        leftover.unlink()
    (root / files.MANIFEST).unlink()


__all__ = ["extract"]
