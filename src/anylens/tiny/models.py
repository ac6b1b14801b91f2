"""Tiny random models of every built-in family, built from configs with no hub access.

Used by the test-suite, by ``al.load("tiny:FAMILY")`` and ``anylens check tiny:FAMILY``, and by
adapter inference (whose candidate checks need a tokenizer); handy for trying an adapter.
"""

from __future__ import annotations

from collections.abc import Callable
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


#: The shape shared by the LLaMA-style tiny decoders: 3 layers, 4 query heads over 2 KV heads (GQA).
_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **_COMMON,
)


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, **_COMMON))


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_DECODER))


def _mistral() -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_DECODER))


def _qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_DECODER))  # q/k/v carry biases


def _gemma() -> torch.nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_DECODER, head_dim=16))


def _gemma2() -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Small caps so that both soft-caps bend the values measurably, and a sliding window shorter
    # than the test prompts so that the local layers really mask.
    config = Gemma2Config(
        **_DECODER,
        head_dim=16,
        query_pre_attn_scalar=16,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
        sliding_window=6,
    )
    return Gemma2ForCausalLM(config)


def _phi3() -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_DECODER, original_max_position_embeddings=128))


def _gpt_neox(parallel: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        config = GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=128,
            use_parallel_residual=parallel,
            **_COMMON,
        )
        return GPTNeoXForCausalLM(config)

    return build


def _opt() -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    # Pre-norm, no embedding projection: the layout of every OPT but the 350m.
    config = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        do_layer_norm_before=True,
        word_embed_proj_dim=64,
        **_COMMON,
    )
    return OPTForCausalLM(config)


def _gptj() -> torch.nn.Module:
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(n_embd=64, n_layer=3, n_head=4, n_inner=128, n_positions=128, rotary_dim=8, **_COMMON)
    return GPTJForCausalLM(config)


def _mamba() -> torch.nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=3, expand=2, conv_kernel=4, **_COMMON)
    return MambaForCausalLM(config)


def _mamba2() -> torch.nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        hidden_size=32,
        num_heads=4,
        head_dim=16,
        expand=2,
        n_groups=1,
        state_size=8,
        conv_kernel=4,
        num_hidden_layers=3,
        chunk_size=16,
        **_COMMON,
    )
    return Mamba2ForCausalLM(config)


def _mamba_ssm() -> torch.nn.Module:
    """The native mamba-ssm model; needs the package and CUDA (its kernels have no CPU path)."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as error:
        raise ImportError(
            f"the tiny mamba_ssm model needs the mamba-ssm package built for CUDA (extra 'cuda'): {error}"
        ) from error

    # The released checkpoints' defaults: RMSNorm, fused add+norm kernel, fp32 residual.
    config = MambaConfig(d_model=64, n_layer=3, vocab_size=VOCAB, pad_vocab_size_multiple=8)
    return MambaLMHeadModel(config, device="cuda", dtype=torch.float32)


#: family name -> builder of a tiny random model of that family
TINY_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
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


def tiny_model(family: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A tiny random float32 model of ``family`` in eval mode, and the tiny tokenizer."""
    if family not in TINY_BUILDERS:
        raise KeyError(f"no tiny model for {family!r}; families: {', '.join(TINY_BUILDERS)}")
    torch.manual_seed(seed)
    model = TINY_BUILDERS[family]().float().eval()
    # Random init leaves biases and norm weights at constants; perturb every parameter so that a
    # mapping error (e.g. a role read at the wrong module) cannot hide behind symmetric values.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model, tiny_tokenizer()
