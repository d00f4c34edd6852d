"""How close ONNX Runtime's own MatMul kernel gets to the bandwidth roofline: the practical ceiling of fp32 decode.

    python -m luffy.benchmarks.ceiling build/my-llama [--rounds 5]

Batch-1 decode of an fp32 model is almost all M=1 MatMuls streaming their weights. This builds a graph of
nothing but the artifact's constant-weight MatMuls (same shapes, same weights, each fed a random [1, K]
row), runs it on ORT with the engine's settings (huge pages included), and alternates it with the bench's
streaming-read probe. ``matmul_gb_per_s / probe_gb_per_s`` is the fraction of the roofline a decode step
could reach if everything besides the MatMuls (attention, norms, rotary, the Python loop) cost nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..runtimes.huge_pages import anonymous_mappings, back_new_mappings_with_huge_pages
from ..runtimes.manifest import read_manifest
from .bandwidth import BandwidthProbe


def matmul_only_model(artifact: Path, out: Path) -> tuple[Path, dict[str, int], int]:
    """Write the MatMul-only graph of ``artifact``; return (path, {input name: K}, weight bytes)."""
    manifest = read_manifest(artifact, verify_files=False)
    model = onnx.load(str(artifact / manifest["model_file"]))
    weights = {init.name: init for init in model.graph.initializer}
    nodes, inputs, initializers, total = [], {}, [], 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        weight = weights[node.input[1]]
        if len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        k = int(weight.dims[0])
        inputs[f"x{k}"] = k
        nodes.append(helper.make_node("MatMul", [f"x{k}", weight.name], [f"y{len(nodes)}"]))
        initializers.append(weight)
        total += 4 * k * int(weight.dims[1])
    if not nodes:
        raise ValueError(f"{artifact}: no fp32 MatMul with a constant 2-D weight; the ceiling is for fp32 artifacts")
    graph = helper.make_graph(
        nodes, "matmul_only",
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, k]) for name, k in inputs.items()],
        [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes], initializers,
    )
    only = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = out / "matmul_only.onnx"
    onnx.save(only, str(path), save_as_external_data=True, location="matmul_only.data")
    return path, inputs, total


def matmul_ceiling(artifact: str | Path, rounds: int = 5, runs: int = 20, buffer_mib: int = 1024) -> dict:
    """Median GB/s of the artifact's MatMuls alone and of the streaming-read probe, alternated ``rounds`` times.

    >>> matmul_ceiling("build/my-llama")["fraction"]       # doctest: +SKIP
    0.91
    """
    artifact = Path(artifact)
    with tempfile.TemporaryDirectory() as tmp:
        path, inputs, total = matmul_only_model(artifact, Path(tmp))
        before = anonymous_mappings()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        huge_pages = back_new_mappings_with_huge_pages(before)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, k), dtype=np.float32) for name, k in inputs.items()}
    session.run(None, feeds)
    probe = BandwidthProbe(buffer_mib)
    matmul, streaming = [], []
    try:
        for _ in range(rounds):
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            matmul.append(total / float(np.median(times)) / 1e9)
            streaming.append(probe.measure(3)["gb_per_s"])
    finally:
        probe.close()
    fractions = [m / s for m, s in zip(matmul, streaming)]
    return {
        "matmuls": len(session.get_outputs()), "weight_bytes": total, "huge_pages": huge_pages,
        "matmul_gb_per_s": round(float(np.median(matmul)), 2), "probe_gb_per_s": round(float(np.median(streaming)), 2),
        "fraction": round(float(np.median(fractions)), 3), "rounds": rounds, "runs_per_round": runs,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="an fp32 luffy artifact directory")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of MatMul timing and probe [5]")
    args = parser.parse_args(argv)
    print(json.dumps(matmul_ceiling(args.artifact, rounds=args.rounds), indent=2))


if __name__ == "__main__":
    main()
