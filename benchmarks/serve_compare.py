"""The comparison `luffy bench serve ARTIFACT --vs ...` runs (the servers: serve_peers.py): each system's server
started in turn, the first burst and every load point sent, the server stopped; one report for all."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from ..runtimes.manifest import read_manifest
from .api import artifact_hf_dir
from .machine import describe_machine
from .serve_bench import ServeLoad, ServeProcess, _drive, run_metrics
from .serve_peers import PEER_CLASSES, Setup, free_port

DEFINITIONS = {
    "ttft": "request sent -> its first streamed chunk with a token (llama-server holds back a chunk whose text "
            "ends inside a UTF-8 sequence)",
    "tpot": "(e2e - ttft) / (generated tokens - 1), the token count being the server's usage field",
    "output_throughput": "generated tokens of completed requests / run duration",
    "first_burst": "right after /health turned 200: `slots` requests sent at once (their own prompts); TTFT "
                   "p99 / median of that burst",
    "tokens_verified": "requests whose usage.completion_tokens equals the max_tokens asked (ignore_eos)",
}


def workload(load: ServeLoad, concurrency: list[int], rate: float | None, slots: int) -> dict:
    """The request plan every system gets: the first burst, then one set of prompts per load point."""
    points = [("rate", rate)] if rate else [("concurrency", c) for c in concurrency]
    return {"points": points, "burst": replace(load, num_prompts=slots),
            "loads": [replace(load, seed=load.seed + 1 + i) for i in range(len(points))]}


def _vocab(manifest: dict) -> int:
    out = next((o for o in manifest.get("io", {}).get("outputs", []) if o.get("name") == "logits"), {})
    dim = (out.get("shape") or [None])[-1]
    if not isinstance(dim, int):
        raise UsageError("the artifact's manifest records no vocabulary size (io.outputs logits shape)")
    return dim


def make_setup(artifact: Path, load: ServeLoad, slots: int, max_num_batched_tokens: int, work: Path) -> Setup:
    """Read the artifact's manifest and check the load fits its context; the HF directory comes later."""
    manifest = read_manifest(artifact, verify_files=False)
    if manifest.get("kind") != "causal-lm":
        raise UsageError(f"{artifact}: luffy bench serve needs a causal LM; this artifact is {manifest.get('kind')!r}")
    context = manifest.get("max_seq_len")
    if not isinstance(context, int):
        raise UsageError(f"{artifact}/manifest.json: no max_seq_len")
    longest = load.input_len[1] + load.output_len[1]
    if longest > context:
        raise UsageError(f"--input-len + --output-len up to {longest} tokens exceed the artifact's max_seq_len {context}")
    return Setup(artifact.resolve(), manifest, artifact.resolve().name, slots, context, max_num_batched_tokens, work)


def compare_serve(artifact: str | Path, load: ServeLoad, concurrency: list[int], rate: float | None, vs: list[str],
                  peer_paths: dict[str, str], *, slots: int, max_num_batched_tokens: int = 512,
                  work: Path | None = None, server_timeout: float = 600.0, threads: int | None = None,
                  progress=None, warn=None) -> dict:
    """luffy serve, then each peer in ``vs``, under the same load; a peer that cannot run is skipped with the
    reason (``warn`` gets the line at once) and the others still run. Returns the report dict."""
    artifact = Path(artifact)
    say, warn = progress or (lambda *a: None), warn or (lambda line: None)
    work = Path(work) if work else artifact.resolve().parent / f"{artifact.resolve().name}.serve-peers"
    setup = make_setup(artifact, load, slots, max_num_batched_tokens, work)
    plan, vocab = workload(load, concurrency, rate, slots), _vocab(setup.manifest)
    requests = {"burst": plan["burst"].requests(vocab), "points": [lo.requests(vocab) for lo in plan["loads"]]}
    peers = [PEER_CLASSES[name](peer_paths.get(name)) for name in vs]
    systems = [_run_luffy(setup, requests, plan["points"], server_timeout, threads, say)]
    setup = _with_hf_dir(setup, peers)
    for peer in peers:
        systems.append(_run_peer(peer, setup, requests, plan["points"], server_timeout, say, warn))
    return {
        "mode": "compare", "artifact": str(setup.artifact), "created": datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="seconds"), "machine": describe_machine(), "load": load.__dict__,
        "workload": {"points": [{k: v} for k, v in plan["points"]], "burst_requests": slots,
                     "seeds": {"burst": plan["burst"].seed, "points": [lo.seed for lo in plan["loads"]]},
                     "slots": slots, "context": setup.context, "max_num_batched_tokens": max_num_batched_tokens,
                     "prompts": "token ids (every server takes a list of ints as the prompt)",
                     "connections": "one per request (no keep-alive), for every system"},
        "hf_dir": str(setup.hf_dir) if setup.hf_dir else None, "work": str(work), "systems": systems,
        "definitions": DEFINITIONS,
    }


def _with_hf_dir(setup: Setup, peers) -> Setup:
    """The HF directory the peers read, looked up (a zoo model: saved once) only when a peer can run."""
    if not any(p.unavailable(setup) is None for p in peers):
        return setup
    hf_dir, reason = artifact_hf_dir(setup.manifest, setup.work)
    return replace(setup, hf_dir=hf_dir, hf_reason=reason)


def _run_luffy(setup: Setup, requests, points, timeout: float, threads: int | None, say) -> dict:
    args = ["--max-num-seqs", str(setup.slots), "--max-num-batched-tokens", str(setup.max_num_batched_tokens),
            *(["--threads", str(threads)] if threads else [])]
    server = ServeProcess(setup.artifact, args)
    say("luffy serve: starting", 0, 1)
    entry = {"name": "luffy", "label": "luffy serve", "weights": f"luffy {setup.precision}", "status": "ok",
             "server_cmd": server.cmd}
    try:
        ready = _timed(lambda: server.start().wait_ready(timeout))
        entry.update(ready_s=ready, **_measure("luffy serve", server.url, setup.model, requests, points, say))
    finally:
        entry["exit_code"] = server.stop()
    return entry


def _run_peer(peer, setup: Setup, requests, points, timeout: float, say, warn) -> dict:
    entry = {"name": peer.name, "label": peer.name, "status": "skipped", "reason": peer.unavailable(setup)}
    if entry["reason"] is None and setup.hf_dir is None:
        entry["reason"] = f"{peer.name} {setup.hf_reason}"
    if entry["reason"] is not None:
        warn(f"{peer.name} skipped: {entry['reason']}")
        return entry
    entry.update(status="ok", reason=None, weights=peer.weights(setup), notes=getattr(peer, "notes", list)())
    server = None
    try:
        entry.update(peer.prepare(setup, say))
        entry["label"] = f"{peer.name} {entry.get('version') or ''}".strip()
        server = peer.server(setup, free_port())
        entry["server_cmd"] = server.cmd
        say(f"{peer.name}: starting", 0, 1)
        entry["ready_s"] = _timed(lambda: server.start().wait_ready(timeout))
        entry.update(_measure(peer.name, server.url, setup.model, requests, points, say))
    except Exception as exc:  # noqa: BLE001 - one peer failing leaves the others' results
        entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
        warn(f"{peer.name} failed: {entry['reason']}")
    finally:
        if server is not None:
            entry["exit_code"] = server.stop()
    return entry


def _timed(fn) -> float:
    start = time.monotonic()
    fn()
    return round(time.monotonic() - start, 2)


def _measure(name: str, url: str, model: str, requests, points, say) -> dict:
    """The first burst at once, then every load point; per run the metrics and the token-count check."""
    burst = requests["burst"]
    say(f"{name}: first burst of {len(burst)}", 0, len(points) + 1)
    results, duration = asyncio.run(_drive(url, model, burst, len(burst), None, 0, lambda r: None, keepalive=False))
    first = _checked(run_metrics(results, duration, {}), results)
    ttft = first["ttft_s"]
    first["p99_over_median"] = ttft["p99"] / ttft["median"] if ttft["median"] else None
    runs = []
    for i, ((kind, value), reqs) in enumerate(zip(points, requests["points"])):
        say(f"{name}: {kind} {value}", i + 1, len(points) + 1)
        results, duration = asyncio.run(_drive(url, model, reqs, value if kind == "concurrency" else None,
                                               value if kind == "rate" else None, i, lambda r: None,
                                               keepalive=False))
        runs.append({"system": name, kind: value, **_checked(run_metrics(results, duration, {}), results)})
    return {"first_burst": first, "runs": runs}


def _checked(metrics: dict, results: list[dict]) -> dict:
    """``metrics`` plus how many completed requests generated exactly the tokens asked, per the usage field."""
    done = [r for r in results if r["ok"]]
    wrong = [f"{r['usage_tokens']} of {r['max_tokens']}" for r in done if r["usage_tokens"] != r["max_tokens"]]
    return {**metrics, "tokens_verified": len(done) - len(wrong), "token_mismatches": wrong[:3],
            "errors": sorted({r["error"] for r in results if r["error"]})[:3]}


# -- the table ----------------------------------------------------------------------------------------------
def _ms(stats: dict, key: str, digits: int = 0) -> str:
    value = stats.get(key)
    return "—" if value is None else f"{value * 1000:.{digits}f}"


def _row(system: dict, run: dict, first_row: bool) -> str:
    load = f"concurrency {run['concurrency']}" if "concurrency" in run else f"rate {run['rate']}/s"
    burst = system["first_burst"]
    ratio = burst.get("p99_over_median")
    burst_cell = (f"{ratio:.2f} ({_ms(burst['ttft_s'], 'median')} / {_ms(burst['ttft_s'], 'p99')})"
                  if first_row and ratio is not None else "")
    return (f"| {system['label']} | {system['weights']} | {load} | {run['output_throughput']:.1f} | "
            f"{run['request_throughput']:.2f} | {_ms(run['ttft_s'], 'median')} / {_ms(run['ttft_s'], 'p99')} | "
            f"{_ms(run['tpot_s'], 'median', 1)} | {burst_cell} | "
            f"{run['tokens_verified']}/{run['completed'] + run['failed']} |")


def workload_line(report: dict) -> str:
    load, work = report["load"], report["workload"]
    points = work["points"]
    shape = (f"Poisson arrivals at {points[0]['rate']}/s" if "rate" in points[0] else
             "concurrency " + ",".join(str(p["concurrency"]) for p in points) + " (closed loop)")
    span = lambda r: f"{r[0]}" if r[0] == r[1] else f"{r[0]}-{r[1]}"  # noqa: E731
    return (f"Workload: {load['num_prompts']} requests per load point at {shape}; prompts {span(load['input_len'])} "
            f"random token ids, outputs {span(load['output_len'])} tokens (greedy, ignore_eos); seeds "
            f"{work['seeds']['burst']} (first burst of {work['burst_requests']}) and "
            f"{','.join(map(str, work['seeds']['points']))} (the points); {work['slots']} slots of "
            f"{work['context']} tokens per server; prompts sent as token ids to every server, one connection per "
            f"request.")


def to_markdown(report: dict) -> str:
    """One table: every system's load points, then the skipped / failed systems and the workload."""
    lines = ["| system | weights | load | output tok/s | req/s | TTFT ms median / p99 | TPOT ms median | "
             "first burst TTFT p99/median (ms) | tokens = usage |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for system in report["systems"]:
        if system["status"] != "ok":
            notes.append(f"- {system['name']}: {system['status']} — {system['reason']}")
            continue
        lines += [_row(system, run, i == 0) for i, run in enumerate(system["runs"])]
        notes += [f"- {system['name']}: {note}" for note in system.get("notes", [])]
    return "\n".join([*lines, "", *notes, *([""] if notes else []), workload_line(report)]) + "\n"


def write(report: dict, json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=float) + "\n")
    if markdown_path is not None:
        Path(markdown_path).write_text(to_markdown(report))
