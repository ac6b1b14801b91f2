"""Adapters as data: a role -> module-path table plus a few facts about the architecture.

A role path reads ``<module path>.<input|output>[.<attr or index>...][|<view>]``:

* ``model.layers.{i}.output`` — the output of layer ``i``;
* ``model.layers.{i}.self_attn.o_proj.input|heads`` — the input of the output projection,
  viewed as ``[batch, pos, n_heads, d_head]``;
* ``output.logits`` — the ``logits`` field of the whole model's output.

A module path may step into nnsight's operation-level ``source`` (``....source.op_name``).
A tuple output is reduced to its first element unless an index follows ``output``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterSpecError
from .roles import ALL_ROLES, LAYER_ROLES

#: Views a role path may end with, after ``|``.
VIEWS: tuple[str, ...] = (
    "heads",  # [..., n_heads * d_head] -> [..., n_heads, d_head]
    "kv_heads",  # [..., n_kv_heads * d_head] -> [..., n_kv_heads, d_head]
    "qkv_fused:q",  # q | k | v laid out one after another in the last dim
    "qkv_fused:k",
    "qkv_fused:v",
    "qkv_interleaved:q",  # per head [q k v] blocks in the last dim (GPT-NeoX)
    "qkv_interleaved:k",
    "qkv_interleaved:v",
    "tokens",  # [batch * pos, ...] -> [batch, pos, ...] for blocks that flatten tokens
)

_IO = ("input", "output")

#: Where a transformers attention module's eager attention function leaves the probabilities: the
#: output of the dropout applied to the softmax (the identity in eval mode), as an operation path.
EAGER_PATTERN_OPERATION = "source.attention_interface_1.source.nn_functional_dropout_0.output"


def eager_pattern(attention_module: str) -> str:
    """The ``pattern`` role path of ``attention_module`` (a module path, with ``{i}``) under eager
    attention, for the transformers attention modules that call ``attention_interface``."""
    return f"{attention_module}.{EAGER_PATTERN_OPERATION}"


@dataclass(frozen=True)
class RolePath:
    """Where one role lives: a module, which side of it, and how to view the tensor."""

    module: str  # dotted, may contain "{i}"; "" is the whole model
    io: str  # "input" | "output"
    select: tuple[str | int, ...] = ()  # attributes / indices after input/output
    view: str | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> RolePath:
        body, _, view_text = text.partition("|")
        body, view = body.strip(), view_text.strip() or None
        if view is not None and view not in VIEWS:
            raise AdapterSpecError(f"unknown view {view!r} in role path {text!r}; valid views: {', '.join(VIEWS)}")
        parts = body.split(".") if body else []
        io_positions = [n for n, part in enumerate(parts) if part in _IO]
        if not io_positions:
            raise AdapterSpecError(
                f"role path {text!r} names no side of a module: end the module path with '.output' or '.input',"
                " e.g. 'model.layers.{i}.output'"
            )
        at = io_positions[-1]
        select = tuple(int(p) if p.lstrip("-").isdigit() else p for p in parts[at + 1 :])
        return cls(module=".".join(parts[:at]), io=parts[at], select=select, view=view, text=text)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.module

    @property
    def steps_into_operations(self) -> bool:
        """Whether the path addresses an operation inside a module's forward (``.source.``)."""
        return ".source." in self.module

    def module_at(self, layer: int | None) -> str:
        return self.module.replace("{i}", str(layer)) if self.per_layer else self.module

    def torch_module_path(self, layer: int | None) -> str:
        """The part of the path that names a torch submodule (before any ``source`` step)."""
        path = self.module_at(layer)
        return path.split(".source.")[0] if ".source." in path else path.removesuffix(".source")


@dataclass(frozen=True)
class Variant:
    """Changes to an adapter that apply when config attributes have given values."""

    when: Mapping[str, Any]
    roles: Mapping[str, str] = field(default_factory=dict)  # added or replaced
    drop: tuple[str, ...] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, config: Any) -> bool:
        return all(getattr(config, key, None) == value for key, value in self.when.items())


@dataclass(frozen=True)
class AdapterSpec:
    """Everything anylens knows about one architecture family.

    ``architectures`` are matched against ``config.architectures`` and the model's class name.
    ``roles`` maps role names to role paths (see module docstring). The facts:

    * ``layers``: path of the list of blocks;
    * ``unembed``: path of the unembedding module (applied as a function by ``model.unembed``);
    * ``out_proj``: path of the attention output projection, for per-head weights ``W_O``;
    * ``n_heads`` / ``n_kv_heads`` / ``d_head`` / ``d_model`` / ``d_vocab``: each a config
      attribute name or a number (``n_heads=4`` for a model without a config; ``d_head`` falls
      back to ``d_model // n_heads``, ``n_kv_heads`` to ``n_heads``, ``d_model`` to the config's
      ``hidden_size`` / ``d_model`` or the unembedding's input width, ``d_vocab`` to the
      unembedding's output width);
    * ``logit_softcap``: config attribute holding the final-logit soft-cap, if any;
    * ``max_positions``: config attribute holding (or a number: how many) positions the model was built for
      (longer prompts are refused where a ``pos_embed`` role says positions are learned
      embeddings, warned about otherwise); a config without it has no limit;
    * ``parallel``: attention and MLP read the same residual (no ``resid_mid``);
    * ``z_feeds_residual``: ``attn_out`` is exactly the output projection of ``z`` (no post-norm).
    """

    name: str
    architectures: tuple[str, ...]
    layers: str
    roles: Mapping[str, str]
    unembed: str = "lm_head"
    out_proj: str | None = None
    n_heads: str | int = "num_attention_heads"
    n_kv_heads: str | int = "num_key_value_heads"
    d_head: str | int = "head_dim"
    d_model: str | int | None = None
    d_vocab: str | int | None = None
    logit_softcap: str | float | None = None
    max_positions: str | int | None = "max_position_embeddings"
    parallel: bool = False
    z_feeds_residual: bool = True
    variants: tuple[Variant, ...] = ()
    description: str = ""
    #: Named internal modules no role covers (name -> module path, ``{i}`` for the layer), listed
    #: in the reference table for orientation (Mamba's ``conv1d``); nothing reads them.
    reference_modules: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise AdapterSpecError("an adapter needs a non-empty 'name'")
        if isinstance(self.architectures, str):
            object.__setattr__(self, "architectures", (self.architectures,))
        if not self.architectures:
            raise AdapterSpecError(f"adapter {self.name!r} claims no architectures: give e.g. ['LlamaForCausalLM']")
        object.__setattr__(self, "architectures", tuple(self.architectures))
        object.__setattr__(self, "variants", tuple(self.variants))
        for variant in self.variants:
            _check_role_table(self.name, variant.roles)
        _check_role_table(self.name, self.roles)
        for fact in FACTS:
            _check_fact(self.name, fact, getattr(self, fact))

    def fact(self, name: str, config: Any) -> Any:
        """The value of fact ``name``: the number the adapter gives, or the config attribute it
        names (None where the config lacks it or there is no config)."""
        value = getattr(self, name)
        return getattr(config, value, None) if isinstance(value, str) else value

    # -- derived views ---------------------------------------------------------------------
    def role_path(self, role: str) -> RolePath:
        return RolePath.parse(self.roles[role])

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(role for role in ALL_ROLES if role in self.roles)

    def specialize(self, config: Any) -> AdapterSpec:
        """This adapter with the variants matching ``config`` applied."""
        spec = self
        for variant in self.variants:
            if variant.matches(config):
                roles = {k: v for k, v in spec.roles.items() if k not in variant.drop}
                roles.update(variant.roles)
                spec = dataclasses.replace(spec, roles=roles, variants=(), **dict(variant.facts))
        return dataclasses.replace(spec, variants=()) if spec.variants else spec

    # -- the data form ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["architectures"] = list(self.architectures)
        data["roles"] = dict(self.roles)
        data["variants"] = [
            {"when": dict(v.when), "roles": dict(v.roles), "drop": list(v.drop), "facts": dict(v.facts)}
            for v in self.variants
        ]
        return {k: v for k, v in data.items() if v not in (None, "", [], {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterSpecError(f"unknown adapter keys {unknown}; valid keys: {sorted(known)}")
        missing = [key for key in ("name", "architectures", "layers", "roles") if key not in data]
        if missing:
            raise AdapterSpecError(f"adapter declaration lacks {missing}; see docs/adapters.md for an example")
        values = dict(data)
        values["variants"] = tuple(
            Variant(
                when=v.get("when", {}),
                roles=v.get("roles", {}),
                drop=tuple(v.get("drop", ())),
                facts=v.get("facts", {}),
            )
            for v in data.get("variants", ())
        )
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> AdapterSpec:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # Python 3.10
            import tomli as tomllib
        with open(path, "rb") as handle:
            try:
                data = tomllib.load(handle)
            except tomllib.TOMLDecodeError as error:
                line = re.search(r"line (\d+)", str(error))
                where = f"line {line.group(1)}" if line else "somewhere"
                raise AdapterSpecError(
                    f"adapter file {str(path)!r} is not valid TOML at {where}: {error}; fix the syntax there "
                    "(docs/adapters.md has an example file)"
                ) from None
        return cls.from_dict(data.get("adapter", data))

    def to_toml(self) -> str:
        return _to_toml(self.to_dict())


#: Facts that are a config attribute name or a number.
FACTS: tuple[str, ...] = ("n_heads", "n_kv_heads", "d_head", "d_model", "d_vocab", "logit_softcap", "max_positions")


def _check_fact(name: str, fact: str, value: Any) -> None:
    if value is None or (isinstance(value, str) and value.isidentifier()):
        return
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if numeric and (isinstance(value, int) or fact == "logit_softcap"):
        return
    kind = "a positive number" if fact == "logit_softcap" else "a positive integer"
    raise AdapterSpecError(
        f"adapter {name!r}: fact {fact}={value!r} is neither {kind} nor a config attribute name; "
        f"give a number, or the name of the config attribute that holds it as a string"
    )


def _check_role_table(name: str, roles: Mapping[str, str]) -> None:
    for role, text in roles.items():
        if role not in ALL_ROLES:
            raise AdapterSpecError(f"adapter {name!r}: unknown role {role!r}; valid roles: {', '.join(ALL_ROLES)}")
        if not isinstance(text, str):
            raise AdapterSpecError(f"adapter {name!r}: role {role!r} must map to a path string, got {text!r}")
        path = RolePath.parse(text)
        if role in LAYER_ROLES and not path.per_layer:
            raise AdapterSpecError(
                f"adapter {name!r}: per-layer role {role!r} has path {text!r} without '{{i}}' for the layer index"
            )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise AdapterSpecError(f"cannot write {value!r} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").isalnum() else _toml_value(key)


def _to_toml(data: Mapping[str, Any]) -> str:
    lines = ["[adapter]"]
    tables = {k: v for k, v in data.items() if k in ("roles",)}
    arrays = {k: v for k, v in data.items() if k == "variants"}
    for key, value in data.items():
        if key not in tables and key not in arrays:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        lines += ["", f"[adapter.{key}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
    for variant in arrays.get("variants", []):
        lines += ["", "[[adapter.variants]]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in variant.items()]
    return "\n".join(lines) + "\n"
