"""keep-last-logits: the lm_head runs on the positions the runtime keeps (1 when generating)."""

import numpy as np

import luffy
from luffy.tests.helpers import PROMPT


def test_graph_after_keep_last_logits(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    record = next(r for r in artifact.report["passes"] if r["name"] == "keep-last-logits")
    assert record["matches"] == 1
    io = artifact.manifest["io"]
    # a multi-row graph (query_seqlens) keeps the positions it is given of each row, by one per-row gather
    assert {"name": "logits_indices", "dtype": "int64", "shape": ["batch", "kept"]} in io["inputs"]
    assert io["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", "kept", 320]}
    import onnx_ir as ir

    model = ir.load(artifact.path / "model.onnx")
    lm_head = next(v for v in model.graph.outputs if v.name == "logits").producer()
    gather = lm_head.inputs[0].producer()
    assert lm_head.op_type == "MatMul" and gather.op_type == "GatherND" and gather.attributes["batch_dims"].value == 1
    assert gather.inputs[1].producer().inputs[0].name == "logits_indices"


def test_encoder_is_untouched_with_a_reason(zoo_artifacts):
    artifact, _ = zoo_artifacts("bert-tiny")
    record = next(r for r in artifact.report["passes"] if r["name"] == "keep-last-logits")
    assert record["matches"] == 0 and "not a decoder step graph" in record["not_matched"][0]["reason"]
    assert not {"logits_to_keep", "logits_indices"} & {i["name"] for i in artifact.manifest["io"]["inputs"]}


def test_same_logits_with_and_without(zoo_artifacts, tmp_path):
    kept, _ = zoo_artifacts("gpt2-tiny")
    full = luffy.compile("gpt2-tiny", output=tmp_path / "full", disable_pass=["keep-last-logits"])
    a, b = kept.load(), full.load()
    prompt = [[1, *PROMPT], PROMPT[:5]]
    assert np.abs(a.score(prompt) - b.score(prompt)).max() <= 1e-5  # score keeps every position
    ids_a, logits_a = a.generate(prompt, max_new_tokens=12, eos_token_id=None, output_logits=True)
    ids_b, logits_b = b.generate(prompt, max_new_tokens=12, eos_token_id=None, output_logits=True)
    assert ids_a.tolist() == ids_b.tolist() and np.abs(logits_a - logits_b).max() <= 1e-5
