"""int4 in the precision table and at the spec's edge: LLMs take it, embeddings refuse it in one
line naming what works, and its floors sit between the measured recipes (docs/llm-deployments.md)."""

from __future__ import annotations

import pytest

from backends.contract.precisions import INT4_GROUP_SIZE, LLM_ONLY, PRECISIONS, parse_precisions
from backends.errors import InvalidArgumentError
from builder.build.deployment import DeploymentSpec
from builder.build.engines.openvino_common import quantization_of


def test_llms_take_int4():
    spec = DeploymentSpec("m", precisions=parse_precisions("int8,int4"))
    assert spec.precisions == ["int8", "int4"]
    assert f"groups of {INT4_GROUP_SIZE}" in quantization_of("int4")


def test_embeddings_refuse_int4_naming_what_works():
    with pytest.raises(InvalidArgumentError) as e:
        DeploymentSpec("e", kind="embedding", precisions=["int8", "int4"])
    msg = str(e.value)
    assert "int4 is for LLMs only" in msg and "fp32, fp16, int8, fp8" in msg and "\n" not in msg
    assert DeploymentSpec("e", kind="embedding", precisions=["int8"]).precisions == ["int8"]
    assert LLM_ONLY == ("int4",)


def test_int4_floors_sit_between_data_free_and_the_chosen_recipe():
    int4, int8 = PRECISIONS["int4"], PRECISIONS["int8"]
    assert 0.702 < int4.llm_min_top1 < 0.772 and 0.900 < int4.llm_min_cosine < 0.952   # measured, see docs
    assert int4.llm_min_top1 < int8.llm_min_top1 and int4.llm_min_cosine < int8.llm_min_cosine
    assert (int4.trtllm_quant_algo, int4.trtllm_dtype, int4.min_compute_capability) == ("W4A16", "float16", (8, 0))
    assert 576 % INT4_GROUP_SIZE == 0 and 1536 % INT4_GROUP_SIZE == 0          # SmolLM2's widths
