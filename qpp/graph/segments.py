"""Run a captured graph from a cut point on, with the values that cross the cut cached.

A search that changes one node at a time, in graph order (the per-layer choice of per-input
ranges tries each candidate for one activation quantizer with every other fixed), reruns the
whole model for every try, although nothing before the changed node can change: the node list
is a topological order, so a node earlier in it does not depend on a later one. ``Segments``
keeps the values that cross the cut (computed before it, read at or after it) and runs only the
nodes from the cut on, so a sweep over the nodes in order costs about half the full runs.
Memory stays at one forward pass: values are dropped after their last use, as in
``torch.fx.Interpreter`` with ``garbage_collect_values``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

Batch = Sequence[torch.Tensor]
#: The values crossing a cut, by node: enough to run the graph from the cut on.
CutValues = dict[Node, object]


class Segments:
    """Runs ``graph_module``'s nodes ``[start, stop)`` from the values crossing ``start``."""

    def __init__(self, graph_module: GraphModule) -> None:
        self.graph_module = graph_module
        self.nodes = list(graph_module.graph.nodes)
        position = {node: index for index, node in enumerate(self.nodes)}
        self.last_use = {
            node: max((position[user] for user in node.users), default=index)
            for index, node in enumerate(self.nodes)
        }
        self._freed_at: dict[int, list[Node]] = {}
        for node, last in self.last_use.items():
            self._freed_at.setdefault(last, []).append(node)

    def cut_of(self, module_target: str) -> int:
        """The position of the first node that calls the submodule ``module_target``."""
        for index, node in enumerate(self.nodes):
            if node.op == "call_module" and node.target == module_target:
                return index
        raise KeyError(f"no node of the graph calls '{module_target}'")

    def crossing(self, cut: int) -> list[Node]:
        """Nodes before ``cut`` whose value a node at or after it reads."""
        return [node for node in self.nodes[:cut] if self.last_use[node] >= cut]

    def prefix(self, batch: Batch, stop: int) -> CutValues:
        """Run nodes ``[0, stop)`` on ``batch`` (the module's positional inputs) and return
        the values crossing ``stop``."""
        inputs = tuple(self.graph_module.graph.process_inputs(*batch))
        env = self._run({}, 0, stop, inputs)
        return {node: env[node] for node in self.crossing(stop)}

    def advance(self, values: CutValues, start: int, stop: int) -> CutValues:
        """Run nodes ``[start, stop)`` from ``values`` (those crossing ``start``) and return
        the values crossing ``stop``."""
        env = self._run(values, start, stop)
        return {node: env[node] for node in self.crossing(stop)}

    def outputs(self, values: CutValues, start: int) -> object:
        """Run the graph from ``start`` (``values``: those crossing it) to its output, and
        return what the module's call returns."""
        env = self._run(values, start, len(self.nodes))
        return self.graph_module.graph.process_outputs(env[self.nodes[-1]])

    def _run(
        self, values: CutValues, start: int, stop: int, inputs: tuple[object, ...] = ()
    ) -> dict[Node, object]:
        interpreter = Interpreter(self.graph_module, garbage_collect_values=False)
        interpreter.env = dict(values)
        interpreter.args_iter = iter(inputs)
        with torch.no_grad():
            for index in range(start, stop):
                node = self.nodes[index]
                interpreter.env[node] = interpreter.run_node(node)
                for dead in self._freed_at.get(index, ()):
                    if dead is not node:
                        interpreter.env.pop(dead, None)
        return interpreter.env
