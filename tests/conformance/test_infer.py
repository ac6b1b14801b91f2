"""Inferred adapters: served only when ``anylens check`` passes, equal to plain PyTorch hooks,
always behind hand-written adapters, and a typed error where the structure defeats inference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

import anylens as al
from anylens.inference import infer
from anylens.inference.infer import InferenceError, infer_adapter, infer_command
from anylens.registry.manager import registry, reset_registry
from anylens.testing import tiny_model as tiny_family
from anylens.testing import tiny_tokenizer
from anylens.tiny.arch import tiny_model

#: Architectures without a hand-written adapter -> what their attention and MLP add to the
#: residual stream, named by hand from each model's code (``{i}``: the layer). Post-norm blocks
#: add their post-norms' outputs; Bloom's attention and MLP modules add the residual themselves,
#: so what they add is their output projection.
SAMPLE = {
    "Qwen3ForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "OlmoForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "Olmo2ForCausalLM": ("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.post_feedforward_layernorm"),
    "StableLmForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "Starcoder2ForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "CohereForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),  # parallel block
    "GraniteForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "GlmForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "MixtralForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),  # mixture of experts
    "FalconForCausalLM": ("transformer.h.{i}.self_attention", "transformer.h.{i}.mlp"),  # parallel block
    "BloomForCausalLM": ("transformer.h.{i}.self_attention.dense", "transformer.h.{i}.mlp.dense_4h_to_h"),
    "CodeGenForCausalLM": ("transformer.h.{i}.attn", "transformer.h.{i}.mlp"),  # parallel block
    "PersimmonForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "Gemma3ForCausalLM": ("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.post_feedforward_layernorm"),
    "Exaone4ForCausalLM": ("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.post_feedforward_layernorm"),
    "HeliumForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "SmolLM3ForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "PhiForCausalLM": ("model.layers.{i}.self_attn", "model.layers.{i}.mlp"),  # parallel block
}

TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_registry():
    reset_registry()
    yield
    reset_registry()


def token_ids() -> torch.Tensor:
    return torch.randint(4, 400, (2, 7), generator=torch.Generator().manual_seed(3))


def plain_forward(model: torch.nn.Module, paths: list[str], ids: torch.Tensor):
    """Module outputs by plain forward hooks, and the hidden states the model itself returns."""
    seen: dict[str, torch.Tensor] = {}

    def keep(path: str):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            seen.setdefault(path, value.detach().clone())

        return hook

    handles = [model.get_submodule(path).register_forward_hook(keep(path)) for path in paths]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out.hidden_states


def read_role(model: al.AnyModel, role: str, ids: torch.Tensor) -> list[torch.Tensor]:
    values: list[torch.Tensor] = []
    with model.trace(ids):
        values.extend(model.role(role).read(i).clone().save() for i in model.layers())
    return values


@pytest.mark.parametrize("architecture", sorted(SAMPLE))
def test_inferred_adapter_passes_check_and_agrees_with_plain_hooks(architecture):
    hf = tiny_model(architecture)
    model = al.wrap(hf, tiny_tokenizer())
    assert model.adapter.name == f"inferred:{architecture}"
    assert model.adapter.description == "inferred"
    assert {"resid_pre", "resid_post", "attn_out", "mlp_out", "z", "logits"} <= set(model.roles)
    assert model.adapter.roles["mixer_out"] == model.adapter.roles["attn_out"]  # attention is the token mixer

    report = al.check(model)
    assert report.passed, str(report)
    invariants = {row.invariant.split()[0] for row in report.rows}
    # z is tied to attn_out by invariant 5, or (behind a post-norm) to the pattern by invariant 6;
    # invariant 4 needs final_norm, which a model that scales its logits does not get
    assert invariants >= {"1", "2", "7", "5" if model.adapter.z_feeds_residual else "6"}
    assert ("4" in invariants) == ("final_norm" in model.roles)

    ids = token_ids()
    attn_path, mlp_path = SAMPLE[architecture]
    layers = model.layers()
    paths = [p.format(i=i) for i in layers for p in (attn_path, mlp_path)]
    hooked, hidden_states = plain_forward(hf, paths, ids)
    resid_post = read_role(model, "resid_post", ids)
    attn_out = read_role(model, "attn_out", ids)
    mlp_out = read_role(model, "mlp_out", ids)
    for i in layers:
        torch.testing.assert_close(attn_out[i], hooked[attn_path.format(i=i)], atol=TOL, rtol=0)
        torch.testing.assert_close(mlp_out[i], hooked[mlp_path.format(i=i)], atol=TOL, rtol=0)
        if i + 1 < len(layers):  # the last hidden state is often taken after the final norm
            torch.testing.assert_close(resid_post[i], hidden_states[i + 1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "gpt_neox", "opt", "mamba"])
def test_inference_reproduces_the_hand_written_adapters(family):
    """Fused q/k/v with learned positions, post-norms with a logit soft-cap, a parallel block with
    interleaved q/k/v, an MLP on flattened tokens, a state-space mixer: the inferred map is the
    hand-written one (``kv_heads`` equals ``heads`` where there are as many kv heads as heads)."""
    hf, _ = tiny_family(family)
    hand = registry().resolve(hf).specialize(hf.config)
    inferred = infer.infer_outcome(hf).spec
    assert {r: p.replace("|kv_heads", "|heads") for r, p in inferred.roles.items()} == {
        r: p.replace("|kv_heads", "|heads") for r, p in hand.roles.items()
    }
    for fact in ("layers", "unembed", "out_proj", "logit_softcap", "parallel", "z_feeds_residual"):
        assert getattr(inferred, fact) == getattr(hand, fact), fact


def test_hand_written_adapters_win():
    model = al.wrap(*tiny_family("llama"))
    assert model.adapter.name == "llama"
    assert model.adapter.description != "inferred"


def test_a_hybrid_keeps_only_the_roles_every_layer_shares():
    """Attention in one layer and a state-space mixer in the other: no per-layer component role
    has one path for every layer, so only the residual stream (and model-level roles) is served."""
    hf = tiny_model("Qwen3NextForCausalLM")
    spec = infer_adapter(hf)
    assert {"resid_pre", "resid_post", "logits"} <= set(spec.roles)
    assert not {"attn_out", "mlp_out", "mixer_out", "z", "pattern"} & set(spec.roles)
    assert al.check(al.wrap(hf, tiny_tokenizer())).passed


def test_inference_is_cached_per_class_and_config_shape(monkeypatch):
    first = infer_adapter(tiny_model("HeliumForCausalLM"))

    def forbidden(model):
        raise AssertionError("inference ran again for a model of the same class and shape")

    monkeypatch.setattr(infer, "infer_outcome", forbidden)
    other_weights = tiny_model("HeliumForCausalLM", seed=1)
    assert al.wrap(other_weights, tiny_tokenizer()).adapter == first


# -- a structure that defeats inference ------------------------------------------------------------
class StashConfig(PretrainedConfig):
    model_type = "anylens_stash_lm"

    def __init__(self, vocab_size=400, hidden_size=32, num_hidden_layers=2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class StashBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.stash = None

    def forward(self, x):
        out = x + self.down(torch.relu(self.up(self.norm(x))))
        self.stash = out  # the model reads this copy, not the returned value
        return out


class StashLM(PreTrainedModel, GenerationMixin):
    """Blocks hand their output to the next block through an attribute: a plain forward looks
    like any residual model, but writing a block's output never reaches the next block."""

    config_class = StashConfig

    def __init__(self, config):
        super().__init__(config)
        width = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, width)
        self.blocks = nn.ModuleList(StashBlock(width) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            block(hidden)
            hidden = block.stash
        return CausalLMOutput(logits=self.head(self.norm(hidden)))


def test_a_structure_that_defeats_inference_raises_a_typed_error_naming_candidates_and_invariant():
    model = StashLM(StashConfig()).eval()
    with pytest.raises(InferenceError) as caught:
        al.wrap(model, tiny_tokenizer())
    assert isinstance(caught.value, al.UnknownArchitectureError)
    message = str(caught.value)
    assert "cannot infer an adapter for StashLM" in message
    assert "layers=blocks" in message  # what was inferred
    assert "Candidate 1: resid_pre=blocks.{i}.input, resid_post=blocks.{i}.output" in message
    assert "7 write zeros to resid_post: logits change" in message  # the invariant that failed
    assert "al.register_adapter" in message and "[adapter.roles]" in message  # how to write it as data


class TapConfig(PretrainedConfig):
    model_type = "anylens_tap_lm"

    def __init__(self, vocab_size=400, hidden_size=32, num_hidden_layers=2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class TapBlock(nn.Module):
    """The stream passes a module (``tap``) before both the residual add and the MLP, whose norm
    sits inside it: ``tap``'s input looks like the MLP's branch input but is the residual's too."""

    def __init__(self, width: int):
        super().__init__()
        self.tap = nn.Identity()
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)
        )

    def forward(self, x):
        x = self.tap(x)
        return x + self.mlp(x)


class TapLM(StashLM):
    config_class = TapConfig

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.ModuleList(TapBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        return CausalLMOutput(logits=self.head(self.norm(hidden)))


def test_a_branch_input_that_is_also_the_residual_is_dropped_by_invariant_8():
    outcome = infer.infer_outcome(TapLM(TapConfig()).eval())
    assert outcome.anatomy.branch_inputs["mlp_in"].module == "tap"  # the candidate ...
    assert outcome.spec.roles["mlp_out"] == "blocks.{i}.mlp.output"
    assert "mlp_in" not in outcome.spec.roles  # ... whose write moved the residual too
    model = al.wrap(TapLM(TapConfig()).eval(), tiny_tokenizer())
    assert al.check(model).passed


def test_invariant_8_rows_blame_their_branch_input():
    assert infer._blamed_roles("8 write mlp_in: the residual keeps resid_pre", []) == ["mlp_in"]
    assert infer._blamed_roles("8 attn_in == the stream its branch reads", []) == ["attn_in"]


# -- the inferred map as data ----------------------------------------------------------------------
def test_infer_command_prints_toml_that_registers_and_serves_the_model(tmp_path, capsys):
    text = infer_command("arch:Qwen3ForCausalLM")
    path = tmp_path / "qwen3.toml"
    path.write_text(text)
    spec = al.AdapterSpec.from_toml(path)
    assert spec == infer_adapter(tiny_model("Qwen3ForCausalLM"))  # the same map, round-tripped

    al.register_adapter(str(path))
    claim = registry().claims["Qwen3ForCausalLM"]
    assert claim.plugin.startswith("runtime:")  # served by the registered file, not by inference
    model = al.wrap(tiny_model("Qwen3ForCausalLM", seed=2), tiny_tokenizer())
    assert model.adapter.name == spec.name
    assert al.check(model).passed

    assert infer.main(["arch:Qwen3ForCausalLM"]) == 0  # python -m anylens.inference.infer
    assert capsys.readouterr().out == text
