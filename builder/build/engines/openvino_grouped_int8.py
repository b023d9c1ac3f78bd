"""int8 weights with a scale and zero point per group of input channels (CPU encoders).

Why: for int8-compressed layers OpenVINO's CPU plugin quantizes the activations on the fly, per
group of `DYNAMIC_QUANTIZATION_GROUP_SIZE` input channels, and rescales each group's integer
partial sums; the group can be no larger than the weights' own. nncf's INT8 modes are per output
channel only (its API refuses a group size), which leaves the CPU at its default group of 32, the
slowest. Weights grouped by 64 with activations grouped by 64 run MiniLM ~10% faster at the
accuracy of per-channel weights with groups of 32 (measurements: docs/embeddings.md).

nncf still does the quantization arithmetic (`do_integer_quantization`, INT8_ASYM with a group
size). Only the decompression subgraph is written here, in the layout nncf itself writes for
grouped 4-bit weights (u8 [N, K/G, G] -> f16, minus zero point, times scale -> [N, K] -> f32),
which the CPU plugin fuses into one compressed FullyConnected. The group size travels inside the
IR (rt_info runtime_options), so every runtime that compiles the engine uses it.
"""

from __future__ import annotations

import numpy as np

DYNAMIC_QUANTIZATION = "DYNAMIC_QUANTIZATION_GROUP_SIZE"


def _grouped_weight(op, group_size: int):
    """The [N, K] float weight of a MatMul(x, W, transpose_b) when K splits into groups, else None."""
    import openvino as ov

    node = op.input_value(1).get_node()
    if node.get_type_name() != "Constant" or not op.get_attributes().get("transpose_b"):
        return None
    if node.get_output_element_type(0) not in (ov.Type.f32, ov.Type.f16):  # numpy has no bf16
        return None
    weight = node.get_data()
    if weight.ndim != 2 or weight.shape[1] % group_size:
        return None
    return np.asarray(weight, dtype=np.float32)


def _decompression(weight: np.ndarray, group_size: int):
    """Grouped u8 constants and the subgraph that turns them back into the f32 [N, K] weight."""
    import nncf
    import openvino as ov
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
    from nncf.quantization.algorithms.weight_compression.weight_lowering import do_integer_quantization
    from nncf.tensor import Tensor
    from openvino import opset13 as ops

    config = WeightCompressionConfig(mode=nncf.CompressWeightsMode.INT8_ASYM, group_size=group_size)
    compressed = do_integer_quantization(Tensor(weight), config, reduction_axes=(1,))
    q, scale, zero = (np.asarray(t.data) for t in (compressed.tensor, compressed.scale, compressed.zero_point))
    x = ops.convert(ops.constant(q.astype(np.uint8), ov.Type.u8), ov.Type.f16)
    x = ops.subtract(x, ops.convert(ops.constant(zero.astype(np.uint8), ov.Type.u8), ov.Type.f16))
    x = ops.multiply(x, ops.constant(scale.astype(np.float16), ov.Type.f16))
    x = ops.reshape(x, ops.constant(np.array(weight.shape, dtype=np.int64)), special_zero=False)
    return ops.convert(x, ov.Type.f32)


def compress(model, group_size: int):
    """int8 asymmetric weights: MatMul weights stored [out, in] in groups of `group_size` input
    channels; every other weight (embedding tables, layers whose input width does not split into
    groups) per output channel by nncf."""
    import nncf

    if group_size <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    for op in model.get_ops():
        if op.get_type_name() == "MatMul" and (weight := _grouped_weight(op, group_size)) is not None:
            op.input(1).replace_source_output(_decompression(weight, group_size).output(0))
    model.validate_nodes_and_infer_types()
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    model.set_rt_info(str(group_size), ["runtime_options", DYNAMIC_QUANTIZATION])
    return model
