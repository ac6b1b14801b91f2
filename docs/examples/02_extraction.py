"""Comprehensive extraction: the residual stream, attention outputs (per head where the model has
heads), MLP and SSM-mixer outputs of a batch of prompts, in one trace per model.

For each model: cache every role of that list the model has, print their shapes (a batch of prompts
of different lengths is left-padded, so the last real token is always at position -1), then split
the final residual stream into the components that wrote it and check that they sum back to it.

    python docs/examples/02_extraction.py [SOURCE ...]     # default: the four zoo models
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODELS, Report, cli, load, prompt_batch

import anylens as al

#: What to extract, where the model has it; roles a model lacks are skipped, never faked.
ROLES = ("embed", "pos_embed", "resid_pre", "resid_post", "attn_out", "z", "mlp_out", "mixer_out")


def main(models: list[str] = DEFAULT_MODELS, out: str = "docs/examples/output") -> dict:
    report = Report(out, "02_extraction")
    results = {}
    for source in models:
        model = load(source)
        prompts = prompt_batch(model, n=4)
        roles = [role for role in ROLES if role in model.roles]
        cache = al.cache(model, prompts, roles=roles)

        mask = cache.attention_mask.bool()
        report(f"== {source} ({model.adapter.name}, {model.n_layers} layers)")
        report(f"  {len(mask)} prompts of {mask.sum(1).tolist()} tokens, left-padded to {mask.shape[1]}")
        shapes = {}
        for role in roles:
            per_layer = role in al.LAYER_ROLES
            shape = tuple(cache.stack(role).shape) if per_layer else tuple(cache[role].shape)
            shapes[role] = list(shape)
            report(f"  {role:<11} {'[layer, batch, pos, ...]' if per_layer else '[batch, pos, d_model]':<25} {shape}")

        # The residual stream after the last layer, as a sum of what every component wrote:
        # embeddings, each head (or each layer's attention), each MLP or mixer.
        per_head = "z" in model.roles
        decomposition = cache.decompose_resid(-1, per_head=per_head)
        resid = cache["resid_post", -1]
        error = float((decomposition.total() - resid)[mask].abs().max())  # real tokens only
        norms = decomposition.components[:, :, -1].norm(dim=-1).mean(1)  # mean over prompts, last token
        largest = [decomposition.labels[i] for i in norms.argsort(descending=True)[:4].tolist()]
        report(
            f"  decomposition of resid_post[{model.n_layers - 1}]: {len(decomposition.labels)} components "
            f"({decomposition.labels[0]!r} ... {decomposition.labels[-1]!r})"
        )
        report(f"  largest at the last token: {', '.join(largest)}")
        scale = float(resid[mask].abs().max())
        report(f"  max |sum of components - resid_post| = {error:.2e}  (float32 rounding; |resid_post| <= {scale:.3g})")
        report()

        results[source] = {
            "n_prompts": int(len(mask)),
            "n_tokens": mask.sum(1).tolist(),
            "shapes": shapes,
            "n_components": len(decomposition.labels),
            "labels": list(decomposition.labels),
            "per_head": any(label.startswith("head ") for label in decomposition.labels),
            "max_error": error,
            "max_abs_resid": scale,
        }
    report.save()
    return results


if __name__ == "__main__":
    cli(main, __doc__)
