"""Typed errors and warnings, all of them here. Each message says what was wrong and what to do instead.

Every error subclasses :class:`AnylensError` and the built-in it matches (``ValueError``,
``LookupError``, ...); every warning subclasses :class:`AnylensWarning`. All are exported from
``anylens``; the packages that raise them also re-export them where they were first defined.
"""

from __future__ import annotations


class AnylensError(Exception):
    """Base class of every error anylens raises on purpose."""


class UnknownArchitectureError(AnylensError, LookupError):
    """No registered adapter claims the model's architecture."""


class MissingRoleError(AnylensError, LookupError):
    """The adapter of this model does not provide the requested role."""


class RoleNameError(MissingRoleError, AttributeError):
    """``model.<name>`` for a name that is neither an attribute nor a role (a typo of a role)."""


class LayerIndexError(AnylensError, IndexError):
    """A layer index outside the model's layers."""


class LayerIndexTypeError(LayerIndexError, TypeError):
    """A layer index that is not an integer (a float, a string, a bool)."""


class ModelSourceError(AnylensError, LookupError):
    """A model source that names nothing loadable here: an unknown name, or a hub id while offline."""


class SourcePathError(AnylensError, FileNotFoundError):
    """A local model path (directory or ``.gguf`` file) that does not exist or holds no model."""


class DamagedFileError(AnylensError, OSError):
    """A weights file that cannot be read to its end (a truncated download, a damaged copy)."""


class DtypeError(AnylensError, ValueError):
    """A ``dtype`` that names no floating-point torch dtype."""


class ModulePathError(AnylensError, LookupError):
    """An adapter's module path does not resolve on the model."""


class OutputStructureError(AnylensError, TypeError):
    """Modules playing the same role disagree on returning a tuple or a tensor."""


class AdapterSpecError(AnylensError, ValueError):
    """An adapter declaration (dict, TOML or class) is malformed."""


class PluginError(AnylensError, RuntimeError):
    """A plugin failed while loading or while providing its adapters."""


class RoleWriteError(AnylensError, TypeError):
    """A value written to a role has the wrong shape or cannot reach the model."""


class PromptError(AnylensError, ValueError):
    """Prompts that cannot be used together (for example, different token lengths)."""


class AnylensWarning(UserWarning):
    """Base class of every warning anylens gives on purpose."""


class PositionError(PromptError, IndexError):
    """A token position outside the prompt (it is a ``PromptError`` and an ``IndexError``)."""


class PositionNameError(PromptError, LookupError):
    """A position name (``positions=["S2"]``) that the prompt or its dataset does not define, or a
    marked word (``[NAME:word]``) that cannot name a token position."""


class MisalignmentWarning(AnylensWarning):
    """Clean and corrupt prompts of the same token length whose sub-word splits shift positions:
    some positions no longer hold corresponding words, yet are patched position by position."""


class AlignmentError(PositionError):
    """An ``align`` that pairs a position outside the clean or the corrupt prompt (a ``PositionError``,
    so a ``PromptError`` and an ``IndexError``)."""


class PositionLimitWarning(AnylensWarning):
    """A prompt longer than the positions a rotary model was trained on: it runs, but past its
    context the model's behaviour is not what it learned."""


class TokenizationError(AnylensError, ValueError):
    """A target word that is not exactly one token, or text that cannot be tokenized."""


class MetricError(AnylensError, ValueError):
    """A metric given by name that is unknown, or that the prompts cannot supply words for."""


class EmptyAnswerError(TokenizationError):
    """A metric's answer (or distractor) that is an empty string: it has no tokens to score."""


class StatisticsError(AnylensError, ValueError):
    """Statistics over prompts asked of a result without a row per prompt, or with a bad ``alpha``."""


class LinearityWarning(AnylensWarning):
    """Attribution patching checked against exact patching (``verify=k``) correlates poorly: the
    linear estimate does not hold for these prompts, so its ranking is not to be trusted."""


class ResultFileError(AnylensError, ValueError):
    """A saved result file that is damaged: truncated, not JSON, or not a saved result."""


class OutputPathError(AnylensError, OSError):
    """An output directory that cannot be written: unwritable, or under a regular file."""


class VerificationError(AnylensError, AssertionError):
    """An adapter failed the invariants of ``anylens check``."""


class RemoteError(AnylensError, ConnectionError):
    """A remote (NDIF) model cannot be reached or used: no API key, no network, unknown model."""


class LocalWeightsError(AnylensError, RuntimeError):
    """A computation needs the model's weights on this machine, but the model runs remotely."""


class NotWrappedError(AnylensError, TypeError):
    """An experiment was given a model anylens has not wrapped (a Hugging Face or nnsight model)."""


# -- experiments and the engine -------------------------------------------------------------------
class OptionError(AnylensError, TypeError):
    """An experiment's option given twice (under its new and its former name, or by position and by
    keyword), or more options by position than the experiment ever took."""


class OverError(AnylensError, ValueError):
    """An ``over`` that the role cannot be swept over (e.g. heads of the residual stream)."""


class LinearisationError(AnylensError, ValueError):
    """The final norm is not of the form ``(x - c * mean(x)) / scale * gain + bias``."""


# -- adapters inferred from structure, tiny models, plugins ----------------------------------------
class AnatomyError(AnylensError, LookupError):
    """A piece every adapter needs (embedding, unembedding, layer list, residual stream) is missing."""


class InferenceError(UnknownArchitectureError):
    """No inferred adapter for this model passes the invariants of ``anylens check``."""


class TinyBuildError(AnylensError, RuntimeError):
    """An architecture that cannot be built as a tiny random model on this machine."""


class AdapterConflictWarning(AnylensWarning):
    """Two adapters claim the same architecture; the message says which one is used."""


class PluginLoadWarning(AnylensWarning):
    """A plugin failed to load or to provide its adapters; the others keep working."""


# -- sweeps -----------------------------------------------------------------------------------------
class SweepError(AnylensError):
    """Base class of the errors a sweep raises on purpose."""


class SweepConfigError(SweepError, ValueError):
    """The sweep cannot run as configured, e.g. ``out`` holds a sweep with another configuration."""


class SweepWeightsChangedError(SweepConfigError):
    """A model's weights are not those its finished chunks were computed with."""


class SweepIntegrityError(SweepError, ValueError):
    """A finished chunk on disk no longer matches its checksum, or cannot be parsed."""


class SweepBusyError(SweepError, RuntimeError):
    """Another process is writing the same sweep directory."""


class SweepModelError(SweepError, RuntimeError):
    """A model of the sweep could not be loaded."""


class SweepWarning(AnylensWarning):
    """Something on disk was not as expected and is being repaired (e.g. a damaged chunk recomputed)."""


# -- generation and steering ---------------------------------------------------------------------
class GenerationLengthError(AnylensError, ValueError):
    """A generation longer than the model can position, or a number of new tokens below 1."""


class SteeringVectorError(AnylensError, ValueError):
    """A steering vector whose width is not the model's, or that is not one vector."""


class InterventionError(AnylensError, TypeError):
    """An intervention that is neither a callable nor a well-formed role edit, or a generation
    block used out of place (``gen.steps`` outside it, ``gen.text`` before it ran)."""


class HookNameError(MissingRoleError):
    """A TransformerLens hook name anylens does not know, or a role that has none."""


class ForwardContractError(AnylensError, TypeError):
    """A model whose forward cannot take what anylens passes (token ids ``[batch, pos]``,
    positionally) or whose output holds no logits (docs/adapters.md, "Bring your own model")."""


class MissingFactError(AnylensError, LookupError):
    """An adapter fact (``n_heads``, ``d_model``, ...) that neither the adapter nor the model's
    config gives, needed by the computation asked for."""


class LabelError(AnylensError, ValueError):
    """Probe labels that do not fit the prompts: another count, or a single class."""


class ExtractionOptionError(AnylensError, ValueError):
    """An extraction option that cannot be used: a role without a per-token layout, a bad budget."""


class ActivationsConfigError(AnylensError, ValueError):
    """An extraction directory that holds another configuration, or files that are no extraction."""


class ActivationsNotFoundError(AnylensError, FileNotFoundError):
    """A directory that holds no extraction."""


class ActivationsIntegrityError(AnylensError, ValueError):
    """A stored activation shard whose bytes no longer match its recorded checksum."""


class ActivationsBusyError(AnylensError, RuntimeError):
    """Another process is writing the same extraction directory."""


class ActivationsWarning(AnylensWarning):
    """An extraction directory read before the extraction finished, or a damaged shard recomputed."""


class ProbeOptionError(AnylensError, ValueError):
    """A probe option that cannot be used: a test share outside (0, 1), prompts missing for a model."""


class CircuitGraphError(AnylensError, LookupError):
    """A component graph cannot be built, or a node or edge it does not have was asked for."""


class EdgeOrderError(CircuitGraphError, ValueError):
    """A sender that does not come before its receiver: no edge can carry it there."""


class CircuitOptionError(AnylensError, ValueError):
    """An option of a circuit experiment that cannot be used: an unknown method or level, steps below 1."""


class MetricGradientError(MetricError):
    """A metric with no gradient (top-1 accuracy, a rank) given to a gradient-based method (EAP)."""
