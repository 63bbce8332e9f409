"""The tiling companions of an instance-norm translator, made from its exported ONNX graph by rewriting each
InstanceNormalization node (models/thumbnail_norm.py is the PyTorch definition they are checked against):

- the statistics graph computes what each node would normalize with, per image: mean then biased variance over
  height and width, all nodes' concatenated into one output `statistics` (N, 2 * sum of channels);
- the tile graph takes those statistics as a second input and normalizes with them instead.

Rewriting the graph instead of exporting two more PyTorch modules: the exporter took 2-3x as long as the
model's own export on these graphs, on every export of every instance-norm model.
"""

from __future__ import annotations

import copy

import onnx
from onnx import TensorProto, helper

from transfigure.pipeline.export import model_card as card

_SPATIAL = "tiles_spatial_axes"  # [2, 3]
_BATCH_AND_SPATIAL = "tiles_batch_and_spatial_axes"  # [0, 2, 3]
_CHANNEL_AXIS = "tiles_channel_axis"  # [1]


def instance_norm_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in proto.graph.node if node.op_type == "InstanceNormalization"]


def statistics_graph(proto: onnx.ModelProto, channels: list[int]) -> onnx.ModelProto:
    """`proto` with one output, `statistics`: [mean_1, var_1, mean_2, var_2, ...] along axis 1."""
    model = copy.deepcopy(proto)
    graph = model.graph
    del graph.value_info[:]  # shapes of tensors that go away; the checker infers the rest again
    _add_axes(graph)
    parts = []
    for index, node in enumerate(_checked(model, channels)):
        x, name = node.input[0], f"tiles_statistics_{index}"
        graph.node.extend(
            [
                helper.make_node("ReduceMean", [x, _SPATIAL], [f"{name}_mean4"], keepdims=1),
                helper.make_node("Sub", [x, f"{name}_mean4"], [f"{name}_centred"]),
                helper.make_node("Mul", [f"{name}_centred", f"{name}_centred"], [f"{name}_squared"]),
                helper.make_node("ReduceMean", [f"{name}_squared", _SPATIAL], [f"{name}_var"], keepdims=0),
                helper.make_node("Squeeze", [f"{name}_mean4", _SPATIAL], [f"{name}_mean"]),
            ]
        )
        parts += [f"{name}_mean", f"{name}_var"]
    graph.node.append(helper.make_node("Concat", parts, [card.STATISTICS], axis=1))
    width = 2 * sum(channels)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(card.STATISTICS, TensorProto.FLOAT, ["batch", width]))
    _drop_unused(graph)
    return model


def tile_graph(proto: onnx.ModelProto, channels: list[int]) -> onnx.ModelProto:
    """`proto` with a second input `statistics` (N, 2 * sum of channels) that every instance norm uses."""
    model = copy.deepcopy(proto)
    graph = model.graph
    _add_axes(graph)
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    graph.input.append(helper.make_tensor_value_info(card.STATISTICS, TensorProto.FLOAT, [batch, 2 * sum(channels)]))
    replaced, start = {}, 0
    for index, (node, count) in enumerate(zip(_checked(model, channels), channels, strict=True)):
        x, scale, bias = node.input
        name, eps = f"tiles_norm_{index}", helper.get_attribute_value(node.attribute[0])
        bounds = {"mean": (start, start + count), "var": (start + count, start + 2 * count)}
        start += 2 * count
        nodes = []
        for part, (low, high) in bounds.items():
            low_name, high_name = f"{name}_{part}_low", f"{name}_{part}_high"
            graph.initializer.extend(
                [
                    helper.make_tensor(low_name, TensorProto.INT64, [1], [low]),
                    helper.make_tensor(high_name, TensorProto.INT64, [1], [high]),
                ]
            )
            nodes += [
                helper.make_node("Slice", [card.STATISTICS, low_name, high_name, _CHANNEL_AXIS], [f"{name}_{part}2"]),
                helper.make_node("Unsqueeze", [f"{name}_{part}2", _SPATIAL], [f"{name}_{part}"]),
            ]
        graph.initializer.append(helper.make_tensor(f"{name}_eps", TensorProto.FLOAT, [], [eps]))
        nodes += [
            helper.make_node("Add", [f"{name}_var", f"{name}_eps"], [f"{name}_var_eps"]),
            helper.make_node("Sqrt", [f"{name}_var_eps"], [f"{name}_std"]),
            helper.make_node("Sub", [x, f"{name}_mean"], [f"{name}_centred"]),
            helper.make_node("Div", [f"{name}_centred", f"{name}_std"], [f"{name}_normalized"]),
            helper.make_node("Unsqueeze", [scale, _BATCH_AND_SPATIAL], [f"{name}_scale"]),
            helper.make_node("Unsqueeze", [bias, _BATCH_AND_SPATIAL], [f"{name}_bias"]),
            helper.make_node("Mul", [f"{name}_normalized", f"{name}_scale"], [f"{name}_scaled"]),
            helper.make_node("Add", [f"{name}_scaled", f"{name}_bias"], [node.output[0]]),
        ]
        replaced[node.output[0]] = nodes
    rebuilt = []
    for node in graph.node:
        is_norm = node.op_type == "InstanceNormalization"
        rebuilt += replaced[node.output[0]] if is_norm else [copy.deepcopy(node)]
    del graph.node[:]
    graph.node.extend(rebuilt)
    return model


def _checked(model: onnx.ModelProto, channels: list[int]) -> list[onnx.NodeProto]:
    nodes = instance_norm_nodes(model)
    if len(nodes) != len(channels):
        raise ValueError(
            f"the exported graph has {len(nodes)} InstanceNormalization nodes; the network has {len(channels)}"
        )
    return nodes


def _add_axes(graph: onnx.GraphProto) -> None:
    graph.initializer.extend(
        [
            helper.make_tensor(_SPATIAL, TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor(_BATCH_AND_SPATIAL, TensorProto.INT64, [3], [0, 2, 3]),
            helper.make_tensor(_CHANNEL_AXIS, TensorProto.INT64, [1], [1]),
        ]
    )


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes after the last instance norm (the statistics graph does not need the output image)."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(copy.deepcopy(node))
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    kept_initializers = [copy.deepcopy(init) for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
