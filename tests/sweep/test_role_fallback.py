"""One sweep across attention and state-space models: a list of roles means the first each model
has, and a role some model lacks is refused before anything is computed."""

from __future__ import annotations

import argparse
import json

import pytest

import anylens as al
from anylens.loading import loader
from anylens.sweep import SweepConfigError, load_results
from anylens.sweep.cli import add_run_parser, run_cli
from anylens.sweep.store import MANIFEST
from anylens.testing import tiny

PAIRS = [("The capital of France is", "The capital of Italy is")]


def test_a_role_list_runs_each_model_on_its_first_role(tmp_path):
    result = al.run(
        "patch",
        ["tiny:gpt2", "tiny:mamba"],
        PAIRS,
        role=["z", "mixer_out"],
        over=("layer",),
        metric="kl",
        out=tmp_path,
        quiet=True,
    )
    frame = result.to_frame()
    assert dict(frame.groupby("model")["role"].unique().map(list)) == {"tiny:gpt2": ["z"], "tiny:mamba": ["mixer_out"]}
    # Each model's rows are what the experiment gives with its role named explicitly.
    for source, role in (("tiny:gpt2", "z"), ("tiny:mamba", "mixer_out")):
        direct = al.patch(tiny(source.split(":")[1]), *PAIRS[0], role=role, over=("layer",), metric=al.metrics.kl())
        swept = frame[frame["model"] == source].sort_values("layer")["metric"].to_numpy()
        assert swept == pytest.approx(direct.to_frame().sort_values("layer")["metric"].to_numpy(), abs=1e-6)


def test_mixer_out_alone_runs_on_every_family(tmp_path):
    frame = al.run(
        "ablate",
        ["tiny:llama", "tiny:mamba", "tiny:plain"],
        ["The cat sat"],
        role="mixer_out",
        over=("layer",),
        out=tmp_path,
        quiet=True,
    ).to_frame()
    assert set(frame["model"]) == {"tiny:llama", "tiny:mamba", "tiny:plain"}


def test_a_missing_role_names_every_model_before_any_weights_load(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the role check loaded a model")

    monkeypatch.setattr(loader, "load", no_weights)  # zoo adapters come from their configs
    with pytest.raises(SweepConfigError) as raised:
        al.run("patch", ["zoo:gpt2", "zoo:mamba", "zoo:llama"], PAIRS, role="z", over=("layer", "head"), out=tmp_path)
    message = str(raised.value)
    assert "zoo:mamba (adapter 'mamba' has none of ['z']" in message
    assert "zoo:gpt2" not in message and "zoo:llama" not in message
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(SweepConfigError, match=r"zoo:mamba \(its role 'mixer_out' has no heads"):
        al.run("patch", ["zoo:gpt2", "zoo:mamba"], PAIRS, role=["z", "mixer_out"], over=("layer", "head"), out=tmp_path)


def test_the_command_line_takes_a_role_list(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="anylens")
    add_run_parser(parser.add_subparsers(dest="command"))
    argv = ["run", "ablate", "--models", "tiny:gpt2", "tiny:mamba", "--out", str(tmp_path), "--quiet"]
    args = parser.parse_args([*argv, "--prompts", str(_prompts(tmp_path)), "--role", "z,mixer_out", "--over", "layer"])
    assert run_cli(args) == 0
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["config"]["options"]["role"] == ["z", "mixer_out"]
    frame = load_results(tmp_path)
    assert dict(frame.groupby("model")["role"].first()) == {"tiny:gpt2": "z", "tiny:mamba": "mixer_out"}


def _prompts(tmp_path) -> object:
    path = tmp_path.parent / f"{tmp_path.name}-prompts.txt"
    path.write_text("The cat sat\n")
    return path
