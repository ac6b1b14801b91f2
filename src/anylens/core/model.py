"""The wrapped model: nnsight underneath, component roles on top."""

from __future__ import annotations

import contextlib
import difflib
import operator
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch

from .access import RoleAccess, envoy_at
from .errors import (
    EmptyAnswerError,
    ForwardContractError,
    LayerIndexError,
    LayerIndexTypeError,
    LocalWeightsError,
    MissingFactError,
    MissingRoleError,
    ModulePathError,
    PromptError,
    RoleNameError,
    TokenizationError,
)
from .forward import PlainForward, check_output_on_every_forward
from .hook_names import HookPoint, looks_like_hook_name, role_for_hook
from .inputs import check_inputs
from .operations import OperationHooks
from .roles import LAYER_ROLES, MODEL_ROLES
from .spec import AdapterSpec


class LayerRole:
    """``model.<role>[layer]``: read, write (whole or by item) one role at a layer, in a trace."""

    def __init__(self, model: AnyModel, access: RoleAccess):
        self._model = model
        self._access = access

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._access.read(self._model.layer_index(layer))

    def __setitem__(self, layer: int, value: Any) -> None:
        self._access.write(self._model.layer_index(layer), value)

    def __len__(self) -> int:
        return self._model.n_layers

    def __repr__(self) -> str:
        return f"<role {self._access.role} of {self._model.adapter.name}: {self._access.path.text}>"


class AnyModel:
    """A language model addressed by component roles.

    ``model.nn`` is the underlying nnsight model and ``model.hf`` the Hugging Face module, for
    anything roles do not cover. Roles are read and written inside ``with model.trace(...)``.
    """

    def __init__(self, nn_model: Any, adapter: AdapterSpec, tokenizer: Any = None, remote: bool | str = False):
        self.nn = nn_model
        #: Where traces run: False here, True on NDIF, "local" through nnsight's serialising dry run.
        self.remote = remote
        self.hf = nn_model._module
        #: The model's config; None for a plain torch model without one (its adapter gives the facts).
        self.config = getattr(self.hf, "config", None)
        #: How a plain torch model's forward is called (None for a transformers model): see core/forward.py.
        self.plain_forward = None if _is_transformers_model(self.hf) else PlainForward(self.hf)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(nn_model, "tokenizer", None)
        self.adapter = adapter.specialize(self.config)
        #: What the model was loaded from ("zoo:llama", a path, a hub id); None when wrapped.
        self.source: str | None = None
        self._structures: dict[str, tuple[str, int | None]] = {}
        self._token_shapes: dict[int, tuple[int, int]] = {}
        self._access = {role: RoleAccess(self, role, self.adapter.role_path(role)) for role in self.adapter.roles}
        self.n_layers = len(cast(torch.nn.ModuleList, self.module(self.adapter.layers)))
        self._operations = OperationHooks()
        self._validate_paths()
        if not remote:  # a remote model's forward runs on the server
            self._check_selections_on_first_forward()
            check_inputs(self)
            if self.plain_forward is not None:
                check_output_on_every_forward(self)
        self._prepare_sources()
        if any(access.path.view == "tokens" for access in self._access.values()):
            self._record_token_shapes()

    def __getattr__(self, name: str) -> Any:
        """Reached only when ordinary lookup fails: a typo of a role gets the model's roles and the
        nearest one. Private names stay plain AttributeErrors (pickle and copy probe them, also on
        an instance whose ``__init__`` has not run)."""
        adapter = self.__dict__.get("adapter")
        if name.startswith("_") or adapter is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        roles = adapter.role_names
        near = difflib.get_close_matches(name, roles, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise RoleNameError(
            f"AnyModel has no attribute or role {name!r}; {hint}adapter {adapter.name!r} provides the roles: "
            f"{', '.join(roles)}"
        )

    # -- facts -------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        return self.adapter.role_names

    @property
    def name(self) -> str:
        return self.source or getattr(self.config, "_name_or_path", "") or type(self.hf).__name__

    def fact(self, name: str) -> Any:
        """An adapter fact's value for this model: the adapter's number, or its config attribute."""
        return self.adapter.fact(name, self.config)

    def _missing_fact(self, name: str, why: str) -> MissingFactError:
        given = getattr(self.adapter, name)
        source = "this model has no config" if self.config is None else f"its config has no {given!r}"
        return MissingFactError(
            f"{why} needs {name}, which adapter {self.adapter.name!r} takes from the config attribute {given!r}, "
            f"but {source}: declare it in the adapter as a number ({name}=...) or name the config attribute "
            "that holds it"
        )

    @property
    def d_model(self) -> int:
        width = self.fact("d_model")
        if width is None:
            width = getattr(self.config, "hidden_size", None) or getattr(self.config, "d_model", None)
        if width is None:  # the unembedding reads the residual stream
            try:
                width = linear_weight(self.module(self.adapter.unembed)).shape[0]
            except ModulePathError:
                raise self._missing_fact("d_model", "the residual width") from None
        return int(width)

    @property
    def d_vocab(self) -> int:
        size = self.fact("d_vocab")
        return int(size) if size else int(cast(torch.Tensor, self.module(self.adapter.unembed).weight).shape[0])

    @property
    def n_heads(self) -> int:
        value = self.fact("n_heads")
        if value is None:
            raise self._missing_fact("n_heads", "splitting attention into heads")
        return int(value)

    @property
    def n_kv_heads(self) -> int:
        value = self.fact("n_kv_heads")
        return int(value) if value else self.n_heads

    @property
    def d_head(self) -> int:
        value = self.fact("d_head")
        return int(value) if value else self.d_model // self.n_heads

    @property
    def logit_softcap(self) -> float | None:
        value = self.fact("logit_softcap")
        return float(value) if value else None

    @property
    def attn_implementation(self) -> str | None:
        return getattr(self.config, "_attn_implementation", None)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device, or the CPU for a remote model (nnsight ships them)."""
        device = next(self.hf.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def __repr__(self) -> str:
        return (
            f"<anylens model {self.name!r} adapter={self.adapter.name} layers={self.n_layers} roles={list(self.roles)}>"
        )

    # -- tracing -----------------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """An nnsight trace; inside it, roles read and write the running model.

        A remote model's traces run remotely unless ``remote=`` is given."""
        if self.plain_forward is not None:
            inputs, kwargs = self.plain_forward.arguments(self, inputs, kwargs)
        return self.nn.trace(*inputs, **self._remote_kwargs(kwargs))

    def generate(self, *inputs: Any, **kwargs: Any) -> Any:
        """``with model.generate(prompts, max_new_tokens=N) as gen:`` runs its block, like a
        trace's, at every generated step; ``gen.steps[...]`` picks steps, ``gen.text`` and
        ``gen.tokens`` hold the output (see :mod:`anylens.core.generation_trace`). Called
        without ``with``, it generates and returns that output. Greedy unless ``do_sample=True``."""
        from nnsight.tracing.tracer import WithBlockNotFoundError

        from .generation_trace import open_generation, run_untraced

        if self.plain_forward is not None:
            raise ForwardContractError(
                f"generation runs transformers' generate, which {self.plain_forward.name} (a plain torch model) "
                "does not have: read and patch roles in model.trace(token_ids) instead, one forward at a time"
            )
        tracer = open_generation(self, inputs, kwargs)
        try:
            tracer.capture()  # looks two frames up: the caller's line
        except WithBlockNotFoundError:
            return run_untraced(tracer)
        return tracer

    def session(self, *args: Any, **kwargs: Any) -> Any:
        """An nnsight session; for a remote model the whole session is one remote job, so pass
        ``remote=False`` to the traces inside it."""
        return self.nn.session(*args, **self._remote_kwargs(kwargs))

    def _remote_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.remote and "remote" not in kwargs and "backend" not in kwargs:
            return {**kwargs, "remote": self.remote}
        return kwargs

    def _local_module(self, path: str, purpose: str) -> torch.nn.Module:
        """A module whose weights a computation outside any trace needs on this machine."""
        module = self.module(path)
        if any(p.device.type == "meta" for p in module.parameters()):
            raise LocalWeightsError(
                f"{purpose} needs the weights of {path!r} on this machine, but {self.name!r} runs remotely "
                "and they stay on the server: compute it inside model.trace(...) from the roles you read, "
                "or load the model locally (al.load without remote=True)"
            )
        return module

    def role(self, name: str) -> RoleAccess | HookPoint:
        """The accessor of a role, or a clear error naming the roles this adapter has.

        A TransformerLens hook name (``"blocks.3.hook_resid_post"``) gives a :class:`HookPoint`:
        that role at that layer, with ``read()``/``save()`` and ``write(value)``."""
        if name not in self._access and name not in MODEL_ROLES + LAYER_ROLES and looks_like_hook_name(name):
            return self._hook_point(name)
        if name not in self._access:
            if name not in MODEL_ROLES + LAYER_ROLES:
                raise MissingRoleError(f"{name!r} is not a role; roles are: {', '.join(MODEL_ROLES + LAYER_ROLES)}")
            raise MissingRoleError(
                f"adapter {self.adapter.name!r} ({type(self.hf).__name__}) has no role {name!r}; "
                f"it provides: {', '.join(self.roles)}"
            )
        if name == "pattern" and self.attn_implementation not in (None, "eager"):
            raise MissingRoleError(
                f"'pattern' needs eager attention, but this model runs {self.attn_implementation!r}: "
                "call model.set_attn_implementation('eager') or load with attn_implementation='eager'"
            )
        return self._access[name]

    def _role_access(self, name: str) -> RoleAccess:
        """:meth:`role` for a role name (never a hook name), which gives a :class:`RoleAccess`."""
        return cast(RoleAccess, self.role(name))

    def _hook_point(self, name: str) -> HookPoint:
        role, layer = role_for_hook(name)
        if role not in self._access:
            raise MissingRoleError(
                f"hook name {name!r} stands for role {role!r}, which adapter {self.adapter.name!r} "
                f"({type(self.hf).__name__}) does not have; it provides: {', '.join(self.roles)}"
            )
        return HookPoint(name, self._role_access(role), None if layer is None else self.layer_index(layer))

    def first_role(self, role: str | Sequence[str]) -> str:
        """``role`` itself, or for a list of roles (``["z", "mixer_out"]``) the first this model
        has: one call that runs on attention and state-space models alike. A list none of whose
        roles the model has raises :class:`MissingRoleError` naming them and the roles it has."""
        if isinstance(role, str):
            return role
        candidates = list(role)
        for name in candidates:
            try:
                self.role(name)
            except MissingRoleError:
                continue
            return name
        raise MissingRoleError(
            f"adapter {self.adapter.name!r} ({self.name!r}) has none of the roles {candidates}; "
            f"it provides: {', '.join(self.roles)}"
        )

    def layer_index(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            layer = _integer_index(layer)
        if not -self.n_layers <= layer < self.n_layers:
            raise LayerIndexError(
                f"layer {layer} is out of range: this model has {self.n_layers} layers, "
                f"valid indices are 0..{self.n_layers - 1} (or -{self.n_layers}..-1)"
            )
        return layer % self.n_layers

    def layers(self, layers: Iterable[int] | None = None) -> list[int]:
        """Normalised layer indices; all layers when ``layers`` is None."""
        return list(range(self.n_layers)) if layers is None else [self.layer_index(i) for i in layers]

    # -- module access -----------------------------------------------------------------------
    def module(self, path: str) -> torch.nn.Module:
        """The torch submodule at a dotted path, or an error naming the nearest existing paths."""
        try:
            return self.hf.get_submodule(path) if path else self.hf
        except AttributeError:
            names = [name for name, _ in self.hf.named_modules()]
            near = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
            raise ModulePathError(
                f"adapter {self.adapter.name!r}: module path {path!r} does not exist in {type(self.hf).__name__}; "
                f"nearest existing modules: {near or names[:5]}"
            ) from None

    def _validate_paths(self) -> None:
        for role, access in self._access.items():
            for layer in (0, self.n_layers - 1) if access.path.per_layer else (None,):
                try:
                    self.module(access.path.torch_module_path(layer))
                except ModulePathError as error:
                    raise ModulePathError(f"role {role!r} ({access.path.text}): {error}") from None

    def _check_selections_on_first_forward(self) -> None:
        """Check role paths that select an element of a module's output (``output.1``) against the
        first real output, so that a wrong index fails on the model's first trace whether or not
        the role is read. A plain hook on one layer's module does it and removes itself once the
        check has passed: no probe forward at wrap time, no cost after the first trace."""
        for access in self._access.values():
            path = access.path
            if not path.select or path.io != "output" or path.steps_into_operations:
                continue
            handles: list[Any] = []

            def check(module: torch.nn.Module, args: Any, output: Any, access=access, handles=handles) -> None:
                access.select(output)
                handles[0].remove()

            module = self.module(path.torch_module_path(0 if path.per_layer else None))
            handles.append(module.register_forward_hook(check))

    def _prepare_sources(self) -> None:
        """Hook the operations of modules that roles step into, before any trace runs.

        nnsight rewrites a module's forward on first ``.source`` access; doing it inside a trace
        would be too late for a module whose forward has already begun.
        """
        for access in self._access.values():
            for owner in self._operation_owners(access):
                envoy_at(self, owner).source  # noqa: B018  (the access instruments the forward)
        # Every hooked module, also those opened before wrapping (adapter inference opens some).
        for path, module in self.hf.named_modules():
            self._operations.adopt(path, module)

    def _operation_owners(self, access: RoleAccess) -> list[str]:
        """The modules whose operations a role steps into, one per layer (none for most roles)."""
        if not access.path.steps_into_operations:
            return []
        layers = range(self.n_layers) if access.path.per_layer else (None,)
        return [access.path.torch_module_path(layer) for layer in layers]

    def operation_hooks_only_for(self, roles: Iterable[str]) -> Any:
        """A context in whose traces only the modules whose operations ``roles`` step into (as
        ``pattern`` does) hook those operations; the others run their plain forward, which makes
        each trace faster. Another role that steps into operations still works inside it when
        it is read or written before its module runs, as reads and writes in forward order are.
        """
        if self.remote:  # traces run elsewhere; the serialised model must keep its hooked forwards
            return contextlib.nullcontext()
        keep = [owner for role in roles if role in self._access for owner in self._operation_owners(self._access[role])]
        return self._operations.only_for(keep)

    def _record_token_shapes(self) -> None:
        """Blocks that flatten [batch, pos] into one dimension: remember the shape they got."""

        def remember(layer: int):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._token_shapes[layer] = tuple(hidden.shape[:2])

            return hook

        layers = cast(torch.nn.ModuleList, self.module(self.adapter.layers))
        for index, block in enumerate(layers):
            block.register_forward_pre_hook(remember(index), with_kwargs=True)

    def _token_shape(self, layer: int | None) -> tuple[int, int]:
        return self._token_shapes[layer if layer is not None else 0]

    def set_attn_implementation(self, implementation: str) -> None:
        self.hf.set_attn_implementation(implementation)

    # -- functions of the model's own modules ------------------------------------------------
    def apply_final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's own final norm applied to a residual-stream tensor."""
        path = self._role_access("final_norm").path
        return self._local_module(path.module, "applying the final norm")(resid)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own unembedding (with its logit soft-cap) applied to normalised residuals."""
        return self._soft_cap(self._local_module(self.adapter.unembed, "unembedding")(x))

    def unembed_columns(self, x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``unembed(x)[..., columns]``, computing only those columns where the unembedding is a
        linear map (every column otherwise)."""
        module = self._local_module(self.adapter.unembed, "unembedding")
        try:
            weight = linear_weight(module)
        except ModulePathError:
            return self.unembed(x)[..., columns]
        columns = columns.to(weight.device)
        logits = x @ weight[:, columns]
        if getattr(module, "bias", None) is not None:
            logits = logits + cast(torch.Tensor, module.bias)[columns]
        return self._soft_cap(logits)

    def _soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def W_O(self, layer: int) -> torch.Tensor:
        """Per-head output weights ``[n_heads, d_head, d_model]`` of layer's attention."""
        weight, _ = self._out_proj(layer)
        return weight.reshape(self.n_heads, self.d_head, -1)

    def b_O(self, layer: int) -> torch.Tensor:
        weight, bias = self._out_proj(layer)
        return bias if bias is not None else weight.new_zeros(weight.shape[-1])

    def _out_proj(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.adapter.out_proj is None:
            raise MissingRoleError(f"adapter {self.adapter.name!r} declares no attention output projection")
        path = self.adapter.out_proj.replace("{i}", str(self.layer_index(layer)))
        module = self._local_module(path, "the attention output weights W_O")
        return linear_weight(module), getattr(module, "bias", None)

    # -- tokens ------------------------------------------------------------------------------
    def to_tokens(self, prompts: str | Sequence[str], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Tokenize like a trace does: a batch, padded on ``padding_side``, with its attention mask."""
        self.require_tokenizer(prompts)
        tokenizer = self.tokenizer
        assert tokenizer is not None  # require_tokenizer raised otherwise
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        previous = tokenizer.padding_side
        tokenizer.padding_side = padding_side
        try:
            encoded = tokenizer(batch, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = previous
        empty = [prompt for prompt, row in zip(batch, encoded["attention_mask"]) if not row.any()]
        if empty:
            raise PromptError(f"prompt {empty[0]!r} has no tokens: give a prompt of at least one token")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def require_tokenizer(self, text: Any) -> None:
        """Refuse text for a model without a tokenizer, saying what to pass instead."""
        if self.tokenizer is None:
            raise TokenizationError(
                f"{self.name!r} has no tokenizer, so it cannot read the text {text!r}: pass token ids "
                "(a [batch, pos] LongTensor), or wrap the model with a tokenizer: al.wrap(model, tokenizer, ...)"
            )

    def to_str_tokens(self, prompt: str | torch.Tensor) -> list[str]:
        ids = prompt if isinstance(prompt, torch.Tensor) else self.to_tokens(prompt)["input_ids"][0]
        return [self.decode([i]) for i in ids.reshape(-1).tolist()]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The text of token ids, for labels; ``<id>`` per token for a model without a tokenizer."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return self.tokenizer.decode(ids)

    def token_id(self, word: str) -> int:
        """The id of a word that must be exactly one token (e.g. ``" Paris"``), or a token id
        checked against the vocabulary; a word the tokenizer reads as its unknown token is refused."""
        if isinstance(word, int):
            return self._checked_token_id(word)
        if word == "":
            raise EmptyAnswerError(
                "target '' is an empty string: it has no tokens to score; give the word with its leading space "
                "(such as ' Paris'), or a token id"
            )
        if self.tokenizer is None:
            raise TokenizationError(
                f"{self.name!r} has no tokenizer to find the token {word!r}: pass its token id (an int), "
                "or wrap the model with a tokenizer"
            )
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise TokenizationError(
                f"target {word!r} is {len(ids)} tokens for this tokenizer, not one: {pieces}; "
                "choose a word that is a single token (try with or without a leading space) or pass a token id"
            )
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        if unknown is not None and ids[0] == unknown and word.strip() != self.tokenizer.unk_token:
            # Scored as the unknown token, the word would silently stand for every word the vocabulary lacks.
            close = _close_words(self.tokenizer, word.strip())
            hint = f" (close vocabulary words: {', '.join(map(repr, close))})" if close else ""
            raise TokenizationError(
                f"target {word!r} is not in this tokenizer's vocabulary: it becomes the unknown token "
                f"{self.tokenizer.unk_token!r}; choose a word the vocabulary has{hint} or pass a token id"
            )
        return int(ids[0])

    def _checked_token_id(self, token: int) -> int:
        size = getattr(self.config, "vocab_size", None) or self.d_vocab
        if not 0 <= token < size:
            raise TokenizationError(
                f"token id {token} is outside the vocabulary of {size} tokens (ids 0 to {size - 1}); "
                "pass an id in that range, or the word itself"
            )
        return token


def _is_transformers_model(module: torch.nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _close_words(tokenizer: Any, word: str, n: int = 3) -> list[str]:
    """Vocabulary entries spelled like ``word``, for a vocabulary of whole words.

    Subword vocabularies hold pieces with marker characters, where spelling matches mislead.
    """
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(backend).__name__ != "WordLevel":
        return []
    return difflib.get_close_matches(word, list(tokenizer.get_vocab()), n=n)


def _integer_index(layer: Any) -> int:
    """A numpy integer or a 0-d integer tensor as an int; anything else (a float, a string, a
    bool) is refused rather than truncated, so that ``resid_post[1.7]`` cannot quietly mean layer 1."""
    is_bool = isinstance(layer, bool) or (isinstance(layer, torch.Tensor) and layer.dtype == torch.bool)
    if not is_bool:  # bools have __index__
        try:
            return operator.index(layer)  # numpy / torch integers; floats and strings have no __index__
        except TypeError:
            pass
    raise LayerIndexTypeError(
        f"layer index must be an integer, got {layer!r} ({type(layer).__name__}); "
        "index layers with an int such as model.resid_post[3] (negative counts from the end)"
    )


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight ``W`` with ``y = x @ W + b``, for ``nn.Linear`` and GPT-2-style ``Conv1D``."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.T
    if type(module).__name__ == "Conv1D":  # transformers' Conv1D stores [in, out]
        return cast(torch.Tensor, module.weight)
    raise ModulePathError(f"{type(module).__name__} is not a linear projection; cannot take its weights")


def _install_role_properties() -> None:
    """``model.resid_post`` and friends: one property per role, failing clearly where absent."""

    def layer_role(name: str) -> property:
        def get(self: AnyModel) -> LayerRole:
            return LayerRole(self, self._role_access(name))

        def set_(self: AnyModel, value: Any) -> None:
            raise TypeError(f"assign a layer: model.{name}[layer] = value")

        return property(get, set_, doc=f"role {name!r}, per layer")

    def model_role(name: str) -> property:
        def get(self: AnyModel) -> torch.Tensor:
            return self._role_access(name).read(None)

        def set_(self: AnyModel, value: Any) -> None:
            self._role_access(name).write(None, value)

        return property(get, set_, doc=f"role {name!r}")

    for name in LAYER_ROLES:
        setattr(AnyModel, name, layer_role(name))
    for name in MODEL_ROLES:
        setattr(AnyModel, name, model_role(name))


_install_role_properties()
