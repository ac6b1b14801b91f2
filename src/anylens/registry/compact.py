"""Role paths for people: what a path hooks, in words, and adapters side by side.

The reference table (:mod:`.table`) has one row per adapter and one column per role, which is
what a program or a diff wants. A person comparing a few architectures wants the transpose:
roles as rows, adapters as columns, paths shortened to the part below the block (``{i}.input``
for ``model.layers.{i}.input``) and wrapped so that lines stay readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..core.hook_names import ROLE_HOOK_NAMES
from ..core.roles import ALL_ROLES
from ..core.spec import EAGER_PATTERN_OPERATION, RolePath
from ..core.tl_names import BLOCKS_PREFIX

if TYPE_CHECKING:
    from .table import TableRow

#: The widest line the side-by-side view aims for.
MAX_WIDTH = 160
#: Narrowest an adapter column gets before the view splits the adapters into several blocks.
MIN_COLUMN = 24
ABSENT = "-"
GAP = "  "

_VIEW_WORDS = {
    "heads": "split into heads",
    "kv_heads": "split into key/value heads",
    "tokens": "unflattened from [batch * pos]",
}


def describe_path(text: str) -> str:
    """What a role path hooks, in words: ``"output of model.layers.{i}"``, or for a path into
    a module's forward the operation it names (the eager attention softmax for ``pattern``)."""
    path = RolePath.parse(text)
    owner, *operations = path.module.split(".source.")
    where = owner or "the whole model"
    if operations and text.split("|")[0].endswith(EAGER_PATTERN_OPERATION):
        what = f"softmax probabilities inside eager attention of {where} (the dropout after the softmax, an identity in eval)"
    elif operations:
        inner = " inside ".join(reversed(operations))
        what = f"{path.io} of operation {inner} in the forward of {where}"
    else:
        what = f"{path.io} of {where}"
    for key in reversed(path.select):
        what = f"{'element' if isinstance(key, int) else 'field'} {key} of the {what}"
    if path.view in _VIEW_WORDS:
        what += f", {_VIEW_WORDS[path.view]}"
    elif path.view:
        part, layout = path.view.split(":")[1], path.view.split(":")[0].removeprefix("qkv_")
        what += f", the {part} part of a {layout} q/k/v projection split into heads"
    return what


def abbreviate(text: str, layers: str) -> str:
    """``text`` with the block prefix ``<layers>.{i}.`` written as ``{i}.``."""
    prefix = f"{layers}.{{i}}."
    return "{i}." + text[len(prefix) :] if layers and text.startswith(prefix) else text


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken after a ``.`` or a space, before
    a ``|``, or failing those after a ``_`` (or anywhere, for a word longer than the line)."""
    lines: list[str] = []
    while len(text) > width:
        cut = max(text.rfind(".", 0, width), text.rfind(" ", 0, width)) + 1
        cut = max(cut, text.rfind("|", 1, width + 1))
        if cut < width // 3:
            cut = max(cut, text.rfind("_", 0, width) + 1)
        cut = cut if cut > 0 else width
        lines.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return lines + [text] if text or not lines else lines


def hook_name_cell(role: str) -> str:
    """The TransformerLens name of a role, without the ``blocks.{i}.`` every per-layer one has."""
    return ROLE_HOOK_NAMES.get(role, "").removeprefix(f"{BLOCKS_PREFIX}.{{i}}.")


def _title(row: TableRow) -> str:
    return f"{row.adapter} ({row.variant})" if row.variant else row.adapter


def _grid_rows(rows: Sequence[TableRow]) -> list[tuple[str, str, list[str]]]:
    """(label, TransformerLens name, one cell per adapter) for roles, facts and modules."""
    grid = []
    for role in ALL_ROLES:
        if any(role in row.roles for row in rows):
            cells = [abbreviate(row.roles[role], row.layers) if role in row.roles else ABSENT for row in rows]
            grid.append((role, hook_name_cell(role), cells))
    facts = ("layers", "unembed", "out_proj", "parallel", "soft_cap", "z_feeds_residual", "architectures")
    for fact in facts:
        grid.append((fact, "", [abbreviate(row.cells()[fact], row.layers) or ABSENT for row in rows]))
    modules = list(dict.fromkeys(name for row in rows for name in row.reference_modules))
    for name in modules:
        cells = [abbreviate(row.reference_modules.get(name, ""), row.layers) or ABSENT for row in rows]
        grid.append((f"module {name}", "", cells))
    return grid


def _block(rows: Sequence[TableRow], column: int) -> list[str]:
    grid = _grid_rows(rows)
    label_width = max(len(label) for label, _, _ in grid)
    hook_width = max(len("TransformerLens"), *(len(hook) for _, hook, _ in grid))
    widths = [
        min(column, max(len(_title(row)), *(len(cells[n]) for _, _, cells in grid))) for n, row in enumerate(rows)
    ]

    def line_group(label: str, hook: str, cells: list[str]) -> list[str]:
        wrapped = [wrap(cell, width) for cell, width in zip(cells, widths)]
        height = max(len(lines) for lines in wrapped)
        out = []
        for k in range(height):
            parts = [(label if k == 0 else "").ljust(label_width), (hook if k == 0 else "").ljust(hook_width)]
            parts += [(lines[k] if k < len(lines) else "").ljust(width) for lines, width in zip(wrapped, widths)]
            out.append(GAP.join(parts).rstrip())
        return out

    lines = line_group("role", "TransformerLens", [_title(row) for row in rows])
    lines.append(GAP.join("-" * width for width in [label_width, hook_width, *widths]))
    for label, hook, cells in grid:
        lines += line_group(label, hook, cells)
    return lines


def _legend(rows: Sequence[TableRow], width: int) -> list[str]:
    lines = [
        "{i}.X is the module X of block i: <layers>.{i}.X, with <layers> from the layers row.",
        f"{ABSENT} means the adapter does not have it: asking for that role raises MissingRoleError.",
        "TransformerLens: the hook name of the role; per-layer names are blocks.{i}.NAME, "
        'so model.role("blocks.3.hook_z") is z at layer 3.',
        "module rows: internal modules no role covers, listed for reference.",
    ]
    operations = [(row, role, text) for row in rows for role, text in row.roles.items() if ".source." in text]
    if operations:
        lines.append("Paths into a module's forward (.source.):")
        lines += [f"  {_title(row)} {role}: {describe_path(text)}" for row, role, text in operations]
    # Continuation lines indented under their entry.
    return [part if k == 0 else "    " + part for line in lines for k, part in enumerate(wrap(line, width - 4))]


def side_by_side(rows: Iterable[TableRow], width: int = MAX_WIDTH) -> str:
    """Roles as rows and adapters as columns, in blocks of as many adapters as fit ``width``."""
    rows = list(rows)
    if not rows:
        return "no adapters\n"
    labels = [*ALL_ROLES, "z_feeds_residual", *(f"module {name}" for row in rows for name in row.reference_modules)]
    hooks = ["TransformerLens", *(hook_name_cell(role) for role in ALL_ROLES)]
    room = width - max(map(len, labels)) - max(map(len, hooks))  # for the adapter columns and every gap
    per_block = min(len(rows), max(1, (room - len(GAP)) // (MIN_COLUMN + len(GAP))))
    blocks = []
    for start in range(0, len(rows), per_block):
        chunk = rows[start : start + per_block]
        column = max(MIN_COLUMN, (room - (len(chunk) + 1) * len(GAP)) // len(chunk))
        blocks.append("\n".join(_block(chunk, column)))
    return "\n\n".join(blocks + ["\n".join(_legend(rows, width))]) + "\n"


__all__ = ["MAX_WIDTH", "abbreviate", "describe_path", "hook_name_cell", "side_by_side", "wrap"]
