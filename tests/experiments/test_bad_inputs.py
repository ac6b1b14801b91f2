"""The bad-input catalogue: every bad or edge input a user can give gets a typed anylens error
(which also subclasses the matching built-in) naming the input and saying what to do, or is
handled correctly. One parametrized test runs every case.

A case is ``Case(id, run, error, match)``: ``run()`` must raise ``error`` (an :class:`AnylensError`
subclass) whose message matches every regular expression in ``match``; or ``error=None`` and
``run()`` makes its own assertions about the correct handling.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import anylens as al
from anylens import cli
from anylens.sweep import SweepConfigError
from anylens.testing import tiny, tiny_model


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[], object]
    error: type[BaseException] | None
    match: tuple[str, ...] = ()


# -- loading, sources, adapters, roles -----------------------------------------------------------
@functools.cache
def _tiny(family: str) -> al.AnyModel:
    return tiny(family)


def _trace(family: str, body: Callable[[al.AnyModel], object], prompt: str = "The cat sat") -> Callable[[], None]:
    def run() -> None:
        model = _tiny(family)
        with model.trace(prompt):
            body(model)

    return run


def _read_layer(index: object) -> Callable[[al.AnyModel], object]:
    return lambda model: model.resid_post[index].save()


def _integer_layer_indices_read_the_same_layer() -> None:
    """ints, negative ints, numpy integers and 0-d integer tensors all name layer 1, checked
    against output_hidden_states (block 1's output is hidden_states[2] below the last layer)."""
    model = _tiny("gpt2")
    forms = [1, 1 - model.n_layers, np.int64(1), torch.tensor(1)]
    reads = []
    with model.trace("The cat sat"):
        for form in forms:
            reads.append(model.resid_post[form].save())
    ids = model.to_tokens("The cat sat")
    with torch.no_grad():
        expected = model.hf(**ids, output_hidden_states=True).hidden_states[2]
    for form, read in zip(forms, reads):
        torch.testing.assert_close(read, expected, rtol=0, atol=1e-6, msg=f"layer index {form!r}")


def _attribute_lookups_still_behave() -> None:
    model = _tiny("gpt2")
    assert issubclass(al.RoleNameError, AttributeError) and issubclass(al.RoleNameError, al.MissingRoleError)
    assert not hasattr(model, "resid_prex")
    assert getattr(model, "no_such_thing", 7) == 7
    assert copy.copy(model).adapter is model.adapter
    bare = al.AnyModel.__new__(al.AnyModel)  # as pickle and copy make it, before any state
    with pytest.raises(AttributeError) as raised:
        bare.adapter  # noqa: B018
    assert not isinstance(raised.value, al.AnylensError)


def _long_prompt(model: al.AnyModel) -> str:
    return "the cat " * (model.config.max_position_embeddings // 2 + 10)


def _token_count(model: al.AnyModel, prompt: str) -> int:
    return len(model.tokenizer(prompt)["input_ids"])


def _absolute_positions_refuse_a_long_prompt() -> None:
    model = _tiny("gpt2")
    prompt = _long_prompt(model)
    expected = rf"{_token_count(model, prompt)} tokens.* 128 positions"
    with pytest.raises(al.PromptError, match=expected), model.trace(prompt):
        model.logits.save()


def _rotary_positions_warn_on_a_long_prompt() -> None:
    model = _tiny("llama")
    prompt = _long_prompt(model)
    expected = rf"{_token_count(model, prompt)} tokens.* 128 positions"
    with pytest.warns(al.PositionLimitWarning, match=expected), model.trace(prompt):
        logits = model.logits.save()
    assert logits.shape[1] == _token_count(model, prompt)


def _write_meta_tensor(model: al.AnyModel) -> None:
    model.resid_post[0] = torch.zeros(1, 3, model.d_model, device="meta")
    model.logits.save()


def _bad_index_adapter() -> al.AnyModel:
    """A LLaMA adapter whose ``attn_out`` selects element 5 of the attention's 2-tuple output."""
    hf, tokenizer = tiny_model("llama")
    spec = al.registry().adapter("llama").to_dict()
    spec["name"] = "llama-bad-index"
    spec["roles"]["attn_out"] = "model.layers.{i}.self_attn.output.5"
    return al.wrap(hf, tokenizer, adapter=spec)


_BAD_INDEX = (r"'llama-bad-index'", r"'attn_out'", r"model\.layers\.\{i\}\.self_attn\.output\.5", r"2 elements")


def _first_trace_of_bad_index_adapter() -> None:
    model = _bad_index_adapter()
    with model.trace("The cat sat"):  # attn_out is not read: the first trace checks it anyway
        model.logits.save()


def _read_of_bad_index_adapter() -> None:
    model = _bad_index_adapter()
    with model.trace("The cat sat"):
        model.attn_out[1].save()


def _saved_tiny(directory: Path) -> Path:
    hf, tokenizer = tiny_model("gpt2")
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _load_cut_safetensors(keep: float) -> Callable[[], object]:
    def run() -> object:
        with tempfile.TemporaryDirectory() as tmp:
            directory = _saved_tiny(Path(tmp))
            _cut(directory / "model.safetensors", keep)
            return al.load(directory)

    return run


def _load_cut_gguf() -> None:
    """A real GGUF file (one LLaMA-named tensor) written with the gguf package, then cut."""
    gguf = pytest.importorskip("gguf")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _cut(path, 0.5)
        al.load(path)


def _intact_files_are_not_called_damaged() -> None:
    from anylens.loading.integrity import find_damage

    with tempfile.TemporaryDirectory() as tmp:
        directory = _saved_tiny(Path(tmp))
        assert find_damage(directory) is None
        assert al.load(directory).adapter.name == "gpt2"


def _bad_toml() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "broken_adapter.toml"
        path.write_text('[adapter]\nname = "mine"\narchitectures = ["X"\nlayers = "model.layers"\n')
        al.register_adapter(path)


class _HubLoader:
    """Stands in for from_pretrained: records calls, loads nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, location: str, **kwargs: object) -> None:
        self.calls.append((location, kwargs))
        raise RuntimeError("stop: the test loads nothing")


def _offline_load(source: str, *, offline: bool, cached: bool = False) -> Callable[[], None]:
    """``al.load(source)`` with the hub unreachable (``HF_HUB_OFFLINE``, or a failed connection
    check) and an empty Hugging Face cache (or one holding ``source``'s config)."""

    def run() -> None:
        import huggingface_hub.constants

        from anylens.loading import hub
        from anylens.loading import loader as loading

        loader = _HubLoader()
        with tempfile.TemporaryDirectory() as cache, pytest.MonkeyPatch.context() as patch:
            patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
            patch.setattr(loading, "_from_pretrained", loader)
            patch.delenv("TRANSFORMERS_OFFLINE", raising=False)
            if offline:
                patch.setenv("HF_HUB_OFFLINE", "1")
                patch.setattr(hub, "hub_reachable", lambda: pytest.fail("offline: no connection check"))
            else:
                patch.delenv("HF_HUB_OFFLINE", raising=False)
                patch.setattr(hub, "hub_reachable", lambda: False)
            if cached:
                snapshot = Path(cache) / f"models--{source.replace('/', '--')}" / "snapshots" / "abc123"
                snapshot.mkdir(parents=True)
                (snapshot / "config.json").write_text("{}")
                (snapshot.parent.parent / "refs").mkdir()
                (snapshot.parent.parent / "refs" / "main").write_text("abc123")
                with pytest.raises(RuntimeError, match="stop"):
                    al.load(source)
                assert loader.calls and loader.calls[0][1].get("local_files_only") is True
                return
            try:
                al.load(source)
            finally:
                assert loader.calls == [], "the hub loader was called"

    return run


def _near_miss(source: str) -> Callable[[], None]:
    def run() -> None:
        from anylens.loading import hub
        from anylens.loading import loader as loading

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hub, "hub_reachable", lambda: pytest.fail("a near miss must not reach the hub"))
            patch.setattr(loading, "_from_pretrained", lambda *a, **k: pytest.fail("a near miss must not load"))
            al.load(source)

    return run


def _sources_parse_as_meant() -> None:
    from anylens.loading.locate import parse_source

    kinds = {
        "gpt2": "hub",
        "HuggingFaceTB/SmolLM2-135M": "hub",
        "zoo:llama": "zoo",
        "tiny:mamba": "tiny",
        "smollm2-135m": "named",
        str(Path(al.__file__).parent / "zoo" / "models" / "gpt2"): "directory",
    }
    for text, kind in kinds.items():
        assert parse_source(text).kind == kind, text


def _command_line_and_sweeps_parse_sources_the_same_way() -> None:
    from anylens import cli
    from anylens.sweep.runner import load_source

    with pytest.raises(cli.UsageError, match="SourcePathError: model path './models/mine' does not exist"):
        cli.load_model("./models/mine")
    with pytest.raises(Exception, match="SourcePathError: model path './models/mine' does not exist"):
        load_source("./models/mine")


LOADING_AND_ROLES: list[Case] = [
    *[
        Case(
            f"layer-index-{type(index).__name__}",
            _trace("gpt2", _read_layer(index)),
            al.LayerIndexTypeError,
            ("must be an integer", re.escape(repr(index)), r"resid_post\[3\]"),
        )
        for index in (1.7, "1", True, torch.tensor(1.0))
    ],
    Case("layer-index-integer-forms", _integer_layer_indices_read_the_same_layer, None),
    *[
        Case(
            f"missing-path-{path}",
            functools.partial(al.load, path),
            al.SourcePathError,
            (re.escape(path), "does not exist"),
        )
        for path in ("./models/mine", "/tmp/nope/model", "~/anylens-no-such-dir/x", "models/")
    ],
    Case("sources-parse-as-meant", _sources_parse_as_meant, None),
    Case("cli-and-sweeps-share-the-parser", _command_line_and_sweeps_parse_sources_the_same_way, None),
    Case(
        "damaged-safetensors-header",
        _load_cut_safetensors(0.0005),
        al.DamagedFileError,
        (r"model\.safetensors", "damaged", "truncated download", "again"),
    ),
    Case(
        "damaged-safetensors-data",
        _load_cut_safetensors(0.5),
        al.DamagedFileError,
        (r"model\.safetensors", "damaged", r"tensors need \d+ bytes but the file has \d+", "again"),
    ),
    Case("damaged-gguf", _load_cut_gguf, al.DamagedFileError, (r"model\.gguf", "damaged", "again")),
    Case("intact-files-load", _intact_files_are_not_called_damaged, None),
    Case(
        "unknown-dtype",
        functools.partial(al.load, "tiny:gpt2", dtype="float17"),
        al.DtypeError,
        ("'float17'", "float32", "bfloat16", "float16"),
    ),
    Case(
        "role-typo",
        _trace("gpt2", lambda model: model.resid_prex),
        al.RoleNameError,
        ("'resid_prex'", "did you mean 'resid_pre'", "resid_post, attn_out"),
    ),
    Case("attribute-lookups-still-behave", _attribute_lookups_still_behave, None),
    Case("empty-prompt", _trace("gpt2", lambda model: model.logits.save(), prompt=""), al.PromptError, ("no tokens",)),
    Case(
        "empty-prompt-in-a-batch",
        lambda: _tiny("gpt2").to_tokens(["The cat", ""]),
        al.PromptError,
        ("prompt '' has no tokens",),
    ),
    Case("long-prompt-absolute-positions", _absolute_positions_refuse_a_long_prompt, None),
    Case("long-prompt-rotary-positions", _rotary_positions_warn_on_a_long_prompt, None),
    Case(
        "meta-tensor-write",
        _trace("gpt2", _write_meta_tensor),
        al.RoleWriteError,
        ("meta device", "no data", "real tensor"),
    ),
    Case("output-index-out-of-range-first-trace", _first_trace_of_bad_index_adapter, al.ModulePathError, _BAD_INDEX),
    Case("output-index-out-of-range-read", _read_of_bad_index_adapter, al.ModulePathError, _BAD_INDEX),
    Case("adapter-toml-syntax", _bad_toml, al.AdapterSpecError, ("broken_adapter.toml", "line 4", "fix the syntax")),
    Case(
        "hub-id-offline",
        _offline_load("gpt2", offline=True),
        al.ModelSourceError,
        ("'gpt2'", "not available locally", "HF_HUB_OFFLINE", "zoo:gpt2", "smollm2-135m", "tiny:llama"),
    ),
    Case(
        "hub-id-unreachable",
        _offline_load("gpt2", offline=False),
        al.ModelSourceError,
        ("'gpt2'", "not available locally", "cannot be reached", "zoo:llama"),
    ),
    Case("hub-id-cached-loads-offline", _offline_load("gpt2", offline=True, cached=True), None),
    Case("near-miss-named", _near_miss("smollm2"), al.ModelSourceError, ("did you mean 'smollm2-135m'",)),
    Case("near-miss-case", _near_miss("SmolLM2-135M"), al.ModelSourceError, ("did you mean 'smollm2-135m'",)),
    Case("near-miss-zoo", _near_miss("zoo:lama"), al.ModelSourceError, ("did you mean 'zoo:llama'", "gpt2, llama")),
    Case("near-miss-tiny", _near_miss("tiny:lama"), al.ModelSourceError, ("did you mean 'tiny:llama'",)),
]


# -- experiments, metrics, results, command line ---------------------------------------------------
CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"


@functools.cache
def zoo_gpt2() -> al.AnyModel:
    """The shipped GPT-2 zoo model: a word-level vocabulary of whole words, with an unknown token."""
    return al.load("zoo:gpt2")


def ioi(n: int = 3) -> list:
    from anylens.datasets import IOI_TEMPLATES, ioi_pairs

    return ioi_pairs(zoo_gpt2().tokenizer, n, templates=IOI_TEMPLATES[:1])  # one template: one token length


def score(metric: al.metrics.Metric) -> object:
    """Evaluate a metric on made-up logits: enough to bind its targets to the tokenizer."""
    model = zoo_gpt2()
    return metric(torch.zeros(1, model.config.vocab_size), model)


def empty_prompt_list(experiment: str) -> Callable[[], object]:
    calls = {
        "cache": lambda model: al.cache(model, []),
        "logit_lens": lambda model: al.logit_lens(model, []),
        "attention_patterns": lambda model: al.attention_patterns(model, []),
        "direct_logit_attribution": lambda model: al.direct_logit_attribution(model, [], metric=" Paris"),
        "patch": lambda model: al.patch(model, [], [], role="resid_pre", over=("layer",)),
        "attribute": lambda model: al.attribute(model, [], [], role="resid_pre", over=("layer",)),
        "ablate": lambda model: al.ablate(model, [], role="resid_pre", over=("layer",)),
    }
    return lambda: calls[experiment](zoo_gpt2())


def named_metric_equals_its_object(name: str, build: Callable[[list], object]) -> Callable[[], None]:
    """A metric given by name scores exactly as the metric object built by hand from the same words."""

    def run() -> None:
        model, pairs = zoo_gpt2(), ioi()
        by_name = al.patch(model, pairs, pairs, role="resid_pre", over=("layer",), metric=name)
        clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
        by_hand = al.patch(model, clean, corrupt, role="resid_pre", over=("layer",), metric=build(pairs))
        assert by_name.meta["metric"] == name
        np.testing.assert_array_equal(by_name.frame["metric"].to_numpy(), by_hand.frame["metric"].to_numpy())

    return run


def dla_logit_diff_by_name() -> None:
    model, pairs = zoo_gpt2(), ioi()
    by_name = al.direct_logit_attribution(model, pairs, metric="logit_diff")
    answers, distractors = [p.answer for p in pairs], [p.distractor for p in pairs]
    by_hand = al.direct_logit_attribution(model, [p.clean for p in pairs], metric=(answers, distractors))
    np.testing.assert_array_equal(by_name.frame["value"].to_numpy(), by_hand.frame["value"].to_numpy())


def damaged_result(damage: str) -> Callable[[], object]:
    def run() -> object:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "result.json"
            al.Result("patch", pd.DataFrame({"layer": [0, 1], "value": [0.5, 1.5]})).save(path)
            text = path.read_text()
            damaged = {
                "truncated": text[: len(text) // 2],
                "not JSON": "layer,value\n0,0.5\n",
                "another JSON file": json.dumps({"experiment": "patch"}),
                "a JSON list": json.dumps([1, 2]),
            }[damage]
            path.write_text(damaged)
            return al.Result.load(path)

    return run


def refused_by_the_command_line(*argv: str, prompts: str = f"{CLEAN}\n{CORRUPT}\n", names: str = "") -> Callable:
    """``anylens run`` refuses: exit status 2, one line on stderr naming ``names``, no traceback,
    nothing written. ``{dir}`` in ``argv`` is a fresh directory holding ``prompts.txt`` and a file ``afile``."""

    def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "prompts.txt").write_text(prompts)
            (Path(folder) / "afile").write_text("not a directory")
            before = sorted(Path(folder).rglob("*"))
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                status = cli.main([a.format(dir=folder) for a in argv])
            message = stderr.getvalue()
            assert status == 2, (status, message)
            assert len(message.strip().splitlines()) == 1 and "Traceback" not in message, message
            assert re.search(names.format(dir=re.escape(folder)), message), message
            assert sorted(Path(folder).rglob("*")) == before, "a refused sweep wrote files"

    return run


def sweep_into(out: Callable[[Path], Path], **options: object) -> Callable[[], object]:
    def run() -> object:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "afile").write_text("not a directory")
            return al.run(
                "logit_lens", models=["tiny:gpt2"], prompts=[CLEAN, CORRUPT], out=out(Path(folder)), **options
            )

    return run


def unwritable(folder: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into a directory of mode 0o500 anyway; the under-a-file case covers root")
    locked = folder / "locked"
    locked.mkdir(mode=0o500)
    return locked / "sweep"


RUN = ("run", "logit_lens", "--models", "tiny:gpt2", "--quiet")
EXPERIMENTS_AND_CLI: list[Case] = [
    # A word the vocabulary lacks is the unknown token: scoring it would score <unk> instead.
    Case(
        "metric-word-not-in-vocabulary",
        lambda: score(al.metrics.logit_diff(" Xylophonequux", " Nina")),
        al.TokenizationError,
        (r"' Xylophonequux'", r"not in this tokenizer's vocabulary", r"unknown token '<unk>'"),
    ),
    Case(
        "metric-word-not-in-vocabulary-suggests-close-words",
        lambda: score(al.metrics.prob(" Ninna")),
        al.TokenizationError,
        (r"' Ninna'", r"close vocabulary words: .*'Nina'"),
    ),
    Case(
        "metric-token-id-past-the-vocabulary",
        lambda: score(al.metrics.prob(10**6)),
        al.TokenizationError,
        (r"token id 1000000", r"vocabulary of \d+ tokens"),
    ),
    Case(
        "metric-negative-token-id",
        lambda: score(al.metrics.rank(-1)),
        al.TokenizationError,
        (r"token id -1", r"vocabulary of \d+ tokens"),
    ),
    # An empty answer has no tokens: refused when the metric is built, naming the metric and the field.
    Case(
        "metric-empty-answer",
        lambda: al.metrics.logit_diff("", " Rome"),
        al.EmptyAnswerError,
        (r"the answer of al\.metrics\.logit_diff is an empty string", r"no tokens to score", r"' Paris'"),
    ),
    Case(
        "logit-lens-empty-target-word",
        lambda: al.logit_lens(zoo_gpt2(), CLEAN, metric=[""]),
        al.EmptyAnswerError,
        (r"target '' is an empty string", r"no tokens to score"),
    ),
    Case(
        "metric-empty-answer-of-one-prompt",
        lambda: al.metrics.log_prob([" Paris", ""]),
        al.EmptyAnswerError,
        (r"the target of prompt 1 of al\.metrics\.log_prob is an empty string",),
    ),
    Case(
        "metric-by-name-with-an-empty-answer-in-a-pair",
        lambda: al.patch(
            zoo_gpt2(),
            [{"clean": CLEAN, "corrupt": CORRUPT, "answer": "", "distractor": " Rome"}],
            [CORRUPT],
            role="resid_pre",
            over=("layer",),
            metric="logit_diff",
        ),
        al.EmptyAnswerError,
        (r"the answer of al\.metrics\.logit_diff is an empty string",),
    ),
    # Statistics over prompts need a row per prompt, and significance marks need a summary.
    Case(
        "summary-of-a-result-averaged-over-prompts",
        lambda: al.patch(zoo_gpt2(), CLEAN, CORRUPT, role="resid_pre", over=("layer",)).summary(),
        al.StatisticsError,
        (r"already averaged over prompts", r"per_prompt=True"),
    ),
    Case(
        "plot-significant-without-a-significant-column",
        lambda: al.patch(zoo_gpt2(), CLEAN, CORRUPT, role="resid_pre", over=("layer",)).plot(significant=True),
        al.StatisticsError,
        (r"no 'significant' column", r"result\.summary\(\)"),
    ),
    Case(
        "aggregate-with-alpha-outside-0-1",
        lambda: al.sweep.aggregate(pd.DataFrame({"layer": [0, 0], "value": [1.0, 2.0]}), alpha=5),
        al.StatisticsError,
        (r"alpha=5", r"between 0 and 1"),
    ),
    # verify=k correlates k components: fewer than three, a bool or a fraction is refused.
    *[
        Case(
            f"attribute-verify-{label}",
            lambda k=k: al.attribute(zoo_gpt2(), CLEAN, CORRUPT, role="resid_pre", over=("layer",), verify=k),
            al.StatisticsError,
            (rf"verify={re.escape(repr(k))}", r"at least 3", r"verify=20"),
        )
        for label, k in (("two", 2), ("true", True), ("fraction", 0.5))
    ],
    # A multi-token answer is scored by teacher forcing in patch and attribute; a metric read on
    # final-position logits alone says so.
    Case(
        "metric-multi-token-answer-on-final-logits",
        lambda: score(al.metrics.log_prob(" Mary John")),
        al.TokenizationError,
        (
            r"' Mary John' is 2 tokens",
            r"al\.patch, al\.attribute and al\.ablate score a multi-token answer by teacher forcing",
        ),
    ),
    Case(
        "metric-multi-token-answer-with-the-unknown-token",
        lambda: al.patch(
            zoo_gpt2(), CLEAN, CORRUPT, role="resid_pre", over=("layer",), metric=al.metrics.log_prob(" Buenos Aires")
        ),
        al.TokenizationError,
        (r"' Buenos Aires' tokenizes to", r"unknown token '<unk>'"),
    ),
    # The per-position mean over one prompt is that prompt: the ablation would change nothing.
    Case(
        "mean-ablation-of-one-prompt-without-reference",
        lambda: al.ablate(zoo_gpt2(), [CLEAN], role="resid_pre", over=("layer",), method="mean"),
        al.PromptError,
        (r"mean ablation needs at least two different prompts", r"more prompts, reference=\[\.\.\.\]"),
    ),
    Case(
        "mean-ablation-of-copies-of-one-prompt",
        lambda: al.ablate(zoo_gpt2(), [CLEAN, CLEAN], role="resid_pre", over=("layer",), method="mean"),
        al.PromptError,
        (r"2 copies of one prompt",),
    ),
    *[
        Case(f"empty-prompt-list-{name}", empty_prompt_list(name), al.PromptError, (r"prompt list is empty",))
        for name in (
            "cache",
            "logit_lens",
            "attention_patterns",
            "direct_logit_attribution",
            "patch",
            "attribute",
            "ablate",
        )
    ],
    # Metrics by name, outside a sweep: words from prompt pairs, or a clear refusal.
    Case(
        "metric-name-without-answers",
        lambda: al.patch(zoo_gpt2(), CLEAN, CORRUPT, role="resid_pre", over=("layer",), metric="logit_diff"),
        al.MetricError,
        (
            r"'logit_diff'",
            r"answer and distractor",
            re.escape(CLEAN),
            re.escape("al.metrics.logit_diff(' Paris', ' Rome')"),
        ),
    ),
    Case(
        "metric-name-unknown",
        lambda: al.ablate(zoo_gpt2(), [CLEAN, CORRUPT], role="resid_pre", over=("layer",), metric="kl_div"),
        al.MetricError,
        (
            r"unknown metric 'kl_div'",
            r"did you mean 'kl'\?",
            r"metrics by name: logit_diff, prob, log_prob, rank, .*kl",
        ),
    ),
    Case(
        "metric-name-needing-no-answers",
        named_metric_equals_its_object("kl", lambda pairs: al.metrics.kl()),
        None,
    ),
    Case(
        "metric-name-from-dataset-pairs",
        named_metric_equals_its_object(
            "logit_diff",
            lambda pairs: al.metrics.logit_diff([p.answer for p in pairs], [p.distractor for p in pairs]),
        ),
        None,
    ),
    Case("metric-name-in-dla", dla_logit_diff_by_name, None),
    *[
        Case(
            f"result-load-{damage.replace(' ', '-')}",
            damaged_result(damage),
            al.ResultFileError,
            (r"result\.json is damaged",),
        )
        for damage in ("truncated", "not JSON", "another JSON file", "a JSON list")
    ],
    # The command line: a refused sweep is one line on stderr and exit status 2.
    Case(
        "cli-run-n-zero",
        refused_by_the_command_line(
            *RUN, "--prompts", "{dir}/prompts.txt", "--n", "0", "--out", "{dir}/out", names="--n 0"
        ),
        None,
    ),
    Case(
        "cli-run-empty-prompts-file",
        refused_by_the_command_line(
            *RUN,
            "--prompts",
            "{dir}/prompts.txt",
            "--out",
            "{dir}/out",
            prompts="\n",
            names="prompts.txt holds no prompts",
        ),
        None,
    ),
    Case(
        "cli-run-out-under-a-file",
        refused_by_the_command_line(
            *RUN,
            "--prompts",
            "{dir}/prompts.txt",
            "--out",
            "{dir}/afile/sweep",
            names="{dir}/afile/sweep.*lies under .*afile, which is a file",
        ),
        None,
    ),
    Case(
        "run-n-zero",
        sweep_into(lambda folder: folder / "out", n=0),
        SweepConfigError,
        (r"n must be a positive number of prompts, not 0",),
    ),
    Case(
        "run-out-under-a-file",
        sweep_into(lambda folder: folder / "afile" / "sweep"),
        al.OutputPathError,
        (r"afile/sweep", r"lies under .*afile, which is a file"),
    ),
    Case(
        "run-out-unwritable", sweep_into(unwritable), al.OutputPathError, (r"locked/sweep", r"locked is not writable")
    ),
]


# -- generation and steering --------------------------------------------------------------------
def unmasked_mamba() -> al.AnyModel:
    """A tiny Mamba whose mixers ignore the attention mask (reading padding into their state)."""
    from anylens.testing import tiny_model

    hf, tokenizer = tiny_model("mamba")
    for block in hf.backbone.layers:
        forward = block.mixer.forward
        block.mixer.forward = lambda hidden, *args, forward=forward, attention_mask=None, **kwargs: forward(
            hidden, *args, **kwargs
        )
    return al.wrap(hf, tokenizer)


GENERATION_AND_STEERING: list[Case] = [
    Case(
        "steering-vector-wrong-width",
        lambda: al.steer(zoo_gpt2(), CORRUPT, torch.zeros(7), layer=1, max_new_tokens=1),
        al.SteeringVectorError,
        (r"shape \(7,\)", r"role 'resid_post'", r"shape \(128,\)"),
    ),
    Case(
        "steer-layer-out-of-range",
        lambda: al.steer(zoo_gpt2(), CORRUPT, torch.zeros(128), layer=9, max_new_tokens=1),
        al.LayerIndexError,
        (r"layer 9 is out of range", r"0\.\.3"),
    ),
    Case(
        "steering-vector-layer-out-of-range",
        lambda: al.steering_vector(zoo_gpt2(), CLEAN, CORRUPT, layer=-5),
        al.LayerIndexError,
        (r"layer -5 is out of range",),
    ),
    Case(
        "steer-per-layer-role-without-layer",
        lambda: al.steer(zoo_gpt2(), CORRUPT, torch.zeros(128), max_new_tokens=1),
        al.InterventionError,
        (r"role 'resid_post' is per layer", r"layer= \(0\.\.3\)"),
    ),
    Case(
        "steer-unknown-positions",
        lambda: al.steer(zoo_gpt2(), CORRUPT, torch.zeros(128), layer=1, positions="last", max_new_tokens=1),
        al.InterventionError,
        (r"positions='last'", r"'prompt'"),
    ),
    Case(
        "generate-beyond-learned-positions",
        lambda: al.generate(zoo_gpt2(), CORRUPT, max_new_tokens=64),
        al.GenerationLengthError,
        (r"6 tokens plus max_new_tokens=64", r"positions for 64 only", r"at most 59 new tokens"),
    ),
    Case(
        "generate-zero-new-tokens",
        lambda: al.generate(zoo_gpt2(), CORRUPT, max_new_tokens=0),
        al.GenerationLengthError,
        (r"max_new_tokens=0", r"at least 1"),
    ),
    Case(
        "generate-malformed-role-edit",
        lambda: al.generate(zoo_gpt2(), CORRUPT, max_new_tokens=1, interventions={"role": "resid_post", "layer": 1}),
        al.InterventionError,
        (r"exactly one of 'add' or 'set'",),
    ),
    Case(
        "generate-unpadded-model-different-lengths",
        lambda: al.generate(unmasked_mamba(), ["a b", "a b c d e"], max_new_tokens=1),
        al.PromptError,
        (r"different token lengths", r"does not mask", r"one length together"),
    ),
]


# -- a model of one's own (docs/adapters.md, "Bring your own model") -----------------------------
class _Own(torch.nn.Module):
    """A plain torch model: embedding, one residual block, readout; ``output`` says what its
    forward returns (the logits, or a dict without them)."""

    def __init__(self, output: str = "logits") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.output = output
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    def forward(self, input_ids: torch.Tensor) -> object:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x)
        return {"scores": logits} if self.output == "dict" else logits


class _TwoInputs(_Own):
    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(embeddings + positions)


class _KeywordsOnly(_Own):
    def forward(self, *, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.embed(input_ids))


_OWN_ADAPTER = {
    "name": "own",
    "architectures": ["_Own"],
    "layers": "blocks",
    "unembed": "head",
    "roles": {"embed": "embed.output", "z": "blocks.{i}.input|heads", "logits": "output"},
}
_IDS = torch.tensor([[1, 2, 3, 4]])


def _own(output: str = "logits", **facts: object) -> al.AnyModel:
    return al.wrap(_Own(output), adapter={**_OWN_ADAPTER, **facts})


def _read_logits(model: al.AnyModel, inputs: object = _IDS) -> None:
    with torch.no_grad(), model.trace(inputs):
        model.logits.save()


def _read_z(model: al.AnyModel) -> None:
    with torch.no_grad(), model.trace(_IDS):
        model.z[0].save()


def _own_reads_equal_plain_hooks() -> None:
    """The contract's happy path: token ids in, a bare logits tensor out, heads from numeric facts."""
    model = _own(n_heads=2, d_head=4)
    with torch.no_grad(), model.trace(_IDS):
        z = model.z[0].save()
        logits = model.logits.save()
    seen = []
    handle = model.hf.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            expected = model.hf(_IDS)
    finally:
        handle.remove()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(z, seen[0].unflatten(-1, (2, 4)), rtol=0, atol=1e-6)


def _register_with_fact(**facts: object) -> Callable[[], object]:
    return lambda: al.register_adapter({**_OWN_ADAPTER, "name": "own-facts", "architectures": ["OwnFacts"], **facts})


def _unmasked_plain_with_tokenizer() -> al.AnyModel:
    from anylens.testing import tiny_tokenizer

    return al.wrap(_Own(), tiny_tokenizer(), adapter=_OWN_ADAPTER)


CUSTOM_MODELS: list[Case] = [
    Case("own-model-reads-equal-hooks", _own_reads_equal_plain_hooks, None),
    Case(
        "own-forward-needs-two-inputs",
        lambda: al.wrap(_TwoInputs(), adapter=_OWN_ADAPTER),
        al.ForwardContractError,
        (r"_TwoInputs\.forward requires 2 arguments", r"token ids", r"Bring your own model"),
    ),
    Case(
        "own-forward-takes-no-positional-ids",
        lambda: al.wrap(_KeywordsOnly(), adapter=_OWN_ADAPTER),
        al.ForwardContractError,
        (r"no positional argument", r"\[batch, pos\] LongTensor"),
    ),
    Case(
        "own-output-without-logits",
        lambda: _read_logits(_own("dict")),
        al.ForwardContractError,
        (r"returned a dict, which holds no logits", r"a tuple whose first element is the logits", r"\.logits"),
    ),
    *[
        Case(
            f"own-fact-{name}-{value!r}",
            _register_with_fact(**{name: value}),
            al.AdapterSpecError,
            (rf"fact {name}={re.escape(repr(value))}", r"neither a positive integer nor a config attribute name"),
        )
        for name, value in (("n_heads", "four heads"), ("d_head", 4.5), ("n_kv_heads", True), ("max_positions", -3))
    ],
    Case(
        "own-heads-without-fact-or-config",
        lambda: _read_z(_own()),
        al.MissingFactError,
        (r"needs n_heads", r"this model has no config", r"declare it in the adapter as a number"),
    ),
    Case(
        "own-model-without-tokenizer-given-text",
        lambda: al.logit_lens(_own(), "The cat sat"),
        al.TokenizationError,
        (r"has no tokenizer", r"'The cat sat'", r"pass token ids", r"al\.wrap\(model, tokenizer"),
    ),
    Case(
        "own-model-without-tokenizer-given-text-pairs",
        lambda: al.patch(_own(n_heads=2, d_head=4), "The cat sat", "The dog sat", role="z", over=("layer",)),
        al.TokenizationError,
        (r"has no tokenizer", r"pass token ids"),
    ),
    Case(
        "own-model-without-tokenizer-given-metric-words",
        lambda: al.metrics.logit_diff(" Paris", " Rome")(torch.zeros(1, 50), _own()),
        al.TokenizationError,
        (r"no tokenizer to find the token ' Paris'", r"pass its token id"),
    ),
    Case(
        "own-forward-without-mask-given-padded-text",
        lambda: _read_logits(_unmasked_plain_with_tokenizer(), ["The cat sat on the mat", "Paris"]),
        al.PromptError,
        (r"different token lengths", r"takes no attention_mask", r"one token length"),
    ),
    Case(
        "own-model-generates",
        lambda: al.generate(_own(), _IDS, max_new_tokens=1),
        al.ForwardContractError,
        (r"generation runs transformers' generate", r"model\.trace\(token_ids\)"),
    ),
    Case(
        "role-list-none-present",
        lambda: al.ablate(_tiny("mamba"), "The cat sat", role=["z", "attn_out"], over=("layer",)),
        al.MissingRoleError,
        (r"has none of the roles \['z', 'attn_out'\]", r"it provides: .*mixer_out"),
    ),
    Case(
        "sweep-role-missing-on-some-models",
        lambda: al.run(
            "ablate", ["tiny:gpt2", "tiny:mamba", "tiny:mamba2"], ["The cat sat"], role="z", out=tempfile.mkdtemp()
        ),
        SweepConfigError,
        (
            r"tiny:mamba \(adapter 'mamba' has none of \['z'\]",
            r"tiny:mamba2 \(adapter 'mamba2'",
            r"\['z', 'mixer_out'\]",
        ),
    ),
]


# -- activations on disk, probes ------------------------------------------------------------------
PROBE_PROMPTS = [CLEAN, CORRUPT, "The capital of Spain is", "The capital of Japan is"]


def extracted(folder: Path, **options: object) -> Path:
    """``folder/acts``: the zoo GPT-2's last-token resid_post of PROBE_PROMPTS at layer 0, on disk."""
    out = folder / "acts"
    options = {"roles": "resid_post", "layers": [0], "positions": "last", "quiet": True, **options}
    al.extract(zoo_gpt2(), PROBE_PROMPTS, out=out, **options)
    return out


def in_a_folder(run: Callable[[Path], object]) -> Callable[[], object]:
    def call() -> object:
        with tempfile.TemporaryDirectory() as folder:
            return run(Path(folder))

    return call


def damaged_shard(folder: Path) -> object:
    out = extracted(folder)
    shard = out / "shards" / "00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    return al.load_activations(out)


def files_kept_after(run: Callable[[Path], object]) -> Callable[[Path], object]:
    """Run ``run`` on a folder holding an extraction; whatever it raises, the files stay as they were."""

    def call(folder: Path) -> object:
        out = extracted(folder)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        try:
            return run(folder)
        finally:
            assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "extraction work was lost"

    return call


ACTIVATIONS_AND_PROBES: list[Case] = [
    Case(
        "probe-label-count-differs-from-prompts",
        lambda: al.probe(zoo_gpt2(), ["Paris", "Rome", "Madrid"], prompts=PROBE_PROMPTS),
        al.LabelError,
        (r"3 labels for 4 prompts", r"one label per prompt"),
    ),
    Case(
        "probe-label-count-differs-from-stored-prompts",
        in_a_folder(lambda folder: al.probe(al.load_activations(extracted(folder)), ["Paris"] * 5)),
        al.LabelError,
        (r"5 labels for 4 prompts",),
    ),
    Case(
        "extract-label-count-differs-from-prompts",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, labels=[0, 1], quiet=True),
        al.LabelError,
        (r"2 labels for 4 prompts",),
    ),
    Case(
        "probe-one-class-only",
        lambda: al.probe(zoo_gpt2(), ["Paris"] * 4, prompts=PROBE_PROMPTS),
        al.LabelError,
        (r"every label is 'Paris'", r"at least two classes"),
    ),
    Case(
        "probe-no-class-with-two-prompts",
        lambda: al.probe(zoo_gpt2(), ["Paris", "Rome", "Madrid", "Tokyo"], prompts=PROBE_PROMPTS),
        al.LabelError,
        (r"no class has two prompts", r"several prompts per label"),
    ),
    Case(
        "probe-test-fraction-outside-0-1",
        lambda: al.probe(zoo_gpt2(), ["a", "a", "b", "b"], prompts=PROBE_PROMPTS, test_fraction=1.5),
        al.ProbeOptionError,
        (r"test_fraction=1.5",),
    ),
    Case(
        "probe-model-without-prompts",
        lambda: al.probe(zoo_gpt2(), ["a", "b"]),
        al.ProbeOptionError,
        (r"needs prompts=",),
    ),
    Case(
        "extract-into-a-directory-with-another-configuration",
        in_a_folder(files_kept_after(lambda folder: extracted(folder, layers=[1]))),
        al.ActivationsConfigError,
        (r"another configuration", r"layers: \[0\] on disk, \[1\] now", r"new out", r"fresh=True", r"kept"),
    ),
    Case(
        "extract-with-another-model-into-a-directory",
        in_a_folder(
            files_kept_after(
                lambda folder: al.extract(
                    al.load("zoo:llama"),
                    PROBE_PROMPTS,
                    roles="resid_post",
                    layers=[0],
                    positions="last",
                    out=folder / "acts",
                    quiet=True,
                )
            )
        ),
        al.ActivationsConfigError,
        (r"weights.sha256: '[0-9a-f]+\.\.\. on disk", r"adapter: 'gpt2' on disk, 'llama' now"),
    ),
    Case(
        "extract-into-a-directory-of-other-files",
        in_a_folder(
            lambda folder: (
                (folder / "notes.txt").write_text("mine")
                and al.extract(zoo_gpt2(), PROBE_PROMPTS, out=folder, quiet=True)
            )
        ),
        al.ActivationsConfigError,
        (r"holds files that are not an extraction \(notes.txt\)", r"new out"),
    ),
    Case(
        "extract-out-under-a-file",
        in_a_folder(
            lambda folder: (
                (folder / "afile").write_text("x")
                and al.extract(
                    zoo_gpt2(), PROBE_PROMPTS, roles=["resid_post"], out=folder / "afile" / "acts", quiet=True
                )
            )
        ),
        al.OutputPathError,
        (r"cannot write the activations to .*afile/acts", r"lies under .*afile, which is a file"),
    ),
    Case(
        "extract-unknown-role",
        lambda: al.extract(al.load("zoo:mamba"), PROBE_PROMPTS, roles=["z"], quiet=True),
        al.MissingRoleError,
        (r"'z'", r"mamba"),
    ),
    Case(
        "extract-layer-out-of-range",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, layers=[7], quiet=True),
        al.LayerIndexError,
        (r"layer 7", r"4 layers"),
    ),
    Case(
        "probe-layer-not-extracted",
        in_a_folder(lambda folder: al.probe(al.load_activations(extracted(folder)), ["a", "a", "b", "b"], layers=[2])),
        al.LayerIndexError,
        (r"layer 2 was not extracted \(layers \[0\]\)",),
    ),
    Case(
        "probe-role-not-extracted",
        in_a_folder(
            lambda folder: al.probe(al.load_activations(extracted(folder)), ["a", "a", "b", "b"], roles="mlp_out")
        ),
        al.MissingRoleError,
        (r"'mlp_out' is not in these activations", r"roles \['resid_post'\]"),
    ),
    Case(
        "extract-position-outside-a-prompt",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, positions=[9], quiet=True),
        al.PositionError,
        (r"position 9 is outside prompt 0, which has 6 tokens", r"'last'"),
    ),
    Case(
        "extract-one-position-list-per-prompt-of-another-count",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, positions=[[0], [1]], quiet=True),
        al.ExtractionOptionError,
        (r"2 lists for 4 prompts",),
    ),
    Case(
        "extract-unknown-position-word",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, positions="first", quiet=True),
        al.ExtractionOptionError,
        (r"positions='first'", r"'last', 'all'"),
    ),
    Case(
        "extract-pattern-role",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, roles=["pattern"], quiet=True),
        al.ExtractionOptionError,
        (r"'pattern'", r"al.cache"),
    ),
    Case(
        "extract-memory-budget-not-a-size",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, memory_budget="lots", quiet=True),
        al.ExtractionOptionError,
        (r"memory_budget='lots'", r"'512MiB'"),
    ),
    Case(
        "extract-integer-dtype",
        lambda: al.extract(zoo_gpt2(), PROBE_PROMPTS, dtype="int8", quiet=True),
        al.DtypeError,
        (r"dtype='int8'", r"floating-point"),
    ),
    Case(
        "load-activations-from-an-empty-directory",
        in_a_folder(al.load_activations),
        al.ActivationsNotFoundError,
        (r"holds no extraction", r"al.extract"),
    ),
    Case(
        "load-activations-with-a-damaged-shard",
        in_a_folder(damaged_shard),
        al.ActivationsIntegrityError,
        (r"shards/00000.safetensors", r"sha256", r"rerun"),
    ),
    Case(
        "cache-load-of-another-file",
        in_a_folder(
            lambda folder: (
                (folder / "x.safetensors").write_text("{}") and al.ActivationCache.load(folder / "x.safetensors")
            )
        ),
        al.ActivationsIntegrityError,
        (r"not a saved activation cache", r"cache.save"),
    ),
]


LONGER = "The capital city of Italy is"  # one token longer than CLEAN
ALIGNMENT_AND_NAMES: list[Case] = [
    Case(
        "align-position-outside-the-clean-prompt",
        lambda: al.patch(zoo_gpt2(), CLEAN, LONGER, over=("layer",), align=([0, 9], [0, 1])),
        al.AlignmentError,
        (r"align's clean position 9 is out of range", r"clean prompt, which has 6 tokens", r"show_alignment"),
    ),
    Case(
        "align-position-outside-the-corrupt-prompt",
        lambda: al.attribute(zoo_gpt2(), CLEAN, LONGER, role="resid_pre", over=("layer",), align=([0, 1], [0, -20])),
        al.AlignmentError,
        (r"align's corrupt position -20 is out of range", r"corrupt prompt, which has 7 tokens"),
    ),
    Case(
        "align-by-an-unknown-word",
        lambda: al.patch(zoo_gpt2(), CLEAN, LONGER, over=("layer",), align="last"),
        al.PromptError,
        (r"align='last'", r"use 'auto'"),
    ),
    Case(
        "align-one-per-pair-for-another-number-of-pairs",
        lambda: al.patch(zoo_gpt2(), [CLEAN] * 3, [LONGER] * 3, over=("layer",), align=["auto", "auto"]),
        al.PromptError,
        (r"2 alignments for 3 prompt pairs", r"one per pair, or one"),
    ),
    Case(
        "different-lengths-without-align",
        lambda: al.patch(zoo_gpt2(), CLEAN, LONGER, over=("layer",)),
        al.PromptError,
        (r"different token lengths", r"align='auto'", r"positions=\['END'\]"),
    ),
    Case(
        "position-name-the-dataset-does-not-define",
        lambda: al.patch(zoo_gpt2(), ioi(2), ioi(2), over=("layer",), metric="logit_diff", positions=["S2", "S3"]),
        al.PositionNameError,
        (r"position name 'S3' is not defined", r"it defines 'IO', 'S1', 'S1\+1', 'S2', 'END'"),
    ),
    Case(
        "position-name-of-a-prompt-without-names",
        lambda: al.attribute(zoo_gpt2(), CLEAN, CORRUPT, role="resid_pre", over=("layer",), positions="subject_last"),
        al.PositionNameError,
        (r"'subject_last' is not defined for the clean prompt 'The capital of France is'", r"defines 'END'", "al.pair"),
    ),
    Case(
        "marked-names-differ-between-clean-and-corrupt",
        lambda: al.pair(zoo_gpt2(), "The capital of [C:France] is", "The capital of [D:Italy] is"),
        al.PositionNameError,
        (r"clean prompt marks \['C'\] and the corrupt prompt \['D'\]", r"mark the same names in both"),
    ),
    Case(
        "mark-not-closed",
        lambda: al.pair(zoo_gpt2(), "The capital of [C:France is", "The capital of [C:Italy is"),
        al.PositionNameError,
        (r"'\[C:France is'", r"not closed or names no words", r"\[NAME:words\]"),
    ),
    Case(
        "mark-naming-no-words",
        lambda: al.pair(zoo_gpt2(), "The capital of [C:] France is", "The capital of [C:] Italy is"),
        al.PositionNameError,
        (r"not closed or names no words",),
    ),
    Case(
        "name-marked-twice",
        lambda: al.pair(zoo_gpt2(), "[C:The] capital of [C:France] is", "[C:The] capital of [C:Italy] is"),
        al.PositionNameError,
        (r"'C' is marked twice", r"mark each name once"),
    ),
    Case(
        "END-marked",
        lambda: al.pair(zoo_gpt2(), "The capital of France [END:is]", "The capital of Italy [END:is]"),
        al.PositionNameError,
        (r"marks 'END', which every prompt defines as its last token",),
    ),
    Case(
        "named-position-outside-the-prompt",
        lambda: (lambda pair: al.patch(zoo_gpt2(), pair, pair, over=("layer",), positions=["C"]))(
            al.Pair(CLEAN, CORRUPT, positions={"C": (4, 40)})
        ),
        al.PositionError,
        (r"names position 40 'C' of its corrupt prompt, which has 6 tokens", r"al.pair"),
    ),
    Case(
        "two-names-for-one-position",
        lambda: al.patch(zoo_gpt2(), ioi(1), ioi(1), over=("layer",), metric="logit_diff", positions=["END", -1]),
        al.PromptError,
        (r"name the same position", r"give each position once"),
    ),
]


# -- circuits ----------------------------------------------------------------------------------
def _path_patch(**options: object) -> Callable[[], object]:
    options = {"senders": "a0.h1", "metric": al.metrics.logit_diff(7, 8), **options}
    return lambda: al.path_patch(_tiny("gpt2"), CLEAN, CORRUPT, **options)


def _edge_metrics(edge_sets: object, graph_of: Callable[[], al.AnyModel] | None = None, **options: object):
    def run() -> object:
        from anylens.circuits.edges import edge_metrics

        model = _tiny("gpt2")
        graph = al.component_graph(graph_of() if graph_of else model, "head")
        options.setdefault("metric", al.metrics.logit_diff(7, 8))
        return edge_metrics(model, CLEAN, CORRUPT, graph, edge_sets, **options)

    return run


def _without_branch_inputs() -> al.AnyModel:
    hf, tokenizer = tiny_model("gpt2")
    spec = al.registry().adapter("gpt2")
    roles = {role: path for role, path in spec.roles.items() if role not in al.BRANCH_INPUT_ROLES}
    return al.wrap(hf, tokenizer, adapter=dataclasses.replace(spec, name="gpt2-nodes-only", roles=roles))


def _nodes_only_model_still_patches_nodes() -> None:
    model = _without_branch_inputs()
    with pytest.raises(al.CircuitGraphError, match=r"attn_in, mlp_in"):
        al.path_patch(model, CLEAN, CORRUPT, senders="a0.h1", metric=al.metrics.logit_diff(7, 8))
    result = al.patch(model, CLEAN, CORRUPT, role="z", over=("layer", "head"), metric=al.metrics.logit_diff(7, 8))
    assert len(result.to_frame()) == model.n_layers * model.n_heads


CIRCUITS = [
    Case(
        "circuit-on-pairs-of-different-lengths",
        lambda: al.circuit(zoo_gpt2(), CLEAN, LONGER, metric=al.metrics.logit_diff(" Paris", " Rome")),
        al.PromptError,
        (r"6 tokens and corrupt prompts 7", r"take no align", r"al.show_alignment"),
    ),
    Case(
        "path-patch-on-pairs-of-different-lengths",
        lambda: al.path_patch(
            zoo_gpt2(), CLEAN, LONGER, senders="a0.h1", metric=al.metrics.logit_diff(" Paris", " Rome")
        ),
        al.PromptError,
        (r"one token length", r"take no align"),
    ),
    Case(
        "path-patch-sender-after-receiver",
        _path_patch(senders="a2.h0", receivers="attn1"),
        al.EdgeOrderError,
        (r"'a2\.h0'", r"attn1", r"later receivers or earlier senders"),
    ),
    Case(
        "path-patch-unknown-node",
        _path_patch(senders="a9.h0"),
        al.CircuitGraphError,
        (r"no node 'a9\.h0'", r"a0\.h0"),
    ),
    Case(
        "path-patch-logits-as-sender",
        _path_patch(senders="logits"),
        al.CircuitGraphError,
        (r"'logits' writes nothing", r"cannot send"),
    ),
    Case(
        "path-patch-metric-not-a-metric",
        _path_patch(metric=42),
        al.MetricError,
        (r"metric=42", r"al\.metrics"),
    ),
    Case("path-patch-no-metric", _path_patch(metric=None), al.MetricError, (r"need a metric", r"logit_diff")),
    Case(
        "path-patch-misspelt-metric", _path_patch(metric="logit_dif"), al.MetricError, (r"did you mean 'logit_diff'",)
    ),
    Case("path-patch-direction", _path_patch(direction="up"), al.OptionError, (r"direction='up'", r"'noise'")),
    Case("path-patch-batch-size", _path_patch(batch_size=0), al.OptionError, (r"batch_size=0", r"positive")),
    Case(
        "path-patch-empty-senders",
        _path_patch(senders=[]),
        al.CircuitGraphError,
        (r"senders=\[\]", r"node name"),
    ),
    Case(
        "edge-the-graph-lacks",
        _edge_metrics([["a1.h0->attn0"]]),
        al.EdgeOrderError,
        (r"'a1\.h0' \(layer 1\) does not come before 'attn0'",),
    ),
    Case(
        "edge-not-an-edge",
        _edge_metrics([["a0.h0 to mlp1"]]),
        al.CircuitGraphError,
        (r"cannot read 'a0\.h0 to mlp1' as an edge", r"'sender->receiver'"),
    ),
    Case(
        "edge-mask-of-the-wrong-width",
        _edge_metrics(torch.ones(2, 5)),
        al.CircuitGraphError,
        (r"\(2, 5\)", r"one column per edge"),
    ),
    Case(
        "edge-metrics-ablation", _edge_metrics([[]], ablation="zero"), al.OptionError, (r"ablation='zero'", r"'mean'")
    ),
    Case("edge-metrics-metric", _edge_metrics([[]], metric="kl_div"), al.MetricError, (r"did you mean 'kl'",)),
    Case(
        "edge-metrics-graph-of-another-model",
        _edge_metrics([[]], graph_of=zoo_gpt2),
        al.CircuitGraphError,
        (r"4 layers", r"build it from this model"),
    ),
    Case(
        "graph-head-level-behind-a-post-norm",
        lambda: al.component_graph(_tiny("gemma2"), "head"),
        al.CircuitGraphError,
        (r"'gemma2'", r"level='layer'"),
    ),
    Case("graph-of-an-adapter-without-branch-inputs", _nodes_only_model_still_patches_nodes, None),
]


# -- circuits: edge attribution --------------------------------------------------------------------
CIRCUIT_IDS = (torch.tensor([[5, 17, 9, 23, 4]]), torch.tensor([[5, 17, 12, 23, 4]]))  # one token differs


def _circuit(**options: object) -> Callable[[], object]:
    return lambda: al.circuit(_tiny("gpt2"), *CIRCUIT_IDS, **{"metric": al.metrics.logit_diff(10, 11), **options})


def _loaded_circuit_faithfulness(folder: Path) -> object:
    path = _circuit(method="eap")().save(folder / "circuit.json")
    return al.CircuitResult.load(path).faithfulness(ks=[1])


CIRCUIT_ATTRIBUTION = [
    Case(
        "circuit-eap-with-a-metric-without-gradients",
        _circuit(method="eap", metric=al.metrics.top1(10)),
        al.MetricGradientError,
        (r"metric 'top1' has no gradient", r"logit_diff", r"edge_patch_scores"),
    ),
    Case(
        "circuit-eap-ig-with-a-rank-metric",
        _circuit(method="eap-ig", metric=al.metrics.rank(10)),
        al.MetricGradientError,
        (r"metric 'rank' has no gradient",),
    ),
    Case("circuit-unknown-method", _circuit(method="acdc"), al.CircuitOptionError, (r"method='acdc'", r"'eap-ig'")),
    Case("circuit-unknown-level", _circuit(level="neuron"), al.CircuitOptionError, (r"level='neuron'", r"'head'")),
    Case("circuit-zero-steps", _circuit(method="eap-ig", steps=0), al.CircuitOptionError, (r"steps=0", r"at least 1")),
    Case(
        "circuit-prune-without-a-rule",
        lambda: _circuit(method="eap")().prune(),
        al.CircuitOptionError,
        (r"threshold=", r"k="),
    ),
    Case(
        "circuit-faithfulness-of-a-loaded-result",
        in_a_folder(_loaded_circuit_faithfulness),
        al.CircuitOptionError,
        (r"loaded from a file", r"al.circuit"),
    ),
]


CASES = [
    *LOADING_AND_ROLES,
    *EXPERIMENTS_AND_CLI,
    *GENERATION_AND_STEERING,
    *CUSTOM_MODELS,
    *ACTIVATIONS_AND_PROBES,
    *ALIGNMENT_AND_NAMES,
    *CIRCUITS,
    *CIRCUIT_ATTRIBUTION,
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clear_answer(case: Case):
    if case.error is None:
        case.run()
        return
    assert issubclass(case.error, al.AnylensError), f"{case.id}: expect an anylens error, not {case.error}"
    with pytest.raises(case.error) as raised:
        case.run()
    message = str(raised.value)
    for pattern in case.match:
        assert re.search(pattern, message), f"{case.id}: {pattern!r} not in {message!r}"
