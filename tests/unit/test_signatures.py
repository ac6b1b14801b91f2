"""One calling convention for every experiment: ``fn(model, prompts, *, ...)`` or
``fn(model, clean, corrupt, *, ...)``, with the same option names throughout, and the old names
still working for one release with a warning that names the new one."""

from __future__ import annotations

import inspect

import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

import anylens as al
from anylens.sweep.experiments import EXPERIMENTS as SWEEP_EXPERIMENTS
from anylens.testing import tiny

#: Public names of ``anylens`` that are not experiments on prompts: the sweep runner, the two
#: that take an activation cache, what reads stored activations (classes and a loader), the
#: prompt pair class and result classes.
NOT_ON_PROMPTS = {
    "Pair",
    "run",
    "stack",
    "decompose_resid",
    "ActivationCache",
    "Activations",
    "ProbeResult",
    "CircuitResult",
    "load_activations",
    "component_graph",  # a model's graph, built from its roles
    "Hypothesis",  # what al.scrub tests
}
PUBLIC_EXPERIMENTS = sorted(name for name in al._LAZY if name not in NOT_ON_PROMPTS)
#: Names the convention replaced.
OLD_NAMES = {"prompt", "position", "targets", "metric_or_targets", "batch"}

POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD = inspect.Parameter.KEYWORD_ONLY


#: What an experiment is about, given by position: the prompts (or clean and corrupt), and for
#: steering the contrast sets or the vector. Everything else is an option, given by keyword.
INPUTS = {
    "steering_vector": ["model", "positive", "negative"],
    "steer": ["model", "prompts", "vector"],
    "steering_sweep": ["model", "prompts", "vector"],
    # a probe is about its labels, of prompts given with a model (prompts=) or of stored activations
    "probe": ["source", "labels"],
    # a circuit hypothesis, tested over a dataset of prompts
    "scrub": ["model", "hypothesis", "dataset"],
}
#: Options passed on to ``transformers``' generate (``do_sample``, ...), by keyword too.
VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("name", PUBLIC_EXPERIMENTS)
def test_every_experiment_takes_the_model_and_prompts_by_position_and_the_rest_by_keyword(name: str) -> None:
    parameters = list(inspect.signature(getattr(al, name)).parameters.values())
    default = ["model", "clean", "corrupt"] if parameters[1].name == "clean" else ["model", "prompts"]
    inputs = INPUTS.get(name, default)
    leading, rest = parameters[: len(inputs)], parameters[len(inputs) :]
    assert [p.name for p in leading] == inputs
    assert all(p.kind is POSITIONAL for p in leading)
    assert rest and all(p.kind in (KEYWORD, VAR_KEYWORD) for p in rest), [(p.name, p.kind) for p in rest]
    assert not OLD_NAMES & {p.name for p in parameters}


def test_the_sweep_runs_only_experiments_of_the_convention() -> None:
    for spec in SWEEP_EXPERIMENTS.values():
        assert spec.attribute in PUBLIC_EXPERIMENTS, spec.name
        takes_pairs = "clean" in inspect.signature(spec.function()).parameters
        assert takes_pairs == spec.needs_pairs, spec.name


@pytest.fixture(scope="module")
def model() -> al.AnyModel:
    return tiny("gpt2")


PROMPT = "The capital of France is"
CLEAN, CORRUPT = torch.tensor([[5, 17, 9, 23, 4]]), torch.tensor([[5, 17, 12, 23, 4]])  # token ids, one differs
LOGIT_DIFF = al.metrics.logit_diff(" Paris", " Rome")

#: (experiment, positional inputs, options under their old names, the same options under the new names)
OLD_CALLS = [
    ("logit_lens", (), dict(prompt=PROMPT, targets=[" Paris"]), dict(prompts=PROMPT, metric=[" Paris"])),
    (
        "direct_logit_attribution",
        (PROMPT,),
        dict(metric_or_targets=(" Paris", " Rome"), position=-2),
        dict(metric=(" Paris", " Rome"), positions=-2),
    ),
    ("attention_patterns", (), dict(prompt=PROMPT), dict(prompts=PROMPT)),
    ("head_scores", (), dict(seq_len=4, batch=2), dict(seq_len=4, n_sequences=2)),
]
#: (experiment, inputs, options given by position as before, the same options by keyword)
POSITIONAL_CALLS = [
    ("cache", (PROMPT,), (["resid_post"], [0]), dict(roles=["resid_post"], layers=[0])),
    ("logit_lens", (PROMPT,), ([" Paris"], 3), dict(metric=[" Paris"], k=3)),
    ("direct_logit_attribution", (PROMPT,), (" Paris", False), dict(metric=" Paris", per_head=False)),
    ("attention_patterns", (PROMPT,), ([1],), dict(layers=[1])),
    (
        "patch",
        (CLEAN, CORRUPT),
        ("resid_pre", ("layer",), LOGIT_DIFF),
        dict(role="resid_pre", over=("layer",), metric=LOGIT_DIFF),
    ),
    ("ablate", (PROMPT,), ("mlp_out", ("layer",)), dict(role="mlp_out", over=("layer",))),
    (
        "attribute",
        (CLEAN, CORRUPT),
        ("resid_pre", ("layer",), LOGIT_DIFF),
        dict(role="resid_pre", over=("layer",), metric=LOGIT_DIFF),
    ),
]


def frame_of(result) -> pd.DataFrame:
    return result.to_frame() if hasattr(result, "to_frame") else result["resid_post", 0]


def assert_same(old, new) -> None:
    if isinstance(new, pd.DataFrame):
        assert_frame_equal(old, new)
    else:
        assert (old == new).all()


@pytest.mark.parametrize(("name", "inputs", "old", "new"), OLD_CALLS, ids=[c[0] for c in OLD_CALLS])
def test_old_keyword_names_still_work_and_warn_naming_the_new_one(model, name, inputs, old, new) -> None:
    function = getattr(al, name)
    with pytest.warns(FutureWarning) as caught:
        before = function(model, *inputs, **old)
    messages = " ".join(str(w.message) for w in caught)
    for old_name, new_name in zip(old, new):
        if old_name != new_name:
            assert f"{old_name}=" in messages and f"{new_name}=" in messages
    assert_same(frame_of(before), frame_of(function(model, *inputs, **new)))
    with pytest.raises(al.OptionError, match="pass"):  # both names at once: refused, not guessed
        function(model, *inputs, **old, **{k: v for k, v in new.items() if k not in old})


@pytest.mark.parametrize(
    ("name", "inputs", "given", "by_keyword"), POSITIONAL_CALLS, ids=[c[0] for c in POSITIONAL_CALLS]
)
def test_options_given_by_position_still_work_and_warn(model, name, inputs, given, by_keyword) -> None:
    function = getattr(al, name)
    with pytest.warns(FutureWarning, match="by keyword: pass " + ", ".join(f"{k}=..." for k in by_keyword)):
        before = function(model, *inputs, *given)
    assert_same(frame_of(before), frame_of(function(model, *inputs, **by_keyword)))


def test_the_logit_lens_takes_the_words_of_a_metric_object_or_name(model) -> None:
    by_words = al.logit_lens(model, PROMPT, metric=[" Paris", " Rome"]).to_frame()
    assert_frame_equal(al.logit_lens(model, PROMPT, metric=LOGIT_DIFF).to_frame(), by_words)
    pair = {"clean": PROMPT, "answer": " Paris", "distractor": " Rome"}
    assert_frame_equal(al.logit_lens(model, pair, metric="logit_diff").to_frame(), by_words)
    only_answer = al.logit_lens(model, PROMPT, metric=al.metrics.prob(" Paris")).to_frame()
    assert_frame_equal(only_answer, al.logit_lens(model, PROMPT, metric=" Paris").to_frame())
    with pytest.raises(al.MetricError, match="has none"):
        al.logit_lens(model, PROMPT, metric="kl")


def test_a_sweep_takes_the_old_names_too_with_a_warning(tmp_path) -> None:
    options = dict(models=["tiny:gpt2"], prompts=[PROMPT], quiet=True)
    with pytest.warns(FutureWarning, match="'targets' is now 'metric'"):
        old = al.run("logit_lens", out=tmp_path / "old", targets=[" Paris"], **options)
    new = al.run("logit_lens", out=tmp_path / "new", metric=[" Paris"], **options)
    assert_frame_equal(old.frame, new.frame)
    assert set(old.frame["target"]) == {" Paris"}


def test_an_option_given_twice_or_too_many_positional_options_are_refused(model) -> None:
    with pytest.warns(FutureWarning), pytest.raises(al.OptionError, match="by position and by keyword"):
        al.attention_patterns(model, PROMPT, [0], layers=[1])
    with pytest.raises(al.OptionError, match="pass the options by keyword"):
        al.attention_patterns(model, PROMPT, [0], [1])
