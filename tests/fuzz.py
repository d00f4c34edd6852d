"""Fuzz luffy's file inputs: mutated ONNX files and mutated manifests through compile, inspect and load.

Every outcome must be a luffy error (a LuffyError, whose class is the CLI's exit code) or a correct result;
a traceback of any other exception, a hang (each input gets a deadline) or an interpreter crash is a
finding. Hypothesis generates the mutations at a fixed seed, so a run is reproducible and a failure
shrinks to a small input. The suite runs a bounded number of examples (tests/test_fuzz.py); a longer run:

    python -m luffy.tests.fuzz --examples 2000 --seed 1 --json counts.json

Each target runs in this process; the input under test is written to ``--workdir`` first, so when ORT or
protobuf takes the interpreter down, the file that did it is on disk (and the parent test names it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import luffy
from luffy.errors import LuffyError

from .graphs import onnx_model

DEADLINE_S = 30  # per input; a compile of these graphs takes ~50 ms, so anything near this is a hang


def base_model() -> onnx.ModelProto:
    """A small valid graph with the parts mutations aim at: an initializer, attributes, two node kinds."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape"),
             helper.make_node("Softmax", ["y"], ["z"], name="softmax", axis=-1)]
    weights = {"w": np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "shape": np.array([-1, 3], dtype=np.int64)}
    return onnx_model(nodes, {"x": (TensorProto.FLOAT, ["batch", 4])}, {"z": (TensorProto.FLOAT, ["batch", 3])}, weights,
                      name="fuzz_base", opset=17, ir_version=8)


INTS = st.one_of(st.integers(-3, 40), st.sampled_from([-(2**31), 2**31 - 1, 2**40, -(2**63), 2**63 - 1]))


@st.composite
def mutated_onnx(draw) -> tuple[str, bytes]:
    """(what was done, the bytes of the .onnx file)."""
    model = base_model()
    how = draw(st.sampled_from(["truncate", "bitflip", "opset", "ir_version", "dims", "dtype", "elem_type",
                                "op_type", "cycle", "dangling", "attribute", "external", "outputs", "raw_data"]))
    graph = model.graph
    if how == "opset":
        model.opset_import[0].version = draw(INTS)
    elif how == "ir_version":
        model.ir_version = draw(INTS)
    elif how == "dims":
        graph.initializer[0].dims[draw(st.integers(0, 1))] = draw(INTS)
    elif how == "dtype":
        graph.initializer[draw(st.integers(0, 1))].data_type = draw(st.integers(-1, 30))
    elif how == "elem_type":
        value = draw(st.sampled_from([graph.input[0], graph.output[0]]))
        value.type.tensor_type.elem_type = draw(st.integers(-1, 30))
    elif how == "op_type":
        node = graph.node[draw(st.integers(0, 3))]
        node.op_type = draw(st.sampled_from(["", "NoSuchOp", "Loop", "If", "Scan", "MatMulNBits", "Attention"]))
        node.domain = draw(st.sampled_from(["", "com.microsoft", "no.such.domain"]))
    elif how == "cycle":  # the first node reads the last one's output
        graph.node[0].input[0] = draw(st.sampled_from(["z", "r", "y"]))
    elif how == "dangling":
        graph.node[draw(st.integers(0, 3))].input.append(draw(st.sampled_from(["nowhere", "", "x"])))
    elif how == "attribute":
        graph.node[3].attribute[0].i = draw(INTS)
        graph.node[3].attribute[0].type = draw(st.integers(0, 14))
    elif how == "external":
        tensor = graph.initializer[0]
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
        tensor.external_data.add(key="location", value=draw(st.sampled_from(["w.bin", "../w.bin", "/etc/passwd", ""])))
        tensor.external_data.add(key="length", value=str(draw(INTS)))
    elif how == "outputs":
        graph.output.add().CopyFrom(graph.output[0] if draw(st.booleans()) else graph.input[0])
    elif how == "raw_data":
        graph.initializer[0].raw_data = draw(st.binary(max_size=64))
    data = model.SerializeToString()
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "bitflip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(flipped) - 1))
            flipped[position] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flipped)
    return how, data


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_manifest(draw, manifest: dict) -> tuple[str, bytes]:
    """(what was done, the bytes of manifest.json) from a real artifact's manifest."""
    how = draw(st.sampled_from(["delete", "replace", "truncate", "bitflip", "nest", "file_entry"]))
    m = json.loads(json.dumps(manifest))
    paths = list(_paths(m))
    if how in ("delete", "replace"):
        path = draw(st.sampled_from(paths))
        parent, key = _walk(m, path[:-1]), path[-1]
        if how == "delete" and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = draw(JSON_VALUES)
    elif how == "nest":  # deep nesting: JSON parsers recurse (spliced in as text: json.loads itself would fail here)
        m["report"] = "NESTED"
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return how, json.dumps(m).replace('"NESTED"', "[" * depth + "]" * depth).encode()
    elif how == "file_entry":
        rel = draw(st.sampled_from(["../escape", "/etc/passwd", "model.onnx/../model.onnx", "sub/x", "", "a\\b"]))
        m["files"][rel] = {"sha256": "0" * 64, "size": draw(INTS)}
        if draw(st.booleans()):
            m["model_file"] = rel
    data = json.dumps(m).encode()
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "bitflip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            flipped[draw(st.integers(0, len(flipped) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flipped)
    return how, data


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield prefix + (key,)
            if key != "report":  # the report is large and informational: a few paths into it suffice
                yield from _paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj[:3]):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


def _walk(obj, path):
    for key in path:
        obj = obj[key]
    return obj


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    def alarm(signum, frame):
        raise Hang(f"no outcome within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call) -> str:
    """'ok' or the LuffyError class name; anything else is raised as a finding."""
    try:
        with deadline(DEADLINE_S):
            call()
    except LuffyError as exc:
        if "\n" in str(exc):
            raise AssertionError(f"{type(exc).__name__} message is not one line: {exc!r}") from exc
        return type(exc).__name__
    return "ok"


def fuzz_onnx(workdir: Path, examples: int, seed_value: int, counts: collections.Counter) -> None:
    from luffy.cli.main import main as cli_main
    from luffy.compiler.report.inspect import inspect_path

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(mutated_onnx(), st.sampled_from([0, 3]))
    def one(case, opt_level):
        how, data = case
        work = workdir / "onnx"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "model.onnx").write_bytes(data)
        (work / "w.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
        got = outcome(lambda: luffy.compile(work / "model.onnx", output=work / "art", opt_level=opt_level))
        if got == "ok":  # what compile published must load and run (or refuse these feeds with a luffy error)
            engine = luffy.load(work / "art", threads=1)
            got = outcome(lambda: engine.run({"x": np.ones((2, 4), np.float32)}))
            got = "ok (compiled, loaded, " + ("ran)" if got == "ok" else f"{got} from run)")
        counts[f"compile {how}: {got}"] += 1
        counts[f"inspect: {outcome(lambda: inspect_path(str(work / 'model.onnx')))}"] += 1
        code = cli_main(["inspect", str(work / "model.onnx"), "--json"])
        assert code in (0, 2, 3, 4, 5, 6, 7, 8), f"luffy inspect exited {code} (internal error) on a {how} mutation"

    one()


def fuzz_manifests(workdir: Path, examples: int, seed_value: int, counts: collections.Counter) -> None:
    from luffy.cli.main import main as cli_main
    from luffy.compiler.report.inspect import inspect_path

    source = workdir / "valid-artifact"
    if not source.exists():
        luffy.compile("llama-tiny", output=source, opt_level=0, check_parity=False)
    manifest = json.loads((source / "manifest.json").read_text())

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(mutated_manifest(manifest))
    def one(case):
        how, data = case
        art = workdir / "mutated-artifact"
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(source, art)
        (art / "manifest.json").write_bytes(data)
        got = outcome(lambda: luffy.load(art, threads=1).generate([[256, 1, 2]], max_new_tokens=2))
        counts[f"load {how}: {got}"] += 1
        counts[f"inspect: {outcome(lambda: inspect_path(str(art)))}"] += 1
        code = cli_main(["inspect", str(art), "--json"])
        assert code in (0, 6), f"luffy inspect exited {code} on a manifest with a {how} mutation"

    one()


def run(examples: int, seed_value: int, workdir: Path | None = None, targets=("onnx", "manifest")) -> dict:
    """Fuzz each target with ``examples`` inputs; returns counts of outcomes by kind (raises on a finding)."""
    counts: collections.Counter = collections.Counter()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="luffy-fuzz-") as tmp:
        root = Path(workdir or tmp)
        with contextlib.redirect_stdout(sys.stderr):  # `luffy inspect --json` prints; keep stdout for the result
            if "onnx" in targets:
                fuzz_onnx(root, examples, seed_value, counts)
            if "manifest" in targets:
                fuzz_manifests(root, examples, seed_value, counts)
    return {"examples_per_target": examples, "seed": seed_value, "seconds": round(time.perf_counter() - started, 1),
            "inputs_tried": sum(n for k, n in counts.items() if not k.startswith("inspect")),
            "outcomes": dict(sorted(counts.items()))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default="onnx,manifest")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the inputs here (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = parser.parse_args(argv)
    result = run(args.examples, args.seed, args.workdir, tuple(args.targets.split(",")))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
