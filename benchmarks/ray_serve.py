"""`luffy serve --replicas` on Ray Serve, measured (issue 15): output throughput of 2 replicas against 1, the
prefix router's hit rate on a workload of 4 shared system prompts (against Ray's default power-of-two router),
and how long Ray Serve takes to replace a SIGKILLed replica. Every server is a real `luffy serve` process on a
local Ray cluster (benchmarks/serve_bench.py's ServeProcess), driven from this process on 127.0.0.1.

    python -m luffy.benchmarks.ray_serve ARTIFACT --json benchmarks/results/ray-serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..measure import latency_summary
from ..runtimes import load as load_engine
from .machine import describe_machine
from .serve_bench import ServeLoad, ServeProcess, _drive, run_metrics

CONFIGS = {  # name -> `luffy serve` flags; every replica gets --threads 1 unless the name says otherwise
    "1 replica (Ray), 1 thread": ["--replicas", "1", "--threads", "1"],
    "2 replicas (Ray), 1 thread each": ["--replicas", "2", "--threads", "1"],
    "1 replica (Ray), 2 threads": ["--replicas", "1", "--threads", "2"],
    "no Ray, 1 thread": ["--threads", "1"],
    "no Ray, 2 threads": ["--threads", "2"],
    "no Ray, 2 threads, --no-spin": ["--threads", "2", "--no-spin"],
}


def descendants(pid: int) -> dict[int, str]:
    """Every live (not zombie) process below ``pid``: pid -> command line, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        todo.extend(children.get(child, []))
    return found


def replica_pids(server: ServeProcess) -> list[int]:
    return [pid for pid, cmd in descendants(server.proc.pid).items() if "ServeReplica:" in cmd and "LuffyReplica" in cmd]


def metric_sum(url: str, name: str) -> float:
    """The sum of ``name`` over every replica's samples in the merged /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE))


def running(url: str) -> int:
    import httpx

    try:
        response = httpx.get(f"{url}/health", timeout=5)
    except httpx.TransportError:
        return 0
    return response.json().get("replicas", {}).get("RUNNING", 0) if response.status_code == 200 else 0


def _server(artifact: Path, args: list[str]) -> ServeProcess:
    server = ServeProcess(artifact, args).start()
    server.wait_ready(300)
    return server


def throughput(artifact: Path, load: ServeLoad, concurrency: int, rounds: int, slots: int, say) -> dict:
    """Each configuration's output tokens/s on the same requests, configurations alternated round by round."""
    requests = load.requests(load_engine(artifact, threads=1).vocab)
    model, runs = artifact.resolve().name, {name: [] for name in CONFIGS}
    for r in range(rounds):
        for name, args in CONFIGS.items():
            say(f"throughput round {r + 1}/{rounds}: {name}")
            server = _server(artifact, [*args, "--max-num-seqs", str(slots)])
            try:
                asyncio.run(_drive(server.url, model, requests[:4], 4, None, load.seed, lambda _: None))  # warm-up
                results, duration = asyncio.run(_drive(server.url, model, requests, concurrency, None, load.seed,
                                                       lambda _: None))
            finally:
                server.stop()
            runs[name].append(run_metrics(results, duration, {}))
    medians = {name: float(np.median([m["output_throughput"] for m in ms])) for name, ms in runs.items()}
    one, two = medians["1 replica (Ray), 1 thread"], medians["2 replicas (Ray), 1 thread each"]
    return {"concurrency": concurrency, "max_num_seqs": slots, "load": load.__dict__, "rounds": rounds,
            "output_tok_s_median": medians, "two_over_one": two / one,
            "runs": {name: [{k: m[k] for k in ("output_throughput", "request_throughput", "duration_s", "failed",
                                               "ttft_s", "tpot_s")} for m in ms] for name, ms in runs.items()}}


async def _routed(url: str, model: str, prompts: list[tuple[int, list[int]]], concurrency: int, max_tokens: int):
    """Non-streamed requests at ``concurrency``: (system prompt index, replica that served it, seconds)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(system, prompt):
            async with gate:
                t0 = time.perf_counter()
                response = await client.post(f"{url}/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                response.raise_for_status()
                return system, response.headers["x-luffy-replica"], time.perf_counter() - t0

        return await asyncio.gather(*(one(s, p) for s, p in prompts))


POLICIES = {"prefix": ["--routing", "prefix"], "prefix, imbalance 0": ["--routing", "prefix", "--routing-imbalance", "0"],
            "pow2": ["--routing", "pow2"]}


def routing(artifact: Path, num_requests: int, system_len: int, suffix_len: int, concurrencies: list[int],
            slots: int, rounds: int, seed: int, say, policies: list[str] | None = None,
            server_args: list[str] | None = None) -> dict:
    """Requests that each start with one of four system prompts of ``system_len`` tokens (uniformly) and add
    ``suffix_len`` new tokens, through 2 replicas, per routing policy; one server per policy and round (policies
    alternated), running each concurrency in turn with its own four system prompts (so one run's cache does not
    serve the next)."""
    vocab = load_engine(artifact, threads=1).vocab
    policies = {name: POLICIES[name] for name in (policies or POLICIES)}
    out = {"num_requests": num_requests, "system_len": system_len, "suffix_len": suffix_len, "max_num_seqs": slots,
           "rounds": rounds, "policies": policies, "server_args": server_args or [], "runs": []}
    for r in range(rounds):
        rng = np.random.default_rng(seed + r)
        workloads = {}
        for concurrency in concurrencies:
            systems = [rng.integers(3, vocab, system_len).tolist() for _ in range(4)]
            workloads[concurrency] = [(int(s), systems[s] + rng.integers(3, vocab, suffix_len).tolist())
                                      for s in rng.integers(0, 4, num_requests)]
        for policy, flags in policies.items():
            say(f"routing round {r + 1}/{rounds}: {policy}")
            server = _server(artifact, ["--replicas", "2", "--threads", "1", "--max-num-seqs", str(slots), *flags,
                                        *(server_args or [])])
            try:
                for concurrency, prompts in workloads.items():
                    out["runs"].append({"round": r, "routing": policy, "concurrency": concurrency,
                                        **_routing_run(server, artifact.resolve().name, prompts, concurrency)})
            finally:
                server.stop()
    out["medians"] = {f"{policy}, concurrency {c}": {key: float(np.median([run[key] for run in out["runs"]
                                                                          if run["routing"] == policy
                                                                          and run["concurrency"] == c]))
                                                     for key in ("token_hit_rate", "system_prompt_cold_starts",
                                                                 "latency_median_s", "duration_s")}
                      for policy in policies for c in concurrencies}
    return out


def _routing_run(server: ServeProcess, model: str, prompts, concurrency: int) -> dict:
    time.sleep(3)  # the board holds every replica's metrics (each pushes once a second)
    before = {n: metric_sum(server.url, f"luffy:prefix_cache_{n}_total") for n in ("hits", "queries")}
    start = time.perf_counter()
    results = asyncio.run(_routed(server.url, model, prompts, concurrency, 8))
    duration = time.perf_counter() - start
    time.sleep(3)
    after = {n: metric_sum(server.url, f"luffy:prefix_cache_{n}_total") for n in ("hits", "queries")}
    seen, placement = set(), {}
    for system, replica, _ in results:
        seen.add((system, replica))
        placement.setdefault(str(system), {}).setdefault(replica, 0)
        placement[str(system)][replica] += 1
    hits, queries = after["hits"] - before["hits"], after["queries"] - before["queries"]
    latency = latency_summary([s for *_, s in results])
    return {"token_hit_rate": hits / queries if queries else None, "prompt_tokens": queries, "cached_tokens": hits,
            "system_prompt_cold_starts": len(seen), "latency_s": latency, "latency_median_s": latency["median"],
            "duration_s": duration, "placement": placement}


class Traffic:
    """``clients`` threads calling ``send(i)`` (an httpx request) back to back until stopped or ``limit_s`` passed;
    ``seen`` gets (time, status or 0 for a transport error, x-luffy-replica) of each."""

    def __init__(self, send, clients: int = 2, limit_s: float = 600.0):
        self.send, self.limit_s, self.stop, self.seen = send, limit_s, threading.Event(), []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int):
        import httpx

        deadline = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                response = self.send(i)
                self.seen.append((time.monotonic(), response.status_code, response.headers.get("x-luffy-replica")))
            except httpx.HTTPError:
                self.seen.append((time.monotonic(), 0, None))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def recovery(artifact: Path, kills: int, say) -> dict:
    """SIGKILL one of 2 replicas under light traffic, ``kills`` times: seconds until a request is served by the
    replacement, until the controller reports 2 running again, and what happened to requests meanwhile."""
    server = _server(artifact, ["--replicas", "2", "--threads", "1", "--max-num-seqs", "4"])
    rounds = []
    try:
        import httpx

        body = {"model": artifact.resolve().name, "prompt": [5, 6, 7, 8], "max_tokens": 32, "temperature": 0,
                "ignore_eos": True}
        with Traffic(lambda _: httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)) as traffic:
            for k in range(kills):
                say(f"recovery: kill {k + 1}/{kills}")
                deadline = time.monotonic() + 60
                while len({r for _, s, r in traffic.seen[-20:] if s == 200}) < 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                known = {r for _, _, r in traffic.seen if r}
                victim = replica_pids(server)[0]
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                served_new = dropped = back = None
                while time.monotonic() < killed_at + 120 and (served_new is None or back is None):
                    count = running(server.url)
                    dropped = dropped or (count < 2 and time.monotonic())
                    if dropped and back is None and count >= 2:
                        back = time.monotonic()
                    new = [t for t, s, r in traffic.seen if t > killed_at and s == 200 and r not in known]
                    served_new = served_new or (new[0] if new else None)
                    time.sleep(0.1)
                window = [(t, s) for t, s, _ in traffic.seen if killed_at <= t <= (served_new or time.monotonic())]
                rounds.append({
                    "first_request_served_by_replacement_s": served_new - killed_at if served_new else None,
                    "controller_reports_2_running_s": back - killed_at if back else None,
                    "requests_failed": sum(1 for _, s in window if s != 200),
                    "requests_served_meanwhile": sum(1 for _, s in window if s == 200),
                    "failed_statuses": sorted({s for _, s in window if s != 200})})
                time.sleep(3)
    finally:
        exit_code = server.stop()
    done = [r["first_request_served_by_replacement_s"] for r in rounds if r["first_request_served_by_replacement_s"]]
    return {"kills": rounds, "replacement_serving_s_median": float(np.median(done)) if done else None,
            "server_exit_code": exit_code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of throughput and routing runs (configurations "
                        "alternated within a round)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="KV slots per replica")
    parser.add_argument("--routing-requests", type=int, default=48)
    parser.add_argument("--routing-concurrency", default="2,8", help="comma-separated")
    parser.add_argument("--policy", action="append", choices=list(POLICIES), help="routing policies [all]")
    parser.add_argument("--prefix-cache-mb", type=int, help="the routing servers' --prefix-cache-mb [luffy's default]")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--only", choices=("throughput", "routing", "recovery"), action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    def say(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    parts = args.only or ["throughput", "routing", "recovery"]
    command = " ".join(["python -m luffy.benchmarks.ray_serve", *(sys.argv[1:] if argv is None else argv)])
    import ray

    report = {"artifact": str(args.artifact), "command": command, "machine": describe_machine(), "ray": ray.__version__}
    if "throughput" in parts:
        load = ServeLoad(args.num_prompts, (args.input_len, args.input_len), (args.output_len, args.output_len),
                         args.seed)
        report["throughput"] = throughput(args.artifact, load, args.concurrency, args.rounds, args.max_num_seqs, say)
    if "routing" in parts:
        extra = [] if args.prefix_cache_mb is None else ["--prefix-cache-mb", str(args.prefix_cache_mb)]
        report["routing"] = routing(args.artifact, args.routing_requests, 256, 32,
                                    [int(c) for c in args.routing_concurrency.split(",")], args.max_num_seqs,
                                    args.rounds, args.seed, say, args.policy, extra)
    if "recovery" in parts:
        report["recovery"] = recovery(args.artifact, args.kills, say)
    text = json.dumps(report, indent=2, default=float)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
