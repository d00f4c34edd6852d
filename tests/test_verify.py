"""--verify and --dump-ir: real captures, real ONNX Runtime, deliberately broken passes run through the driver."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_ir.passes import common

import luffy
from luffy.compiler.capture.onnx_file import load_onnx_source
from luffy.compiler.quality.verify import Verifier
from luffy.passes.driver import PassStep, run_passes
from luffy.tests.graphs import onnx_model
from luffy.tests.helpers import luffy_cli

TOLERANCE = 1e-4


class SwapAddForSub(ir.passes.InPlacePass):
    """Wrong on purpose: the first float Add of two computed values becomes a Sub (valid graph, wrong numbers).

    Not an Add of a constant: ``mean + eps`` -> ``mean - eps`` moves the logits by less than the tolerance.
    """

    def call(self, model):
        node = next(
            n for n in model.graph
            if n.op_type == "Add" and n.outputs[0].dtype == ir.DataType.FLOAT and all(i.const_value is None for i in n.inputs)
        )
        node.op_type = "Sub"
        return ir.passes.PassResult(model, modified=True)


class OrphanFirstNode(ir.passes.InPlacePass):
    """Wrong on purpose: removes the first node and leaves its consumers reading a value nothing produces."""

    def call(self, model):
        model.graph.remove(model.graph.node(0), safe=False)
        return ir.passes.PassResult(model, modified=True)


def _small_onnx(path, x_type=onnx.TensorProto.FLOAT):
    """y = Relu(x @ w + b) with a named batch dim: the inputs --verify has to synthesize."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["y"])]
    weights = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    onnx.save_model(onnx_model(nodes, {"x": (x_type, ["n", 4])}, {"y": (onnx.TensorProto.FLOAT, ["n", 3])}, weights,
                               name="small"), path)
    return path


def test_verify_checks_every_pass_of_the_default_pipeline(llama_verified):
    artifact, _ = llama_verified
    records = artifact.report["passes"]
    assert records and records[-1]["verified"]
    for i, record in enumerate(records):
        if record["verified"]:
            assert record["max_abs_diff"] <= TOLERANCE, record
        else:
            # A graph holding a rewrite's internal op cannot run; a later pass must have checked it.
            assert "no runtime executes" in record["verify_deferred"], record
            assert any(record["name"] in later.get("verify_covers", []) for later in records[i + 1:]), record
    assert artifact.manifest["options"]["verify"] is True
    assert artifact.report["parity"]["passed"]


def test_a_pass_that_breaks_parity_is_named(llama_verified):
    _, dump = llama_verified
    # The dumped captured graph is a real llama step graph; as an ONNX source it is a decoder again.
    captured = load_onnx_source(dump / "00-captured.onnx")
    steps = [
        PassStep("cse", common.CommonSubexpressionEliminationPass, "a correct pass first"),
        PassStep("swap-add-for-sub", SwapAddForSub, "wrong on purpose"),
        PassStep("topological-sort", common.TopologicalSortPass, "never reached"),
    ]
    with pytest.raises(luffy.CaptureError) as failure:
        run_passes(captured.model, steps, after_pass=Verifier(captured))
    message = str(failure.value)
    assert message.startswith("--verify: pass 'swap-add-for-sub' broke parity: output ")
    assert "differs by" in message and "\n" not in message


def test_a_pass_that_breaks_the_graph_is_named(tmp_path):
    captured = load_onnx_source(_small_onnx(tmp_path / "small.onnx"))
    steps = [PassStep("orphan-first-node", OrphanFirstNode, "wrong on purpose")]
    with pytest.raises(luffy.CaptureError, match=r"^--verify: pass 'orphan-first-node' produced an invalid model: "):
        run_passes(captured.model, steps, after_pass=Verifier(captured))


def test_verify_synthesizes_inputs_for_onnx_files(tmp_path):
    artifact = luffy.compile(str(_small_onnx(tmp_path / "small.onnx")), output=tmp_path / "out", opt_level=1, verify=True)
    assert all(r["verified"] and r["max_abs_diff"] <= TOLERANCE for r in artifact.report["passes"])


def test_an_input_that_cannot_be_synthesized_is_named(tmp_path):
    source = _small_onnx(tmp_path / "strings.onnx", x_type=onnx.TensorProto.STRING)
    with pytest.raises(luffy.UsageError, match=r"graph input 'x': dtype STRING"):
        luffy.compile(str(source), output=tmp_path / "out", opt_level=1, verify=True)


def test_dump_ir_writes_one_numbered_graph_per_pass(llama_verified):
    artifact, dump = llama_verified
    records = artifact.report["passes"]
    expected = ["00-captured.onnx"] + [f"{i:02d}-{r['name']}.onnx" for i, r in enumerate(records, start=1)]
    assert sorted(p.name for p in dump.glob("*.onnx")) == expected
    assert [r["ir_dump"] for r in records] == expected[1:]
    for name in expected:
        onnx.load(dump / name)  # resolves weights.data, as Netron and ORT would
        inline = onnx.load(dump / name, load_external_data=False)
        assert all(len(t.raw_data) < 1024 for t in inline.graph.initializer), name
    assert len(onnx.load(dump / expected[-1]).graph.node) == records[-1]["nodes_after"]
    # Each distinct weight is written once for all dumps, not once per dump.
    assert (dump / "weights.data").stat().st_size <= 2 * 4 * artifact.report["parameters"]


def test_cli_accepts_verify_and_dump_ir(tmp_path):
    out, dump = tmp_path / "gpt2", tmp_path / "ir"
    proc = luffy_cli("compile", "gpt2-tiny", "-o", out, "--verify", "--dump-ir", dump, "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)["passes"]
    assert records[-1]["verified"]
    assert all(r["max_abs_diff"] <= TOLERANCE for r in records if r["verified"])
    assert (dump / "00-captured.onnx").is_file() and (dump / records[-1]["ir_dump"]).is_file()
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert options["verify"] is True and options["dump_ir"] == str(dump)
