"""kv-cache-dtype: GroupQueryAttention's cache in fp16, or int8/int4 with calibrated per-channel scales."""

import collections

import numpy as np
import onnx_ir as ir
import pytest

import luffy
from luffy.compiler.config import LuffyConfig
from luffy.models_zoo.trained import CALIB_FILE, PYDOC_LLAMA_DIR
from luffy.passes.kv_cache_dtype import kv_cache_dtype
from luffy.passes.kv_cache_io import kv_cache_io
from luffy.tests.helpers import PROMPT

CALIB = PYDOC_LLAMA_DIR / CALIB_FILE


@pytest.mark.parametrize("options, message", [
    (dict(kv_cache_dtype="bf16"), "no bf16 cache"),
    (dict(kv_cache_dtype="int8"), r"needs --kv-calib FILE \(or --calib\)"),
    (dict(kv_calib="calib.txt"), "--kv-cache-dtype auto takes none"),
    (dict(kv_cache_dtype="fp32", precision="fp16"), "would hold fp16 values"),
    (dict(kv_cache_dtype="int9"), "choose one of auto, fp32, fp16, bf16, int8, int4"),
    (dict(calib="calib.txt"), "precision fp32 with KV cache auto takes none"),
    (dict(target="trt", kv_cache_dtype="int4", kv_calib="calib.txt"), "no 4-bit activation type"),
])
def test_kv_cache_choices_refused_before_capture(options, message):
    with pytest.raises(luffy.UsageError, match=message):
        LuffyConfig(**options)


def _ranges(layers=2, heads=2, dim=16):
    rng = np.random.default_rng(0)
    return {layer: (rng.uniform(1, 4, (heads, dim)), rng.uniform(1, 4, (heads, dim))) for layer in range(layers)}


@pytest.mark.parametrize("dtype, storage, dim, bits", [
    ("int8", ir.DataType.INT8, 16, 8), ("int4", ir.DataType.UINT8, 8, 4), ("fp16", ir.DataType.FLOAT16, 16, None)])
def test_graph_after_kv_cache_dtype(zoo_artifacts, dtype, storage, dim, bits):
    model = ir.load(zoo_artifacts("llama-tiny")[0].path / "model.onnx")
    ranges = _ranges()
    p = kv_cache_dtype(dtype, ranges)
    p(model)
    assert p.stats["matches"] == 2 and p.stats["kv_cache_dtype"] == dtype
    caches = [v for v in [*model.graph.inputs, *model.graph.outputs] if v.name.startswith(("past_", "present."))]
    assert len(caches) == 8 and all(v.dtype == storage and v.shape[3] == dim for v in caches)
    for node in (n for n in model.graph if n.op_type == "GroupQueryAttention"):
        layer = int(node.inputs[3].name.split(".")[1])
        if bits is None:
            assert node.inputs[12] is None and node.inputs[13] is None and "k_quant_type" not in node.attributes
            continue
        assert node.attributes["kv_cache_bit_width"].value == bits
        assert node.attributes["k_quant_type"].value == node.attributes["v_quant_type"].value == "PER_CHANNEL"
        key, value = (node.inputs[i].const_value.numpy() for i in (12, 13))
        assert key.shape == value.shape == (1, 2, 1, 16)
        levels = 127 if bits == 8 else 7
        np.testing.assert_allclose(value[0, :, 0] * levels, ranges[layer][1], rtol=1e-6)
        # a key channel's scale covers its rotary partner (i and i + 8 rotate into each other)
        np.testing.assert_allclose(key[0, :, 0, :8], key[0, :, 0, 8:])
        assert (key[0, :, 0] * levels >= ranges[layer][0] - 1e-6).all()


def test_a_graph_without_group_query_attention_is_refused(zoo_artifacts):
    model = ir.load(zoo_artifacts("bert-tiny")[0].path / "model.onnx")
    with pytest.raises(luffy.UnsupportedModelError, match="needs the graph's attention fused into GroupQueryAttention"):
        kv_cache_dtype("int8", {})(model)


def test_int8_kv_cache_artifact(zoo_artifacts, tmp_path):
    fp32 = zoo_artifacts("llama-tiny")[0]
    art = luffy.compile("llama-tiny", output=tmp_path / "int8kv", kv_cache_dtype="int8", kv_calib=CALIB,
                        eval_file=CALIB)
    kv = art.manifest["kv_cache"]
    assert kv["dtype"] == "int8" and kv["bytes_per_token"] * 4 == fp32.manifest["kv_cache"]["bytes_per_token"]
    scales = art.report["kv_cache"]["scales"]
    assert scales.startswith("static per channel") and "--kv-calib" in scales
    assert art.report["kv_cache"]["multi_row_steps"] and art.report["parity"]["tolerance"] is None
    assert abs(art.report["quality"]["perplexity_increase_pct"]) < 1.0  # random weights: near-flat logits
    engine = art.load()
    slots = engine.open_slots(2, 64)
    assert engine.kv_dtype == np.int8 and slots.cache.buffers[0][0].dtype == np.int8
    assert slots.cache.nbytes * 4 == fp32.load().open_slots(2, 64).cache.nbytes
    # a step reads back the codes it wrote: a chunked prompt equals the same prompt in one step
    whole = engine.open_slots(1, 64).step(0, 1, np.array([PROMPT]))[0, -1].copy()
    slots.step(0, 1, np.array([PROMPT[:7]]))
    assert np.abs(slots.step(0, 1, np.array([PROMPT[7:]]))[0, -1] - whole).max() <= 1e-4
    assert engine.generate([PROMPT], max_new_tokens=4, eos_token_id=None)[0, :len(PROMPT) + 1].tolist() == \
        fp32.load().generate([PROMPT], max_new_tokens=1, eos_token_id=None)[0].tolist()


def _concat_step_graph() -> ir.Model:
    """past [1, 2, past, 4] ++ new -> present, and a reader of present (what attention would be)."""
    past = ir.Value(name="past_key_values.0.key", shape=ir.Shape([1, 2, "past", 4]),
                    type=ir.TensorType(ir.DataType.FLOAT))
    new = ir.Value(name="new", shape=ir.Shape([1, 2, 1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    concat = ir.node("Concat", [past, new], attributes={"axis": 2})
    concat.outputs[0].name = "present.0.key"
    total = ir.node("ReduceSum", [concat.outputs[0]], attributes={"keepdims": 0})
    total.outputs[0].name = "attended"
    graph = ir.Graph([past, new], [concat.outputs[0], total.outputs[0]], nodes=[concat, total], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_tensorrt_graph_holds_its_cache_at_the_interface(dtype):
    import onnxruntime as ort

    model = _concat_step_graph()
    p = kv_cache_io(dtype, {0: (np.full((2, 4), 2.0), np.full((2, 4), 1.0))})
    p(model)
    storage = {"fp16": np.float16, "int8": np.int8}[dtype]
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops == ({"Cast": 2} if dtype == "fp16" else {"DequantizeLinear": 1, "QuantizeLinear": 1}) | {"Concat": 1,
                                                                                                        "ReduceSum": 1}
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    past = np.array([[[[-1.0, 0.5, 2.0, 0.25]] * 3] * 2], dtype=np.float32)  # exactly representable either way
    scale = 2.0 / 127
    codes = np.rint(past / scale).astype(np.int8) if dtype == "int8" else past.astype(np.float16)
    present, attended = session.run(None, {"past_key_values.0.key": codes, "new": np.ones((1, 2, 1, 4), np.float32)})
    assert present.dtype == storage and present.shape == (1, 2, 4, 4)
    assert np.array_equal(present[:, :, :3], codes)  # the past half comes back as the same codes: no drift
    decoded = codes.astype(np.float32) * (scale if dtype == "int8" else 1.0)
    assert np.isclose(attended, decoded.sum() + 8, atol=1e-4)  # attention read the decoded past and the new key


def test_tensorrt_int8_kv_artifact_runs_on_onnx_runtime(zoo_artifacts, tmp_path):
    art = luffy.compile("llama-tiny", target="trt", output=tmp_path / "trt", defer_build=True, kv_cache_dtype="int8",
                        kv_calib=CALIB)
    io = {v["name"]: v["dtype"] for v in art.manifest["io"]["inputs"] + art.manifest["io"]["outputs"]}
    assert io["past_key_values.1.value"] == io["present.1.value"] == art.manifest["kv_cache"]["dtype"] == "int8"
    assert art.report["kv_cache"]["scales"].startswith("static per tensor")
    engine = luffy.load(art.path, runtime="ort")  # how a TensorRT artifact's numerics are checked without a GPU
    assert engine.kv_dtype == np.int8
    fp32 = zoo_artifacts("llama-tiny")[0].load()
    got, want = (e.generate([PROMPT], max_new_tokens=4, eos_token_id=None) for e in (engine, fp32))
    assert got[0, :len(PROMPT) + 1].tolist() == want[0, :len(PROMPT) + 1].tolist()
