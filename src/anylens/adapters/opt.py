"""OPT: learned absolute positions and an MLP that lives on the layer itself.

The layer flattens ``[batch, pos, d]`` to ``[batch * pos, d]`` before ``fc1``/``fc2``, so the MLP
roles and ``resid_mid`` use the ``tokens`` view to get ``[batch, pos, ...]`` back. The position
embedding (``embed_positions``, offset by 2 internally) is its own module: ``pos_embed``.

Pre-norm is the layout of every OPT size but 350m. The 350m model normalises *after* each
residual add (``do_layer_norm_before=False``) and projects embeddings in and out of a smaller
width: there the residual stream is not a sum of sublayer outputs, so the variant drops
``attn_out``/``mlp_out``/``resid_mid`` rather than report numbers that do not add up, and maps
``embed``/``final_norm`` to the projections into and out of the stream.
"""

from anylens import AdapterSpec, Variant, hookimpl
from anylens.core.spec import eager_pattern

_LAYER = "model.decoder.layers.{i}"

OPT = AdapterSpec(
    name="opt",
    architectures=("OPTForCausalLM",),
    layers="model.decoder.layers",
    out_proj=f"{_LAYER}.self_attn.out_proj",
    roles={
        "embed": "model.decoder.embed_tokens.output",
        "pos_embed": "model.decoder.embed_positions.output",
        "resid_pre": f"{_LAYER}.input",
        "resid_mid": f"{_LAYER}.final_layer_norm.input|tokens",
        "resid_post": f"{_LAYER}.output",
        "attn_in": f"{_LAYER}.self_attn_layer_norm.input",
        "mixer_in": f"{_LAYER}.self_attn_layer_norm.input",
        "mlp_in": f"{_LAYER}.final_layer_norm.input|tokens",
        "attn_out": f"{_LAYER}.self_attn.output",
        "mixer_out": f"{_LAYER}.self_attn.output",  # the token-mixing sublayer: attention
        "mlp_out": f"{_LAYER}.fc2.output|tokens",
        "z": f"{_LAYER}.self_attn.out_proj.input|heads",
        "q": f"{_LAYER}.self_attn.q_proj.output|heads",  # before OPT's 1/sqrt(d_head) scaling
        "k": f"{_LAYER}.self_attn.k_proj.output|heads",
        "v": f"{_LAYER}.self_attn.v_proj.output|heads",
        "pattern": eager_pattern(f"{_LAYER}.self_attn"),
        "mlp_post": f"{_LAYER}.fc2.input|tokens",
        "final_norm": "model.decoder.final_layer_norm.output",
        "logits": "output.logits",
    },
    variants=(
        Variant(
            when={"do_layer_norm_before": False},
            drop=("resid_mid", "attn_out", "mixer_out", "mlp_out", "attn_in", "mixer_in", "mlp_in"),
            roles={
                "embed": "model.decoder.project_in.output",
                "final_norm": "model.decoder.project_out.output",
            },
        ),
    ),
    description="OPT (OPTForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [OPT]
