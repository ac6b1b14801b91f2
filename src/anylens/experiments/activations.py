"""Activations of many prompts as rows: one row per (prompt, position), per role and layer.

:func:`plan` checks an extraction's options and turns them into an :class:`ExtractionJob`, which
runs the prompts in batches and groups the rows into shards of about ``memory_budget`` bytes;
:func:`collect` keeps them in memory. ``anylens.extract`` (:mod:`anylens.sweep.activations`)
writes them to disk instead, resumably.

Positions count a prompt's *real* tokens: batches are left-padded (the model sees the attention
mask, and positions follow it), and padding is never stored. ``"last"`` keeps each prompt's last
token, ``None``/``"all"`` every real token (prompts of different lengths give different numbers of
rows), an int or a list of ints the same positions of every prompt (negative ones from the
prompt's end), and a list of lists one list of positions per prompt (e.g. where each prompt's
subject ends).

Shard boundaries depend only on the configuration (batches of ``batch_size`` prompts, a shard
closed after the batch whose rows reach the budget), so a run resumed at a shard boundary
produces the very rows an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import DtypeError, ExtractionOptionError, LabelError, PositionError
from ..core.operations import only_role_operations
from ..core.roles import LAYER_ROLES
from . import activation_store as files
from .extraction import _requested_roles, read_roles
from .prompts import Prompts, as_batch

if TYPE_CHECKING:
    from ..core.model import AnyModel

Positions = int | str | Sequence[int] | Sequence[Sequence[int]] | None
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class ExtractionPlan:
    """What to run (``job``), the configuration a directory records (``config``), and the labels."""

    job: ExtractionJob
    config: dict[str, Any]
    labels: list[Any] | None


def plan(
    model: AnyModel,
    prompts: Prompts,
    *,
    roles: Iterable[str] | str = ("resid_post",),
    layers: Iterable[int] | int | None = None,
    positions: Positions = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 16,
    memory_budget: int | str = "512MiB",
    labels: Sequence[Any] | None = None,
    quiet: bool = False,
) -> ExtractionPlan:
    """Check every option before anything runs; see :func:`anylens.extract` for their meaning."""
    texts = as_batch(prompts)
    token_lists = _token_lists(model, texts)
    n_prompts = len(token_lists)
    if labels is not None:
        labels = _check_labels(labels, n_prompts)
    names = _requested_roles(model, roles)
    if "pattern" in names:
        raise ExtractionOptionError(
            "role 'pattern' cannot be extracted to rows: its key axis has each prompt's own length; "
            "read it with al.cache(model, prompts, roles=['pattern']) or al.attention_patterns"
        )
    chosen_layers = model.layers([layers] if isinstance(layers, int) else layers)
    keys = [(role, layer) for role in names for layer in (chosen_layers if role in LAYER_ROLES else [None])]
    per_prompt, described = resolve_positions(positions, [len(ids) for ids in token_lists])
    store_dtype = _dtype(dtype, model)
    budget = parse_bytes(memory_budget)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractionOptionError(f"batch_size={batch_size!r}: give a positive number of prompts per forward")
    config = {
        "roles": names,
        "layers": chosen_layers,
        "positions": described,
        "dtype": str(store_dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "memory_budget": budget,
        "n_prompts": n_prompts,
        "prompts_sha256": _sha256_json(token_lists),
        "positions_sha256": _sha256_json(per_prompt),
    }
    job = ExtractionJob(model, token_lists, per_prompt, keys, store_dtype, batch_size, budget, quiet)
    return ExtractionPlan(job, config, labels)


@only_role_operations("roles")
def collect(model: AnyModel, prompts: Prompts, *, roles: Iterable[str] | str = ("resid_post",), **options: Any):
    """The rows of :func:`plan` computed in memory, as :class:`~.activation_store.Activations`."""
    planned = plan(model, prompts, roles=roles, **options)
    manifest = {
        "format": files.FORMAT,
        "config": planned.config,
        "model": {"name": model.name, "n_layers": model.n_layers},
        "labels": planned.labels,
        "tensors": {},
        "shards": [],
        "complete": True,
    }
    return files.Activations(planned.job.run(manifest, 0, lambda tensors, stop: None), manifest)


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


# -- options ------------------------------------------------------------------------------------
def resolve_positions(spec: Positions, lengths: Sequence[int]) -> tuple[list[list[int]], Any]:
    """Per prompt, the real-token positions to keep (0 = its first token), and a JSON description."""
    if spec is None or spec == "all":
        return [list(range(n)) for n in lengths], "all"
    if spec == "last":
        return [[n - 1] for n in lengths], "last"
    if isinstance(spec, (str, bool)):
        raise ExtractionOptionError(
            f"positions={spec!r}: give 'last', 'all' (or None), an int, a list of ints, or one list per prompt"
        )
    if isinstance(spec, int):
        return [_absolute([spec], n, i) for i, n in enumerate(lengths)], [spec]
    items = list(spec)
    if items and all(isinstance(p, (list, tuple)) for p in items):
        if len(items) != len(lengths):
            raise ExtractionOptionError(
                f"positions has {len(items)} lists for {len(lengths)} prompts: give one list of positions per prompt"
            )
        per_prompt = [_absolute(list(p), n, i) for i, (p, n) in enumerate(zip(items, lengths))]
        return per_prompt, "per prompt"
    if not items or not all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        raise ExtractionOptionError(
            f"positions={spec!r}: give 'last', 'all' (or None), an int, a list of ints, or one list per prompt"
        )
    return [_absolute(items, n, i) for i, n in enumerate(lengths)], items


def _absolute(positions: list[int], n: int, prompt: int) -> list[int]:
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int):
            raise ExtractionOptionError(f"position {p!r} of prompt {prompt} is not an int")
        if not -n <= p < n:
            raise PositionError(
                f"position {p} is outside prompt {prompt}, which has {n} tokens (valid: 0..{n - 1} or -{n}..-1); "
                "positions count each prompt's real tokens: use 'last', negative positions, or one list per prompt"
            )
    return [p % n for p in positions]


def parse_bytes(budget: int | str) -> int:
    """``512MiB``, ``2GB``, ``1048576`` -> bytes."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        value = budget
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(budget), re.IGNORECASE)
        if match is None:
            raise ExtractionOptionError(f"memory_budget={budget!r}: give bytes as an int or a size such as '512MiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if value <= 0:
        raise ExtractionOptionError(f"memory_budget={budget!r}: the budget must be a positive number of bytes")
    return value


def _dtype(dtype: torch.dtype | str | None, model: AnyModel) -> torch.dtype:
    if dtype is None:
        return model.dtype
    chosen = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(chosen, torch.dtype) or not chosen.is_floating_point:
        raise DtypeError(f"dtype={dtype!r}: give a floating-point dtype such as 'float32' or 'bfloat16'")
    return chosen


def _check_labels(labels: Sequence[Any], n_prompts: int) -> list[Any]:
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    if len(labels) != n_prompts:
        raise LabelError(f"{len(labels)} labels for {n_prompts} prompts: give exactly one label per prompt")
    return labels


def _token_lists(model: AnyModel, texts: list[str] | torch.Tensor) -> list[list[int]]:
    """Each prompt's real token ids, tokenized as a batch would be (before padding)."""
    if isinstance(texts, torch.Tensor):
        return texts.tolist()
    return [list(ids) for ids in model.tokenizer(texts)["input_ids"]]


# -- running ------------------------------------------------------------------------------------
class ExtractionJob:
    """The batches of one extraction, from any prompt on, grouped into shards by the budget."""

    def __init__(self, model, token_lists, per_prompt, keys, dtype, batch_size, budget, quiet):
        self.model = model
        self.token_lists = token_lists
        self.per_prompt = per_prompt
        self.keys = keys
        self.dtype = dtype
        self.batch_size = batch_size
        self.budget = budget
        self.quiet = quiet
        tokenizer = model.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None and tokenizer is not None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def run(self, manifest: dict[str, Any], start: int, write: Any) -> list[dict[str, torch.Tensor]]:
        """Compute prompts ``start..`` and hand each shard to ``write(tensors, stop)``; returns the shards
        (kept in memory only when ``write`` does not store them: it returns None)."""
        from tqdm.auto import tqdm

        n = len(self.token_lists)
        kept: list[dict[str, torch.Tensor]] = []
        pending: list[dict[str, torch.Tensor]] = []
        held = 0
        with tqdm(total=n, initial=start, disable=self.quiet, unit="prompt", desc=f"extract {self.model.name}") as bar:
            for begin in range(start, n, self.batch_size):
                stop = min(begin + self.batch_size, n)
                rows = self.batch(begin, stop)
                pending.append(rows)
                held += sum(t.numel() * t.element_size() for t in rows.values())
                bar.update(stop - begin)
                if held >= self.budget or stop == n:
                    tensors = {name: torch.cat([p[name] for p in pending]) for name in pending[0]}
                    if not manifest["tensors"]:
                        manifest["tensors"] = {
                            name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
                            for name, t in tensors.items()
                            if name not in files.INDEX_KEYS
                        }
                    if write(tensors, stop) is None:
                        kept.append(tensors)
                    pending, held = [], 0
        return kept

    def _read(self, inputs: dict[str, torch.Tensor], read_at: list[int] | None) -> dict:
        # nnsight counts a left-padded row's positions from its first token only when the
        # tokenizer says it pads on the left; these batches are left-padded whatever it says.
        tokenizer = self.model.tokenizer
        side = getattr(tokenizer, "padding_side", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        try:
            return read_roles(self.model, inputs, self.keys, read_at)
        finally:
            if tokenizer is not None:
                tokenizer.padding_side = side

    def batch(self, begin: int, stop: int) -> dict[str, torch.Tensor]:
        """The rows of prompts ``begin..stop-1``: one left-padded forward, then the kept positions."""
        ids = self.token_lists[begin:stop]
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        batch_rows, columns, prompts, positions = [], [], [], []
        for r, row in enumerate(ids):
            pad = width - len(row)
            input_ids[r, pad:] = torch.tensor(row, dtype=torch.long)
            mask[r, pad:] = 1
            for p in self.per_prompt[begin + r]:
                batch_rows.append(r)
                columns.append(pad + p)
                prompts.append(begin + r)
                positions.append(p)
        # Read only the padded columns some prompt keeps (one column for "last").
        union = sorted(set(columns))
        where = {c: j for j, c in enumerate(union)}
        read_at = None if len(union) == width else union
        inputs = {"input_ids": input_ids.to(self.model.device), "attention_mask": mask.to(self.model.device)}
        values = self._read(inputs, read_at)
        select_rows = torch.tensor(batch_rows, dtype=torch.long)
        select_columns = torch.tensor([where[c] if read_at is not None else c for c in columns], dtype=torch.long)
        out = {}
        for (role, layer), value in values.items():
            value = value.expand(len(ids), *value.shape[1:])  # roles computed once for the batch ([1, pos, d])
            picked = value[select_rows.to(value.device), select_columns.to(value.device)]
            out[files.tensor_name(role, layer)] = picked.to(device="cpu", dtype=self.dtype).contiguous()
        out["prompt"] = torch.tensor(prompts, dtype=torch.long)
        out["position"] = torch.tensor(positions, dtype=torch.long)
        out["token"] = input_ids[select_rows, torch.tensor(columns, dtype=torch.long)]
        return out


__all__ = ["ExtractionJob", "ExtractionPlan", "collect", "parse_bytes", "plan", "resolve_positions"]
