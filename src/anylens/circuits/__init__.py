"""Circuits: the component graph, path patching and edge attribution, built on roles."""

from .eap import METHODS, EdgeScores, edge_attribution
from .experiment import circuit
from .graph import LEVELS, Edge, Graph, Node, component_graph, missing_graph_roles
from .result import CircuitResult

__all__ = [
    "LEVELS",
    "METHODS",
    "CircuitResult",
    "Edge",
    "EdgeScores",
    "Graph",
    "Node",
    "circuit",
    "component_graph",
    "edge_attribution",
    "missing_graph_roles",
]
