"""Circuits: the component graph, path patching and edge attribution, built on roles."""

from .graph import LEVELS, Edge, Graph, Node, component_graph, missing_graph_roles

__all__ = ["LEVELS", "Edge", "Graph", "Node", "component_graph", "missing_graph_roles"]
