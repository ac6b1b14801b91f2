"""Tiny random models of every built-in family, built from configs with no hub access.

Used by the test-suite, by ``al.load("tiny:FAMILY")`` and ``anylens check tiny:FAMILY``, and by
adapter inference (whose candidate checks need a tokenizer); handy for trying an adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

#: A small corpus for the tiny tokenizer: enough merges for realistic multi-token words.
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The Eiffel Tower is in Paris and the Colosseum is in Rome.",
    "the cat sat on the mat and the dog sat on the log",
] * 20


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer (vocabulary 400) trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        special_tokens=["<unk>", "<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


VOCAB = 400
_COMMON = dict(vocab_size=VOCAB, bos_token_id=2, eos_token_id=3, pad_token_id=1)


@dataclass(frozen=True)
class TinyShape:
    """The sizes of a tiny model; every family reads them into its own config.

    The width is ``n_heads * d_head``; MLPs are twice as wide. ``n_kv_heads`` counts key/value
    heads where a family has grouped-query attention (Mamba2: its groups) and is ignored elsewhere.
    An SSM has no attention heads: ``n_heads * d_head`` is its mixer's inner width, twice ``d_model``.
    """

    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int = 2
    d_head: int = 16
    d_vocab: int = VOCAB

    @property
    def d_model(self) -> int:
        return self.n_heads * self.d_head

    def common(self) -> dict[str, int]:
        return {**_COMMON, "vocab_size": self.d_vocab}


#: The shape of the tiny models: 3 layers, 4 query heads of width 16 over 2 KV heads (GQA).
DEFAULT_SHAPE = TinyShape()


def _decoder(shape: TinyShape) -> dict[str, int]:
    """The config of the LLaMA-style tiny decoders."""
    return dict(
        hidden_size=shape.d_model,
        intermediate_size=2 * shape.d_model,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=128,
        **shape.common(),
    )


def _gpt2(shape: TinyShape) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=shape.d_model, n_layer=shape.n_layers, n_head=shape.n_heads, n_positions=128, **shape.common()
    )
    return GPT2LMHeadModel(config)


def _llama(shape: TinyShape) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_decoder(shape)))


def _mistral(shape: TinyShape) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_decoder(shape)))


def _qwen2(shape: TinyShape) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_decoder(shape)))  # q/k/v carry biases


def _gemma(shape: TinyShape) -> torch.nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_decoder(shape), head_dim=shape.d_head))


def _gemma2(shape: TinyShape) -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Small caps so that both soft-caps bend the values measurably, and a sliding window shorter
    # than the test prompts so that the local layers really mask.
    config = Gemma2Config(
        **_decoder(shape),
        head_dim=shape.d_head,
        query_pre_attn_scalar=shape.d_head,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
        sliding_window=6,
    )
    return Gemma2ForCausalLM(config)


def _phi3(shape: TinyShape) -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_decoder(shape), original_max_position_embeddings=128))


def _gpt_neox(parallel: bool) -> Callable[[TinyShape], torch.nn.Module]:
    def build(shape: TinyShape) -> torch.nn.Module:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        config = GPTNeoXConfig(
            hidden_size=shape.d_model,
            intermediate_size=2 * shape.d_model,
            num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads,
            max_position_embeddings=128,
            use_parallel_residual=parallel,
            **shape.common(),
        )
        return GPTNeoXForCausalLM(config)

    return build


def _opt(shape: TinyShape) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    # Pre-norm, no embedding projection: the layout of every OPT but the 350m.
    config = OPTConfig(
        hidden_size=shape.d_model,
        ffn_dim=2 * shape.d_model,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        max_position_embeddings=128,
        do_layer_norm_before=True,
        word_embed_proj_dim=shape.d_model,
        **shape.common(),
    )
    return OPTForCausalLM(config)


def _gptj(shape: TinyShape) -> torch.nn.Module:
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(
        n_embd=shape.d_model,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        n_inner=2 * shape.d_model,
        n_positions=128,
        rotary_dim=min(8, shape.d_head),
        **shape.common(),
    )
    return GPTJForCausalLM(config)


def _mamba(shape: TinyShape) -> torch.nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        hidden_size=shape.d_model // 2,
        state_size=4,
        num_hidden_layers=shape.n_layers,
        expand=2,
        conv_kernel=4,
        **shape.common(),
    )
    return MambaForCausalLM(config)


def _mamba2(shape: TinyShape) -> torch.nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        hidden_size=shape.d_model // 2,
        num_heads=shape.n_heads,
        head_dim=shape.d_head,
        expand=2,
        n_groups=shape.n_kv_heads,
        state_size=8,
        conv_kernel=4,
        num_hidden_layers=shape.n_layers,
        chunk_size=16,
        **shape.common(),
    )
    return Mamba2ForCausalLM(config)


def _mamba_ssm(shape: TinyShape) -> torch.nn.Module:
    """The native mamba-ssm model; needs the package and CUDA (its kernels have no CPU path)."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as error:
        raise ImportError(
            f"the tiny mamba_ssm model needs the mamba-ssm package built for CUDA (extra 'cuda'): {error}"
        ) from error

    # The released checkpoints' defaults: RMSNorm, fused add+norm kernel, fp32 residual.
    config = MambaConfig(
        d_model=shape.d_model, n_layer=shape.n_layers, vocab_size=shape.d_vocab, pad_vocab_size_multiple=8
    )
    return MambaLMHeadModel(config, device="cuda", dtype=torch.float32)


#: family name -> builder of a tiny random model of that family, from its shape
TINY_BUILDERS: dict[str, Callable[[TinyShape], torch.nn.Module]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt_neox": _gpt_neox(parallel=True),
    "gpt_neox_sequential": _gpt_neox(parallel=False),
    "opt": _opt,
    "gptj": _gptj,
    "mamba": _mamba,
    "mamba2": _mamba2,
    "mamba_ssm": _mamba_ssm,
}


#: Families whose tiny model departs from :data:`DEFAULT_SHAPE`.
_FAMILY_SHAPES = {"mamba2": replace(DEFAULT_SHAPE, n_kv_heads=1)}

#: Families whose config counts key/value heads (or, for Mamba2, groups) apart from query heads.
GROUPED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "mamba2"})


def default_shape(family: str) -> TinyShape:
    """The shape of ``tiny(family)``."""
    return _FAMILY_SHAPES.get(family, DEFAULT_SHAPE)


def tiny_model(
    family: str, seed: int = 0, shape: TinyShape | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """A tiny random model of ``family`` (of ``shape``; the family's default shape if None) in eval
    mode, and the tiny tokenizer. Its parameters are cast to ``dtype``, as loading with a dtype
    does; buffers such as rotary frequencies stay float32."""
    if family not in TINY_BUILDERS:
        raise KeyError(f"no tiny model for {family!r}; families: {', '.join(TINY_BUILDERS)}")
    torch.manual_seed(seed)
    model = TINY_BUILDERS[family](shape or default_shape(family)).float().eval()
    # Random init leaves biases and norm weights at constants; perturb every parameter so that a
    # mapping error (e.g. a role read at the wrong module) cannot hide behind symmetric values.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
            parameter.data = parameter.data.to(dtype)
    return model, tiny_tokenizer()
