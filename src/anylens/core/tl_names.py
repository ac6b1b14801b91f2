"""TransformerLens / SAELens hook names and the anylens roles they name (data only).

A per-layer hook name reads ``blocks.{i}.<suffix>``; a model-level one is the bare name. The
tensors agree in shape: TransformerLens's ``attn.hook_z`` is ``[batch, pos, n_heads, d_head]``
like ``z``, and ``attn.hook_pattern`` ``[batch, n_heads, query_pos, key_pos]`` like ``pattern``.
"""

from __future__ import annotations

#: The prefix of per-layer hook names: ``blocks.{i}.``.
BLOCKS_PREFIX = "blocks"

#: Per-layer hook-name suffix -> role.
LAYER_HOOK_ROLES: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "attn.hook_q": "q",
    "attn.hook_k": "k",
    "attn.hook_v": "v",
    "attn.hook_pattern": "pattern",
    "attn.hook_z": "z",
    "hook_attn_out": "attn_out",
    "mlp.hook_post": "mlp_post",
    "hook_mlp_out": "mlp_out",
    # The MLP's input before its norm (use_hook_mlp_in). There is no ``hook_attn_in`` here:
    # TransformerLens's is one copy of the stream per head, [batch, pos, n_heads, d_model].
    "hook_mlp_in": "mlp_in",
}

#: Model-level hook name -> role. TransformerLens's ``ln_final.hook_normalized`` is taken before
#: the norm's scale when the scale is folded into the unembedding (its default); ``final_norm``
#: is the norm's real output, scale included.
MODEL_HOOK_ROLES: dict[str, str] = {
    "hook_embed": "embed",
    "hook_pos_embed": "pos_embed",
    "ln_final.hook_normalized": "final_norm",
}
