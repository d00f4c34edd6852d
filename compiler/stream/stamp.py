"""Stamp the decoder layers of a reduced-depth export across the model's depth.

The exporter tags every node with the modules it came from (``pkg.torch.onnx.name_scopes``), so the export of a
T-layer copy splits into: constants (hoisted: the exporter shares them between scopes), the prologue (embedding,
mask, rotary tables), T layer slots, and the epilogue (final norm, head). A few nodes carry no layer scope but
belong to one (the step wrapper's Identity on ``past_key_values.i``): a node that reads only layer i's cache and
prologue values and feeds only layer i joins layer i.

Each slot reads constants, prologue values, its own weights and cache input, and the value its predecessor
hands on (the residual stream); anything else (a layer reading a layer two back, a head reading a middle layer)
has no place to stamp from, and the capture falls back to the whole model. Slots of one kind must be the same
node list (op, attributes, and inputs of the same role at every position); the first layer differs only in
reading the embedding (a prologue value) where the others read their predecessor.

Stamping keeps the template's layers as the model's first T layers, then for each layer j >= T clones the
slot whose (previous kind, kind) pair matches: its weights become ``<layers>.<j>.*`` initializers (their values
are attached by the caller), its cache I/O ``past_key_values.<j>.*`` / ``present.<j>.*``, its predecessor the
clone of layer j-1. The epilogue then reads layer N-1 instead of slot T-1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx_ir as ir

SCOPES = "pkg.torch.onnx.name_scopes"
INPUT_KIND = "pkg.torch.export.graph_signature.InputSpec.kind"  # PARAMETER, BUFFER, CONSTANT_TENSOR
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
PROLOGUE, EPILOGUE, CONST = "prologue", "epilogue", "const"


class StampError(Exception):
    """The template cannot be stamped; the message is the one-line reason the compile report gives."""


@dataclass
class Partition:
    owner: dict  # node -> slot index (int) | PROLOGUE | EPILOGUE | CONST
    slots: list[list[ir.Node]]
    index: dict = field(default_factory=dict)  # node -> position in its slot


def _layer_of_name(name: str | None, prefix: str) -> int | None:
    if not name or not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _scope_layer(node: ir.Node, pattern: re.Pattern) -> int | None:
    found = {int(m) for m in pattern.findall(node.metadata_props.get(SCOPES, ""))}
    if len(found) > 1:
        raise StampError(f"node {node.name} is tagged with layers {sorted(found)}")
    return found.pop() if found else None


def _past_layer(value: ir.Value) -> int | None:
    match = PAST.match(value.name or "") if value.is_graph_input() else None
    return int(match.group(1)) if match else None


def partition(graph: ir.Graph, prefix: str, depth: int) -> Partition:
    """Who owns every node of the raw export of a ``depth``-layer copy whose layers live under ``prefix``."""
    pattern = re.compile(rf"'{re.escape(prefix)}\.(\d+)'")
    nodes = list(graph)
    owner: dict = {}
    for node in nodes:
        layer_weight = any(v is not None and v.is_initializer() and _layer_of_name(v.name, prefix) is not None
                           for v in node.inputs)
        if not layer_weight and all(_is_constant(v, owner) for v in node.inputs):
            owner[node] = CONST
            continue
        layer = _scope_layer(node, pattern)
        if layer is not None:
            owner[node] = layer
    _assign_unscoped(nodes, owner)
    slots: list[list[ir.Node]] = [[] for _ in range(depth)]
    for node in nodes:
        if isinstance(owner[node], int):
            if owner[node] >= depth:
                raise StampError(f"node {node.name} is tagged with layer {owner[node]} of a {depth}-layer template")
            slots[owner[node]].append(node)
    index = {node: k for slot in slots for k, node in enumerate(slot)}
    return Partition(owner, slots, index)


def _is_constant(value: ir.Value | None, owner: dict) -> bool:
    if value is None:
        return True
    producer = value.producer()
    if producer is None:
        return value.is_initializer() and not value.is_graph_input()
    return owner.get(producer) == CONST


def _assign_unscoped(nodes: list[ir.Node], owner: dict) -> None:
    """Unscoped nodes: a node on one layer's cache input that feeds only that layer joins it; the rest are the
    prologue (no layer before them) or the epilogue."""
    layers_before: dict = {}
    for node in nodes:
        seen: set = set()
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer is None:
                past = _past_layer(value)
                seen |= {("past", past)} if past is not None else set()
            elif isinstance(owner.get(producer), int):
                seen.add(("layer", owner[producer]))
            else:
                seen |= layers_before.get(producer, set())
        layers_before[node] = seen
        if node not in owner:
            owner[node] = EPILOGUE if any(kind == "layer" for kind, _ in seen) else PROLOGUE
    changed = True
    while changed:  # a cache-input node whose every reader is layer i's is layer i's
        changed = False
        for node in reversed(nodes):
            if owner[node] != PROLOGUE:
                continue
            pasts = {i for kind, i in layers_before[node] if kind == "past"}
            readers = {owner[c] for out in node.outputs for c in out.consumers()}
            if len(pasts) == 1 and len(readers) == 1 and readers == pasts and \
                    not any(out.is_graph_output() for out in node.outputs):
                owner[node] = pasts.pop()
                changed = True


def _role(value: ir.Value | None, slot: int, part: Partition, prefix: str) -> tuple:
    """What an input of a slot-``slot`` node is, in terms that hold for every layer of its kind."""
    if value is None:
        return ("none",)
    producer = value.producer()
    if producer is None:
        if value.is_graph_input():
            past = PAST.match(value.name or "")
            if past is None:
                return ("shared", value)
            if int(past.group(1)) != slot:
                raise StampError(f"layer {slot} reads {value.name}")
            return ("past", past.group(2))
        layer = _layer_of_name(value.name, prefix)
        if layer is None:
            return ("shared", value)
        if layer != slot:
            raise StampError(f"layer {slot} reads the weight {value.name} of layer {layer}")
        relative = value.name.split(".", len(prefix.split(".")) + 1)[-1]
        if value.metadata_props.get(INPUT_KIND, "PARAMETER") == "PARAMETER":
            return ("weight", relative)
        # a buffer or a constant torch.export lifted (numbered model-wide: lifted_tensor_4 in one layer is
        # lifted_tensor_6 in the next): compared by value, stamped under the new layer's name
        return ("buffer", _tensor_key(value.const_value), relative)
    owner = part.owner[producer]
    if owner == CONST:
        return ("const", _constant_key(producer, value))
    if owner == PROLOGUE:
        return ("shared", value)
    where = (part.index[producer], producer.outputs.index(value))
    if owner == slot:
        return ("own", *where)
    if owner == slot - 1:
        return ("carry", *where)
    raise StampError(f"layer {slot} reads {value.name} of {owner if isinstance(owner, str) else f'layer {owner}'}; "
                     "only its predecessor's output can be stamped")


def _constant_key(node: ir.Node, value: ir.Value) -> tuple:
    """Equal keys for equal constants: the exporter repeats a constant in every layer that uses it."""
    inputs = tuple(("init", id(v)) if v is not None and v.producer() is None else
                   (_constant_key(v.producer(), v) if v is not None else None) for v in node.inputs)
    return (_signature(node), inputs, node.outputs.index(value))


def _tensor_key(tensor) -> tuple:
    return (str(tensor.dtype), tuple(tensor.shape), tensor.tobytes()) if tensor is not None else None


def _signature(node: ir.Node) -> tuple:
    attributes = tuple(sorted((name, _attribute_key(attr)) for name, attr in node.attributes.items()))
    return (node.domain, node.op_type, node.overload, attributes, len(node.inputs), len(node.outputs))


def _attribute_key(attr: ir.Attr):
    if attr.type == ir.AttributeType.TENSOR:
        tensor = attr.as_tensor()
        return (str(tensor.dtype), tuple(tensor.shape), tensor.tobytes())
    return repr(attr.value)


def _check_same_kind(part: Partition, a: int, b: int, prefix: str) -> None:
    """Slots ``a`` < ``b`` of one kind must be the same nodes reading the same roles; the first layer may read a
    prologue value where the others read their predecessor."""
    left, right = part.slots[a], part.slots[b]
    if len(left) != len(right):
        raise StampError(f"layers {a} and {b} are one kind but export {len(left)} and {len(right)} nodes")
    for x, y in zip(left, right):
        if _signature(x) != _signature(y):
            raise StampError(f"layers {a} and {b} differ at {x.name} ({x.op_type}) / {y.name} ({y.op_type})")
        for vx, vy in zip(x.inputs, y.inputs):
            rx, ry = _role(vx, a, part, prefix), _role(vy, b, part, prefix)
            first_layer_carry = a == 0 and rx[0] == "shared" and ry[0] == "carry"
            same_buffer = rx[0] == ry[0] == "buffer" and rx[1] == ry[1]  # names differ, values agree
            if rx != ry and not first_layer_carry and not same_buffer:
                raise StampError(f"layers {a} and {b} differ in an input of {x.name} ({x.op_type}): "
                                 f"{_describe(rx)} / {_describe(ry)}")


def _describe(role: tuple) -> str:
    if role[0] == "shared":
        return f"shared {role[1].name}"
    return "a constant" if role[0] == "const" else " ".join(map(str, role))


def check_template(part: Partition, kinds: list[str], prefix: str) -> None:
    """Every slot's inputs have a role (raises otherwise), slots of one kind agree, the epilogue reads only the
    last slot."""
    for slot, nodes in enumerate(part.slots):
        for node in nodes:
            for value in node.inputs:
                _role(value, slot, part, prefix)
            for out in node.outputs:
                if out.is_graph_output() and not PRESENT.match(out.name or ""):
                    raise StampError(f"layer {slot}'s {out.name} is a graph output")
    for b in range(len(kinds)):
        a = kinds.index(kinds[b])
        if a != b:
            _check_same_kind(part, a, b, prefix)
    last = len(part.slots) - 1
    for node, owner in part.owner.items():
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            source = part.owner.get(producer) if producer is not None else None
            if isinstance(source, int) and owner in (EPILOGUE, PROLOGUE, CONST) and source != last:
                raise StampError(f"{owner} node {node.name} reads {value.name} of layer {source}, not the last layer")


def source_slots(template_kinds: list[str], kinds: list[str]) -> list[int]:
    """For each layer of the model, the template slot it is copied from (layers below the template's depth are
    the template's own)."""
    depth = len(template_kinds)
    pairs = {}
    for s in range(1, depth):
        pairs.setdefault((template_kinds[s - 1], template_kinds[s]), s)
    sources = list(range(min(depth, len(kinds))))
    for j in range(depth, len(kinds)):
        if (kinds[j - 1], kinds[j]) not in pairs:
            raise StampError(f"layer {j} follows a {kinds[j - 1]} layer with a {kinds[j]} layer, which the template "
                             "does not show")
        sources.append(pairs[(kinds[j - 1], kinds[j])])
    return sources


def stamp(model: ir.Model, prefix: str, template_kinds: list[str], kinds: list[str]) -> ir.Model:
    """The template export ``model`` (in place) grown to ``len(kinds)`` layers; returns it.

    New layer weights are initializers without values, named ``<prefix>.<j>.<name in the layer>``; the caller
    attaches their tensors. Raises StampError when the template cannot be stamped.
    """
    graph = model.graph
    part = partition(graph, prefix, len(template_kinds))
    check_template(part, template_kinds, prefix)
    sources = source_slots(template_kinds, kinds)
    depth = len(template_kinds)
    if len(kinds) <= depth:
        return model
    produced = {j: part.slots[j] for j in range(depth)}  # layer -> its nodes, in slot order
    new_nodes = []
    for j in range(depth, len(kinds)):
        produced[j] = _clone_layer(graph, part, prefix, sources[j], j, produced[j - 1])
        new_nodes += produced[j]
    _repoint(part, produced[len(kinds) - 1])
    graph.extend(new_nodes)
    graph.sort()
    _order_io(graph)
    return model


def _clone_layer(graph: ir.Graph, part: Partition, prefix: str, slot: int, layer: int, previous: list) -> list:
    mapping: dict[ir.Value, ir.Value] = {}
    pasts: dict[str, ir.Value] = {}
    nodes = []
    for node in part.slots[slot]:
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise StampError(f"layer node {node.name} ({node.op_type}) holds a subgraph")
        inputs = []
        for value in node.inputs:
            role = _role(value, slot, part, prefix)
            if role[0] in ("none", "shared", "const"):
                inputs.append(value)
            elif role[0] == "own":
                inputs.append(mapping[value])
            elif role[0] == "carry":
                inputs.append(previous[role[1]].outputs[role[2]])
            elif role[0] == "past":
                if role[1] not in pasts:
                    pasts[role[1]] = _graph_input(graph, value, f"past_key_values.{layer}.{role[1]}")
                inputs.append(pasts[role[1]])
            else:  # a layer weight or buffer
                inputs.append(_initializer(graph, value, f"{prefix}.{layer}.{role[-1]}"))
        clone = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
                        num_outputs=len(node.outputs), version=node.version, name=f"{node.name}.l{layer}",
                        metadata_props=dict(node.metadata_props))
        for old, new in zip(node.outputs, clone.outputs):
            mapping[old] = new
            new.name = f"{old.name}.l{layer}" if old.name else None
            new.type, new.shape = old.type, old.shape.copy() if old.shape is not None else None
            if old.is_graph_output():
                present = PRESENT.match(old.name)
                new.name = f"present.{layer}.{present.group(2)}"
                graph.outputs.append(new)
        nodes.append(clone)
    return nodes


def _graph_input(graph: ir.Graph, template: ir.Value, name: str) -> ir.Value:
    value = ir.Value(name=name, type=template.type, shape=template.shape.copy() if template.shape is not None else None)
    graph.inputs.append(value)
    return value


def _initializer(graph: ir.Graph, template: ir.Value, name: str) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, type=template.type, shape=template.shape.copy() if template.shape is not None else None,
                     const_value=template.const_value)
    graph.register_initializer(value)
    return value


def _repoint(part: Partition, last: list) -> None:
    """Epilogue nodes read the model's last layer where they read the template's."""
    for node, owner in part.owner.items():
        if owner != EPILOGUE:
            continue
        for i, value in enumerate(node.inputs):
            producer = value.producer() if value is not None else None
            if producer is not None and producer in part.index and part.owner[producer] == len(part.slots) - 1:
                node.replace_input_with(i, last[part.index[producer]].outputs[producer.outputs.index(value)])


def _order_io(graph: ir.Graph) -> None:
    """Cache inputs and outputs in layer order, key before value, after the other inputs and outputs."""
    def key(value: ir.Value):
        match = PAST.match(value.name or "") or PRESENT.match(value.name or "")
        return (1, int(match.group(1)), match.group(2)) if match else (0, 0, "")

    for values in (graph.inputs, graph.outputs):
        ordered = sorted(values, key=key)  # stable: the other inputs keep their order
        values.clear()
        values.extend(ordered)
