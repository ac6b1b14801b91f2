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
def test_table_markdown_is_the_reference_document(capsys):
    status, out, _ = run(capsys, "table")
    assert status == 0
    assert out == render(table_rows(), "markdown")
    assert out.startswith("# Role reference")
    assert "| llama |  | LlamaForCausalLM | built-in | hand-written |" in out
    assert "_Generated from the adapter registry with anylens " in out


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


def test_check_exits_1_when_an_invariant_fails(capsys, monkeypatch):
    """An adapter that reads attn_out from the MLP: the residual sums no longer add up."""
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
    status, out, _ = run(capsys, "check", "anything", "--prompt", "The capital of France is")
    assert status == 1
    assert "| 2 resid_pre + attn_out + mlp_out == resid_post | 0 |" in out
    assert "FAIL" in out
    assert "checks FAIL" in out.splitlines()[-1]


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
    assert "  pos_embed  -> transformer.wpe.output" in lines
    assert "  z          -> transformer.h.{i}.attn.c_proj.input|heads" in lines
    assert not any(line.strip().startswith("mixer_out") for line in lines)


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
