"""An adapter inferred from a model's structure, accepted only when ``anylens check`` passes.

:func:`infer_adapter` reads the model's anatomy (:mod:`.anatomy`, :mod:`.heads`,
:mod:`.attention_ops`), turns every placed piece into a group of candidate role mappings (most
specific first, "absent" last for the optional ones), and tries candidate adapters in that fixed
order: each one is wrapped and checked on a real trace of the model; a failing invariant rejects
the mapping it blames, and the next candidate replaces only that mapping. The first candidate that
passes every invariant is returned. When no candidate keeps the residual stream,
:class:`InferenceError` says what was found, which invariant failed, and how to write the adapter
as data.

Run ``python -m anylens.inference.infer MODEL`` (or ``anylens infer MODEL``) to print the verified
map as TOML, ready for ``al.register_adapter("model.toml")``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import AnatomyError, InferenceError, UnknownArchitectureError
from ..core.spec import AdapterSpec
from .anatomy import read_anatomy
from .attention_ops import pattern_options
from .heads import screen_qkv
from .structure import Anatomy, Piece, sample_ids

#: Stop after this many candidates: each costs a full ``anylens check``.
MAX_ATTEMPTS = 8

DESCRIPTION = "inferred"


# -- candidate groups ------------------------------------------------------------------------------
@dataclass
class Option:
    """One way to map a group of roles (empty ``roles``: the group is absent)."""

    roles: dict[str, str]
    facts: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass
class Group:
    name: str
    options: list[Option]
    required: bool = False


ABSENT = Option({}, label="absent")


def candidate_groups(anatomy: Anatomy) -> list[Group]:
    """Role groups in the order candidates vary them; every optional group ends with 'absent'."""
    layer = f"{anatomy.layers}.{{i}}"
    groups = [
        Group(
            "residual",
            [
                Option(
                    {"resid_pre": f"{layer}.input", "resid_post": f"{layer}.output", "logits": "output.logits"},
                    label="layer input/output",
                )
            ],
            required=True,
        )
    ]

    def optional(name: str, options: list[Option]) -> None:
        groups.append(Group(name, options + [ABSENT]))

    if anatomy.embed:
        optional("embed", [Option({"embed": f"{anatomy.embed}.output"})])
    if anatomy.pos_embed:
        optional("pos_embed", [Option({"pos_embed": f"{anatomy.pos_embed}.output"})])
    if anatomy.final_norm:
        optional(
            "final_norm",
            [Option({"final_norm": f"{anatomy.final_norm}.output"}, {"logit_softcap": anatomy.logit_softcap})],
        )
    if anatomy.components:
        names = {"attn": "attn_out", "mlp": "mlp_out", "mixer": "mixer_out"}
        roles = {names[kind]: piece.path(layer) for kind, piece in anatomy.components.items()}
        if "attn_out" in roles and "mixer_out" not in roles:  # attention is the token mixer
            roles["mixer_out"] = roles["attn_out"]
        parallel = {"attn", "mlp"} <= anatomy.components.keys() and anatomy.resid_mid is None
        optional("components", [Option(roles, {"parallel": parallel})])
    if anatomy.resid_mid:
        optional("resid_mid", [Option({"resid_mid": anatomy.resid_mid.path(layer)})])
    if anatomy.branch_inputs:  # verified by invariant 8
        optional("branch_inputs", [Option({role: piece.path(layer) for role, piece in anatomy.branch_inputs.items()})])
    if anatomy.out_proj:
        feeds = anatomy.z_feeds_residual and "attn" in anatomy.components
        # z is verified by invariant 5 (z @ W_O == attn_out) or else by 6 (pattern @ v == z)
        optional(
            "z",
            [
                Option(
                    {"z": Piece(anatomy.out_proj, "input", "heads").path(layer)},
                    {"z_feeds_residual": feeds, "z_needs_pattern": not feeds},
                )
            ],
        )
    if anatomy.qkv_options:
        # a fused layout, or projections whose names do not say which is which, are told apart
        # only by 'pattern @ v == z': they come with the pattern or not at all
        fused = any(p.view.startswith("qkv") for option in anatomy.qkv_options for p in option.values())
        needs_pattern = fused or len(anatomy.qkv_options) > 1
        if needs_pattern and not anatomy.pattern_options:
            anatomy.notes.append("q/k/v: without a pattern nothing tells the projections' layout apart")
        else:
            optional(
                "qkv",
                [
                    Option(
                        {r: p.path(layer) for r, p in o.items()},
                        {"qkv_needs_pattern": needs_pattern},
                        label=o["v"].view or "",
                    )
                    for o in anatomy.qkv_options
                ],
            )
    if anatomy.pattern_options:
        optional("pattern", [Option({"pattern": f"{layer}.{op}.output"}, label=op) for op in anatomy.pattern_options])
    if anatomy.mlp_post:
        optional("mlp_post", [Option({"mlp_post": anatomy.mlp_post.path(layer)})])
    return groups


def build_spec(anatomy: Anatomy, groups: list[Group], choice: dict[str, int]) -> AdapterSpec:
    roles: dict[str, str] = {}
    facts: dict[str, Any] = {}
    for group in groups:
        option = group.options[choice[group.name]]
        roles.update(option.roles)
        facts.update(option.facts)
    # roles whose only verifying invariant needs a role that this candidate lacks are left out
    if "attn_out" not in roles:
        roles.pop("resid_mid", None)  # invariant 3
    if not {"attn_out", "mixer_out"} & roles.keys():  # invariant 8 writes need the branch outputs
        for role in ("attn_in", "mlp_in", "mixer_in"):
            roles.pop(role, None)
    if facts.get("qkv_needs_pattern") and "pattern" not in roles:
        for role in "qkv":
            roles.pop(role, None)
    if facts.get("z_needs_pattern") and not {"pattern", "v"} <= roles.keys():
        roles.pop("z", None)
    if "z" in roles:
        facts.setdefault("z_feeds_residual", False)
    else:
        facts["z_feeds_residual"] = True  # nothing to verify; the default
    heads = anatomy.heads
    return AdapterSpec(
        name=f"inferred:{anatomy.class_name}",
        architectures=(anatomy.class_name,),
        layers=anatomy.layers,
        roles=roles,
        unembed=anatomy.unembed,
        out_proj=f"{anatomy.layers}.{{i}}.{anatomy.out_proj}" if anatomy.out_proj and "z" in roles else None,
        n_heads=heads.n_heads_attr if heads else "num_attention_heads",
        n_kv_heads=heads.n_kv_attr if heads else "num_key_value_heads",
        d_head=heads.d_head_attr if heads else "head_dim",
        logit_softcap=facts.get("logit_softcap") if "final_norm" in roles else None,
        parallel=bool(facts.get("parallel", False)) and "attn_out" in roles,
        z_feeds_residual=bool(facts["z_feeds_residual"]),
        description=DESCRIPTION,
    )


# -- which group a failing invariant blames -----------------------------------------------------------
def _blamed_roles(invariant: str, failing: list[str]) -> list[str]:
    """The roles a failing check row points at (see ``anylens.registry.verify``)."""
    if invariant.startswith("read "):
        return [invariant.split()[1]]
    if invariant.startswith("7 "):
        return [invariant.split(" to ")[-1].split(":")[0].strip() if " to " in invariant else invariant.split()[-1]]
    number = invariant.split()[0]
    if number == "1":
        return ["resid_post"]
    if number == "2":
        return ["attn_out"] if "attn_out" in invariant else ["mlp_out", "mixer_out"]
    if number == "3":
        return ["resid_mid"]
    if number == "4":
        return ["final_norm"]
    if number == "5":
        return ["z"]
    if number == "8":  # "8 attn_in == ..." or "8 write attn_in: ..."
        words = invariant.split()
        return [(words[2] if words[1] == "write" else words[1]).rstrip(":")]
    if number == "6":
        if "@ v" not in invariant:
            return ["pattern"]
        return ["z"] if any(f.startswith("5 ") for f in failing) else ["v"]
    return []


def _group_of(groups: list[Group], choice: dict[str, int], role: str) -> Group | None:
    for group in groups:
        if role in group.options[choice[group.name]].roles:
            return group
    return None


# -- the search ------------------------------------------------------------------------------------
@dataclass
class Attempt:
    spec: AdapterSpec
    failures: list[str]


def _candidates(groups: list[Group]) -> Iterator[tuple[dict[str, int], set[tuple[str, int]]]]:
    """Choices in preference order; a rejected (group, option) is never proposed again."""
    rejected: set[tuple[str, int]] = set()
    while True:
        choice = {}
        for group in groups:
            usable = [i for i in range(len(group.options)) if (group.name, i) not in rejected]
            if not usable:
                return
            choice[group.name] = usable[0]
        yield choice, rejected


def _check(hf_model: torch.nn.Module, spec: AdapterSpec) -> list[tuple[str, str]]:
    """(invariant, detail) of every failing check row; a crash is one failure of its own."""
    from ..core.wrapping import wrap_with_spec
    from ..registry.verify import check
    from ..tiny.models import tiny_tokenizer

    try:
        model = wrap_with_spec(hf_model, spec, tiny_tokenizer())
        report = check(model)
    except Exception as error:  # a candidate that cannot even be traced is a failed candidate
        return [("crash", f"{type(error).__name__}: {error}".replace("\n", " ")[:300])]
    failures = []
    for row in report.failures:
        where = "" if row.layer is None else f" at layer {row.layer}"
        failures.append((row.invariant, f"{row.detail or f'error {row.error:.2e} > {row.tolerance:.1e}'}{where}"))
    return failures


def search(hf_model: torch.nn.Module, anatomy: Anatomy) -> tuple[AdapterSpec | None, list[Attempt]]:
    groups = candidate_groups(anatomy)
    attempts: list[Attempt] = []
    for choice, rejected in _candidates(groups):
        if len(attempts) >= MAX_ATTEMPTS:
            break
        spec = build_spec(anatomy, groups, choice)
        failures = _check(hf_model, spec)
        attempts.append(Attempt(spec, [f"{inv}: {detail}" for inv, detail in failures]))
        if not failures:
            return spec, attempts
        blamed = _blame(groups, choice, failures)
        if not blamed or any(g.required for g in blamed):
            break
        rejected.update((g.name, choice[g.name]) for g in blamed)
    return None, attempts


def _blame(groups: list[Group], choice: dict[str, int], failures: list[tuple[str, str]]) -> list[Group]:
    invariants = [inv for inv, _ in failures]
    blamed: dict[str, Group] = {}
    for invariant in invariants:
        if invariant == "crash":
            # no row to read: give up the most derived mapping still present
            for group in reversed(groups):
                if group.options[choice[group.name]].roles and not group.required:
                    blamed[group.name] = group
                    break
            continue
        for role in _blamed_roles(invariant, invariants):
            group = _group_of(groups, choice, role)
            if group is not None:
                blamed[group.name] = group
    # an invariant over the sum blames the components only if nothing more specific failed
    if len(blamed) > 1 and "components" in blamed:
        specific = [i for i in invariants if not i.startswith("2 ")]
        if specific:
            blamed.pop("components")
    return list(blamed.values())


# -- the public entry point ------------------------------------------------------------------------
_CACHE: dict[tuple[str, str], AdapterSpec | InferenceError] = {}

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_attn_implementation_internal",
    "id2label",
    "label2id",
    "_commit_hash",
}


def cache_key(hf_model: torch.nn.Module) -> tuple[str, str]:
    """The model class and its config's shape (everything but names, dtypes and attention kernels)."""
    config = {k: v for k, v in hf_model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    cls = type(hf_model)
    return f"{cls.__module__}.{cls.__qualname__}", json.dumps(config, sort_keys=True, default=str)


def infer_adapter(hf_model: torch.nn.Module) -> AdapterSpec:
    """A verified adapter for a decoder-only Hugging Face model, or :class:`InferenceError`.

    The result is cached per model class and config shape: a second model of the same shape is
    served without inference or checking.
    """
    key = cache_key(hf_model)
    if key not in _CACHE:
        outcome = infer_outcome(hf_model)
        _CACHE[key] = outcome.spec if outcome.spec is not None else outcome.error
    found = _CACHE[key]
    if isinstance(found, InferenceError):
        raise found
    return found


@dataclass
class Outcome:
    """Everything one inference did: the anatomy, each candidate tried and why it failed."""

    spec: AdapterSpec | None
    anatomy: Anatomy | None
    attempts: list[Attempt]
    error: InferenceError | None = None


def infer_outcome(hf_model: torch.nn.Module) -> Outcome:
    """Run inference without the cache (``infer_adapter`` is the cached front door)."""
    name = type(hf_model).__name__
    hf_model.eval()  # dropout would make every value comparison noise (wrap switches to eval too)
    previous = getattr(hf_model.config, "_attn_implementation", None)
    _use_eager(hf_model)
    try:
        anatomy = read_anatomy(hf_model)
    except AnatomyError as error:
        _restore(hf_model, previous)
        return Outcome(None, None, [], InferenceError(_message(name, None, [], f"structure: {error}")))
    except Exception as error:  # the model's forward (or reading its structure) failed
        _restore(hf_model, previous)
        reason = f"reading the structure failed: {type(error).__name__}: {error}"
        return Outcome(None, None, [], InferenceError(_message(name, None, [], reason)))
    _find_patterns(hf_model, anatomy)
    spec, attempts = search(hf_model, anatomy)
    if spec is None or "pattern" not in spec.roles:
        _restore(hf_model, previous)
    if spec is None:
        reason = "every candidate fails an invariant on the residual-stream roles every adapter needs"
        error = InferenceError(_message(name, anatomy, attempts, reason))
        return Outcome(None, anatomy, attempts, error)
    return Outcome(spec, anatomy, attempts)


def _use_eager(hf_model: torch.nn.Module) -> None:
    """Eager attention materialises the probabilities that ``pattern`` reads."""
    if getattr(hf_model.config, "_attn_implementation", None) not in (None, "eager"):
        with contextlib.suppress(Exception):  # a model that cannot switch keeps its kernel: no pattern
            hf_model.set_attn_implementation("eager")


def _restore(hf_model: torch.nn.Module, previous: str | None) -> None:
    if previous and getattr(hf_model.config, "_attn_implementation", None) != previous:
        with contextlib.suppress(Exception):
            hf_model.set_attn_implementation(previous)


def _find_patterns(hf_model: torch.nn.Module, anatomy: Anatomy) -> None:
    """Attention-pattern operations (needs a trace), then q/k/v layouts screened against them."""
    if anatomy.attention is None or anatomy.heads is None:
        return
    from nnsight.modeling.transformers import TransformersModel

    from ..tiny.models import tiny_tokenizer

    # the attention module, then the module that owns its projections (the pattern may live there)
    modules = [anatomy.attention] + sorted(
        {p.module.rsplit(".", 1)[0] for option in anatomy.qkv_options for p in option.values() if "." in p.module}
        - {anatomy.attention}
    )
    try:
        nn_model = TransformersModel(hf_model, tokenizer=tiny_tokenizer())
        block = f"{anatomy.layers}.0"
        found = pattern_options(nn_model, modules, block, sample_ids(hf_model), anatomy.heads.n_heads)
    except Exception as error:
        anatomy.notes.append(f"pattern: searching the attention forward failed ({type(error).__name__}: {error})")
        found = []
    anatomy.pattern_options = [option for option, _ in found]
    if found:
        screen_qkv(anatomy, found[0][1])
    else:
        anatomy.notes.append("pattern: no softmax in the attention forward gives causal rows that sum to 1")


def _message(name: str, anatomy: Anatomy | None, attempts: list[Attempt], reason: str) -> str:
    lines = [f"cannot infer an adapter for {name}: {reason}."]
    if anatomy is not None:
        lines.append(f"Inferred: {anatomy.summary()}.")
        lines += [f"  note: {note}" for note in anatomy.notes]
    for n, attempt in enumerate(attempts, 1):
        roles = ", ".join(f"{role}={path}" for role, path in attempt.spec.roles.items())
        lines.append(f"Candidate {n}: {roles}")
        lines += [f"  failed invariant {failure}" for failure in attempt.failures[:6]]
    lines.append(
        "Write the adapter as data instead: a TOML file with [adapter] name, architectures, layers and an "
        "[adapter.roles] table (role = \"<module path>.<input|output>[|view]\", '{i}' for the layer), "
        "registered with al.register_adapter('my_model.toml'); `python -m anylens.inference.infer` on a similar "
        "model prints one to start from, and `anylens check` tells you whether it is right (see docs/inference.md)."
    )
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------
def load_for_inference(source: str) -> torch.nn.Module:
    """``tiny:FAMILY``, ``arch:<ClassName>`` or a local model directory, as a float32 HF model."""
    if source.startswith("tiny:"):
        from ..tiny.models import tiny_model

        return tiny_model(source.removeprefix("tiny:"))[0]
    if source.startswith("arch:"):
        from ..tiny.arch import tiny_model as tiny_arch_model

        return tiny_arch_model(source.removeprefix("arch:"))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def infer_command(model_source: str) -> str:
    """The verified inferred adapter of ``model_source`` as TOML (raises :class:`InferenceError`)."""
    spec = infer_adapter(load_for_inference(model_source))
    header = (
        f"# Adapter inferred by anylens for {spec.architectures[0]} ({model_source}); it passed `anylens check`.\n"
        "# Register it with al.register_adapter('this_file.toml') or an entry-point plugin.\n"
    )
    return header + spec.to_toml()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="tiny:FAMILY, arch:<transformers causal-LM class>, or a model directory")
    parser.add_argument("-o", "--output", help="write the TOML here instead of printing it")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for the TOML: libraries that print progress (at the OS level) go to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 printed, 1 inference failed (the message says why), 2 the model did not load."""
    from ..core.errors import AnylensError

    try:
        with _stdout_to_stderr():
            text = infer_command(args.model)
    except UnknownArchitectureError as error:
        print(error, file=sys.stderr)
        return 1
    except (AnylensError, OSError, ValueError, KeyError) as error:
        print(f"cannot load {args.model!r}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anylens.inference.infer", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
