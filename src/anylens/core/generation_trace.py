"""``with model.generate(prompts, max_new_tokens=N) as gen:`` — a trace of a whole generation.

The block is written like the body of ``model.trace`` (role reads and writes, ``.save()``), and it
runs once per generated step: at step 0 the model reads the prompt (``[batch, prompt, ...]``), at
each later step the one token generated last (``[batch, 1, ...]``). ``with gen.steps[...]:``
restricts part of the block to chosen steps. Afterwards ``gen.tokens`` / ``gen.text`` hold what
was generated.

nnsight runs a traced block interleaved with the model; a plain ``with model.nn.generate(...)``
block binds to the first step only, and reaching later steps needs ``for step in tracer.iter[...]``
whose end must match the number of steps the model really makes. Here the block is compiled as the
body of such a loop over the generation's steps, ended quietly when the model stops early (at the
end-of-sequence token).
"""

from __future__ import annotations

import ast
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import CodeType
from typing import TYPE_CHECKING, Any, cast

import torch
from greenlet import getcurrent
from nnsight.intervention.interleaver import OutOfOrderError
from nnsight.intervention.iterator import Iterations
from nnsight.intervention.tracer import InterleavingTracer
from nnsight.tracing.tracer import Tracer, push_result
from nnsight.tracing.util import Scope

from .errors import GenerationLengthError, InterventionError, PromptError, RemoteError
from .inputs import position_limit

if TYPE_CHECKING:
    from .model import AnyModel

#: The generation whose block is running in this thread (the compiled loop finds it here).
_running = threading.local()


def _steps() -> Any:
    """The steps of the running generation, pinning nnsight's occurrence counter to each."""
    generation: GenerationTrace = _running.generation
    begins = f"{generation.model.nn.path}.input"  # reached once per step: the model's own input
    for step in Iterations(0, generation.max_steps):
        mediator = getcurrent().mediator()
        if mediator.occurrence(begins) > step:
            # A read or write of step - 1 came after the model had run past its module, so nnsight
            # bound it to this step instead: the block would silently run a step late.
            raise OutOfOrderError(
                f"at step {step - 1} of the generation the block read or wrote a role after the model had "
                "already run past it: within a step, read and write roles in forward order (earlier layers "
                "first, and within a layer in the order of the README's role list)"
            )
        generation.step = step
        # Wait for the model to begin this step, so that nothing of the block runs for a step the
        # model never makes (it stops early at the end-of-sequence token).
        generation.model.nn.inputs  # noqa: B018
        yield step


#: The loop a generation block is compiled into; its body is replaced by the user's block.
_LOOP = "for _anylens_step in __import__('anylens.core.generation_trace', fromlist=['_steps'])._steps():\n    pass\n"


@dataclass
class Generated:
    """What a generation produced.

    ``tokens``: ``[batch, prompt + new]`` ids, prompts left-padded to one length; ``new_tokens``:
    ``[batch, new]``, rows that ended early padded with the pad token; ``text``: each prompt's
    continuation, decoded without special tokens.
    """

    tokens: torch.Tensor
    prompt_length: int
    tokenizer: Any
    #: The logits ``[batch, vocab]`` the first new token was chosen from, where they were kept.
    first_logits: torch.Tensor | None = None

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length :]

    @property
    def text(self) -> list[str]:
        return self.tokenizer.batch_decode(self.new_tokens, skip_special_tokens=True)


class StepSelection(Tracer):
    """``with gen.steps[0]:`` / ``gen.steps[1:]`` / ``gen.steps[[0, 2]]``: run a part of the block
    only at the chosen steps of the generation (0 is the prompt step)."""

    def __init__(self, generation: GenerationTrace, chosen: Any):
        super().__init__()
        self.generation = generation
        self.chosen = chosen

    def selects(self, step: int) -> bool:
        chosen = self.chosen
        if isinstance(chosen, slice):
            return step in range(*chosen.indices(max(step + 1, self.generation.max_steps)))
        if isinstance(chosen, int):
            return step == chosen % self.generation.max_steps if chosen < 0 else step == chosen
        return step in set(chosen)

    def execute(self, code: CodeType) -> None:
        if self.generation.step is None:
            raise InterventionError(
                "gen.steps[...] selects steps inside the block of `with model.generate(...) as gen:`; "
                "use it there, as `with gen.steps[0]:`"
            )
        frame = self.info.frame
        scope = Scope(dict(frame.f_locals), {}, frame.f_globals)
        if self.selects(self.generation.step):
            exec(code, scope)
        push_result(frame, scope)


class _Steps:
    def __init__(self, generation: GenerationTrace):
        self._generation = generation

    def __getitem__(self, chosen: int | slice | Sequence[int]) -> StepSelection:
        if not isinstance(chosen, (int, slice)):
            chosen = [int(step) for step in chosen]
        return StepSelection(self._generation, chosen)


class GenerationTrace(InterleavingTracer):
    """The tracer ``model.generate`` returns: its block runs at every generated step.

    Inside the block ``gen.step`` is the step being run (0: the prompt; ``k``: the token
    generated at step ``k - 1``) and ``gen.steps[...]`` opens a block for chosen steps only.
    After it, ``gen.tokens``, ``gen.new_tokens`` and ``gen.text`` hold the output.
    """

    def __init__(self, envoy: Any, fn: Any, *inputs: Any, anylens_model: AnyModel, **kwargs: Any):
        super().__init__(envoy, fn, *inputs, **kwargs)
        self.model = anylens_model
        self.max_steps = int(kwargs["max_new_tokens"])
        self.step: int | None = None
        self.output: Generated | None = None

    # -- inside the block ----------------------------------------------------------------------
    @property
    def steps(self) -> _Steps:
        return _Steps(self)

    # -- afterwards ------------------------------------------------------------------------------
    def _done(self) -> Generated:
        if self.output is None:
            raise InterventionError(
                "the generation has not run yet: read gen.tokens / gen.text after the `with model.generate(...)` block"
            )
        return self.output

    @property
    def tokens(self) -> torch.Tensor:
        return self._done().tokens

    @property
    def new_tokens(self) -> torch.Tensor:
        return self._done().new_tokens

    @property
    def text(self) -> list[str]:
        return self._done().text

    # -- compiling and running -----------------------------------------------------------------
    def build(self, node: ast.With | ast.AsyncWith) -> ast.Module:
        loop = cast(ast.For, ast.parse(_LOOP).body[0])  # _LOOP is one for statement
        loop.body = node.body
        ast.copy_location(loop, node.body[0])
        ast.copy_location(loop.iter, node.body[0])
        module = ast.Module(body=[loop], type_ignores=[])
        ast.fix_missing_locations(module)
        return module

    def execute(self, code: CodeType) -> None:
        previous = getattr(_running, "generation", None)
        _running.generation = self
        try:
            with warnings.catch_warnings():
                # A generation that ends before max_new_tokens (end-of-sequence) leaves the loop
                # waiting for a step that never comes; nnsight warns, the values are kept.
                warnings.filterwarnings("ignore", message=".*was never reached.*")
                super().execute(code)
        finally:
            _running.generation = previous
            self.step = None

    def record(self, tokens: torch.Tensor, prompt_length: int) -> None:
        self.output = Generated(tokens.detach().cpu(), prompt_length, self.model.tokenizer)


# -- opening a generation ------------------------------------------------------------------------
def open_generation(model: AnyModel, inputs: tuple, kwargs: dict[str, Any]) -> GenerationTrace:
    """A :class:`GenerationTrace` of ``model`` on prompts, with its inputs checked.

    Prompts (strings, or token ids ``[batch, pos]``) are left-padded and the attention mask is
    passed along; sampling is off unless ``do_sample=True`` is given.
    """
    if model.remote:
        raise RemoteError(
            "model.generate with a block of role edits runs on local models only: its block is recompiled "
            "to run at every step, which a remote job cannot carry; use model.nn.generate(..., remote=True) "
            "with `for step in tracer.iter[...]` instead"
        )
    if len(inputs) != 1:
        raise PromptError(f"model.generate takes one prompt or one list of prompts, got {len(inputs)} arguments")
    max_new_tokens = kwargs.get("max_new_tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationLengthError(
            f"max_new_tokens={max_new_tokens!r}: give how many tokens to generate, an integer of at least 1"
        )
    encoded = _encode(model, inputs[0])
    check_positions(model, encoded["input_ids"].shape[1], max_new_tokens)
    check_padding(model, encoded["attention_mask"])
    settings = {"do_sample": False, **kwargs}
    pad = getattr(model.tokenizer, "pad_token_id", None) if model.tokenizer is not None else None
    if pad is not None:
        settings.setdefault("pad_token_id", pad)
    tracer = model.nn.trace(fn=None, tracer_cls=GenerationTrace, anylens_model=model, **encoded, **settings)
    tracer.fn = _recording(model, tracer)
    return tracer


def _encode(model: AnyModel, prompts: Any) -> dict[str, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        if ids.numel() == 0:
            raise PromptError(f"the token ids have shape {list(prompts.shape)}: give at least one prompt of one token")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise PromptError("the prompt list is empty: give at least one prompt")
    if not all(isinstance(p, str) for p in batch):
        raise PromptError("model.generate takes a string, a list of strings, or token ids [batch, pos]")
    return model.to_tokens(batch)


def _recording(model: AnyModel, tracer: GenerationTrace) -> Any:
    """nnsight's own generate (which passes its output through ``model.nn.generator``), keeping
    the ids it returns on the tracer."""
    generate = type(model.nn).generate.__wrapped__.__get__(model.nn)

    def run(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        output = generate(*args, **kwargs)
        tracer.record(output, int(ids.shape[1]))
        return output

    return run


def run_untraced(tracer: GenerationTrace) -> Generated:
    """A generation called without a ``with`` block: generate and return the output."""
    tracer.envoy.interleave(tracer.fn, **tracer.kwargs)
    return tracer._done()


# -- what cannot be generated exactly ------------------------------------------------------------
def check_positions(model: AnyModel, prompt_length: int, max_new_tokens: int) -> None:
    """Refuse, before generating, what would read past a model's learned absolute positions (a
    rotary model runs on; its traces warn past the trained context)."""
    limit = position_limit(model) if "pos_embed" in model.roles else None
    # The last generated token is never fed back: the final step reads position prompt + new - 2.
    if limit is not None and prompt_length + max_new_tokens - 1 > limit:
        raise GenerationLengthError(
            f"a prompt of {prompt_length} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{prompt_length + max_new_tokens - 1} positions, but {model.name!r} has learned positions for "
            f"{limit} only: generate at most {max(limit - prompt_length + 1, 0)} new tokens or shorten the prompt"
        )


_exact_padding: dict[int, bool] = {}


def pads_exactly(model: AnyModel) -> bool:
    """Whether left padding leaves a prompt's next-token logits unchanged, measured once per model.

    Attention masks padding out; transformers' Mamba zeroes padded positions before and after its
    convolution, so its recurrent state never sees them. A model that does neither fails here.
    """
    key = id(model.hf)
    if key not in _exact_padding:
        import inspect

        ids = torch.tensor([[5, 7, 11, 13]], device=model.device) % model.d_vocab
        pad = getattr(model.tokenizer, "pad_token_id", None) or 0
        padded = torch.cat([torch.full((1, 3), pad, device=model.device), ids], 1)
        mask = torch.cat([torch.zeros(1, 3, device=model.device), torch.ones(1, 4, device=model.device)], 1).long()
        extra = {}
        if "position_ids" in inspect.signature(model.hf.forward).parameters:  # as generate derives them
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            alone = model.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
            in_batch = model.hf(input_ids=padded, attention_mask=mask, **extra).logits[0, -1].float()
        tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
        _exact_padding[key] = bool(torch.allclose(alone, in_batch, atol=tolerance, rtol=tolerance))
    return _exact_padding[key]


def check_padding(model: AnyModel, attention_mask: torch.Tensor) -> None:
    if bool(attention_mask.all()) or pads_exactly(model):
        return
    lengths = attention_mask.sum(-1).tolist()
    raise PromptError(
        f"prompts of different token lengths {lengths} need left padding, which {model.name!r} "
        f"({model.adapter.name}) does not mask: a padded prompt's logits differ from the prompt's own, "
        "so the generations would differ from generating each prompt alone. Generate prompts of one "
        "length together, or one prompt at a time"
    )
