"""The ``anylens`` command line: table, check, roles, zoo train, and its exit statuses."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anylens as al
from anylens import cli
from anylens.adapters.llama import LLAMA
from anylens.registry.manager import reset_registry
from anylens.registry.table import COLUMNS, reference_markdown, render, table_rows
from anylens.testing import TINY_BUILDERS, tiny_model


@pytest.fixture(autouse=True)
def fresh_registry():
    reset_registry()
    yield
    reset_registry()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# -- anylens table -------------------------------------------------------------------------------
def test_table_markdown_is_the_table_alone(capsys):
    status, out, _ = run(capsys, "table")
    assert status == 0
    assert out == render(table_rows(), "markdown")
    assert all(line.startswith("|") for line in out.splitlines())  # no prose: that is --reference
    assert out.startswith("| adapter | variant |")
    assert "| llama |  | LlamaForCausalLM | built-in | hand-written |" in out


def grid_line(out: str, label: str) -> str:
    """The first line of a side-by-side view whose first column is ``label``."""
    return next(line for line in out.splitlines() if line.split("  ")[0].strip() == label)


def test_table_adapters_side_by_side(capsys):
    status, out, _ = run(capsys, "table", "--adapters", "llama,mamba,gpt2")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["role", "TransformerLens", "llama", "mamba", "gpt2"]
    assert max(map(len, lines)) <= 160
    assert grid_line(out, "resid_pre").split() == ["resid_pre", "hook_resid_pre", "{i}.input", "{i}.input", "{i}.input"]
    assert grid_line(out, "mixer_out").split()[-3:] == ["-", "{i}.mixer.output", "-"]
    assert grid_line(out, "z").split() == [
        "z",
        "attn.hook_z",
        "{i}.self_attn.o_proj.input|heads",
        "-",
        "{i}.attn.c_proj.input|heads",
    ]
    assert grid_line(out, "layers").split() == ["layers", "model.layers", "backbone.layers", "transformer.h"]
    assert grid_line(out, "module conv1d").split()[-3:] == ["-", "{i}.mixer.conv1d", "-"]
    assert "  llama pattern: softmax probabilities inside eager attention of model.layers.{i}.self_attn" in out
    assert "{i}.X is the module X of block i: <layers>.{i}.X" in out


def test_table_adapters_split_into_blocks_that_fit(capsys):
    names = sorted({row.adapter for row in table_rows()})
    status, out, _ = run(capsys, "table", "--adapters", ",".join(names))
    assert status == 0
    headers = [line.split() for line in out.splitlines() if line.startswith("role ")]
    assert len(headers) > 1  # thirteen adapters do not fit one block of 160 characters
    assert [name for header in headers for name in header[2:] if name in names] == [
        name for name in names for _ in range(1 + sum(row.variant != "" for row in table_rows() if row.adapter == name))
    ]
    assert max(map(len, out.splitlines())) <= 160


def test_table_adapters_take_architecture_names_in_other_formats(capsys):
    status, out, _ = run(capsys, "table", "--adapters", "LlamaForCausalLM,gpt2", "--format", "json")
    assert status == 0
    assert [row["adapter"] for row in json.loads(out)["rows"]] == ["llama", "gpt2"]


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (("table", "--adapters", "llama,mambaa"), "no adapter or architecture named 'mambaa'; did you mean 'mamba'"),
        (("table", "--adapters", ","), "--adapters needs at least one adapter or architecture name"),
        (("roles", "lama"), "no adapter or architecture named 'lama'; did you mean 'llama'"),
        (("roles", "NOSUCH"), "no adapter or architecture named 'NOSUCH'; adapters: gemma, gemma2, gpt2"),
    ],
)
def test_unknown_adapter_names_are_one_line_usage_errors(capsys, argv, fragment):
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"anylens {argv[0]}: error: ")
    assert fragment in err


def test_table_json(capsys):
    status, out, _ = run(capsys, "table", "--format", "json")
    assert status == 0
    payload = json.loads(out)
    assert payload["columns"] == list(COLUMNS)
    llama = next(row for row in payload["rows"] if row["adapter"] == "llama")
    assert llama["roles"]["z"] == "model.layers.{i}.self_attn.o_proj.input|heads"
    assert llama["source"] == "built-in" and llama["parallel"] is False


def test_table_csv(capsys):
    status, out, _ = run(capsys, "table", "--format", "csv")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows == [row.cells() for row in table_rows()]
    gpt2 = next(row for row in rows if row["adapter"] == "gpt2")
    assert gpt2["pos_embed"] == "transformer.wpe.output" and gpt2["mixer_out"] == ""


def test_table_write_reference_gives_the_reference_file(capsys, tmp_path):
    target = tmp_path / "reference.md"
    al.register_adapter({**LLAMA.to_dict(), "name": "runtime_only", "architectures": ["RuntimeOnlyLM"]})
    status, out, err = run(capsys, "table", "--reference", "--write", str(target))
    assert status == 0 and out == ""
    assert f"wrote {target}" in err
    assert target.read_text() == reference_markdown()
    assert "runtime_only" not in target.read_text()


def test_table_marks_inferred_adapters_as_inferred(capsys):
    status, out, _ = run(capsys, "table", "--builtin", "--format", "json", "--infer", "OlmoForCausalLM")
    assert status == 0
    rows = {row["adapter"]: row for row in json.loads(out)["rows"]}
    assert rows["inferred:OlmoForCausalLM"]["kind"] == "inferred"
    assert rows["llama"]["kind"] == "hand-written"


def test_table_write_to_a_missing_folder_is_a_usage_error(capsys, tmp_path):
    status, _, err = run(capsys, "table", "--write", str(tmp_path / "no" / "such" / "dir.md"))
    assert status == 2
    assert err.startswith("anylens table: error: cannot write ")


def test_table_unknown_format_is_a_usage_error(capsys):
    status, _, err = run(capsys, "table", "--format", "xml")
    assert status == 2
    assert "invalid choice: 'xml'" in err


def test_installed_console_script_prints_the_table():
    script = shutil.which("anylens", path=str(Path(sys.executable).parent))
    assert script is not None, "the anylens console script is not installed next to this Python"
    done = subprocess.run([script, "table", "--format", "csv"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split(",") == list(COLUMNS)
    assert any(row.startswith("llama,,LlamaForCausalLM,built-in,hand-written,") for row in rows)


# -- anylens check -------------------------------------------------------------------------------
def test_check_tiny_llama_passes(capsys):
    status, out, err = run(capsys, "check", "tiny:llama")
    assert status == 0, out + err
    assert "anylens check: tiny:llama (adapter llama)" in out
    assert "| invariant | layer | max abs error | tolerance | result | detail |" in out
    assert "| 1 resid_post[i] == resid_pre[i+1] | 0 |" in out
    assert out.rstrip().endswith("all invariants pass")
    assert "FAIL" not in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_check_exits_1_when_an_invariant_fails(capsys, monkeypatch, dtype):
    """An adapter that reads attn_out from the MLP: the residual sums no longer add up, also
    within bfloat16's wider tolerance."""
    roles = {
        "resid_pre": "model.layers.{i}.input",
        "resid_post": "model.layers.{i}.output",
        "attn_out": "model.layers.{i}.mlp.output",
        "mlp_out": "model.layers.{i}.mlp.output",
        "logits": "output.logits",
    }
    declaration = {"name": "miswired", "architectures": ["LlamaForCausalLM"], "layers": "model.layers", "roles": roles}
    model, tokenizer = tiny_model("llama")
    wrapped = al.wrap(model, tokenizer, adapter=declaration)
    monkeypatch.setattr(cli, "load_model", lambda source: wrapped)
    status, out, _ = run(capsys, "check", "anything", "--prompt", "The capital of France is", "--dtype", dtype)
    assert status == 1
    assert "| 2 resid_pre + attn_out + mlp_out == resid_post | 0 |" in out
    assert "FAIL" in out
    assert "checks FAIL" in out.splitlines()[-1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_check_in_half_precision_passes_and_states_the_epsilon(capsys, dtype):
    status, out, err = run(capsys, "check", "tiny:llama", "--dtype", dtype)
    assert status == 0, out + err
    assert f"eps = {torch.finfo(getattr(torch, dtype)).eps:.1e} ({dtype})" in out
    assert out.rstrip().endswith("all invariants pass")


def test_check_dtype_casts_parameters_and_keeps_buffers_in_float32(capsys, monkeypatch):
    """Like loading with a dtype: rotary frequencies in bfloat16 would shift every position's angle."""
    model, tokenizer = tiny_model("llama")
    wrapped = al.wrap(model, tokenizer)
    monkeypatch.setattr(cli, "load_model", lambda source: wrapped)
    status, out, err = run(capsys, "check", "anything", "--dtype", "bfloat16")
    assert status == 0, out + err
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_check_dtype_must_be_one_of_the_floating_point_choices(capsys):
    status, _, err = run(capsys, "check", "tiny:llama", "--dtype", "int8")
    assert status == 2
    assert "argument --dtype: invalid choice: 'int8'" in err


def test_check_directory_without_config_exits_2_with_a_clear_message(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    status, out, err = run(capsys, "check", str(tmp_path))
    assert status == 2 and out == ""
    assert err.startswith(f"anylens check: error: cannot load '{tmp_path}'")
    assert "has no config.json: give a saved model directory" in err
    assert "Traceback" not in err


def test_check_unknown_tiny_family_exits_2_listing_the_families(capsys):
    status, _, err = run(capsys, "check", "tiny:nonesuch")
    assert status == 2
    assert "no tiny model family 'nonesuch'; families: " in err
    assert all(family in err for family in TINY_BUILDERS)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("zoo:nonesuch", "zoo model 'nonesuch'"),
        ("missing-model.gguf", "'missing-model.gguf' does not exist"),
    ],
)
def test_check_unloadable_sources_exit_2(capsys, source, expected):
    status, _, err = run(capsys, "check", source)
    assert status == 2
    assert expected in err and "Traceback" not in err


def test_check_without_model_is_a_usage_error(capsys):
    status, _, err = run(capsys, "check")
    assert status == 2
    assert "the following arguments are required: MODEL" in err


# -- anylens roles ------------------------------------------------------------------------------
def test_roles_of_a_tiny_model(capsys):
    status, out, _ = run(capsys, "roles", "tiny:gpt2")
    assert status == 0
    lines = out.splitlines()
    assert lines[1] == "adapter: gpt2 (GPT2LMHeadModel), 3 layers"
    assert "  pos_embed  -> transformer.wpe.output" in lines[3]
    assert lines[3].split() == ["pos_embed", "->", "transformer.wpe.output", "hook_pos_embed"]
    assert ["z", "->", "transformer.h.{i}.attn.c_proj.input|heads", "blocks.{i}.attn.hook_z"] in [
        line.split() for line in lines
    ]
    assert not any(line.strip().startswith("mixer_out") for line in lines)
    assert "pattern: softmax probabilities inside eager attention of transformer.h.{i}.attn" in out


@pytest.mark.parametrize("name", ["llama", "LlamaForCausalLM", "LLAMA"])
def test_roles_of_an_adapter_or_architecture_name(capsys, name):
    status, out, _ = run(capsys, "roles", name)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "adapter: llama (LlamaForCausalLM), built-in"
    assert [line.split()[0] for line in lines[1:] if line.startswith("  ")] == list(
        role for role in al.ALL_ROLES if role in LLAMA.roles
    )
    assert ["resid_post", "->", "model.layers.{i}.output", "blocks.{i}.hook_resid_post"] in [
        line.split() for line in lines
    ]


def test_roles_of_an_adapter_show_its_variants_and_reference_modules(capsys):
    status, out, _ = run(capsys, "roles", "gpt_neox")
    assert status == 0
    assert (
        "variant when use_parallel_residual=false: resid_mid -> gpt_neox.layers.{i}.post_attention_layernorm.input"
        in out
    )
    status, out, _ = run(capsys, "roles", "mamba")
    assert status == 0
    modules = out.split("modules (for reference; no role reads them):\n")[1].splitlines()
    assert [line.split()[0] for line in modules] == ["in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"]
    assert "  conv1d   -> backbone.layers.{i}.mixer.conv1d" in modules


def test_roles_of_a_saved_model_directory(capsys, tmp_path):
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    status, out, _ = run(capsys, "roles", str(tmp_path))
    assert status == 0
    assert "adapter: llama (LlamaForCausalLM), 3 layers" in out
    assert "  resid_post -> model.layers.{i}.output" in out


# -- anylens zoo train, and the command table ------------------------------------------------------
def test_zoo_train_forwards_its_arguments(capsys, monkeypatch):
    from anylens.zoo import train

    received = []
    monkeypatch.setattr(train, "main", lambda argv: received.append(argv) or 0)
    assert cli.main(["zoo", "train", "--quick", "--models", "gpt2", "--out", "x"]) == 0
    assert received == [["--quick", "--models", "gpt2", "--out", "x"]]


def test_zoo_train_usage_errors_keep_their_exit_status(capsys):
    status, _, err = run(capsys, "zoo", "train", "--models", "nonesuch")
    assert status == 2
    assert "unknown model(s) nonesuch" in err


def test_zoo_without_an_action_is_a_usage_error(capsys):
    status, _, err = run(capsys, "zoo")
    assert status == 2
    assert "usage: anylens zoo" in err


def test_help_lists_the_commands_and_no_args_is_a_usage_error(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for name in ("table", "check", "roles", "zoo"):
        assert f"    {name} " in out
    status, _, err = run(
        capsys,
    )
    assert status == 2
    assert "the following arguments are required: COMMAND" in err
    status, _, err = run(capsys, "frobnicate")
    assert status == 2 and "invalid choice: 'frobnicate'" in err


def test_a_subcommand_module_plugs_into_the_command_table(capsys, tmp_path, monkeypatch):
    (tmp_path / "anylens_test_hello.py").write_text(
        "def add_arguments(parser):\n"
        "    parser.add_argument('--name', default='world')\n"
        "def run(args):\n"
        "    print(f'hello {args.name}')\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "hello", cli.module_command("anylens_test_hello", help="say hello"))
    status, out, _ = run(capsys, "hello", "--name", "roles")
    assert (status, out) == (3, "hello roles\n")
