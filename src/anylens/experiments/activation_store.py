"""Activations on disk: the extraction directory, its shards, and reading them back lazily.

Layout of an extraction directory (written by :func:`anylens.extract`)::

    manifest.json                 configuration, model identity, tensor shapes, finished shards
    shards/00000.safetensors      one file per run of consecutive prompts
    .lock                         held while a process writes the directory

Every shard holds the same tensors, one row per stored (prompt, position):

* ``"<role>.<layer>"`` (``"resid_post.3"``) or ``"<role>"`` for model-wide roles: ``[rows, ...]``,
  the role's shape without its batch and position axes;
* ``"prompt"``: the prompt's index in the extraction's prompt list, ``"position"``: the position
  among that prompt's real tokens (0 is its first token, padding never counts), ``"token"``: the
  token id there (all int64, ``[rows]``).

Files are written atomically (by :mod:`anylens.sweep.activations`), and a shard counts as finished only
once the manifest lists it with its sha256. Loading is lazy: ``safe_open(...).get_tensor`` (and
``load_file``) of safetensors 0.8 return tensors backed by a private memory map of the file, so
only the pages a computation touches are read, and writing to such a tensor never reaches the file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import (
    ActivationsConfigError,
    ActivationsIntegrityError,
    ActivationsNotFoundError,
    ActivationsWarning,
    LabelError,
    LayerIndexError,
    MissingRoleError,
)
from ..core.roles import LAYER_ROLES

if TYPE_CHECKING:
    from ..core.model import AnyModel
    from .extraction import ActivationCache

MANIFEST = "manifest.json"
SHARDS = "shards"
#: Written into the manifest and every shard; bumped when the layout changes incompatibly.
FORMAT = "anylens-activations/1"
CACHE_FORMAT = "anylens-cache/1"
#: Row bookkeeping stored next to the activations in every shard.
INDEX_KEYS = ("prompt", "position", "token")

Key = tuple[str, int | None]


def tensor_name(role: str, layer: int | None) -> str:
    """``resid_post.3`` for a per-layer role, ``embed`` for a model-wide one."""
    return role if layer is None else f"{role}.{layer}"


def parse_name(name: str) -> Key:
    role, _, layer = name.partition(".")
    return role, (int(layer) if layer else None)


def shard_file(index: int) -> str:
    return f"{SHARDS}/{index:05d}.safetensors"


def shard_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of one shard: equal tensors give equal bytes (keys are sorted by the
    format, and the one metadata entry keeps the header free of unordered maps)."""
    from safetensors.torch import save

    return save({name: t.contiguous() for name, t in tensors.items()}, metadata={"format": FORMAT})


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ActivationsNotFoundError(
            f"{root} holds no extraction ({MANIFEST} is missing); write one with al.extract(model, prompts, out={str(root)!r})"
        ) from None
    except (OSError, ValueError) as error:
        raise ActivationsConfigError(
            f"{path} cannot be read ({error}): the extraction's record is damaged; "
            "extract into a new out, or pass fresh=True to start this one over"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ActivationsConfigError(
            f"{path} is not an {FORMAT} manifest (format {found!r}): this directory holds something else; "
            "extract into a new out"
        )
    return manifest


def shard_problem(root: Path, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """``None`` when the shard file matches its manifest entry, else what is wrong with it."""
    path = root / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "its file is missing"
    if size != entry["bytes"]:
        return f"its file has {size} bytes, {entry['bytes']} were written (truncated?)"
    if checksum and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        return "its sha256 does not match the one recorded when it was written"
    return None


# -- reading ------------------------------------------------------------------------------------
class Activations:
    """Stored activations, one row per (prompt, position), per role and layer.

    ``acts["resid_post", 3]`` is a ``[rows, d_model]`` tensor (memory-mapped when the extraction
    has one shard; with several, the role's rows of every shard concatenated in memory, the other
    roles untouched); ``acts.shards("resid_post", 3)`` gives the memory-mapped piece of each shard.
    ``acts.prompt``, ``acts.position`` and ``acts.token`` say where each row comes from, and
    ``acts.dataset(role, layer)`` is a torch ``Dataset`` over the rows.
    """

    def __init__(self, shards: Sequence[dict[str, torch.Tensor]], manifest: dict[str, Any], root: Path | None = None):
        self._shards = list(shards)
        self.manifest = manifest
        self.root = root
        self._offsets = [0]
        for shard in self._shards:
            self._offsets.append(self._offsets[-1] + int(shard["prompt"].shape[0]))

    # -- facts ---------------------------------------------------------------------------------
    def keys(self) -> list[Key]:
        """(role, layer) of every stored tensor, like ``ActivationCache.keys()``."""
        return [parse_name(name) for name in self.manifest["tensors"]]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.manifest["config"]["roles"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["config"]["layers"])

    @property
    def n_prompts(self) -> int:
        return int(self.manifest["config"]["n_prompts"])

    @property
    def labels(self) -> list[Any] | None:
        return self.manifest.get("labels")

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return self._offsets[-1]

    def __repr__(self) -> str:
        where = f" in {self.root}" if self.root is not None else ""
        return (
            f"<Activations {self.model_name!r}{where}: {len(self)} rows of {self.n_prompts} prompts, "
            f"roles {list(self.roles)}, layers {self.layers}, {len(self._shards)} shards>"
        )

    # -- tensors -------------------------------------------------------------------------------
    def _name(self, role: str, layer: int | None) -> str:
        if role not in self.roles:
            raise MissingRoleError(
                f"role {role!r} is not in these activations (roles {list(self.roles)}); extract it with "
                f"al.extract(model, prompts, roles=[{role!r}], out=<a new directory>)"
            )
        if role in LAYER_ROLES:
            n_layers = int(self.manifest["model"]["n_layers"])
            if layer is None or not -n_layers <= layer < n_layers:
                raise LayerIndexError(
                    f"{role!r} is per layer: index it with a layer of the {n_layers}, stored layers {self.layers}"
                    if layer is None
                    else f"layer {layer} is out of range for {n_layers} layers (valid: 0..{n_layers - 1} or -{n_layers}..-1)"
                )
            layer %= n_layers
            if layer not in self.layers:
                raise LayerIndexError(
                    f"layer {layer} was not extracted (layers {self.layers}); extract it into a new out"
                )
        elif layer is not None:
            raise LayerIndexError(f"{role!r} is a model-wide role: index it without a layer, acts[{role!r}]")
        return tensor_name(role, layer)

    def shards(self, role: str, layer: int | None = None) -> list[torch.Tensor]:
        """The rows of ``role`` at ``layer`` in each shard, memory-mapped: nothing is read yet."""
        name = self._name(role, layer)
        return [shard[name] for shard in self._shards]

    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:
        role, layer = (key, None) if isinstance(key, str) else key
        return self._join(self.shards(role, layer), self._name(role, layer))

    def _join(self, pieces: list[torch.Tensor], name: str) -> torch.Tensor:
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:  # an extraction killed before its first shard
            spec = self.manifest["tensors"].get(name, {"shape": [], "dtype": "int64"})
            return torch.empty(0, *spec["shape"], dtype=getattr(torch, spec["dtype"]))
        return torch.cat(pieces)

    @property
    def prompt(self) -> torch.Tensor:
        """``[rows]``: the index of each row's prompt."""
        return self._join([s["prompt"] for s in self._shards], "prompt")

    @property
    def position(self) -> torch.Tensor:
        """``[rows]``: each row's position among its prompt's real tokens (0 = first)."""
        return self._join([s["position"] for s in self._shards], "position")

    @property
    def token(self) -> torch.Tensor:
        """``[rows]``: the token id at each row's position."""
        return self._join([s["token"] for s in self._shards], "token")

    def row(self, index: int) -> tuple[int, int]:
        """(shard, row within it) of global row ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} is out of range for {len(self)} rows")
        index %= len(self)
        shard = bisect.bisect_right(self._offsets, index) - 1
        return shard, index - self._offsets[shard]

    def dataset(self, role: str, layer: int | None = None, labels: Sequence[Any] | None = None) -> ActivationDataset:
        """A torch ``Dataset`` over the rows of ``role`` at ``layer``; each item is a dict with
        ``activation``, ``prompt``, ``position`` and, where there are labels (given here, or
        stored by the extraction), ``label`` (the label of the row's prompt)."""
        name = self._name(role, layer)
        labels = self.labels if labels is None else list(labels)
        if labels is not None and len(labels) != self.n_prompts:
            raise LabelError(
                f"{len(labels)} labels for {self.n_prompts} prompts: give one label per prompt of the extraction"
            )
        return ActivationDataset(self, name, labels)


class ActivationDataset(torch.utils.data.Dataset):
    """Rows of one stored role/layer; reads one row of one shard per item (lazily)."""

    def __init__(self, activations: Activations, name: str, labels: list[Any] | None):
        self.activations = activations
        self.name = name
        self.labels = labels

    def __len__(self) -> int:
        return len(self.activations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard_index, row = self.activations.row(int(index))
        shard = self.activations._shards[shard_index]
        prompt = int(shard["prompt"][row])
        item = {"activation": shard[self.name][row], "prompt": prompt, "position": int(shard["position"][row])}
        if self.labels is not None:
            item["label"] = self.labels[prompt]
        return item


def open_shard(root: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a shard, memory-mapped (``safe_open`` reads only the header now)."""
    from safetensors import safe_open

    handle = safe_open(str(root / entry["file"]), framework="pt")
    names = handle.keys()
    return {name: handle.get_tensor(name) for name in names}


def load_activations(path: str | os.PathLike, *, verify: bool = True) -> Activations:
    """The activations an :func:`anylens.extract` wrote to ``path``, memory-mapped.

    ``verify`` checks every shard's sha256 first (reads each file once; a damaged shard raises
    :class:`ActivationsIntegrityError`); sizes are always checked. An unfinished extraction gives
    the shards it has, with an :class:`ActivationsWarning`.
    """
    root = Path(path)
    manifest = read_manifest(root)
    entries = manifest["shards"]
    for entry in entries:
        problem = shard_problem(root, entry, checksum=verify)
        if problem is not None:
            raise ActivationsIntegrityError(
                f"shard {entry['file']} in {root} is damaged: {problem}; "
                "rerun the same al.extract(..., out=...) to recompute it"
            )
    if not manifest.get("complete"):
        done = entries[-1]["prompts"][1] if entries else 0
        warnings.warn(
            f"the extraction in {root} is unfinished ({done} of {manifest['config']['n_prompts']} prompts): "
            "rerun the same al.extract(...) to complete it",
            ActivationsWarning,
            stacklevel=2,
        )
    return Activations([open_shard(root, entry) for entry in entries], manifest, root)


# -- one cache ----------------------------------------------------------------------------------
def save_cache(cache: ActivationCache, path: str | os.PathLike) -> Path:
    """One :class:`ActivationCache` as a safetensors file (tensors, tokens, mask, layers, positions)."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {tensor_name(role, layer): value.detach().cpu().contiguous() for (role, layer), value in cache.items()}
    tensors["tokens"] = cache.tokens.detach().cpu().contiguous()
    tensors["attention_mask"] = cache.attention_mask.detach().cpu().contiguous()
    # A tensor broadcast by the model (GPT-2's position embedding) may share storage: copy each.
    tensors = {name: t.clone() for name, t in tensors.items()}
    meta = {
        "model": cache.model.name,
        "n_layers": int(cache.model.n_layers),
        "layers": list(cache.layers),
        "positions": cache.positions,
        "keys": [tensor_name(role, layer) for role, layer in cache],
    }
    data = save(tensors, metadata={"format": CACHE_FORMAT, "cache": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Replaced whole: a reader sees the old file or the new one (the sweep store's writer also
    # syncs to disk, but it sits in a layer above this one).
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return path


def load_cache(path: str | os.PathLike, model: AnyModel | None = None) -> ActivationCache:
    """An :class:`ActivationCache` that :func:`save_cache` wrote; ``model`` (optional) restores
    what needs the model itself (token strings, the residual decomposition)."""
    from safetensors import SafetensorError, safe_open

    from .extraction import ActivationCache

    path = Path(path)
    if not path.is_file():
        raise ActivationsNotFoundError(
            f"{path} does not exist: save a cache there first with cache.save({str(path)!r})"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}")
            meta = json.loads(metadata["cache"])
            names = handle.keys()
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, ValueError, KeyError, OSError) as error:
        raise ActivationsIntegrityError(
            f"{path} is not a saved activation cache ({error}); save one with cache.save(path)"
        ) from None
    if model is not None and model.name != meta["model"]:
        warnings.warn(
            f"{path} was saved from model {meta['model']!r}, loaded with {model.name!r}",
            ActivationsWarning,
            stacklevel=2,
        )
    values = {parse_name(name): tensors[name] for name in meta["keys"]}
    owner = model if model is not None else _SavedModel(meta["model"], meta["n_layers"])
    return ActivationCache(
        owner, values, tensors["tokens"], tensors["attention_mask"], meta["layers"], meta["positions"]
    )


class _SavedModel:
    """What a loaded cache knows of its model when no model is given: name and layer count."""

    def __init__(self, name: str, n_layers: int):
        self.name = name
        self.n_layers = n_layers

    def layer_index(self, layer: int) -> int:
        from ..core.errors import LayerIndexError

        if not -self.n_layers <= layer < self.n_layers:
            raise LayerIndexError(
                f"layer {layer} is out of range for {self.n_layers} layers (valid: 0..{self.n_layers - 1} "
                f"or -{self.n_layers}..-1)"
            )
        return layer % self.n_layers

    def layers(self, layers: Any = None) -> list[int]:
        return list(range(self.n_layers)) if layers is None else [self.layer_index(i) for i in layers]

    def to_str_tokens(self, prompt: Any) -> list[str]:
        raise AttributeError(
            f"this cache was loaded without its model; load it with ActivationCache.load(path, model) "
            f"(model {self.name!r}) to see token strings"
        )


__all__ = [
    "ActivationDataset",
    "Activations",
    "ActivationsWarning",
    "FORMAT",
    "load_activations",
    "load_cache",
    "save_cache",
]
