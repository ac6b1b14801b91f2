"""The role x architecture reference table, generated from the adapter registry.

One row per adapter, plus one row per variant of an adapter (the adapter with that variant
applied). The table is rendered as markdown, JSON or CSV, which carry the same cells, so any of
them can be checked against the others (JSON adds each adapter's reference modules); or as text,
adapters side by side (:mod:`.compact`). ``docs/reference.md`` is the markdown table inside its
explanation (:func:`reference_markdown`).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.metadata
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ..core.errors import UnknownArchitectureError
from ..core.roles import ALL_ROLES, MODEL_ROLES, ROLE_MEANINGS, ROLE_SHAPES
from ..core.spec import AdapterSpec, Variant
from .compact import describe_path, hook_name_cell, side_by_side
from .manager import Claim, Registry, registry

FORMATS: tuple[str, ...] = ("markdown", "json", "csv", "text")

#: Columns before the role columns, and the facts after them.
LEAD_COLUMNS: tuple[str, ...] = ("adapter", "variant", "architectures", "source", "kind")
FACT_COLUMNS: tuple[str, ...] = ("layers", "unembed", "out_proj", "parallel", "soft_cap", "z_feeds_residual")
COLUMNS: tuple[str, ...] = LEAD_COLUMNS + ALL_ROLES + FACT_COLUMNS
#: Columns holding module or role paths, shown as code in markdown.
PATH_COLUMNS: frozenset[str] = frozenset(ALL_ROLES) | {"layers", "unembed", "out_proj"}

#: Versions in the markdown stamp: the role paths are a statement about these libraries.
STAMPED_PACKAGES: tuple[str, ...] = ("anylens", "transformers", "nnsight", "torch")

BUILTIN_SOURCE = "built-in"
#: Every adapter today is written by hand; adapters inferred from a model will say "inferred".
HAND_WRITTEN = "hand-written"
INFERRED = "inferred"

REGENERATE_COMMAND = "anylens table --reference --write docs/reference.md"


@dataclass(frozen=True)
class TableRow:
    """One adapter (or one variant of it) as the table shows it."""

    adapter: str
    variant: str  # "" for the adapter itself, else the condition of the variant
    architectures: tuple[str, ...]
    source: str  # "built-in" or the plugin's registered name
    kind: str
    roles: Mapping[str, str] = field(default_factory=dict)
    layers: str = ""  # module path of the list of blocks
    unembed: str = ""  # module path of the unembedding
    out_proj: str = ""  # module path of the attention output projection (for W_O)
    parallel: bool = False
    soft_cap: str | None = None  # config attribute that holds the final-logit soft-cap
    z_feeds_residual: bool = True
    reference_modules: Mapping[str, str] = field(default_factory=dict)  # name -> module path

    def cells(self) -> dict[str, str]:
        """The row as strings, one per column in :data:`COLUMNS` (absent roles are empty)."""
        cells = {
            "adapter": self.adapter,
            "variant": self.variant,
            "architectures": " ".join(self.architectures),
            "source": self.source,
            "kind": self.kind,
        }
        cells.update({role: self.roles.get(role, "") for role in ALL_ROLES})
        cells.update(
            layers=self.layers,
            unembed=self.unembed,
            out_proj=self.out_proj,
            parallel=_flag(self.parallel),
            soft_cap=self.soft_cap or "",
            z_feeds_residual=_flag(self.z_feeds_residual),
        )
        return cells

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "variant": self.variant,
            "architectures": list(self.architectures),
            "source": self.source,
            "kind": self.kind,
            "roles": {role: self.roles[role] for role in ALL_ROLES if role in self.roles},
            "layers": self.layers,
            "unembed": self.unembed,
            "out_proj": self.out_proj,
            "parallel": self.parallel,
            "soft_cap": self.soft_cap,
            "z_feeds_residual": self.z_feeds_residual,
            "reference_modules": dict(self.reference_modules),
        }


def _flag(value: bool) -> str:
    return "true" if value else "false"


# -- rows --------------------------------------------------------------------------------------
def table_rows(reg: Registry | None = None, *, builtin_only: bool = False) -> list[TableRow]:
    """The rows of every registered adapter: built-ins first, then plugins, each by name."""
    reg = registry() if reg is None else reg
    claims = [claim for claim in reg.adapters.values() if claim.builtin or not builtin_only]
    claims.sort(key=lambda claim: (not claim.builtin, claim.adapter.name, claim.plugin))
    rows: list[TableRow] = []
    for claim in claims:
        rows.append(_row(claim.adapter, claim, variant=""))
        for variant in claim.adapter.variants:
            rows.append(_row(apply_variant(claim.adapter, variant), claim, variant=describe_variant(variant)))
    return rows


#: Architectures with no hand-written adapter whose inferred (and verified) maps docs/reference.md
#: shows as examples; docs/coverage.md lists every architecture inference serves.
INFERRED_EXAMPLES: tuple[str, ...] = ("Qwen3ForCausalLM", "OlmoForCausalLM", "StableLmForCausalLM")


def inferred_rows(class_names: Iterable[str]) -> list[TableRow]:
    """Rows for adapters inferred on tiny random instances of transformers classes (``kind`` inferred)."""
    from ..inference.infer import infer_adapter
    from ..tiny.arch import tiny_model

    rows = []
    for class_name in class_names:
        spec = infer_adapter(tiny_model(class_name))
        rows.append(
            dataclasses.replace(
                _row(spec, Claim(spec, "inference", False), variant=""), source="inference", kind=INFERRED
            )
        )
    return rows


def apply_variant(spec: AdapterSpec, variant: Variant) -> AdapterSpec:
    """``spec`` with exactly this variant applied, using the same code path a real config takes."""
    only_this = dataclasses.replace(spec, variants=(variant,))
    return only_this.specialize(SimpleNamespace(**dict(variant.when)))


def describe_variant(variant: Variant) -> str:
    return "when " + ", ".join(f"{key}={_literal(value)}" for key, value in variant.when.items())


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return _flag(value)
    return repr(value) if isinstance(value, str) else str(value)


def _row(spec: AdapterSpec, claim: Claim, *, variant: str) -> TableRow:
    return TableRow(
        adapter=spec.name,
        variant=variant,
        architectures=tuple(spec.architectures),
        source=BUILTIN_SOURCE if claim.builtin else claim.plugin,
        kind=HAND_WRITTEN,
        roles=dict(spec.roles),
        layers=spec.layers,
        unembed=spec.unembed,
        out_proj=spec.out_proj or "",
        parallel=spec.parallel,
        soft_cap=spec.logit_softcap,
        z_feeds_residual=spec.z_feeds_residual,
        reference_modules=dict(spec.reference_modules),
    )


def select_rows(rows: Iterable[TableRow], names: Iterable[str]) -> list[TableRow]:
    """The rows (variants included) of the adapters ``names`` give, in that order; a name is an
    adapter name or an architecture (``LlamaForCausalLM``), in any case. An unknown name raises
    :class:`UnknownArchitectureError` with the nearest names."""
    rows = list(rows)
    known = {row.adapter.lower(): row.adapter for row in rows}
    known |= {arch.lower(): row.adapter for row in rows for arch in row.architectures}
    chosen: list[str] = []
    for name in names:
        adapter = known.get(name.strip().lower())
        if adapter is None:
            raise UnknownArchitectureError(unknown_name_message(name, rows))
        if adapter not in chosen:
            chosen.append(adapter)
    return [row for adapter in chosen for row in rows if row.adapter == adapter]


def unknown_name_message(name: str, rows: Iterable[TableRow]) -> str:
    """No adapter or architecture is called ``name``: the nearest ones and every adapter."""
    rows = list(rows)
    adapters = list(dict.fromkeys(row.adapter for row in rows))
    candidates = adapters + [arch for row in rows for arch in row.architectures]
    lowered = {candidate.lower(): candidate for candidate in candidates}
    near = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)]
    hint = f"did you mean {', '.join(map(repr, near))}? " if near else ""
    return f"no adapter or architecture named {name!r}; {hint}adapters: {', '.join(adapters)}"


# -- versions ----------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Installed versions of the stamped packages, without local build tags.

    ``2.13.0+cpu`` and ``2.13.0+cu128`` are the same torch release and map the same module
    paths, so the stamp (and the staleness test of docs/reference.md) ignores the ``+...`` tag.
    """
    found: dict[str, str] = {}
    for package in STAMPED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def version_stamp() -> str:
    stamp = ", ".join(f"{package} {version}" for package, version in versions().items())
    return f"_Generated from the adapter registry with {stamp}._"


# -- rendering ---------------------------------------------------------------------------------
def render(rows: Iterable[TableRow], fmt: str = "markdown") -> str:
    rows = list(rows)
    if fmt == "markdown":
        return markdown_table(rows) + "\n"
    if fmt == "text":
        return side_by_side(rows)
    if fmt == "json":
        payload = {"versions": versions(), "columns": list(COLUMNS), "rows": [row.to_json() for row in rows]}
        return json.dumps(payload, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(row.cells() for row in rows)
        return buffer.getvalue()
    raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")


def markdown_table(rows: Iterable[TableRow]) -> str:
    """Just the table: role paths in code spans, with ``|`` escaped so views keep their cell."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = row.cells()
        shown = [_md_cell(cells[column], code=column in PATH_COLUMNS) for column in COLUMNS]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _md_cell(text: str, *, code: bool) -> str:
    if not text:
        return ""
    escaped = text.replace("|", "\\|")
    return f"`{escaped}`" if code else escaped


_INTRO = """\
# Role reference

Which module of each architecture plays each component role. Each row is an adapter registered
with anylens; a row with a `variant` is that adapter as it applies to models whose config has
the listed values. A role column holds the role path the adapter reads and writes for that
role. An empty cell means the architecture does not have the role: asking for it raises
`MissingRoleError`, it is never faked. `source` says where the adapter comes from (`built-in`,
or the plugin that registered it) and `kind` how it was written.

A role path reads `<module path>.<input|output>[.<field or index>...][|<view>]`. `{i}` stands for
the layer index; `input` or `output` is the side of the module; a field or index after it picks
part of a structured output (without one, a tuple output is reduced to its first element); a
`.source.<op>` step addresses an operation inside a module's forward (the paths that do are
spelled out in words under [Paths into a module's forward](#paths-into-a-modules-forward)); an
empty module path (`output.logits`) is the whole model. The view after `|` reshapes the tensor:
`heads` and `kv_heads` split the last dimension into heads; `qkv_fused:q` (`:k`, `:v`) and
`qkv_interleaved:q` (`:k`, `:v`) take one of q, k, v from a fused projection; `tokens` unflattens
`[batch * pos]`. For example, `model.layers.{i}.self_attn.o_proj.input|heads` in the `z` column
means that `z[i]` is the input of layer `i`'s output projection, seen as
`[batch, pos, n_heads, d_head]`.

The facts: `layers`, `unembed` and `out_proj` are the module paths of the list of blocks, of the
unembedding, and of the attention output projection (whose weights give the per-head `W_O`).
`parallel` means attention and MLP read the same residual (so there is no `resid_mid`);
`soft_cap` names the config attribute holding the final-logit soft-cap; `z_feeds_residual` means
`attn_out` is exactly the output projection of `z`, so per-head contributions add up to it.
How to add an adapter is in [adapters.md](adapters.md).

Every role that TransformerLens (and so SAELens) has a hook for answers to that hook name too:
the `TransformerLens name` column of [Roles](#roles) gives it, and
`model.role("blocks.3.hook_resid_post")` is `resid_post` at layer 3 on any adapter with the role
(`al.role_for_hook` and `al.hook_for_role` convert between the two). `ln_final.hook_normalized`
stands for `final_norm`, the final norm's real output: TransformerLens, which folds the norm's
scale into the unembedding by default, reads it before the scale.

[Modules for reference](#modules-for-reference) lists internal modules that no role covers (the
Mamba mixer's projections and convolution), as the adapters declare them.

On a terminal, `anylens table` prints the adapters table alone, and
`anylens table --adapters llama,mamba,gpt2` prints those adapters side by side: roles as rows,
paths shortened to the part below the block (`{i}.input`) and wrapped, with a legend.
`anylens roles NAME` shows one adapter's roles given an adapter name, an architecture
(`LlamaForCausalLM`) or a model.

This file is generated from the registry; do not edit it by hand. Regenerate it with
`{command}`."""


def _role_legend() -> str:
    lines = ["| role | TransformerLens name | shape | meaning |", "|---|---|---|---|"]
    for role in ALL_ROLES:
        hook = hook_name_cell(role)
        name = f"`blocks.{{i}}.{hook}`" if hook and role not in MODEL_ROLES else f"`{hook}`" if hook else ""
        lines.append(f"| `{role}` | {name} | {ROLE_SHAPES[role]} | {ROLE_MEANINGS[role]} |")
    return "\n".join(lines)


def _operation_paths(rows: list[TableRow]) -> str:
    """The role paths that step into a module's forward, with what they hook in words."""
    lines = ["| adapter | variant | role | what it hooks | path |", "|---|---|---|---|---|"]
    for row in rows:
        for role, text in row.roles.items():
            if ".source." in text:
                lines.append(
                    f"| {row.adapter} | {row.variant} | `{role}` | {describe_path(text)} | {_md_cell(text, code=True)} |"
                )
    return "\n".join(lines)


def _reference_modules(rows: list[TableRow]) -> str:
    lines = ["| adapter | module | path |", "|---|---|---|"]
    for row in rows:
        if not row.variant:
            lines += [f"| {row.adapter} | {name} | `{path}` |" for name, path in row.reference_modules.items()]
    return "\n".join(lines)


def _document(rows: list[TableRow]) -> str:
    parts = [
        _INTRO.replace("{command}", REGENERATE_COMMAND),
        version_stamp(),
        "## Adapters\n\n" + markdown_table(rows),
        "## Roles\n\n" + _role_legend(),
        "## Paths into a module's forward\n\n" + _operation_paths(rows),
        "## Modules for reference\n\n" + _reference_modules(rows),
    ]
    return "\n\n".join(parts) + "\n"


def reference_markdown(reg: Registry | None = None) -> str:
    """The ``docs/reference.md`` document: built-in adapters (so that it does not depend on which
    third-party plugins happen to be installed) and a few inferred ones, marked as such."""
    return _document(table_rows(reg, builtin_only=True) + inferred_rows(INFERRED_EXAMPLES))


__all__ = [
    "COLUMNS",
    "FORMATS",
    "REGENERATE_COMMAND",
    "TableRow",
    "apply_variant",
    "markdown_table",
    "reference_markdown",
    "render",
    "select_rows",
    "table_rows",
    "version_stamp",
    "versions",
]
