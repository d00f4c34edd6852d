"""The portable path (TensorRT target): opset-23 RMSNormalization, RotaryEmbedding and Attention, no
com.microsoft ops, at parity with PyTorch on ONNX Runtime."""

import collections

import onnx_ir as ir
import torch

from luffy.compiler.capture.torch_export import CAPTURE_OPSET, capture_causal_lm
from luffy.compiler.quality.parity import check_parity
from luffy.compiler.sources.resolve import resolve_source
from luffy.compiler.sources.torch_model import load_torch_model
from luffy.passes.driver import run_passes
from luffy.passes.fuse_onnx23 import fuse_onnx23
from luffy.passes.pipelines import pipeline
from luffy.tests.graphs import op_counts
from luffy.tests.test_fusions import RMSNorm, apply, assert_parity


def test_llama_on_the_trt_pipeline_uses_standard_ops_only(tmp_path):
    captured = capture_causal_lm(load_torch_model(resolve_source("llama-tiny")), CAPTURE_OPSET["trt"])
    model, records = run_passes(captured.model, pipeline("trt", 2))
    counts = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph)
    assert counts[("ai.onnx", "Attention")] == 2 and counts[("ai.onnx", "RotaryEmbedding")] == 4
    assert counts[("ai.onnx", "RMSNormalization")] == 5
    assert not [op for (domain, op) in counts if domain != "ai.onnx"]
    assert model.opset_imports[""] == 23
    ir.save(model, tmp_path / "model.onnx")
    captured.model = model
    assert check_parity(captured, tmp_path / "model.onnx", vocab=320)["passed"]


def test_decomposed_rms_norm_is_fused_at_opset_23():
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        # optimize=False: as another exporter would hand it over, without onnxscript's own fusions
        model = torch.onnx.export(RMSNorm().eval(), (x,), dynamo=True, opset_version=23, verbose=False,
                                  optimize=False).model
    assert op_counts(model, subgraphs=True)["RMSNormalization"] == 0
    # through the trt pipeline: cleanup folds the norm's Constant nodes, then the rule sees literal values
    fused, records = run_passes(ir.from_proto(ir.to_proto(model)), pipeline("trt", 2))
    assert next(r for r in records if r["name"] == "fuse-onnx23")["matches"] == 1
    assert op_counts(fused, subgraphs=True) == {"RMSNormalization": 1}
    assert_parity(model, fused, x)


def test_opset_20_graph_is_left_alone():
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        model = torch.onnx.export(RMSNorm().eval(), (x,), dynamo=True, opset_version=20, verbose=False).model
    p = fuse_onnx23()
    fused, (count,) = apply(model, p)
    assert count == 0 and op_counts(fused, subgraphs=True) == op_counts(model, subgraphs=True)
    assert "opset 20" in p.stats["not_matched"][0]["reason"]


def test_int4_on_the_trt_pipeline_is_qdq_in_standard_onnx(tmp_path):
    # TensorRT's strongly typed networks take precision from the graph: blockwise int4 DequantizeLinear
    # feeding each MatMul, no com.microsoft op; checked on ORT by perplexity on the trained zoo model.
    from luffy.compiler.quality.calibration import graph_perplexity, token_windows, torch_perplexity
    from luffy.models_zoo.byte_tokenizer import byte_tokenizer
    from luffy.models_zoo.trained import heldout_text_path
    from luffy.passes.pipelines import precision_steps

    tm = load_torch_model(resolve_source("llama-pydoc"))
    captured = capture_causal_lm(tm, CAPTURE_OPSET["trt"])
    model, _ = run_passes(captured.model, pipeline("trt", 2))
    matmuls = sum(1 for n in model.graph if n.op_type == "MatMul")
    model, records = run_passes(model, precision_steps("int4", target="trt"))
    counts = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph)
    assert counts[("ai.onnx", "DequantizeLinear")] == counts[("ai.onnx", "MatMul")] == matmuls
    assert not [op for (domain, op) in counts if domain != "ai.onnx"]
    int4 = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.INT4]
    assert len(int4) == matmuls - 1  # the lm_head is int8, per output channel
    scheme = records[0]["scheme"]
    assert scheme["layout"] == "qdq" and scheme["symmetric"] and scheme["lm_head_bits"] == 8
    ir.save(model, tmp_path / "model.onnx")
    windows, prefix = token_windows(heldout_text_path(), byte_tokenizer(add_bos=True), 256, 16)
    reference = torch_perplexity(tm.module, windows, prefix)
    quantized = graph_perplexity(tmp_path / "model.onnx", windows, prefix)
    assert reference < quantized < reference * 1.03
