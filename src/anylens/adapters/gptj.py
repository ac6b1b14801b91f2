"""GPT-J: one ``ln_1`` feeds attention and MLP in parallel (no ``resid_mid``), partial rotary
positions on the first ``rotary_dim`` channels, separate q/k/v projections without biases, and an
``lm_head`` with a bias."""

from anylens import AdapterSpec, hookimpl
from anylens.core.spec import eager_pattern

_LAYER = "transformer.h.{i}"

GPTJ = AdapterSpec(
    name="gptj",
    architectures=("GPTJForCausalLM",),
    layers="transformer.h",
    out_proj=f"{_LAYER}.attn.out_proj",
    parallel=True,
    roles={
        "embed": "transformer.wte.output",
        "resid_pre": f"{_LAYER}.input",
        "resid_post": f"{_LAYER}.output",
        # one ln_1 feeds both branches: they read one input, so edges reach the block, not a branch
        "attn_in": f"{_LAYER}.ln_1.input",
        "mixer_in": f"{_LAYER}.ln_1.input",
        "mlp_in": f"{_LAYER}.ln_1.input",
        "attn_out": f"{_LAYER}.attn.output",
        "mixer_out": f"{_LAYER}.attn.output",  # the token-mixing sublayer: attention
        "mlp_out": f"{_LAYER}.mlp.output",
        "z": f"{_LAYER}.attn.out_proj.input|heads",
        "q": f"{_LAYER}.attn.q_proj.output|heads",
        "k": f"{_LAYER}.attn.k_proj.output|heads",
        "v": f"{_LAYER}.attn.v_proj.output|heads",
        "pattern": eager_pattern(f"{_LAYER}.attn"),
        "mlp_post": f"{_LAYER}.mlp.fc_out.input",
        "final_norm": "transformer.ln_f.output",
        "logits": "output.logits",
    },
    description="GPT-J (GPTJForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [GPTJ]
