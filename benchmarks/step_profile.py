"""Where a decode step's time goes: ONNX Runtime's own profiler over real steps, per op type, at each row count.

    python -m luffy.benchmarks.step_profile build/ref-int8 --rows 1,16 [--prompt-len 128] [--steps 64] [--json f]

For each row count the artifact is loaded with ORT's profiler on (``luffy.load(..., profile=PREFIX)``), its
slots are prefilled with seeded random prompts (one step), and ``--steps`` greedy decode steps run over all
rows at once, as the server's scheduler runs them. The trace gives every run and every node; the first decode
run is a warm-up and is left out. Per step the report has: the wall time around ``OrtSlots.step`` plus the token
choice (what a user waits for), ORT's run, the sum of its nodes (the gap is ORT's own per-run work), and per op
type its time, calls and share of the nodes, as medians over the steps.

The profiler adds to every node (a 156M int8 step: 5.9-6.8 ms without it, 7.3-8.0 with it, three runs), so the same steps
also run once with it off and the report gives that wall time beside; the shares are what the trace is for
(which kernels to work on, what a row costs), not absolute speed. Time it on a quiet
machine: another process on the cores inflates exactly the small ops this is meant to find.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import median

import numpy as np

from ..errors import LuffyError
from ..runtimes import load
from .machine import describe_machine


def _decode_runs(trace: list[dict], skip: int) -> list[tuple[dict, list[dict]]]:
    """The trace's model runs in time order after the first ``skip``, each with the node events inside it."""
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])[skip:]
    nodes = sorted((e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    out, i = [], 0
    for run in runs:
        while i < len(nodes) and nodes[i]["ts"] < run["ts"]:
            i += 1
        inside = []
        while i < len(nodes) and nodes[i]["ts"] <= run["ts"] + run["dur"]:
            inside.append(nodes[i])
            i += 1
        out.append((run, inside))
    return out


def _summarize(runs: list[tuple[dict, list[dict]]], wall_us: list[float]) -> dict:
    by_op: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, list[int]] = defaultdict(list)
    for _, nodes in runs:
        step_ops: dict[str, float] = defaultdict(float)
        step_calls: dict[str, int] = defaultdict(int)
        for node in nodes:
            step_ops[node["args"]["op_name"]] += node["dur"]
            step_calls[node["args"]["op_name"]] += 1
        for op in step_ops:
            by_op[op].append(step_ops[op])
            calls[op].append(step_calls[op])
    node_us = median(sum(n["dur"] for n in nodes) for _, nodes in runs)
    ops = {op: {"us": median(times), "calls": int(median(calls[op])), "share_of_nodes": median(times) / node_us}
           for op, times in sorted(by_op.items(), key=lambda kv: -median(kv[1]))}
    return {"steps": len(runs), "wall_us": median(wall_us), "run_us": median(r["dur"] for r, _ in runs),
            "nodes_us": node_us, "ops": ops}


def _timed_steps(engine, rows: int, prompt_len: int, steps: int, seed: int) -> list[float]:
    """Prefill ``rows`` seeded prompts in one step, then ``steps`` greedy decode steps; µs of each decode step."""
    slots = engine.open_slots(rows, prompt_len + steps + 1)
    prompt = np.random.default_rng(seed).integers(3, min(engine.vocab, 250), size=(rows, prompt_len))
    token = slots.step(0, rows, prompt)[:, -1].argmax(-1)
    wall_us = []
    for _ in range(steps):
        start = time.perf_counter()
        token = slots.step(0, rows, token[:, None])[:, -1].argmax(-1)
        wall_us.append((time.perf_counter() - start) * 1e6)
    return wall_us[1:]  # the first decode step is a warm-up


def profile_steps(artifact: str | Path, rows: int, prompt_len: int = 128, steps: int = 64, seed: int = 0,
                  threads: int | None = None) -> dict:
    """Profile ``steps`` decode steps of ``rows`` rows after a ``prompt_len``-token prefill; medians per step.

    The same steps run first with the profiler off (``wall_unprofiled_us``: the step as a user gets it), then
    on, one engine at a time (an 8B artifact is not held twice).

    >>> profile_steps("build/ref-int8", rows=16)["ops"]["MatMulNBits"]["share_of_nodes"]   # doctest: +SKIP
    0.75
    """
    if steps < 2:
        raise ValueError(f"steps={steps}: the first decode step is a warm-up; profile at least 2")
    unprofiled = median(_timed_steps(load(artifact, threads=threads), rows, prompt_len, steps, seed))
    with tempfile.TemporaryDirectory(prefix="luffy-step-profile-") as tmp:
        engine = load(artifact, profile=str(Path(tmp) / "ort"), threads=threads)
        wall_us = _timed_steps(engine, rows, prompt_len, steps, seed)
        trace = json.loads(Path(engine.session.end_profiling()).read_text())
    runs = _decode_runs(trace, skip=2)  # the prefill and the warm-up decode step
    return {"artifact": str(artifact), "rows": rows, "prompt_len": prompt_len, "wall_unprofiled_us": unprofiled,
            **_summarize(runs, wall_us)}


def markdown(report: dict, top: int = 12) -> str:
    """One table per row count: the step's totals, then the op types by time."""
    lines = [f"rows {report['rows']}, prompt {report['prompt_len']}, {report['steps']} steps, medians per step: "
             f"{report['wall_unprofiled_us'] / 1e3:.2f} ms with the profiler off; with it on "
             f"{report['wall_us'] / 1e3:.2f} ms, of which ORT's run {report['run_us'] / 1e3:.2f} ms, its nodes "
             f"{report['nodes_us'] / 1e3:.2f} ms", "",
             "| op | µs per step | calls | share of nodes |", "|---|---:|---:|---:|"]
    for op, row in list(report["ops"].items())[:top]:
        lines.append(f"| {op} | {row['us']:.0f} | {row['calls']} | {100 * row['share_of_nodes']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.step_profile", description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--rows", default="1", help="comma-separated row counts, e.g. 1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    args = parser.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows {args.rows!r}: give row counts as integers, e.g. 1,16")
    if min(rows) < 1 or args.prompt_len < 1 or args.steps < 2:
        parser.error("--rows and --prompt-len must be at least 1, --steps at least 2 (the first is a warm-up)")
    try:
        reports = [profile_steps(args.artifact, r, args.prompt_len, args.steps, threads=args.threads) for r in rows]
    except LuffyError as exc:
        raise SystemExit(f"step_profile: {exc}") from None
    print("\n\n".join(markdown(r) for r in reports))
    if args.json is not None:
        record = {"machine": describe_machine(), "reports": reports}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
