"""fuse-gqa: attention + KV concat + repeat-KV -> GroupQueryAttention over a shared, in-place KV buffer."""


import numpy as np
import onnx_ir as ir
import pytest

import luffy
from luffy.compiler.capture.torch_export import capture_causal_lm
from luffy.compiler.sources.resolve import resolve_source
from luffy.compiler.sources.torch_model import load_torch_model
from luffy.passes.driver import run_passes
from luffy.passes.fuse_gqa import fuse_gqa
from luffy.passes.pipelines import pipeline
from luffy.tests.graphs import op_counts
from luffy.tests.helpers import LAYERS, PROMPT


@pytest.fixture(scope="module")
def before_gqa():
    """llama-tiny's step graph with every pass that precedes fuse-gqa at -O2 applied."""
    steps = pipeline("ort", 2)
    upto = [s.name for s in steps].index("fuse-gqa")
    captured = capture_causal_lm(load_torch_model(resolve_source("llama-tiny")))
    model, _ = run_passes(captured.model, steps[:upto])
    return ir.to_proto(model)


def test_graph_after_fuse_gqa(before_gqa):
    model = ir.from_proto(before_gqa)
    p = fuse_gqa()
    p(model)
    assert p.stats == {"matches": 2, "multi_row": True}
    ops = op_counts(model)
    assert ops["GroupQueryAttention"] == 2 and ops["SDPA"] == 0 and ops["Expand"] < op_counts(ir.from_proto(before_gqa))["Expand"]
    inputs = {v.name: v for v in model.graph.inputs}
    assert inputs["seqlens_k"].dtype == ir.DataType.INT32 and list(inputs["seqlens_k"].shape) == ["batch"]
    assert inputs["total_sequence_length"].shape.rank() == 0
    assert [str(d) for d in inputs["past_key_values.0.key"].shape] == ["batch", "2", "max_seq", "16"]
    for value in model.graph.outputs[1:]:
        assert value.producer().op_type == "GroupQueryAttention"  # present is the op's in-place buffer
    for i in range(2):  # nothing reads the past except attention (and no concat copies it)
        for kind in ("key", "value"):
            readers = {u.node.op_type for u in inputs[f"past_key_values.{i}.{kind}"].uses()}
            assert readers == {"GroupQueryAttention"}


def test_extra_reader_of_the_cache_leaves_the_graph_alone(before_gqa):
    model = ir.from_proto(before_gqa)
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.1.value")
    extra = ir.node("ReduceSum", [past], attributes={"keepdims": 0})
    extra.outputs[0].name = "cache_checksum"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    p = fuse_gqa()
    p(model)
    assert p.stats["matches"] == 0
    assert "past_key_values.1.value" in p.stats["not_matched"][0]["reason"]
    # all-or-nothing: layer 0 matched too, but no layer was rewritten and the interface is unchanged
    ops = op_counts(model)
    assert ops["GroupQueryAttention"] == 0 and ops["SDPA"] == 2
    assert "seqlens_k" not in {v.name for v in model.graph.inputs}
    assert all(str(v.shape[2]) == "past" for v in model.graph.inputs if v.name.startswith("past_key_values"))


def test_not_a_decoder_is_explained(zoo_artifacts):
    artifact, _ = zoo_artifacts("bert-tiny")
    record = next(r for r in artifact.report["passes"] if r["name"] == "fuse-gqa")
    assert record["matches"] == 0 and "no past_key_values" in record["not_matched"][0]["reason"]


def test_shared_buffer_engine_matches_the_concat_engine(zoo_artifacts, tmp_path):
    fused, _ = zoo_artifacts("llama-tiny")
    plain = luffy.compile("llama-tiny", output=tmp_path / "plain", disable_pass=["fuse-gqa"])
    assert fused.manifest["kv_cache"]["mode"] == "shared-buffer"
    assert plain.manifest["kv_cache"]["mode"] == "concat"
    assert fused.manifest["dims"]["max_seq"] == {"min": 1, "max": 512}
    a, b = fused.load(), plain.load()
    assert a.graph.shared_kv and not b.graph.shared_kv
    rows = [[256, *PROMPT[:4]], [256, *PROMPT]]
    ids_a, logits_a = a.generate(rows, max_new_tokens=16, eos_token_id=None, output_logits=True)
    ids_b, logits_b = b.generate(rows, max_new_tokens=16, eos_token_id=None, output_logits=True)
    assert ids_a.tolist() == ids_b.tolist()
    assert np.abs(logits_a - logits_b).max() <= 1e-4


def test_multi_row_graph_takes_query_seqlens_with_causal_attention(before_gqa):
    model = ir.from_proto(before_gqa)
    fuse_gqa()(model)
    inputs = {v.name: v for v in model.graph.inputs}
    assert inputs["query_seqlens"].dtype == ir.DataType.INT32 and list(inputs["query_seqlens"].shape) == ["batch"]
    for node in (n for n in model.graph if n.op_type == "GroupQueryAttention"):
        assert node.attributes["causal"].value == 1 and node.inputs[16] is inputs["query_seqlens"]
        assert node.inputs[10] is not None  # the model's own mask stays, as attention_bias


def test_a_sliding_window_keeps_one_multi_token_row_per_step(family_artifact):
    artifact, _ = family_artifact("mistral")  # window 16: relative to each query's own position
    record = next(r for r in artifact.report["passes"] if r["name"] == "fuse-gqa")
    assert record["matches"] == LAYERS and record["multi_row"] is False  # every layer fused, one row per step
    assert "not causal plus padding alone" in record["not_matched"][0]["reason"]
    model = ir.load(artifact.path / "model.onnx")
    lm_head = next(v for v in model.graph.outputs if v.name == "logits").producer()
    assert lm_head.inputs[0].producer().op_type == "Slice"  # keep-last-logits' plain form: the last positions
    engine = artifact.load()
    assert engine.graph.shared_kv and not engine.graph.multi_row
    slots = engine.open_slots(2, 64)
    slots.step(0, 2, np.array([PROMPT[:3], PROMPT[:3]]))  # rows that start empty still step together
    with pytest.raises(luffy.UsageError, match="one row at a time"):
        slots.step(0, 2, np.array([PROMPT[3:5], PROMPT[5:7]]))
