"""Remote models (NDIF): the preflight errors, and the whole remote path run offline.

``remote="local"`` is nnsight's dry run of a remote request: the model here is built on the meta
device from its config alone, and every trace is serialised, rebuilt against a model loaded from
the checkpoint, and run — so a test can check that experiments survive the trip, without NDIF.
"""

from __future__ import annotations

import time

import nnsight
import pytest
import torch

import anylens as al
from anylens.loading.remote import load_remote
from anylens.zoo import corpus, model_dir

TOL = 1e-5  # float32; the remote and the local model run the same attention implementation


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "test-key")


def test_remote_without_api_key_says_how_to_set_one(monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(al.RemoteError, match="NDIF_API_KEY"):
        al.load("meta-llama/Llama-3.1-8B", remote=True)


@pytest.mark.parametrize("host", ["http://127.0.0.1:9", "https://ndif.invalid"], ids=["closed-port", "unknown-name"])
def test_unreachable_ndif_fails_fast_with_a_clear_message(api_key, host):
    start = time.monotonic()
    with pytest.raises(al.RemoteError, match="cannot reach NDIF") as error:
        al.load("meta-llama/Llama-3.1-8B", remote=host)
    assert time.monotonic() - start < 10  # the preflight's own limit is 5 s; never a hang
    assert host in str(error.value) and "without remote=True" in str(error.value)


def test_unreachable_configured_host_is_used_for_remote_true(api_key, monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", "http://127.0.0.1:9")
    with pytest.raises(al.RemoteError, match="127.0.0.1:9"):
        al.load("meta-llama/Llama-3.1-8B", remote=True)


def factual_pairs(n: int = 3) -> tuple[list[str], list[str]]:
    pairs = corpus.factual_patching_pairs("capital")[:n]
    return [p.clean for p in pairs], [p.corrupt for p in pairs]


def experiments(model) -> dict[str, object]:
    """The experiments that compute inside traces, with the role each family has."""
    clean, corrupt = factual_pairs()
    head_role = ("z", ("layer", "head")) if "z" in model.roles else ("mixer_out", ("layer",))
    cache = al.cache(model, clean, roles=["resid_post", head_role[0]])
    return {
        "resid_post": torch.stack([cache["resid_post", layer] for layer in range(model.n_layers)]),
        head_role[0]: torch.stack([cache[head_role[0], layer] for layer in range(model.n_layers)]),
        "patch": al.patch(model, clean, corrupt, role="resid_pre").frame["metric"],
        "attribute": al.attribute(model, clean, corrupt, role=head_role[0], over=head_role[1]).frame["estimate"],
        "ablate": al.ablate(model, clean, role=head_role[0], over=head_role[1]).frame["metric"],
    }


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(values.to_numpy(copy=True)) if hasattr(values, "to_numpy") else values


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "mamba"])
def test_remote_path_gives_the_local_results(name):
    remote = load_remote(str(model_dir(name)), remote="local")
    assert remote.remote == "local" and next(remote.hf.parameters()).device.type == "meta"
    local = al.load(f"zoo:{name}", attn_implementation="sdpa" if "z" in remote.roles else None)

    got, expected = experiments(remote), experiments(local)
    for key, value in expected.items():
        assert (as_tensor(value) - as_tensor(got[key])).abs().max() <= TOL, key
    # Nothing ran here: the meta model never received weights.
    assert all(p.device.type == "meta" for p in remote.hf.parameters())


def test_computations_needing_weights_here_say_so():
    remote = load_remote(str(model_dir("llama")), remote="local")
    with pytest.raises(al.LocalWeightsError, match="final norm.*runs remotely"):
        al.logit_lens(remote, "The capital of France is")
    with pytest.raises(al.LocalWeightsError, match="W_O"):
        remote.W_O(0)


def test_load_remote_local_keeps_weights_here_and_traces_through_serialisation(monkeypatch):
    model = al.load("zoo:gpt2", remote="local")
    seen = []
    original = model.nn.trace
    monkeypatch.setattr(model.nn, "trace", lambda *a, **k: seen.append(k.get("remote")) or original(*a, **k))
    result = al.logit_lens(model, "The capital of France is", metric="Paris")
    assert seen and set(seen) == {"local"}
    assert result.to_frame()["prob"].notna().all()
