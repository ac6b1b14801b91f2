"""Tiny random models of every built-in family, built from configs with no hub access.

Used by the test-suite and by ``anylens check tiny:FAMILY``; handy for trying an adapter.
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
        special_tokens=["<unk>", "<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


VOCAB = 400
_COMMON = dict(vocab_size=VOCAB, bos_token_id=2, eos_token_id=3, pad_token_id=1)


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, **_COMMON))


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **_COMMON,
    )
    return LlamaForCausalLM(config)


#: family name -> builder of a tiny random model of that family
TINY_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2": _gpt2,
    "llama": _llama,
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


def tiny(family: str, seed: int = 0, **wrap_kwargs: Any):
    """A tiny random model of ``family`` wrapped as an :class:`anylens.AnyModel`."""
    from .core.loading import wrap

    model, tokenizer = tiny_model(family, seed)
    return wrap(model, tokenizer, **wrap_kwargs)
