"""An embedding encoder's compressed weights (fp16, int8, fp8 IRs): kept compressed where a CPU
kernel computes on them, expanded to f32 once at load where the plugin would decompress them on
every call instead.

An encoder is compute-bound (thousands of tokens per call), so decompressing the weights on each
call is pure overhead when nothing faster consumes them. Measured on an AVX2-only AMD Zen3 host
(2026-12-02, docs/embeddings.md): the int8 encoder ran at 129-157 texts/s against fp32's 163-175
(the plugin applies no dynamic quantization there, and its int8 kernels are slower than f32 ones),
fp16 slower than fp32 everywhere; expanded at load they run at fp32's speed with their own
outputs (cosine 1.000000 against the compressed engine). Where a kernel does use the compressed
form it is kept: int8 with dynamic quantization from the avx512 class up (1.4x fp32 on Zen4), fp8
under bf16 compute on bf16 classes. Expanded weights take f32's memory (MiniLM: 86 MiB of weights
instead of 22 for int8 or 43 for fp16), the embedding table included: OpenVINO's Python API cannot
exclude a subgraph from ConstantFolding, and only its gathered rows would need decompressing.
"""

from __future__ import annotations

from backends.cpu_isa import at_least

# element types of weight constants that the IR decompresses (Constant -> Convert), by family
_COMPRESSED = {"f16": "f16", "u8": "int8", "i8": "int8", "u4": "int4", "i4": "int4",
               "f8e4m3": "f8", "f8e5m2": "f8"}


def compressed_weights(model) -> set[str]:
    """The families of compressed weights in an OpenVINO model: Constants decompressed by a Convert."""
    found = set()
    for op in model.get_ops():
        if op.get_type_name() != "Convert":
            continue
        source = op.input_value(0).get_node()
        if source.get_type_name() == "Constant":
            family = _COMPRESSED.get(source.get_output_element_type(0).get_type_name())
            if family:
                found.add(family)
    return found


def computes_on(family: str, inference_precision: str, isa_class: str) -> bool:
    """Whether this host has a kernel that computes on weights of this family directly."""
    # dynamic quantization of the activations: measured on AVX-512 with VNNI (Zen4); assumed for
    # AVX-512 without VNNI (the LLM build measured it available there, under a cap), not on AVX2_VNNI
    if family in ("int8", "int4"):
        return at_least(isa_class, "avx512")
    if family == "f8":                 # fp8 weights under bf16 compute
        return inference_precision == "bf16" and at_least(isa_class, "avx512_bf16")
    return False                       # f16 weights under f32 compute: decompressed on every call


def expand_at_load(model, inference_precision: str, isa_class: str) -> bool:
    """Whether to expand the model's compressed weights to f32 when it loads on this host."""
    return any(not computes_on(f, inference_precision, isa_class) for f in compressed_weights(model))


def expanded(model):
    """The model with every constant subgraph folded: compressed weights become f32 Constants."""
    from openvino.passes import ConstantFolding, Manager

    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)
    return model
