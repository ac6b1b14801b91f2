"""The component roles: what a component adds to or reads from the residual stream."""

from __future__ import annotations

from collections.abc import Iterable

#: Roles that exist once per model.
MODEL_ROLES: tuple[str, ...] = ("embed", "pos_embed", "final_norm", "logits")

#: Roles that exist once per layer, indexed ``model.<role>[layer]``.
LAYER_ROLES: tuple[str, ...] = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "mixer_out",
    "z",
    "q",
    "k",
    "v",
    "pattern",
    "mlp_post",
    "attn_in",
    "mlp_in",
    "mixer_in",
)

#: Branch-input roles: what one sublayer reads from the residual stream, before its own norm.
#: Reading gives the residual stream as that branch sees it; writing changes what that branch
#: alone receives (the residual connection and the other branch keep the unwritten value), which
#: is what edge-level experiments (path patching, circuits) need.
BRANCH_INPUT_ROLES: tuple[str, ...] = ("attn_in", "mlp_in", "mixer_in")

#: The sublayer output each branch input feeds.
BRANCH_OUTPUT: dict[str, str] = {"attn_in": "attn_out", "mlp_in": "mlp_out", "mixer_in": "mixer_out"}

ALL_ROLES: tuple[str, ...] = MODEL_ROLES + LAYER_ROLES


def residual_writers(roles: Iterable[str]) -> tuple[str, ...]:
    """The roles that, added to ``resid_pre[i]``, give ``resid_post[i]``.

    ``mixer_out`` is the token-mixing sublayer's output: on an attention model the same tensor as
    ``attn_out`` (so a sweep of one role runs on attention and state-space models alike), on an
    SSM the mixer. It counts only where ``attn_out`` is absent, so that nothing is counted twice.
    """
    roles = set(roles)
    writers: list[str] = [role for role in ("attn_out", "mlp_out") if role in roles]
    if "mixer_out" in roles and "attn_out" not in roles:
        writers.append("mixer_out")
    return tuple(writers)


#: Roles split into attention heads; their last two dimensions are [heads, d_head].
HEAD_ROLES: frozenset[str] = frozenset({"z", "q", "k", "v"})

ROLE_SHAPES: dict[str, str] = {
    "embed": "[batch, pos, d_model]",
    "pos_embed": "[batch, pos, d_model]",
    "final_norm": "[batch, pos, d_model]",
    "logits": "[batch, pos, d_vocab]",
    "resid_pre": "[batch, pos, d_model]",
    "resid_mid": "[batch, pos, d_model]",
    "resid_post": "[batch, pos, d_model]",
    "attn_out": "[batch, pos, d_model]",
    "mlp_out": "[batch, pos, d_model]",
    "mixer_out": "[batch, pos, d_model]",
    "z": "[batch, pos, n_heads, d_head]",
    "q": "[batch, pos, n_heads, d_head]",
    "k": "[batch, pos, n_kv_heads, d_head]",
    "v": "[batch, pos, n_kv_heads, d_head]",
    "pattern": "[batch, n_heads, query_pos, key_pos]",
    "mlp_post": "[batch, pos, d_mlp]",
    "attn_in": "[batch, pos, d_model]",
    "mlp_in": "[batch, pos, d_model]",
    "mixer_in": "[batch, pos, d_model]",
}

ROLE_MEANINGS: dict[str, str] = {
    "embed": "token embedding output",
    "pos_embed": "learned absolute position embedding output",
    "final_norm": "output of the final norm (input of the unembedding)",
    "logits": "the model's real output logits, after any soft-capping",
    "resid_pre": "input of layer i",
    "resid_mid": "after the attention add, before the MLP (sequential blocks only)",
    "resid_post": "output of layer i",
    "attn_out": "what attention adds to the residual",
    "mlp_out": "what the MLP adds to the residual",
    "mixer_out": "what the token-mixing sublayer adds to the residual: attention (= attn_out), or an SSM mixer",
    "z": "per-head attention values: input of the output projection",
    "q": "per-head query projections",
    "k": "per-head key projections",
    "v": "per-head value projections",
    "pattern": "attention probabilities",
    "mlp_post": "MLP hidden activations (neurons): input of the down projection",
    "attn_in": "what the attention branch reads from the residual stream (input of its norm)",
    "mlp_in": "what the MLP branch reads from the residual stream (input of its norm)",
    "mixer_in": "what the token-mixing branch reads from the residual stream: attn_in, or the SSM mixer's",
}

#: The order in which a forward pass produces roles; reads in one trace must follow it.
LAYER_ROLE_ORDER: tuple[str, ...] = (
    "resid_pre",
    "attn_in",
    "mixer_in",
    "q",
    "k",
    "v",
    "pattern",
    "z",
    "attn_out",
    "mixer_out",  # the attention output where attention is the mixer
    "resid_mid",
    "mlp_in",
    "mlp_post",
    "mlp_out",
    "resid_post",
)
MODEL_ROLES_BEFORE_LAYERS: tuple[str, ...] = ("embed", "pos_embed")
MODEL_ROLES_AFTER_LAYERS: tuple[str, ...] = ("final_norm", "logits")
