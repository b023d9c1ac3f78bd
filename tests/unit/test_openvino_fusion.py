"""Projections that share an input fused into one MatMul (builder/build/engines/openvino_fusion.py),
on small OpenVINO graphs compiled for this CPU: same outputs to the bit, fewer MatMuls, and
graphs it must not touch left alone."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from builder.build.engines.openvino_fusion import fuse_shared_input_matmuls

IN = 64


def compressed(rows: int, rng: np.random.Generator, weight_type=np.uint8):
    """nncf's INT8_ASYM per-channel pattern: u8 rows, a zero point and a scale per output row."""
    w = ops.constant(rng.integers(0, 127, (rows, IN)).astype(weight_type))
    zp = ops.constant(rng.integers(40, 80, (rows, 1)).astype(weight_type))
    scale = ops.constant(rng.uniform(0.001, 0.02, (rows, 1)).astype(np.float16))
    sub = ops.subtract(ops.convert(w, ov.Type.f16), ops.convert(zp, ov.Type.f16))
    return ops.convert(ops.multiply(sub, scale), ov.Type.f32)


def model(weights: list) -> ov.Model:
    x = ops.parameter([-1, IN], ov.Type.f32, name="x")
    hidden = ops.relu(x)                          # the shared input, as a layer norm's output
    outs = [ops.result(ops.relu(ops.matmul(hidden, w, False, True))) for w in weights]   # as RoPE or act
    return ov.Model(outs, [x])


def run(m: ov.Model, x: np.ndarray) -> list[np.ndarray]:
    compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(x)
    return [result[o] for o in compiled.outputs]


def count(m: ov.Model, kind: str) -> int:
    return sum(op.get_type_name() == kind for op in m.get_ordered_ops())


@pytest.mark.parametrize("tokens", [1, 7])
def test_three_projections_become_one_matmul_with_the_same_outputs(tokens):
    def build():                                 # the same weights in both models
        rng = np.random.default_rng(7)
        return model([compressed(48, rng), compressed(16, rng), compressed(16, rng)])

    x = np.random.default_rng(1).standard_normal((tokens, IN)).astype(np.float32)
    before, fused = build(), build()
    assert fuse_shared_input_matmuls(fused) == 1
    assert count(fused, "MatMul") == 1 and count(fused, "VariadicSplit") == 1
    got, want = run(fused, x), run(before, x)
    assert [g.shape for g in got] == [(tokens, 48), (tokens, 16), (tokens, 16)]
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_uncompressed_or_lonely_weights_are_left_alone():
    rng = np.random.default_rng(3)
    plain = model([ops.constant(rng.standard_normal((8, IN)).astype(np.float32)),
                   ops.constant(rng.standard_normal((8, IN)).astype(np.float32))])
    assert fuse_shared_input_matmuls(plain) == 0 and count(plain, "MatMul") == 2   # fp32: the reference
    single = model([compressed(8, rng)])
    assert fuse_shared_input_matmuls(single) == 0


def test_projections_of_different_layouts_are_not_fused_together():
    """A zero point of another type makes another decompression: two groups of one, no fusion."""
    rng = np.random.default_rng(5)
    mixed = model([compressed(8, rng, np.uint8), compressed(8, rng, np.int8)])
    assert fuse_shared_input_matmuls(mixed) == 0 and count(mixed, "MatMul") == 2


def scalar_zero_point(rows: int, rng: np.random.Generator, zero: int):
    """u8 rows with one zero point for the whole tensor (a Constant shared, not per row)."""
    w = ops.constant(rng.integers(0, 127, (rows, IN)).astype(np.uint8))
    sub = ops.subtract(ops.convert(w, ov.Type.f32), ops.convert(ops.constant(np.array([[zero]], np.uint8)),
                                                                 ov.Type.f32))
    return ops.multiply(sub, ops.constant(rng.uniform(0.001, 0.02, (rows, 1)).astype(np.float32)))


def test_a_shared_constant_must_be_the_same_to_fuse():
    rng = np.random.default_rng(11)
    differ = model([scalar_zero_point(8, rng, 3), scalar_zero_point(8, rng, 5)])
    assert fuse_shared_input_matmuls(differ) == 0
    x = np.random.default_rng(2).standard_normal((3, IN)).astype(np.float32)
    same, fused = (model([scalar_zero_point(8, np.random.default_rng(4), 3),
                          scalar_zero_point(8, np.random.default_rng(5), 3)]) for _ in range(2))
    assert fuse_shared_input_matmuls(fused) == 1
    assert all(np.array_equal(g, w) for g, w in zip(run(fused, x), run(same, x), strict=True))


def test_a_matmul_that_is_a_model_output_keeps_its_own_tensor():
    rng = np.random.default_rng(17)
    x = ops.parameter([-1, IN], ov.Type.f32, name="x")
    hidden = ops.relu(x)
    m = ov.Model([ops.result(ops.matmul(hidden, compressed(8, rng), False, True)) for _ in range(2)], [x])
    assert fuse_shared_input_matmuls(m) == 0


def test_per_column_constants_and_fp16_weights_are_left_alone():
    """A square weight scaled per input column ([in], broadcast from the last axis) is not rows;
    fp16 weights are not integer weights."""
    rng = np.random.default_rng(13)

    def per_column():
        w = ops.convert(ops.constant(rng.integers(0, 127, (IN, IN)).astype(np.uint8)), ov.Type.f32)
        return ops.multiply(w, ops.constant(rng.uniform(0.001, 0.02, (IN,)).astype(np.float32)))

    square = model([per_column(), per_column()])
    assert fuse_shared_input_matmuls(square) == 0
    half = model([ops.convert(ops.constant(rng.standard_normal((8, IN)).astype(np.float16)), ov.Type.f32)
                  for _ in range(2)])
    assert fuse_shared_input_matmuls(half) == 0



def grouped_int4(rows: int, rng: np.random.Generator, group: int, kind=ov.Type.u4):
    """nncf's INT4_ASYM grouped pattern: u4 [rows, groups, group size], a u4 zero point and an f16
    scale per row and group, reshaped to [rows, IN]."""
    groups = IN // group
    w = ops.constant(rng.integers(0, 8, (rows, groups, group)).astype(np.uint8), dtype=kind)
    zp = ops.constant(rng.integers(0, 8, (rows, groups, 1)).astype(np.uint8), dtype=kind)
    scale = ops.constant(rng.uniform(0.001, 0.02, (rows, groups, 1)).astype(np.float16))
    decompressed = ops.multiply(ops.subtract(ops.convert(w, ov.Type.f16), ops.convert(zp, ov.Type.f16)), scale)
    flat = ops.reshape(decompressed, ops.constant(np.array([rows, IN], dtype=np.int64)), False)
    return ops.convert(flat, ov.Type.f32)


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("rows,group", [((24, 8, 8), 16), ((9, 3, 3), IN)],
                         ids=["byte-aligned", "odd-nibbles"])   # 9 x 1 zero points: 4.5 bytes, packed again
def test_grouped_int4_projections_fuse_with_the_same_outputs(tokens, rows, group):
    def build():
        rng = np.random.default_rng(11)
        return model([grouped_int4(r, rng, group) for r in rows])

    x = np.random.default_rng(2).standard_normal((tokens, IN)).astype(np.float32)
    before, fused = build(), build()
    assert fuse_shared_input_matmuls(fused) == 1
    assert count(fused, "MatMul") == 1 and count(fused, "Reshape") == 1
    got, want = run(fused, x), run(before, x)
    assert [g.shape for g in got] == [(tokens, r) for r in rows]
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_int4_groups_of_another_size_are_not_fused_together():
    """The group size is part of the layout: rows grouped by 16 and by 32 stay apart."""
    rng = np.random.default_rng(13)
    mixed = model([grouped_int4(8, rng, 16), grouped_int4(8, rng, 32)])
    assert fuse_shared_input_matmuls(mixed) == 0 and count(mixed, "MatMul") == 2


def test_signed_int4_is_left_alone():
    """i4 Constants cannot be read back unpacked on this OpenVINO (`get_vector` refuses them)."""
    rng = np.random.default_rng(17)
    signed = model([grouped_int4(8, rng, 16, ov.Type.i4), grouped_int4(8, rng, 16, ov.Type.i4)])
    assert fuse_shared_input_matmuls(signed) == 0 and count(signed, "MatMul") == 2
