"""The role x architecture reference table and the committed docs/reference.md."""

from __future__ import annotations

import csv
import difflib
import importlib
import io
import json
import re
from pathlib import Path

import families
import pytest
import torch

import anylens as al
from anylens.adapters.llama import LLAMA
from anylens.core.roles import ALL_ROLES
from anylens.registry.builtin import BUILTIN_PLUGINS
from anylens.registry.compact import describe_path, wrap
from anylens.registry.manager import as_spec, registry, reset_registry
from anylens.registry.table import (
    COLUMNS,
    REGENERATE_COMMAND,
    apply_variant,
    markdown_table,
    reference_markdown,
    render,
    table_rows,
    version_stamp,
    versions,
)
from anylens.testing import tiny

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


@pytest.fixture(autouse=True)
def fresh_registry():
    reset_registry()
    yield
    reset_registry()


def builtin_adapter_names() -> set[str]:
    """Adapter names straight from the built-in plugin modules, not through the registry."""
    names = set()
    for module in BUILTIN_PLUGINS:
        names |= {as_spec(item).name for item in importlib.import_module(module).anylens_adapters()}
    return names


def add_runtime_adapter_with_variant() -> None:
    """A plugin row whose paths use views (``|``) and whose variant changes roles and facts."""
    declaration = {
        **LLAMA.to_dict(),
        "name": "tabletest",
        "architectures": ["TableTestLM", "TableTestLM2"],
        "logit_softcap": "final_logit_softcapping",
        "variants": [{"when": {"parallel_block": True}, "drop": ["resid_mid"], "facts": {"parallel": True}}],
    }
    al.register_adapter(declaration)


# -- contents ----------------------------------------------------------------------------------
def test_every_builtin_adapter_has_a_row():
    builtins = builtin_adapter_names()
    assert {"gpt2", "llama"} <= builtins
    base_rows = [row for row in table_rows() if not row.variant]
    assert {row.adapter for row in base_rows if row.source == "built-in"} == builtins
    assert all(row.kind == "hand-written" for row in table_rows())


def test_rows_carry_the_adapters_role_paths_and_facts():
    for row in table_rows():
        if row.variant:
            continue
        spec = registry().adapter(row.adapter)
        assert row.architectures == spec.architectures
        cells = row.cells()
        for role in ALL_ROLES:
            assert cells[role] == spec.roles.get(role, ""), (row.adapter, role)
        assert cells["parallel"] == ("true" if spec.parallel else "false")
        assert cells["layers"] == spec.layers


def test_a_variant_gets_its_own_row_with_the_variant_applied():
    add_runtime_adapter_with_variant()
    rows = [row for row in table_rows() if row.adapter == "tabletest"]
    assert [row.variant for row in rows] == ["", "when parallel_block=true"]
    base, variant = rows
    assert base.source == variant.source == "runtime:tabletest"
    assert "resid_mid" in base.roles and "resid_mid" not in variant.roles
    assert (base.parallel, variant.parallel) == (False, True)
    assert variant.cells()["resid_mid"] == ""
    assert base.cells()["architectures"] == "TableTestLM TableTestLM2"
    assert base.cells()["soft_cap"] == "final_logit_softcapping"


def test_apply_variant_applies_only_that_variant():
    spec = as_spec(
        {
            **LLAMA.to_dict(),
            "name": "two_variants",
            "variants": [
                {"when": {"a": 1}, "drop": ["z"]},
                {"when": {"b": 1}, "drop": ["q"]},
            ],
        }
    )
    first = apply_variant(spec, spec.variants[0])
    assert "z" not in first.roles and "q" in first.roles
    assert first.variants == ()


def test_builtin_rows_come_first_sorted_by_name():
    add_runtime_adapter_with_variant()
    rows = [row for row in table_rows() if not row.variant]
    sources = [row.source == "built-in" for row in rows]
    assert sources == sorted(sources, reverse=True)
    builtin_names = [row.adapter for row in rows if row.source == "built-in"]
    assert builtin_names == sorted(builtin_names)
    assert rows[-1].adapter == "tabletest"


# -- formats -------------------------------------------------------------------------------------
def markdown_cells(document: str) -> list[dict[str, str]]:
    """Parse the adapters table of a markdown document back into cells."""
    lines = [line for line in document.splitlines() if line.startswith("| adapter |")]
    assert len(lines) == 1, "the document has exactly one adapters table"
    body = document.splitlines()
    start = body.index(lines[0])
    header = _split_md_row(body[start])
    assert body[start + 1].startswith("|---|")
    rows = []
    for line in body[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, _split_md_row(line), strict=True)))
    return rows


def _split_md_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [cell.strip().removeprefix("`").removesuffix("`").replace("\\|", "|") for cell in cells]


def test_markdown_json_and_csv_agree():
    add_runtime_adapter_with_variant()  # exercises '|' in paths, a plugin source and a variant
    rows = table_rows()
    expected = [row.cells() for row in rows]

    from_markdown = markdown_cells(render(rows, "markdown"))
    from_csv = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    payload = json.loads(render(rows, "json"))

    assert from_markdown == expected
    assert from_csv == expected
    assert payload["columns"] == list(COLUMNS)
    assert payload["versions"] == versions()
    assert [entry["adapter"] for entry in payload["rows"]] == [row.adapter for row in rows]
    for entry, cells in zip(payload["rows"], expected, strict=True):
        assert " ".join(entry["architectures"]) == cells["architectures"]
        assert {role: entry["roles"].get(role, "") for role in ALL_ROLES} == {role: cells[role] for role in ALL_ROLES}
        assert entry["parallel"] is (cells["parallel"] == "true")
        assert (entry["soft_cap"] or "") == cells["soft_cap"]
        assert entry["kind"] == cells["kind"] == "hand-written"


def test_markdown_escapes_the_view_separator_in_cells():
    table = markdown_table(table_rows())
    assert "`model.layers.{i}.self_attn.o_proj.input\\|heads`" in table
    assert "input|heads" not in table


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown table format 'xml'; choose one of markdown, json, csv, text$"):
        render(table_rows(), "xml")


def test_version_stamp_names_the_libraries_without_local_build_tags():
    stamp = version_stamp()
    for package in ("anylens", "transformers", "nnsight", "torch"):
        assert f"{package} {versions()[package]}" in stamp
    assert versions()["anylens"] == al.__version__
    assert "+" not in stamp  # 2.13.0+cpu and 2.13.0+cu128 are the same release


# -- docs/reference.md -------------------------------------------------------------------------
def test_reference_lists_builtins_only():
    add_runtime_adapter_with_variant()
    assert "| tabletest |" in render(table_rows(), "markdown")
    assert "| tabletest |" not in reference_markdown()
    assert "| llama |" in reference_markdown()


def without_version_stamp(document: str) -> str:
    """The document less its version stamp: a newer transformers or anylens release that maps the same
    module paths leaves the table current (``make test-latest`` would otherwise fail on the stamp alone)."""
    return "\n".join(
        line for line in document.splitlines() if not line.startswith("_Generated from the adapter registry")
    )


def test_docs_reference_is_current():
    fresh = without_version_stamp(reference_markdown())
    committed = without_version_stamp(REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else "")
    assert fresh.count("\n") > 50 and "| llama |" in fresh  # the comparison is of the table, not of nothing
    if committed != fresh:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    "docs/reference.md (committed)",
                    "docs/reference.md (generated now)",
                )
            )[:40]
        )
        pytest.fail(f"docs/reference.md is stale; regenerate it with `{REGENERATE_COMMAND}`\n{diff}")


# -- TransformerLens names, paths in words, reference modules -----------------------------------------
def reference_section(title: str) -> list[str]:
    """The table lines of a ``## title`` section of the reference document."""
    lines = reference_markdown().split(f"## {title}\n\n")[1].split("\n\n")[0].splitlines()
    assert lines[1].startswith("|---|")
    return lines[2:]


def test_role_legend_gives_each_roles_transformerlens_name():
    legend = {_split_md_row(line)[0]: _split_md_row(line)[1] for line in reference_section("Roles")}
    assert list(legend) == list(ALL_ROLES)
    assert legend["resid_post"] == "blocks.{i}.hook_resid_post" and legend["embed"] == "hook_embed"
    assert legend["logits"] == legend["mixer_out"] == ""  # TransformerLens has no hook of either
    for role, name in legend.items():
        if name:
            assert al.role_for_hook(name.replace("{i}", "0")) == (role, 0 if "{i}" in name else None)


def test_paths_into_a_forward_are_described_in_words():
    rows = table_rows(builtin_only=True)
    stepping = [
        (row.adapter, row.variant, role) for row in rows for role, text in row.roles.items() if ".source." in text
    ]
    assert ("llama", "", "pattern") in stepping
    described = reference_section("Paths into a module's forward")
    assert [tuple(_split_md_row(line)[:3]) for line in described][: len(stepping)] == stepping
    llama = next(_split_md_row(line) for line in described if line.startswith("| llama |"))
    assert llama[3].startswith("softmax probabilities inside eager attention of model.layers.{i}.self_attn")
    assert llama[4] == LLAMA.roles["pattern"]  # the machine path is kept beside the words


def test_reference_modules_are_listed_and_exist_on_the_tiny_models():
    listed = [tuple(_split_md_row(line)) for line in reference_section("Modules for reference")]
    assert ("mamba", "conv1d", "backbone.layers.{i}.mixer.conv1d") in listed
    for family in families.selected:
        spec = families.spec_of(family)
        assert [(a, n, p) for a, n, p in listed if a == spec.name] == [
            (spec.name, name, path) for name, path in spec.reference_modules.items()
        ]
        if spec.reference_modules:
            model = tiny(family)
            for path in spec.reference_modules.values():
                assert isinstance(model.module(path.replace("{i}", str(model.n_layers - 1))), torch.nn.Module)


def test_json_carries_the_reference_modules():
    payload = json.loads(render(table_rows(), "json"))
    mamba = next(entry for entry in payload["rows"] if entry["adapter"] == "mamba")
    assert mamba["reference_modules"]["x_proj"] == "backbone.layers.{i}.mixer.x_proj"


@pytest.mark.parametrize("width", [8, 20, 40])
def test_wrap_keeps_every_character_within_the_width(width):
    text = LLAMA.roles["pattern"]
    lines = wrap(text, width)
    assert all(len(line) <= width for line in lines) and "".join(lines) == text


@pytest.mark.parametrize(
    "path,words",
    [
        (
            "transformer.h.{i}.attn.c_attn.output|qkv_fused:k",
            "output of transformer.h.{i}.attn.c_attn, the k part of a fused",
        ),
        ("output.logits", "field logits of the output of the whole model"),
        ("blocks.{i}.output.1", "element 1 of the output of blocks.{i}"),
        ("h.{i}.attn.source.matmul_0.output", "output of operation matmul_0 in the forward of h.{i}.attn"),
        (
            "h.{i}.attn.source.eager_1.source.softmax_0.output",
            "output of operation softmax_0 inside eager_1 in the forward",
        ),
    ],
)
def test_describe_path_says_which_module_side_and_view(path, words):
    assert describe_path(path).startswith(words)
