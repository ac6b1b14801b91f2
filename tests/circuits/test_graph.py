"""The component graph: its size by hand arithmetic per kind of block, its edges, its errors."""

from __future__ import annotations

import dataclasses
from functools import cache

import pytest
from tiny_models import model_cache

import anylens as al
from anylens.circuits.graph import component_graph
from anylens.testing import tiny_model

model_of = model_cache()


def sequential(L: int, H: int) -> int:
    """Pre-norm sequential blocks, H senders per attention (H = 1 at layer level) and an MLP.

    Senders: the embedding, then per layer H attention senders and the MLP. Layer l's attention
    reads the embedding and every sender of the l layers before it: 1 + l (H + 1); its MLP reads
    those and the H attention senders of its own layer; the logits read all 1 + L (H + 1).
    Summed over l = 0 .. L-1 (sum of l = L (L - 1) / 2):
    2 L + (H + 1) L (L - 1) + L H + 1 + L (H + 1).
    """
    return 2 * L + (H + 1) * L * (L - 1) + L * H + 1 + L * (H + 1)


def parallel(L: int, H: int) -> int:
    """As :func:`sequential`, but the MLP of layer l does not read its own layer's attention."""
    return 2 * L + (H + 1) * L * (L - 1) + 1 + L * (H + 1)


def shared(L: int, H: int) -> int:
    """One receiver per block (one norm feeds both branches): block l reads 1 + l (H + 1)."""
    return L + (H + 1) * L * (L - 1) // 2 + 1 + L * (H + 1)


def mixer_only(L: int) -> int:
    """One SSM mixer per layer, sender and receiver: mixer l reads 1 + l, the logits 1 + L."""
    return L + L * (L - 1) // 2 + 1 + L


@cache
def zoo_gpt2() -> al.AnyModel:
    return al.load("zoo:gpt2")


def test_zoo_gpt2_head_graph_has_105_edges():
    graph = component_graph(zoo_gpt2(), "head")
    assert (zoo_gpt2().n_layers, zoo_gpt2().n_heads) == (4, 4)
    assert sequential(4, 4) == 105 == len(graph)
    assert len(graph.senders) == 1 + 4 * 5 and len(graph.receivers) == 2 * 4 + 1


# (family, level, expected edges as a function of layers and heads)
SIZES = [
    ("gpt2", "head", sequential),
    ("gpt2", "layer", lambda L, H: sequential(L, 1)),
    ("llama", "head", sequential),
    ("gpt_neox_sequential", "head", sequential),
    ("gpt_neox", "head", parallel),
    ("gpt_neox", "layer", lambda L, H: parallel(L, 1)),
    ("gptj", "head", shared),
    ("gemma2", "layer", lambda L, H: sequential(L, 1)),
    ("mamba", "layer", lambda L, H: mixer_only(L)),
    ("mamba2", "head", lambda L, H: mixer_only(L)),  # no attention: mixers are the senders at any level
]


@pytest.mark.parametrize("family,level,count", SIZES, ids=[f"{f}-{lv}" for f, lv, _ in SIZES])
def test_edge_count_by_hand(family, level, count):
    model = model_of(family)
    graph = component_graph(model, level)
    heads = model.n_heads if "attn_out" in model.roles else 1
    assert len(graph) == count(model.n_layers, heads)
    assert len({edge.name for edge in graph.edges}) == len(graph)  # no edge twice
    for edge in graph.edges:  # every edge runs forward
        assert (edge.sender.layer, edge.sender.stage) < (edge.receiver.layer, edge.receiver.stage)


def test_parallel_blocks_have_no_attention_to_mlp_edge_within_a_layer():
    neox = component_graph(model_of("gpt_neox"), "layer")
    with pytest.raises(al.EdgeOrderError, match="'attn1'"):
        neox.edge("attn1", "mlp1")
    assert neox.edge("attn0", "mlp1").name == "attn0->mlp1"
    gpt2 = component_graph(model_of("gpt2"), "layer")
    assert gpt2.edge("attn1", "mlp1").name == "attn1->mlp1"  # sequential: attention's write reaches the MLP


def test_gptj_branches_share_one_receiver_per_block():
    graph = component_graph(model_of("gptj"), "head")
    names = [node.name for node in graph.receivers]
    assert names == [f"block{i}" for i in range(model_of("gptj").n_layers)] + ["logits"]
    assert graph.edge("mlp0", "block1").receiver.input_role == "attn_in"
    with pytest.raises(al.EdgeOrderError):
        graph.edge("a1.h0", "block1")


def test_names_that_are_sender_and_receiver_resolve_by_side():
    graph = component_graph(model_of("gpt2"), "head")
    assert graph.sender("mlp0").output_role == "mlp_out"
    assert graph.receiver("mlp0").input_role == "mlp_in"
    assert [e.name for e in graph.parse_edges(["embed->mlp0", ("mlp0", "attn1")])] == ["embed->mlp0", "mlp0->attn1"]
    assert len(graph.edges_into("mlp0")) == 1 + 4  # the embedding and layer 0's heads


def test_unknown_node_names_the_graphs_nodes():
    graph = component_graph(model_of("gpt2"), "head")
    with pytest.raises(al.CircuitGraphError, match=r"no node 'a9\.h0'.*a0\.h0") as raised:
        graph.edge("a9.h0", "logits")
    assert isinstance(raised.value, LookupError)


def test_sender_after_receiver_is_an_edge_order_error():
    graph = component_graph(model_of("gpt2"), "head")
    with pytest.raises(al.EdgeOrderError, match=r"'a2\.h1' \(layer 2\) does not come before 'attn1' \(layer 1\)"):
        graph.edge("a2.h1", "attn1")
    with pytest.raises(al.CircuitGraphError, match="cannot receive"):
        graph.edge("mlp0", "embed")
    with pytest.raises(al.CircuitGraphError, match="cannot send"):
        graph.edge("logits", "mlp2")


def test_missing_branch_roles_are_named():
    hf, tokenizer = tiny_model("gpt2")
    spec = al.registry().adapter("gpt2")
    roles = {role: path for role, path in spec.roles.items() if role not in al.BRANCH_INPUT_ROLES}
    model = al.wrap(hf, tokenizer, adapter=dataclasses.replace(spec, name="gpt2-no-branches", roles=roles))
    with pytest.raises(al.CircuitGraphError, match=r"'gpt2-no-branches'.*attn_in, mlp_in.*node-level"):
        component_graph(model, "head")


def test_head_level_where_heads_pass_a_post_norm_suggests_layer_level():
    with pytest.raises(al.CircuitGraphError, match=r"level='layer'"):
        component_graph(model_of("gemma2"), "head")
    with pytest.raises(al.CircuitGraphError, match=r"level must be one of"):
        component_graph(model_of("gpt2"), "neuron")
