"""The forward contract of a model that is not a transformers model (a plain torch module).

A transformers model takes keyword inputs (``input_ids=``, ``attention_mask=``) and nnsight's
``TransformersModel`` tokenizes strings for it. A plain model gets what this module gives it:

* token ids, a ``[batch, pos]`` LongTensor, as the forward's first positional argument;
* ``attention_mask=`` (``[batch, pos]``, 1 for real tokens) only if the forward has a parameter
  of that name (read from its signature once, when the model is wrapped);
* ``logits_to_keep=`` (an optimisation that leaves the last position's logits as they are)
  only if accepted; any other keyword goes to the forward as given.

Its output may be the logits tensor itself, a tuple whose first element is the logits, or an
object with a ``.logits`` tensor. Anything else, or a forward that cannot take one positional
argument, gets a :class:`ForwardContractError` naming this contract.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .errors import ForwardContractError, PromptError

if TYPE_CHECKING:
    from .model import AnyModel

CONTRACT = (
    "anylens calls a custom model's forward with token ids, a [batch, pos] LongTensor, as its first "
    "positional argument (and attention_mask= only if the forward has that parameter), and reads the "
    "logits from its output: a tensor, a tuple whose first element is the logits, or an object with "
    "a .logits tensor (docs/adapters.md, 'Bring your own model')"
)


class PlainForward:
    """How to call one plain model's forward, read from its signature once."""

    def __init__(self, module: torch.nn.Module):
        name = type(module).__name__
        self.name = name
        # The class's forward, not the instance attribute, which nnsight may have replaced by a wrapper.
        signature = inspect.signature(type(module).forward)
        parameters = list(signature.parameters.values())[1:]  # without self
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
            raise ForwardContractError(
                f"{name}.forward{signature} takes no positional argument for the token ids; {CONTRACT}"
            )
        required = [
            p.name
            for p in parameters
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if len(required) > 1:
            raise ForwardContractError(
                f"{name}.forward requires {len(required)} arguments ({', '.join(required)}), but anylens passes "
                f"one; give the others defaults. {CONTRACT}"
            )
        first = positional[0].name if positional else None
        #: Keyword parameters the forward names (the ids' parameter excluded), and whether it takes **kwargs.
        self.keywords = frozenset(
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != first
        )
        self.open_keywords = any(p.kind == p.VAR_KEYWORD for p in parameters)
        # Only a forward that names the parameter gets the mask: one swallowed by **kwargs may be ignored.
        self.takes_mask = "attention_mask" in self.keywords

    def accepts(self, keyword: str) -> bool:
        return self.open_keywords or keyword in self.keywords

    def arguments(self, model: AnyModel, inputs: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The positional and keyword arguments of the forward for a trace's ``inputs``: strings
        tokenized with the model's tokenizer, a tokenized dict split into ids and mask."""
        if "logits_to_keep" in kwargs and not self.accepts("logits_to_keep"):
            kwargs = {key: value for key, value in kwargs.items() if key != "logits_to_keep"}
        if len(inputs) != 1:
            return inputs, kwargs
        data = inputs[0]
        if isinstance(data, str) or (
            isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data)
        ):
            data = model.to_tokens(data)
        if isinstance(data, Mapping) and "input_ids" in data:
            mask = data.get("attention_mask")
            data = data["input_ids"]
            if mask is not None:
                if self.takes_mask:
                    kwargs = {"attention_mask": mask, **kwargs}
                elif not bool(mask.all()):
                    raise PromptError(
                        f"these prompts have different token lengths, so they are padded, but {self.name}.forward "
                        "takes no attention_mask to mask the padding: give prompts of one token length (or token "
                        "ids [batch, pos]), or add an attention_mask parameter to the forward"
                    )
        if isinstance(data, torch.Tensor) and data.dim() == 1:
            data = data[None]
        return (data,), kwargs


def logits_of(output: Any, name: str) -> torch.Tensor:
    """The logits in a plain model's output, or the contract's error."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ForwardContractError(f"{name}.forward returned a {type(output).__name__}, which holds no logits; {CONTRACT}")


def check_output_on_every_forward(model: AnyModel) -> None:
    """A hook on the whole model that refuses an output without logits (cheap: type checks)."""

    def check(module: torch.nn.Module, args: Any, output: Any) -> None:
        logits_of(output, type(module).__name__)

    model.hf.register_forward_hook(check)
