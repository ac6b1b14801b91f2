"""The component graph: who writes into the residual stream, and who reads each write.

Built from roles alone, so it is the same object on every architecture:

* **senders** write into the residual stream: the embedding (all of ``resid_pre[0]``, so learned
  positions and embedding scales are included), each attention head (its ``z`` through ``W_O``)
  or each attention layer (``attn_out``), each MLP (``mlp_out``), each SSM mixer (``mixer_out``);
* **receivers** read it, each through its own branch-input role (``attn_in``, ``mlp_in``,
  ``mixer_in``), and the logits read the last layer's ``resid_post``.

An edge joins a sender to every later receiver its write reaches: attention of layer ``l`` reaches
the MLP of layer ``l`` only in sequential blocks (``parallel`` adapters read one residual for both).
Where an adapter maps two branches onto one input (one norm feeding both), they are one receiver.
Heads are senders but not separate receivers: all heads of a layer read one branch input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.errors import CircuitGraphError, EdgeOrderError

if TYPE_CHECKING:
    from ..core.model import AnyModel

LEVELS = ("head", "layer")

#: How a head is named: ``a{layer}.h{head}``.
HEAD_NAME = re.compile(r"^a\d+\.h\d+$")


@dataclass(frozen=True)
class Node:
    """One component. ``layer`` orders nodes: -1 for the embedding, ``n_layers`` for the logits;
    ``stage`` orders nodes within a layer (0 the token-mixing branch, 1 the MLP)."""

    name: str
    kind: str  # "embed" | "head" | "attn" | "mlp" | "mixer" | "block" | "logits"
    layer: int
    head: int | None = None
    stage: int = 0
    #: The role whose value this node writes into the residual stream (None: not a sender).
    output_role: str | None = None
    #: The branch-input role this node reads the residual stream through (None: not a receiver).
    input_role: str | None = None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Edge:
    sender: Node
    receiver: Node

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"

    def __str__(self) -> str:
        return self.name


@dataclass
class Graph:
    """Senders, receivers and the edges between them, in forward order."""

    level: str
    n_layers: int
    senders: tuple[Node, ...]
    receivers: tuple[Node, ...]
    edges: tuple[Edge, ...]
    _by_name: dict[str, Node] = field(default_factory=dict, repr=False)
    _edge_index: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for node in (*self.senders, *self.receivers):
            self._by_name.setdefault(node.name, node)
        self._edge_index = {(e.sender.name, e.receiver.name): i for i, e in enumerate(self.edges)}

    def __len__(self) -> int:
        return len(self.edges)

    def node(self, name: str | Node) -> Node:
        if isinstance(name, Node):
            name = name.name
        if name not in self._by_name:
            raise CircuitGraphError(
                f"this {self.level}-level graph has no node {name!r}; its nodes are named like "
                f"{', '.join(n.name for n in _examples(self.senders + self.receivers))}"
            )
        return self._by_name[name]

    def sender(self, name: str | Node) -> Node:
        """The sender called ``name``: an MLP is a sender and a receiver under one name."""
        return self._one_of(name, self.senders, "writes nothing into the residual stream: it cannot send")

    def receiver(self, name: str | Node) -> Node:
        """The receiver called ``name``."""
        return self._one_of(name, self.receivers, "reads no branch input: it cannot receive")

    def _one_of(self, name: str | Node, nodes: tuple[Node, ...], why: str) -> Node:
        node = self.node(name)  # an unknown name: the error lists the graph's names
        for candidate in nodes:
            if candidate.name == node.name:
                return candidate
        raise CircuitGraphError(f"{node.name!r} {why}")

    def edge(self, sender: str | Node, receiver: str | Node) -> Edge:
        """The edge from ``sender`` to ``receiver``, or a typed error saying why there is none."""
        send, receive = self.sender(sender), self.receiver(receiver)
        key = (send.name, receive.name)
        if key in self._edge_index:
            return self.edges[self._edge_index[key]]
        raise EdgeOrderError(
            f"{send.name!r} (layer {send.layer}) does not come before {receive.name!r} (layer {receive.layer}), "
            "so no edge joins them: a sender reaches only receivers later in the forward pass"
        )

    def index(self, edge: Edge) -> int:
        return self._edge_index[(edge.sender.name, edge.receiver.name)]

    def edges_into(self, receiver: str | Node) -> list[Edge]:
        name = self.node(receiver).name
        return [e for e in self.edges if e.receiver.name == name]

    def edges_from(self, sender: str | Node) -> list[Edge]:
        name = self.node(sender).name
        return [e for e in self.edges if e.sender.name == name]

    def parse_edges(self, edges: Iterable[str | Edge | tuple[str, str]]) -> list[Edge]:
        """Edges given as ``Edge``, ``(sender, receiver)`` or ``"sender->receiver"``."""
        parsed = []
        for edge in edges:
            if isinstance(edge, Edge):
                parsed.append(self.edge(edge.sender, edge.receiver))
            elif isinstance(edge, str) and "->" in edge:
                sender, receiver = (part.strip() for part in edge.split("->", 1))
                parsed.append(self.edge(sender, receiver))
            elif isinstance(edge, tuple) and len(edge) == 2:
                parsed.append(self.edge(*edge))
            else:
                raise CircuitGraphError(
                    f"cannot read {edge!r} as an edge: give 'sender->receiver', a (sender, receiver) pair or an Edge"
                )
        return parsed


def _examples(nodes: Sequence[Node]) -> list[Node]:
    seen: dict[str, Node] = {}
    for node in nodes:
        seen.setdefault(node.kind, node)
    return list(seen.values())


def missing_graph_roles(model: AnyModel, level: str = "head") -> list[str]:
    """The roles the adapter would need for a graph at ``level`` (empty when it has them all)."""
    roles = set(model.roles)
    needed = ["resid_pre", "resid_post"]
    if "attn_out" in roles:
        needed += ["attn_in"] + (["z"] if level == "head" else [])
    elif "mixer_out" in roles:
        needed += ["mixer_in"]
    else:
        needed += ["attn_out or mixer_out"]
    if "mlp_out" in roles:
        needed += ["mlp_in"]
    return [role for role in needed if role not in roles]


def component_graph(model: AnyModel, level: str = "head") -> Graph:
    """The graph of ``model``'s components at ``level`` ("head": attention heads are senders;
    "layer": attention layers are)."""
    if level not in LEVELS:
        raise CircuitGraphError(f"level must be one of {LEVELS}, not {level!r}")
    missing = missing_graph_roles(model, level)
    if missing:
        raise CircuitGraphError(
            f"adapter {model.adapter.name!r} lacks the roles a {level}-level component graph reads: "
            f"{', '.join(missing)}. Add them to the adapter's roles (branch inputs are the input of the "
            "norm that starts each branch, e.g. 'model.layers.{i}.input_layernorm.input'); node-level "
            "experiments (patch, ablate, attribute) work without them"
        )
    roles = set(model.roles)
    if level == "head" and "attn_out" in roles and not model.adapter.z_feeds_residual:
        raise CircuitGraphError(
            f"on {model.adapter.name!r} attention's output passes a norm before it joins the residual stream, "
            "so single heads do not write separable contributions: use level='layer'"
        )
    n = model.n_layers
    attention = "attn_out" in roles
    mixer_role = "attn_out" if attention else "mixer_out"
    mixer_input = "attn_in" if attention else "mixer_in"
    has_mlp = "mlp_out" in roles
    parallel = model.adapter.parallel
    shared = has_mlp and model.adapter.roles.get(mixer_input) == model.adapter.roles.get("mlp_in")

    senders: list[Node] = [Node("embed", "embed", -1, output_role="resid_pre")]
    receivers: list[Node] = []
    for layer in range(n):
        kind = "attn" if attention else "mixer"
        if shared:
            receivers.append(Node(f"block{layer}", "block", layer, input_role=mixer_input))
        else:
            receivers.append(Node(f"{kind}{layer}", kind, layer, input_role=mixer_input))
        if attention and level == "head":
            senders += [Node(f"a{layer}.h{h}", "head", layer, head=h, output_role="z") for h in range(model.n_heads)]
        else:
            senders.append(Node(f"{kind}{layer}", kind, layer, output_role=mixer_role))
        if has_mlp:
            if not shared:
                receivers.append(Node(f"mlp{layer}", "mlp", layer, stage=1, input_role="mlp_in"))
            senders.append(Node(f"mlp{layer}", "mlp", layer, stage=1, output_role="mlp_out"))
    receivers.append(Node("logits", "logits", n, input_role="resid_post"))

    edges = [
        Edge(sender, receiver)
        for receiver in receivers
        for sender in senders
        if _reaches(sender, receiver, parallel or shared)
    ]
    return Graph(level, n, tuple(senders), tuple(receivers), tuple(edges))


def _reaches(sender: Node, receiver: Node, parallel: bool) -> bool:
    if sender.layer < receiver.layer:
        return True
    # Within one sequential block the mixer's write reaches the MLP's input.
    return sender.layer == receiver.layer and not parallel and sender.stage < receiver.stage
