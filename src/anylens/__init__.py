"""anylens: mechanistic-interpretability experiments written once against component roles.

Roles (``resid_post``, ``attn_out``, ``z``, ...) are mapped onto each architecture by adapters,
which are pluggy plugins; experiments use roles only and run on every architecture.
"""

from __future__ import annotations

from ._version import __version__
from .core.errors import (
    ActivationsBusyError,
    ActivationsConfigError,
    ActivationsIntegrityError,
    ActivationsNotFoundError,
    ActivationsWarning,
    AdapterConflictWarning,
    AdapterSpecError,
    AnatomyError,
    AnylensError,
    AnylensWarning,
    CircuitGraphError,
    CircuitOptionError,
    DamagedFileError,
    DtypeError,
    EdgeOrderError,
    ExtractionOptionError,
    ForwardContractError,
    GenerationLengthError,
    HookNameError,
    InferenceError,
    InterventionError,
    LabelError,
    LayerIndexError,
    LayerIndexTypeError,
    LinearisationError,
    LocalWeightsError,
    MetricError,
    MetricGradientError,
    MissingFactError,
    MissingRoleError,
    ModelSourceError,
    ModulePathError,
    NotWrappedError,
    OptionError,
    OutputPathError,
    OutputStructureError,
    OverError,
    PluginError,
    PluginLoadWarning,
    PositionError,
    PositionLimitWarning,
    ProbeOptionError,
    PromptError,
    RemoteError,
    ResultFileError,
    RoleNameError,
    RoleWriteError,
    SourcePathError,
    SteeringVectorError,
    SweepBusyError,
    SweepConfigError,
    SweepError,
    SweepIntegrityError,
    SweepModelError,
    SweepWarning,
    SweepWeightsChangedError,
    TinyBuildError,
    TokenizationError,
    UnknownArchitectureError,
    VerificationError,
)
from .core.hook_names import HookPoint, hook_for_role, role_for_hook
from .core.model import AnyModel
from .core.roles import ALL_ROLES, BRANCH_INPUT_ROLES, LAYER_ROLES, MODEL_ROLES
from .core.spec import AdapterSpec, Variant
from .loading import load, wrap
from .registry.hookspecs import hookimpl, hookspec
from .registry.manager import register_adapter, register_plugin, registry
from .registry.verify import CheckReport, check

__all__ = [
    "__version__",
    "ALL_ROLES",
    "BRANCH_INPUT_ROLES",
    "LAYER_ROLES",
    "MODEL_ROLES",
    "ActivationsBusyError",
    "ActivationsConfigError",
    "ActivationsIntegrityError",
    "ActivationsNotFoundError",
    "ActivationsWarning",
    "AdapterConflictWarning",
    "AdapterSpec",
    "AdapterSpecError",
    "AnatomyError",
    "AnyModel",
    "AnylensError",
    "AnylensWarning",
    "CheckReport",
    "CircuitGraphError",
    "CircuitOptionError",
    "DamagedFileError",
    "DtypeError",
    "EdgeOrderError",
    "ForwardContractError",
    "ExtractionOptionError",
    "LabelError",
    "GenerationLengthError",
    "HookNameError",
    "InterventionError",
    "InferenceError",
    "LayerIndexError",
    "LayerIndexTypeError",
    "LinearisationError",
    "LocalWeightsError",
    "MetricError",
    "MetricGradientError",
    "MissingFactError",
    "MissingRoleError",
    "ModelSourceError",
    "ModulePathError",
    "NotWrappedError",
    "OptionError",
    "OutputPathError",
    "OutputStructureError",
    "OverError",
    "PluginError",
    "PluginLoadWarning",
    "PositionError",
    "PositionLimitWarning",
    "ProbeOptionError",
    "PromptError",
    "RemoteError",
    "ResultFileError",
    "RoleNameError",
    "RoleWriteError",
    "SourcePathError",
    "SteeringVectorError",
    "SweepBusyError",
    "SweepConfigError",
    "SweepError",
    "SweepIntegrityError",
    "SweepModelError",
    "SweepWarning",
    "SweepWeightsChangedError",
    "TinyBuildError",
    "TokenizationError",
    "UnknownArchitectureError",
    "Variant",
    "VerificationError",
    "check",
    "hook_for_role",
    "HookPoint",
    "role_for_hook",
    "hookimpl",
    "hookspec",
    "load",
    "register_adapter",
    "register_plugin",
    "registry",
    "wrap",
]


from .experiments import metrics
from .experiments.results import Result

#: Experiments, imported on first use so that ``import anylens`` stays light.
_LAZY = {
    "cache": "anylens.experiments.extraction",
    "ActivationCache": "anylens.experiments.extraction",
    "stack": "anylens.experiments.extraction",
    "decompose_resid": "anylens.experiments.extraction",
    "logit_lens": "anylens.experiments.logit_lens",
    "direct_logit_attribution": "anylens.experiments.dla",
    "attention_patterns": "anylens.experiments.patterns",
    "head_scores": "anylens.experiments.patterns",
    "patch": "anylens.experiments.patching",
    "ablate": "anylens.experiments.ablation",
    "attribute": "anylens.experiments.attribution",
    "run": "anylens.sweep.runner",
    "extract": "anylens.sweep.activations",
    "load_activations": "anylens.experiments.activation_store",
    "Activations": "anylens.experiments.activation_store",
    "probe": "anylens.experiments.probes",
    "ProbeResult": "anylens.experiments.probes",
    "generate": "anylens.experiments.generation",
    "steering_vector": "anylens.experiments.steering",
    "steer": "anylens.experiments.steering",
    "steering_sweep": "anylens.experiments.steering",
    "component_graph": "anylens.circuits.graph",
    "path_patch": "anylens.circuits.path_patching",
    "scrub": "anylens.circuits.scrub",
    "Hypothesis": "anylens.circuits.scrub",
    "circuit": "anylens.circuits.experiment",
    "CircuitResult": "anylens.circuits.result",
}

__all__ += ["Result", "metrics", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anylens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
