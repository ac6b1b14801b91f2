"""Native mamba-ssm models (``mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel``).

The layout is not transformers': ``backbone.embedding``, ``backbone.layers.{i}`` (``norm`` then
``mixer``), ``backbone.norm_f`` and ``lm_head``. Each block does *add -> norm -> mixer*: it takes
``(hidden_states, residual)`` — the previous mixer's output and the previous residual — adds them,
normalises the sum for its mixer, and returns ``(mixer output, sum)``. So the residual stream
never passes a module boundary of layer ``i`` as one tensor:

* ``resid_pre[i]`` is the *sum of the two inputs* of block ``i`` (block 0 gets no residual), and
  it is also the second output of block ``i`` — but that copy is returned after the mixer has
  read it, so writing there would not reach layer ``i``'s own mixer;
* ``resid_post[i]`` is the *sum of the two outputs* of block ``i``; it first exists as one tensor
  inside block ``i + 1`` (or inside the final add before ``norm_f``).

Role paths name one tensor at one module, so this adapter provides only the roles that are a
single tensor whose read and write both mean what the role says: ``embed`` (block 0 adds nothing
to it), ``mixer_out`` (the first output of each block, which the next add consumes),
``final_norm`` and ``logits``. The residual roles are absent rather than half-writable; for them,
load the checkpoint into transformers' ``MambaForCausalLM`` (same weights, ``mamba`` adapter).

With ``fused_add_norm=True`` (the default of the released checkpoints) the add and the norms run
inside one Triton kernel and ``norm_f`` is never called as a module, so ``final_norm`` is absent
too. Hybrid configurations (``attn_layer_idx``, ``d_intermediate > 0``) are not covered.
mamba-ssm runs only on CUDA.
"""

from anylens import AdapterSpec, Variant, hookimpl

MAMBA_SSM = AdapterSpec(
    name="mamba_ssm",
    architectures=("MambaLMHeadModel",),
    layers="backbone.layers",
    roles={
        "embed": "backbone.embedding.output",
        "mixer_out": "backbone.layers.{i}.mixer.output",
        "final_norm": "backbone.norm_f.output",
        "logits": "output.logits",
    },
    variants=(Variant(when={"fused_add_norm": True}, drop=("final_norm",)),),
    description="mamba-ssm native MambaLMHeadModel",
)


@hookimpl
def anylens_adapters():
    return [MAMBA_SSM]
