"""Adapter registration and resolution, and the typed errors users meet on the way."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

import anylens as al
from anylens.adapters.llama import LLAMA
from anylens.registry.builtin import BUILTIN_PLUGINS, plugin_name
from anylens.registry.manager import (
    AdapterConflictWarning,
    PluginLoadWarning,
    Registry,
    as_spec,
    registry,
    reset_registry,
)
from anylens.registry.table import table_rows
from anylens.testing import tiny_model


@pytest.fixture(autouse=True)
def fresh_registry():
    reset_registry()
    yield
    reset_registry()


@contextmanager
def recorded_warnings():
    """All warnings raised inside, also when the block ends in an exception."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def messages(caught, category) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


class MyLlama(LlamaForCausalLM):
    """A custom model class that no built-in adapter claims by name."""


class Mystery(LlamaForCausalLM):
    """Claimed only by an ``anylens_resolve`` fallback."""


def custom_llama(cls=MyLlama):
    """A tiny LLaMA of class ``cls`` (with the tiny LLaMA's perturbed weights), and its tokenizer."""
    base, tokenizer = tiny_model("llama")
    config = base.config
    config.architectures = [cls.__name__]
    model = cls(config).float().eval()
    model.load_state_dict(base.state_dict())
    return model, tokenizer


def stub(class_name: str, architectures=None):
    """The least a model needs for resolution: a class name and a config."""
    model = type(class_name, (), {})()
    model.config = SimpleNamespace(architectures=architectures)
    return model


def llama_declaration(name: str, architectures=("MyLlama",), **changes) -> dict:
    return {**LLAMA.to_dict(), "name": name, "architectures": list(architectures), **changes}


def ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(4, 400, (batch, length), generator=torch.Generator().manual_seed(1))


# -- resolution --------------------------------------------------------------------------------
def test_builtin_architectures_resolve_by_config_and_by_class_name():
    reg = registry()
    assert reg.resolve(stub("Whatever", ["LlamaForCausalLM"])).name == "llama"
    assert reg.resolve(stub("GPT2LMHeadModel")).name == "gpt2"  # config.architectures unset


def test_unknown_architecture_names_the_class_lists_adapters_and_says_how_to_register():
    # Not a torch model, so not even inference can serve it (a real unclaimed causal LM is
    # inferred instead: tests/conformance/test_infer.py).
    with pytest.raises(al.UnknownArchitectureError) as caught:
        al.wrap(stub("MyLlama", ["MyLlama"]), tokenizer=object())
    message = str(caught.value)
    assert "no adapter claims MyLlama" in message
    assert "['MyLlama']" in message
    assert "Registered adapters: " in message and "gpt2" in message and "llama" in message
    assert "al.register_adapter" in message and "docs/adapters.md" in message


def test_adapter_lookup_by_unknown_name_lists_the_registered_names():
    with pytest.raises(al.UnknownArchitectureError, match=r"no adapter named 'lama'; registered: .*llama"):
        registry().adapter("lama")


# -- declaring adapters as data ------------------------------------------------------------------
def test_dict_adapter_registers_and_passes_check_end_to_end():
    spec = al.register_adapter(llama_declaration("myllama"))
    assert isinstance(spec, al.AdapterSpec)
    model, tokenizer = custom_llama()
    wrapped = al.wrap(model, tokenizer)
    assert wrapped.adapter.name == "myllama"
    report = al.check(wrapped, write_layers=[0])
    assert report.passed, str(report)
    assert any(row.invariant.startswith("5 ") for row in report.rows)  # per-head invariant ran


def test_toml_adapter_registers_and_passes_check_end_to_end(tmp_path):
    path = tmp_path / "myllama.toml"
    path.write_text(dataclasses.replace(LLAMA, name="myllama_toml", architectures=("MyLlama",)).to_toml())
    al.register_adapter(path)
    model, tokenizer = custom_llama()
    wrapped = al.wrap(model, tokenizer)
    assert wrapped.adapter.name == "myllama_toml"
    assert wrapped.adapter.roles == LLAMA.roles
    report = al.check(wrapped, write_layers=[1])
    assert report.passed, str(report)


def test_hand_written_toml_file_is_read(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(
        textwrap.dedent(
            """
            [adapter]
            name = "handwritten"
            architectures = ["HandWrittenLM"]
            layers = "model.layers"
            out_proj = "model.layers.{i}.self_attn.o_proj"

            [adapter.roles]
            resid_pre = "model.layers.{i}.input"
            resid_post = "model.layers.{i}.output"
            z = "model.layers.{i}.self_attn.o_proj.input|heads"
            logits = "output.logits"

            [[adapter.variants]]
            when = { tie_word_embeddings = true }
            drop = ["z"]
            """
        )
    )
    spec = al.AdapterSpec.from_toml(path)
    assert spec.architectures == ("HandWrittenLM",)
    assert spec.role_names == ("logits", "resid_pre", "resid_post", "z")
    assert spec.role_path("z").view == "heads"
    assert spec.variants[0].when == {"tie_word_embeddings": True}
    assert "z" not in spec.specialize(SimpleNamespace(tie_word_embeddings=True)).roles
    assert "z" in spec.specialize(SimpleNamespace(tie_word_embeddings=False)).roles


class MyLlamaForCausalLM(LlamaForCausalLM):
    """The custom class of the example in docs/adapters.md."""


def test_the_toml_example_in_the_docs_works(tmp_path):
    docs = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"
    blocks = re.findall(r"```toml\n(.*?)```", docs.read_text(), flags=re.S)
    example = next(block for block in blocks if block.startswith("[adapter]"))
    path = tmp_path / "myllama.toml"
    path.write_text(example)
    al.register_adapter(path)
    assert registry().adapter("myllama").roles == LLAMA.roles  # the example is the full LLaMA table
    model, tokenizer = custom_llama(MyLlamaForCausalLM)
    wrapped = al.wrap(model, tokenizer)
    assert wrapped.adapter.name == "myllama"
    with wrapped.trace(ids()):
        z = wrapped.z[0].save()
    assert z.shape == (2, 6, 4, 16)


def test_to_toml_round_trips_through_from_toml(tmp_path):
    spec = dataclasses.replace(
        LLAMA,
        name="round_trip",
        logit_softcap="final_logit_softcapping",
        parallel=True,
        variants=(
            al.Variant(when={"model_type": "x", "flag": True}, roles={"resid_mid": "model.layers.{i}.mid.input"}),
            al.Variant(when={"n": 2}, drop=("q", "k"), facts={"z_feeds_residual": False}),
        ),
    )
    path = tmp_path / "round_trip.toml"
    path.write_text(spec.to_toml())
    assert al.AdapterSpec.from_toml(path) == spec
    assert al.AdapterSpec.from_dict(spec.to_dict()) == spec


# -- conflicts and determinism -------------------------------------------------------------------
def test_plugin_claiming_a_builtin_architecture_is_refused_with_a_warning():
    with recorded_warnings() as caught:
        al.register_adapter(llama_declaration("impostor", ["LlamaForCausalLM"]))
    [message] = messages(caught, AdapterConflictWarning)
    assert "claims LlamaForCausalLM with adapter 'impostor'" in message
    assert "keeping 'llama'" in message and "override=True" in message
    assert registry().resolve(stub("LlamaForCausalLM")).name == "llama"
    assert registry().adapter("impostor").name == "impostor"  # still usable by name


def test_override_replaces_the_builtin_with_a_warning():
    with recorded_warnings() as caught:
        al.register_adapter(llama_declaration("impostor", ["LlamaForCausalLM"]), override=True)
    [message] = messages(caught, AdapterConflictWarning)
    assert "adapter 'impostor'" in message and "overrides 'llama' for LlamaForCausalLM" in message
    assert registry().resolve(stub("LlamaForCausalLM")).name == "impostor"


def test_an_adapter_name_already_taken_keeps_the_first():
    with recorded_warnings() as caught:
        al.register_adapter(llama_declaration("llama", ["SomethingElse"]))
    [message] = messages(caught, AdapterConflictWarning)
    assert "registers adapter name 'llama', already registered by" in message
    assert registry().adapter("llama").architectures == ("LlamaForCausalLM",)
    with pytest.raises(al.UnknownArchitectureError):
        registry().resolve(stub("SomethingElse"))


def test_resolution_is_deterministic_first_registration_wins():
    def resolve_after(order: list[str]) -> str:
        reg = Registry()
        with recorded_warnings():
            for name in order:
                reg.register_adapter(llama_declaration(name, ["Shared"]))
        return reg.resolve(stub("Shared")).name

    assert resolve_after(["first", "second"]) == resolve_after(["first", "second"]) == "first"
    assert resolve_after(["second", "first"]) == "second"


def test_entry_points_load_builtins_first_in_name_order():
    first, second = Registry(), Registry()
    first.load_plugins()
    second.load_plugins()
    assert list(first.claims) == list(second.claims)
    assert all(claim.builtin for claim in first.adapters.values())
    assert {"gpt2", "llama"} <= set(first.adapters)


def builtin_declarations() -> dict[str, list]:
    """Each built-in module's adapters, asked of the module itself rather than the registry."""
    return {module: importlib.import_module(module).anylens_adapters() for module in BUILTIN_PLUGINS}


@pytest.mark.parametrize(
    "points",
    [
        pytest.param([], id="no-entry-point-metadata"),
        pytest.param(  # what an older install's metadata advertised: must not register them twice
            [importlib.metadata.EntryPoint(module.rsplit(".", 1)[-1], module, "anylens") for module in BUILTIN_PLUGINS],
            id="stale-builtin-entry-points",
        ),
    ],
)
def test_builtin_adapters_register_from_the_static_list(monkeypatch, points):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: points)
    with recorded_warnings() as caught:
        reg = registry()
    assert not messages(caught, Warning) and not reg.failures
    assert sorted(name for name, _ in reg.pm.list_name_plugin()) == sorted(map(plugin_name, BUILTIN_PLUGINS))
    expected = {as_spec(item).name: as_spec(item) for items in builtin_declarations().values() for item in items}
    assert {"gpt2", "llama", "mistral", "mamba", "opt"} <= set(expected)
    for name, spec in expected.items():
        assert reg.adapters[name].builtin
        for arch in spec.architectures:
            assert reg.resolve(stub(arch)).name == name, arch
    assert reg.pm.get_plugin(plugin_name("anylens.adapters.inferred")).anylens_resolve  # the fallback resolver


def test_registering_an_adapter_again_replaces_its_claims():
    al.register_adapter(llama_declaration("moving", ["OldName"]))
    al.register_adapter(llama_declaration("moving", ["NewName"]))
    assert registry().resolve(stub("NewName")).name == "moving"
    with pytest.raises(al.UnknownArchitectureError):
        registry().resolve(stub("OldName"))


# -- plugins that fail -----------------------------------------------------------------------------
class ExplodingPlugin:
    explode = True

    @al.hookimpl
    def anylens_adapters(self):
        if self.explode:
            raise RuntimeError("weights on fire")
        return [llama_declaration("repaired", ["RepairedLM"])]


def test_register_plugin_that_raises_gives_plugin_error_naming_it():
    plugin = ExplodingPlugin()
    with recorded_warnings() as caught, pytest.raises(al.PluginError) as raised:
        al.register_plugin(plugin, "exploding")
    assert "plugin 'exploding' failed: RuntimeError: weights on fire" in str(raised.value)
    [warned] = messages(caught, PluginLoadWarning)
    assert "'exploding'" in warned and "the other adapters keep working" in warned
    assert registry().resolve(stub("LlamaForCausalLM")).name == "llama"

    plugin.explode = False  # fixed: registering it again works and no stale error remains
    al.register_plugin(plugin, "exploding")
    assert registry().resolve(stub("RepairedLM")).name == "repaired"
    assert "exploding" not in registry().failures


def test_plugin_providing_a_malformed_adapter_fails_with_the_spec_problem():
    class Malformed:
        @al.hookimpl
        def anylens_adapters(self):
            return [{"name": "bad", "architectures": ["BadLM"], "layers": "x", "roles": {"resid_post": "x.output"}}]

    with recorded_warnings(), pytest.raises(al.PluginError, match=r"'malformed'.*AdapterSpecError.*without '\{i\}'"):
        al.register_plugin(Malformed(), "malformed")
    assert "bad" not in registry().adapters


def write_distribution(root, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A third-party package on sys.path: a dist-info with ``anylens`` entry points, and modules."""
    info = root / "thirdparty_lens-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-lens\nVersion: 1.0\n")
    lines = ["[anylens]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_broken_entry_point_plugins_warn_by_name_and_the_rest_keep_working(tmp_path, monkeypatch):
    write_distribution(
        tmp_path,
        {
            "good": "thirdparty_lens_good",
            "missing": "thirdparty_lens_not_there",
            "raising": "thirdparty_lens_raising",
        },
        {
            "thirdparty_lens_good": """
                import anylens as al
                from anylens.adapters.llama import LLAMA

                @al.hookimpl
                def anylens_adapters():
                    return [{**LLAMA.to_dict(), "name": "thirdparty_llama", "architectures": ["ThirdPartyLM"]}]
            """,
            "thirdparty_lens_raising": """
                import anylens as al

                @al.hookimpl
                def anylens_adapters():
                    raise ValueError("no adapters today")
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("thirdparty_lens_good", "thirdparty_lens_raising"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    reset_registry()

    with recorded_warnings() as caught:
        reg = registry()
    warned = messages(caught, PluginLoadWarning)
    assert len(warned) == 2
    assert any("'thirdparty-lens:missing'" in m and "ModuleNotFoundError" in m for m in warned)
    assert any("'thirdparty-lens:raising'" in m and "no adapters today" in m for m in warned)
    assert set(reg.failures) == {"thirdparty-lens:missing", "thirdparty-lens:raising"}

    assert reg.resolve(stub("ThirdPartyLM")).name == "thirdparty_llama"
    assert reg.adapters["thirdparty_llama"].plugin == "thirdparty-lens:good"
    assert not reg.adapters["thirdparty_llama"].builtin
    assert reg.resolve(stub("LlamaForCausalLM")).name == "llama"
    sources = {row.adapter: row.source for row in table_rows(reg)}
    assert sources["thirdparty_llama"] == "thirdparty-lens:good" and sources["llama"] == "built-in"


# -- the anylens_resolve fallback -----------------------------------------------------------------
class MysteryResolver:
    @al.hookimpl
    def anylens_resolve(self, model, config):
        if type(model).__name__ == "Mystery":
            return llama_declaration("mystery", ["Mystery"])
        return None


def test_resolve_hook_claims_a_model_no_name_matches():
    al.register_plugin(MysteryResolver(), "mystery-resolver")
    model, tokenizer = custom_llama(Mystery)
    model.config.architectures = None  # nothing to match by config either
    wrapped = al.wrap(model, tokenizer)
    assert wrapped.adapter.name == "mystery"
    with wrapped.trace(ids()):
        logits = wrapped.logits.save()
    assert logits.shape == (2, 6, 400)
    with pytest.raises(al.UnknownArchitectureError, match="no adapter claims Unclaimed"):
        registry().resolve(stub("Unclaimed"))


def test_names_win_over_the_resolve_hook():
    class Greedy:
        @al.hookimpl
        def anylens_resolve(self, model, config):
            return llama_declaration("greedy", ["Anything"])

    al.register_plugin(Greedy(), "greedy")
    assert registry().resolve(stub("LlamaForCausalLM")).name == "llama"
    assert registry().resolve(stub("Nameless")).name == "greedy"


# -- errors on a wrapped model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_parts():
    return tiny_model("llama")


def wrap_llama(llama_parts, **declaration_changes):
    model, tokenizer = llama_parts
    declaration = llama_declaration("custom", ["LlamaForCausalLM"])
    roles = dict(declaration["roles"])
    for role in declaration_changes.pop("drop_roles", ()):
        roles.pop(role)
    roles.update(declaration_changes.pop("roles", {}))
    declaration.update(roles=roles, **declaration_changes)
    return al.wrap(model, tokenizer, adapter=declaration)


def test_missing_role_names_the_adapter_and_the_roles_it_has(llama_parts):
    model = wrap_llama(llama_parts, name="no_heads", drop_roles=["z", "q", "k", "v", "pattern"])
    with pytest.raises(al.MissingRoleError) as caught:
        model.z  # noqa: B018
    message = str(caught.value)
    assert "adapter 'no_heads' (LlamaForCausalLM) has no role 'z'" in message
    provided = message.split("it provides: ")[1].split(", ")
    assert provided == list(model.roles)
    assert "resid_post" in provided and "z" not in provided


def test_asking_for_something_that_is_not_a_role_lists_the_roles(llama_parts):
    model = wrap_llama(llama_parts)
    with pytest.raises(al.MissingRoleError, match=r"'resid' is not a role; roles are: embed, pos_embed"):
        model.role("resid")


def test_layer_out_of_range_gives_the_valid_range_and_negative_indices_work(llama_parts):
    model = wrap_llama(llama_parts)
    assert model.n_layers == 3
    for bad in (3, -4):
        with pytest.raises(al.LayerIndexError, match=r"valid indices are 0\.\.2 \(or -3\.\.-1\)"):
            model.resid_post[bad]
    with pytest.raises(al.LayerIndexError, match="must be an integer"):
        model.resid_post["last"]
    with model.trace(ids()):  # reads follow the forward pass: layer 0 before layer 2
        first_by_negative = model.resid_pre[-3].save()
        first = model.resid_pre[0].save()
        last = model.resid_post[-1].save()
        explicit = model.resid_post[2].save()
    assert torch.equal(last, explicit)
    assert torch.equal(first_by_negative, first)
    assert not torch.equal(first, last)


def test_path_that_does_not_resolve_names_it_and_the_nearest_modules(llama_parts):
    with pytest.raises(al.ModulePathError) as caught:
        wrap_llama(llama_parts, name="typo", roles={"resid_post": "model.layer.{i}.output"})
    message = str(caught.value)
    assert "role 'resid_post' (model.layer.{i}.output)" in message
    assert "module path 'model.layer.0' does not exist in LlamaForCausalLM" in message
    assert "'model.layers.0'" in message.split("nearest existing modules:")[1]


def test_layers_path_that_does_not_resolve_is_a_module_path_error(llama_parts):
    with pytest.raises(al.ModulePathError, match=r"'model.blocks' does not exist.*nearest existing modules"):
        wrap_llama(llama_parts, layers="model.blocks")


def test_layers_disagreeing_on_tuple_or_tensor_output_raise(monkeypatch):
    """A toy where the last block returns a 1-tuple (and the final norm unwraps it)."""
    model, tokenizer = tiny_model("llama")
    last, norm = model.model.layers[2], model.model.norm
    block_forward, norm_forward = last.forward, norm.forward
    monkeypatch.setattr(last, "forward", lambda *args, **kwargs: (block_forward(*args, **kwargs),))
    monkeypatch.setattr(norm, "forward", lambda x: norm_forward(x[0] if isinstance(x, tuple) else x))
    wrapped = al.wrap(model, tokenizer, adapter=llama_declaration("toy", ["LlamaForCausalLM"]))

    with wrapped.trace(ids()):  # the toy runs, and layers that agree read fine
        wrapped.resid_post[0].save()
        logits = wrapped.logits.save()
    assert logits.shape == (2, 6, 400)
    with pytest.raises(al.OutputStructureError) as caught, wrapped.trace(ids()):
        for layer in range(3):
            wrapped.resid_post[layer].save()
    message = str(caught.value)
    assert "role 'resid_post' of adapter 'toy'" in message
    assert "layer 0 returned a tensor but the module at layer 2 returned a tuple" in message


def test_write_of_the_wrong_shape_is_a_role_write_error(llama_parts):
    model = wrap_llama(llama_parts)
    wrong_shape = r"shape \(3,\) to role 'resid_post' of shape \(2, 6, 64\)"
    with pytest.raises(al.RoleWriteError, match=wrong_shape), model.trace(ids()):
        model.resid_post[0] = torch.zeros(3)
    with pytest.raises(al.RoleWriteError, match=r"role 'z' of shape \(2, 6, 4, 16\)"), model.trace(ids()):
        model.z[1] = torch.zeros(2, 6, 16)  # heads missing: cannot broadcast
    with model.trace(ids()):  # writes that broadcast to the role's shape are fine
        model.resid_post[0] = torch.zeros(64)
        model.z[1][:, -1, 2] = 0
        model.logits.save()


# -- malformed declarations ------------------------------------------------------------------------
def minimal(**changes) -> dict:
    declaration = {
        "name": "broken",
        "architectures": ["BrokenLM"],
        "layers": "model.layers",
        "roles": {"resid_post": "model.layers.{i}.output"},
    }
    declaration.update(changes)
    return declaration


@pytest.mark.parametrize(
    ("declaration", "expected"),
    [
        (minimal(colour="blue"), r"unknown adapter keys \['colour'\]; valid keys: \["),
        (
            minimal(roles={"resid_banana": "model.layers.{i}.output"}),
            r"adapter 'broken': unknown role 'resid_banana'; valid roles: embed",
        ),
        (
            minimal(roles={"resid_post": "model.layers.0.output"}),
            r"per-layer role 'resid_post' has path 'model.layers.0.output' without '\{i\}'",
        ),
        (
            minimal(roles={"z": "model.layers.{i}.o_proj.input|sideways"}),
            r"unknown view 'sideways'.*valid views: heads, kv_heads",
        ),
        (
            minimal(roles={"resid_post": "model.layers.{i}"}),
            r"names no side of a module: end the module path with '.output' or '.input'",
        ),
        (minimal(roles={"resid_post": 3}), r"role 'resid_post' must map to a path string, got 3"),
        ({"name": "broken", "roles": {}}, r"lacks \['architectures', 'layers'\]"),
        (minimal(architectures=[]), r"adapter 'broken' claims no architectures"),
        (minimal(variants=[{"when": {"x": 1}, "roles": {"nope": "a.output"}}]), r"unknown role 'nope'"),
    ],
    ids=[
        "unknown-key",
        "unknown-role",
        "no-layer-index",
        "unknown-view",
        "no-side",
        "not-a-string",
        "missing-keys",
        "no-architectures",
        "bad-variant-role",
    ],
)
def test_malformed_declarations_raise_adapter_spec_error(declaration, expected):
    with pytest.raises(al.AdapterSpecError, match=expected):
        al.AdapterSpec.from_dict(declaration)
    with pytest.raises(al.AdapterSpecError, match=expected):
        al.register_adapter(declaration)
    assert "broken" not in registry().adapters


def test_something_that_is_not_an_adapter_is_refused():
    with pytest.raises(al.AdapterSpecError, match=r"cannot use 42 as an adapter: give an AdapterSpec, a dict"):
        al.register_adapter(42)
