"""Grouped int8 weights (builder/engines/openvino_grouped_int8.py) on a small OpenVINO model:
the layout the CPU plugin fuses, the group size carried in the IR, and the accuracy that grouping
buys over nncf's per-channel int8."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from builder.build.engines import openvino_grouped_int8 as grouped

VOCAB, WIDTH, HIDDEN, OUT = 50, 128, 96, 40


def _weights():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, WIDTH)).astype(np.float32)
    w1 = rng.normal(size=(HIDDEN, WIDTH)).astype(np.float32)
    w1[:, 64:] *= 0.01               # the second group of input channels is 100x smaller
    w2 = rng.normal(size=(OUT, HIDDEN)).astype(np.float32)   # 96 inputs: no whole groups of 64
    return table, w1, w2


def _model():
    """ids -> embedding table -> linear (128 -> 96) -> linear (96 -> 40), as torch exports them."""
    from openvino import opset13 as ops

    table, w1, w2 = _weights()
    ids = ops.parameter([-1], ov.Type.i64, name="ids")
    x = ops.gather(ops.constant(table), ids, ops.constant(np.int64(0)))
    x = ops.matmul(x, ops.constant(w1), transpose_a=False, transpose_b=True)
    x = ops.matmul(x, ops.constant(w2), transpose_a=False, transpose_b=True)
    return ov.Model([x], [ids], "tiny")


def _weight_constants(model):
    return sorted(tuple(op.get_output_partial_shape(0).to_shape()) for op in model.get_ops()
                  if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.u8
                  and op.get_output_partial_shape(0).rank.get_length() >= 2 and op.get_output_partial_shape(0)[-1] != 1)


def _run(model, ids, **config):
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **config})
    return compiled({"ids": ids})[0]


def test_matmul_weights_are_grouped_and_the_rest_per_channel():
    model = grouped.compress(_model(), 64)
    # w1 in 2 groups of 64; w2 (96 inputs) and the embedding table per channel, by nncf
    assert _weight_constants(model) == sorted([(HIDDEN, 2, 64), (OUT, HIDDEN), (VOCAB, WIDTH)])


def test_the_group_size_travels_in_the_ir(tmp_path):
    ov.save_model(grouped.compress(_model(), 64), tmp_path / "m.xml", compress_to_fp16=False)
    model = ov.Core().read_model(tmp_path / "m.xml")
    assert model.get_rt_info(["runtime_options", grouped.DYNAMIC_QUANTIZATION]).astype(str) == "64"
    compiled = ov.Core().compile_model(tmp_path / "m.xml", "CPU")
    assert int(compiled.get_property(grouped.DYNAMIC_QUANTIZATION)) == 64


def test_groups_keep_small_channels_that_per_channel_scales_flatten():
    """The first linear's last 64 inputs are 100x smaller than its first 64: one scale per output
    channel rounds them coarsely, one per group does not. Weight error only (no activation
    quantization), on the layer's output."""
    import nncf
    from openvino import opset13 as ops

    table, w1, _ = _weights()
    ids = np.arange(VOCAB, dtype=np.int64)
    x = table.copy()
    x[:, :64] = 0.0                       # only the small channels contribute
    reference = x @ w1.T

    def first_layer():
        p = ops.parameter([-1, WIDTH], ov.Type.f32, name="x")
        return ov.Model([ops.matmul(p, ops.constant(w1), False, True)], [p], "one")

    def error(model):
        out = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     grouped.DYNAMIC_QUANTIZATION: "0"})({"x": x})[0]
        return float(np.abs(out - reference).max() / np.abs(reference).max())

    per_channel = error(nncf.compress_weights(first_layer(), mode=nncf.CompressWeightsMode.INT8_ASYM))
    by_group = error(grouped.compress(first_layer(), 64))
    assert by_group < 0.01 and by_group * 20 < per_channel, (by_group, per_channel)
    # and the whole model stays close to its float output
    full = _run(_model(), ids)
    got = _run(grouped.compress(_model(), 64), ids, **{grouped.DYNAMIC_QUANTIZATION: "0"})
    assert np.linalg.norm(got - full) / np.linalg.norm(full) < 0.01


def test_a_group_size_must_be_positive():
    with pytest.raises(ValueError, match="group size must be positive"):
        grouped.compress(_model(), 0)
