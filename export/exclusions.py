"""What the int8-cpu file keeps in float: node groups found from the graph's op patterns (not from node
names, so any architecture's graph is read the same way), each with the reason export.json records."""

from __future__ import annotations

from typing import Any

#: Reasons recorded in the export for each pattern kept in float32 by the int8-cpu quantisation.
EXCLUSION_REASONS = {
    "squeeze-excitation": (
        "squeeze-excitation block (global pool -> 1x1 projections -> sigmoid gate -> channel product): the "
        "gate rescales whole channels, so one 8-bit step on it moves every value of a channel; it costs "
        "almost no compute (1x1 tensors) and is kept in float"
    ),
    "hard-swish": (
        "hard-swish / hard-sigmoid: its output range is lopsided (min -0.375, max unbounded) and onnxruntime "
        "has no 8-bit kernel for it, so quantising around it only adds rounding; kept in float"
    ),
    "embedding-head": (
        "embedding head (the last projection and what follows it up to the output): its rounding error goes "
        "straight into the embedding the search compares, with no later layer to average it out; kept in float"
    ),
}
#: Ops a squeeze-excitation gate is built of between its global pool and its channel product.
_SE_INNER = {"Conv", "Gemm", "MatMul", "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Add", "Mul", "Div",
             "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"}
_SE_GATES = {"Sigmoid", "HardSigmoid"}
_WEIGHTED = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def find_exclusions(proto) -> list[dict[str, Any]]:
    """The node groups of ``proto`` (a float32 ONNX ModelProto) the int8-cpu file keeps in float.

    Found by op pattern, not by name, so any architecture's graph is read the same way:
    - ``squeeze-excitation``: a channel product ``Mul(x, gate)`` whose gate is computed from a global
      average pool of the same ``x`` through 1x1 projections and a sigmoid or hard-sigmoid;
    - ``hard-swish``: ``HardSwish`` and ``HardSigmoid`` nodes, and the ``Mul(x, HardSigmoid(x))`` form;
    - ``embedding-head``: the last weighted projection (Conv / Gemm / MatMul) before the output and every
      node after it, the L2 normalisation included.
    Returns ``[{"pattern", "nodes", "reason"}]``, one entry per pattern found (nodes in graph order); a
    node belongs to one entry only (the first pattern that claims it).
    """
    graph = _Graph(proto.graph)
    groups: dict[str, list[str]] = {}
    claimed: set[str] = set()
    for pattern, find in (("squeeze-excitation", _squeeze_excitation), ("hard-swish", _hard_swish),
                          ("embedding-head", _embedding_head)):
        groups[pattern] = [n for n in find(graph, claimed) if n not in claimed]
        claimed |= set(groups[pattern])
    order = {n.name: i for i, n in enumerate(proto.graph.node)}
    return [{"pattern": pattern, "nodes": sorted(nodes, key=lambda n: order.get(n, 0)),
             "reason": EXCLUSION_REASONS[pattern]} for pattern, nodes in groups.items() if nodes]


class _Graph:
    """The lookups the patterns read a graph through: who produces and who reads each tensor."""

    def __init__(self, graph) -> None:
        self.nodes = list(graph.node)
        self.consts = {i.name for i in graph.initializer}
        self.consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        self.producers = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inputs = {i.name for i in graph.input}
        self.outputs = [o.name for o in graph.output]

    def acts(self, node) -> list[str]:
        """The inputs of ``node`` computed from the image (not weights, constants or shapes)."""
        out = []
        for name in node.input:
            if not name or name in self.consts:
                continue
            p = self.producers.get(name)
            if (p is None and name not in self.inputs) or (p is not None and p.op_type in ("Constant", "Shape")):
                continue
            out.append(name)
        return out


def _squeeze_excitation(g: _Graph, claimed: set[str]) -> dict[str, None]:
    """Each SE block's nodes, its channel product included."""
    found: dict[str, None] = {}
    for mul in g.nodes:
        if mul.op_type != "Mul":
            continue
        ins = g.acts(mul)
        if len(ins) != 2:
            continue
        for gate_in, x in (ins, ins[::-1]):
            block = _se_block(gate_in, x, g.producers, g.acts)
            if block:
                found.update(dict.fromkeys([*block, mul.name]))
                break
    return found


def _hard_swish(g: _Graph, claimed: set[str]) -> dict[str, None]:
    """Hard-swish / hard-sigmoid nodes outside squeeze-excitation blocks, ``Mul(x, HardSigmoid(x))`` too."""
    found: dict[str, None] = {}
    for node in g.nodes:
        if node.name in claimed:
            continue
        if node.op_type in ("HardSwish", "HardSigmoid"):
            found[node.name] = None
        elif node.op_type == "Mul":
            ins = g.acts(node)
            for a, b in (ins, ins[::-1]) if len(ins) == 2 else ():
                p = g.producers.get(a)
                if p is not None and p.op_type == "HardSigmoid" and p.input[0] == b:
                    found[node.name] = None
                    break
    return found


def _embedding_head(g: _Graph, claimed: set[str]) -> dict[str, None]:
    """From the output back to the last weighted projection."""
    head: dict[str, None] = {}
    todo = list(g.outputs)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = g.producers.get(name)
        if node is None or node.op_type == "Constant":
            continue
        head[node.name] = None
        if node.op_type in _WEIGHTED and any(i in g.consts for i in node.input[1:2]):
            continue  # the last projection: stop here
        for inp in g.acts(node):
            # A tensor that nodes outside the head also read (a residual stream) is where the head
            # ends; x in x / max(||x||, eps) is read by the norm and the division, both in the head
            # once the walk has passed them, so the walk goes on through it.
            if any(c.name not in head for c in g.consumers.get(inp, [])):
                continue
            todo.append(inp)
    return head


def name_nodes(graph) -> bool:
    """Give every unnamed or twice-named node of ``graph`` a unique name; whether any was renamed."""
    seen: set[str] = set()
    renamed = False
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
            renamed = True
        seen.add(node.name)
    return renamed


def _se_block(gate_in: str, x: str, producers: dict, acts) -> list[str] | None:
    """The nodes between a global pool of ``x`` and the gate tensor ``gate_in`` (pool included), when
    ``gate_in`` is a squeeze-excitation gate of ``x``; None otherwise."""
    start = producers.get(gate_in)
    if start is None or start.op_type not in _SE_GATES:
        return None
    block: dict[str, None] = {}
    todo, pooled = [start], False
    while todo:
        node = todo.pop()
        if node.name in block:
            continue
        if len(block) > 16:
            return None
        block[node.name] = None
        if _is_global_pool(node):
            if node.input[0] != x:
                return None
            pooled = True
            continue
        if node.op_type not in _SE_INNER:
            return None
        for name in acts(node):
            p = producers.get(name)
            if p is None:
                return None
            todo.append(p)
    return list(block) if pooled else None


def _is_global_pool(node) -> bool:
    """GlobalAveragePool, or a ReduceMean that keeps dims over the two spatial axes."""
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    attrs = {a.name: a for a in node.attribute}
    keep = attrs["keepdims"].i if "keepdims" in attrs else 1
    axes = list(attrs["axes"].ints) if "axes" in attrs else None
    return bool(keep) and (axes is None or sorted(axes) in ([2, 3], [-2, -1]) or len(node.input) > 1)
