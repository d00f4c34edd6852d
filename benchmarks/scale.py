"""The deployable-size benchmark (issue 21): compile random checkpoints of the shapes people deploy and record what
each compile costs.

    python -m luffy.benchmarks.scale --shapes 1b,8b --precisions int4,int8 --out /work/ckpt/out

For every shape (benchmarks/checkpoints.py: Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B, and a 4-layer ``tiny`` for
the docs) it writes the random bf16 checkpoint tensor by tensor, or reuses a complete one (``--checkpoints DIR``
holds ``llama-<shape>``), then compiles each precision in a subprocess and records its wall time, the peak
resident memory of the whole process tree (sampled from /proc every ``SAMPLE_SECONDS``: the sum over the
process and its children, so a compile that forks cannot hide memory) and the artifact's size. ``--load`` also
records the peak RSS of a process that loads each artifact (``luffy.load``) and runs one step; ``--speed`` runs
``luffy bench`` on each artifact (prefill and decode, luffy.measure's definitions); ``--genai`` builds the same
checkpoint with onnxruntime-genai's model builder and ``--llama-cpp BIN`` converts it with llama.cpp's
convert_hf_to_gguf.py and llama-quantize, both measured the same way. Timings on a shared machine are noise:
the memory, sizes and counts are what a shared machine can measure. Results go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .checkpoints import SHAPES, write_checkpoint
from .machine import describe_machine

SAMPLE_SECONDS = 0.1
LLAMA_CPP_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
LOAD_SCRIPT = ("import sys, luffy, numpy as np; e = luffy.load(sys.argv[1]); "
               "e.generate(np.array([[1, 2, 3, 4]]), max_new_tokens=2); print('loaded')")


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant (0 for a process that has gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue  # exited between listing and reading, or a zombie without VmRSS
    return total


def run_measured(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``command`` (output to ``log``); its wall seconds, exit code and peak RSS of its process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = [0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        wall = time.perf_counter() - start
        sampler.join()
    return {"command": " ".join(map(str, command)), "returncode": code, "wall_s": round(wall, 1),
            "peak_rss_bytes": peak[0], "log": str(log)}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


def luffy_compile(checkpoint: Path, out: Path, precision: str, extra: list[str]) -> dict:
    """One `luffy compile` in a subprocess, measured; the report's phases and parity when it succeeded."""
    command = [sys.executable, "-m", "luffy.cli.main", "compile", str(checkpoint), "-o", str(out),
               "--precision", precision, *extra]
    record = run_measured(command, out.with_name(out.name + ".log"))
    record["artifact_bytes"] = dir_bytes(out)
    manifest = out / "manifest.json"
    if record["returncode"] == 0 and manifest.is_file():
        report = json.loads(manifest.read_text())["report"]
        record["phases"] = report.get("phases")
        record["streamed"] = report["capture"].get("streamed")
        record["parity_max_abs_diff"] = (report.get("parity") or {}).get("max_abs_diff")
        record["preflight"] = report.get("preflight")
    return record


def luffy_load(artifact: Path) -> dict:
    """Peak RSS of a process that loads ``artifact`` and generates two tokens."""
    return run_measured([sys.executable, "-c", LOAD_SCRIPT, str(artifact)], artifact.with_name(artifact.name + ".load.log"))


def luffy_speed(artifact: Path) -> dict:
    """`luffy bench` on the artifact alone: prefill and decode (its own table on stdout, kept in the log)."""
    report = artifact.with_name(artifact.name + ".bench.json")
    record = run_measured([sys.executable, "-m", "luffy.cli.main", "bench", str(artifact), "--batch", "1",
                           "--no-bandwidth", "--json", str(report)], artifact.with_name(artifact.name + ".bench.log"))
    record["bench_json"] = str(report)
    return record


def genai_build(checkpoint: Path, out: Path, precision: str) -> dict:
    """onnxruntime-genai's model builder on the same checkpoint (CPU), measured like a compile."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out / "cache")]
    record = run_measured(command, out.with_name(out.name + ".log"), {"HF_HUB_OFFLINE": "1"})
    record["artifact_bytes"] = dir_bytes(out) - dir_bytes(out / "cache")
    return record


def llama_cpp_build(checkpoint: Path, out: Path, precision: str, bin_dir: Path) -> dict:
    """convert_hf_to_gguf.py (bf16 GGUF), then llama-quantize to the precision's type; wall and peak of each."""
    tree = bin_dir.parents[1]  # BUILD/bin -> the llama.cpp checkout
    out.mkdir(parents=True, exist_ok=True)
    bf16 = out / "model-bf16.gguf"
    convert = run_measured([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(checkpoint), "--outfile",
                            str(bf16), "--outtype", "bf16"], out / "convert.log")
    target = out / f"model-{LLAMA_CPP_TYPES[precision]}.gguf"
    quantize = run_measured([str(bin_dir / "llama-quantize"), str(bf16), str(target), LLAMA_CPP_TYPES[precision]],
                            out / "quantize.log")
    bf16.unlink(missing_ok=True)
    return {"convert": convert, "quantize": quantize, "artifact_bytes": dir_bytes(target),
            "wall_s": round(convert["wall_s"] + quantize["wall_s"], 1),
            "peak_rss_bytes": max(convert["peak_rss_bytes"], quantize["peak_rss_bytes"]),
            "returncode": convert["returncode"] or quantize["returncode"]}


def run(args) -> dict:
    results = {"machine": describe_machine(), "runs": []}
    for shape in args.shapes:
        checkpoint = write_checkpoint(shape, Path(args.checkpoints) / f"llama-{shape}", say=lambda m: print(m, flush=True))
        for precision in args.precisions:
            out = Path(args.out) / f"{shape}-{precision}"
            print(f"{shape} {precision}: luffy compile", flush=True)
            row = {"shape": shape, "precision": precision, "system": "luffy",
                   **luffy_compile(checkpoint, out, precision, args.compile_args)}
            if args.load and row["returncode"] == 0:
                row["load"] = luffy_load(out)
            if args.speed and row["returncode"] == 0:
                row["speed"] = luffy_speed(out)
            results["runs"].append(row)
            print(json.dumps(_summary(row)), flush=True)
            if args.genai:
                gen = {"shape": shape, "precision": precision, "system": "onnxruntime-genai builder",
                       **genai_build(checkpoint, Path(args.out) / f"{shape}-{precision}-genai", precision)}
                results["runs"].append(gen)
                print(json.dumps(_summary(gen)), flush=True)
            if args.llama_cpp:
                cpp = {"shape": shape, "precision": precision, "system": "llama.cpp convert + quantize",
                       **llama_cpp_build(checkpoint, Path(args.out) / f"{shape}-{precision}-gguf", precision,
                                         Path(args.llama_cpp))}
                results["runs"].append(cpp)
                print(json.dumps(_summary(cpp)), flush=True)
    return results


def _summary(row: dict) -> dict:
    gib = 1 << 30
    out = {k: row[k] for k in ("shape", "precision", "system", "returncode", "wall_s")}
    out["peak_rss_gib"] = round(row["peak_rss_bytes"] / gib, 2)
    out["artifact_gib"] = round(row["artifact_bytes"] / gib, 3)
    if "load" in row:
        out["load_peak_rss_gib"] = round(row["load"]["peak_rss_bytes"] / gib, 2)
    return out


def table(results: dict) -> str:
    """The markdown table of the runs (docs/large-models.md)."""
    lines = ["| shape | precision | system | wall (s) | peak RSS (GiB) | artifact (GiB) | load peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        s = _summary(row)
        lines.append(f"| {s['shape']} | {s['precision']} | {s['system']} | {s['wall_s']} | {s['peak_rss_gib']} | "
                     f"{s['artifact_gib']} | {s.get('load_peak_rss_gib', '')} |" + ("" if s["returncode"] == 0 else
                                                                                      f" exit {s['returncode']}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b", type=lambda s: s.split(","), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--precisions", default="int4", type=lambda s: s.split(","), help="fp32, int8, int4")
    parser.add_argument("--checkpoints", default="checkpoints", help="where llama-<shape> checkpoints are (or go)")
    parser.add_argument("--out", default="scale-out", help="artifacts and logs")
    parser.add_argument("--load", action="store_true", help="also measure loading each artifact")
    parser.add_argument("--speed", action="store_true", help="also time prefill and decode (luffy bench)")
    parser.add_argument("--genai", action="store_true", help="also build with onnxruntime-genai's model builder")
    parser.add_argument("--llama-cpp", metavar="BIN", help="also convert with llama.cpp (its build's bin directory)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--compile-args", default="", type=str.split, help="extra `luffy compile` flags, quoted")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
