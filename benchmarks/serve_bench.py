"""`luffy bench serve`: load against a real `luffy serve` process, measured the way `vllm bench serve` measures.

Requests are random token-id prompts with input and output lengths drawn from ranges (``ignore_eos``, so every
request produces exactly its output length), sent with OpenAI's async client, streamed (raw lines, see _one). Per request:
TTFT (send -> first token's chunk), ITL (gaps between token chunks), TPOT ((E2E - TTFT) / (tokens - 1)) and
E2E. Per run: request and output-token throughput, mean / median / p99 of each latency, and goodput (requests
per second meeting every ``--goodput`` SLO). Runs go at a fixed concurrency (a closed loop: each client
sends its next request when the last one ends) or at a Poisson request rate.

The same requests also run in-process through ``Engine.generate`` before the server starts: one at a time
(the per-token cost streaming is held against) and as static batches (left-padded, every row generating its
batch's longest output: what a service without continuous batching gets).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..benchmarks.machine import describe_machine
from ..errors import UsageError
from ..measure import latency_summary, time_per_output_token
from ..runtimes import load as load_engine


@dataclass(frozen=True)
class ServeLoad:
    """What to send: ``num_prompts`` requests, lengths uniform in the inclusive ranges, seeded."""

    num_prompts: int = 64
    input_len: tuple[int, int] = (112, 144)
    output_len: tuple[int, int] = (112, 144)
    seed: int = 0

    def requests(self, vocab: int, reserved: int = 3) -> list[tuple[list[int], int]]:
        rng = np.random.default_rng(self.seed)
        out = []
        for _ in range(self.num_prompts):
            n_in = int(rng.integers(self.input_len[0], self.input_len[1] + 1))
            n_out = int(rng.integers(self.output_len[0], self.output_len[1] + 1))
            # ids below ``reserved`` are left out: no special token lands in the middle of a prompt
            out.append((rng.integers(reserved, vocab, n_in).tolist(), n_out))
        return out


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'128' -> (128, 128); '112:144' -> (112, 144)."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise UsageError(f"{name} {text!r}: expected N or LOW:HIGH") from None
    low, high = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1]) if len(parts) == 2 else (0, -1)
    if not 1 <= low <= high:
        raise UsageError(f"{name} {text!r}: expected N or LOW:HIGH with 1 <= LOW <= HIGH")
    return low, high


def parse_prefix(text: str) -> tuple[int, int]:
    """'1024:32' -> (1024, 32): a shared prefix of 1024 tokens, then 32 new ones."""
    try:
        prefix, suffix = (int(p) for p in text.split(":"))
    except ValueError:
        raise UsageError(f"--shared-prefix {text!r}: expected PREFIX:SUFFIX token counts, e.g. 1024:32") from None
    if prefix < 1 or suffix < 1:
        raise UsageError(f"--shared-prefix {text!r}: both counts must be >= 1")
    return prefix, suffix


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:100'] -> {'ttft': 0.5, 'tpot': 0.1} (milliseconds in, seconds out), as vllm bench serve."""
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise UsageError(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2e:MS")
        slos[key] = float(value) / 1000
    return slos


def run_metrics(results: list[dict], duration: float, slos: dict[str, float]) -> dict:
    """vllm bench serve's numbers for one run's per-request results."""
    done = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in done)
    prompt = sum(r["prompt_tokens"] for r in done)
    good = [r for r in done if all(r[k] <= limit for k, limit in slos.items())]
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "request_throughput": len(done) / duration, "output_throughput": tokens / duration,
        "total_token_throughput": (tokens + prompt) / duration,
        "goodput": len(good) / duration if slos else None,
        "ttft_s": latency_summary([r["ttft"] for r in done]), "tpot_s": latency_summary([r["tpot"] for r in done if r["tokens"] > 1]),
        "itl_s": latency_summary([g for r in done for g in r["itl"]]), "e2e_s": latency_summary([r["e2e"] for r in done]),
    }


# A chunk carrying usage (luffy's and vLLM's own usage chunk with ``choices: []``, or llama-server's final
# chunk, which holds usage beside an empty choice) is not a token's arrival. JSON writers differ in spacing
# (Python's ``"usage": {``, vLLM's and llama-server's ``"usage":{``): matched with optional whitespace.
_USAGE = re.compile(r'"usage":\s*\{')


async def _one(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request. The SSE lines are read raw (openai's streaming-response API) and only the usage
    chunk is parsed: on a 2-core machine the client shares the server's cores, and building one pydantic
    object per token (the client's default iteration) would slow the server it measures by ~3 %; vLLM's
    own benchmark reads raw lines too. ``usage_tokens`` is the server's own count of generated tokens (None
    when it sent no usage)."""
    start = time.perf_counter()
    stamps, usage, error = [], None, None
    try:
        async with client.completions.with_streaming_response.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as response:
            async for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if _USAGE.search(line):
                    usage = json.loads(line[6:])["usage"]
                elif '"error"' in line[:16]:
                    error = json.loads(line[6:])["error"]["message"]
                else:
                    stamps.append(time.perf_counter())
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    usage_tokens = usage.get("completion_tokens") if usage is not None else None
    tokens = usage_tokens if usage_tokens is not None else len(stamps)
    ok = error is None and bool(stamps)
    ttft = stamps[0] - start if stamps else None
    return {"ok": ok, "error": error, "prompt_tokens": len(prompt), "tokens": tokens, "ttft": ttft,
            "e2e": end - start, "itl": list(np.diff(stamps)) if len(stamps) > 1 else [],
            "tpot": (end - start - ttft) / (tokens - 1) if ok and tokens > 1 else 0.0,
            "max_tokens": max_tokens, "usage_tokens": usage_tokens}


async def _drive(url: str, model: str, requests, concurrency: int | None, rate: float | None, seed: int,
                 on_done, keepalive: bool = True) -> tuple[list[dict], float]:
    """Send ``requests`` (at ``concurrency`` in flight, or Poisson arrivals at ``rate``); per-request results and
    the run's duration. ``keepalive=False`` opens a connection per request: llama-server's HTTP server now and
    then drops a kept-alive connection a request was just sent on ("Server disconnected without sending a
    response"), so the server comparison sends every system's requests that way."""
    import httpx
    from openai import AsyncOpenAI

    http = None if keepalive else httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=600)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600, http_client=http)
    gate = asyncio.Semaphore(concurrency or len(requests))
    rng = np.random.default_rng(seed)

    async def gated(prompt, n):
        async with gate:
            result = await _one(client, model, prompt, n)
        on_done(result)
        return result

    start = time.perf_counter()
    tasks = []
    for prompt, n in requests:
        tasks.append(asyncio.create_task(gated(prompt, n)))
        if rate is not None:  # Poisson arrivals: exponential gaps
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return results, duration


class ServeProcess:
    """`luffy serve` in a child process on 127.0.0.1 (a port the OS picks), its log collected, its RSS readable;
    tests/server_process.py drives the same class.

    >>> server = ServeProcess("build/ref", ["--max-num-seqs", "16"]).start(); server.wait_ready()  # doctest: +SKIP
    """

    def __init__(self, artifact: Path, args: list[str], env: dict | None = None):
        self.cmd = [sys.executable, "-m", "luffy", "serve", str(artifact), "--host", "127.0.0.1", "--port", "0", *args]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url, self.log = "", []

    def start(self) -> "ServeProcess":
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=self.env)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)
            if match := re.search(r"listening on (http://\S+)", line):
                self.url = match.group(1)

    def wait_ready(self, timeout: float = 300.0) -> list[int]:
        """Poll /health until 200 (503 while the model loads); returns every status seen. A server that exits
        or never gets there is stopped, and the error carries the end of its log."""
        import httpx

        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.url:
                try:
                    seen.append(httpx.get(f"{self.url}/health", timeout=5).status_code)
                except httpx.TransportError:
                    seen.append(0)
                if seen[-1] == 200:
                    return seen
            time.sleep(0.02)
        self.stop()
        raise UsageError(f"luffy serve did not become ready (/health: {seen[-5:]}): {''.join(self.log)[-2000:]}")

    def itl_totals(self) -> tuple[float, float]:
        """(sum, count) of the server's own luffy:inter_token_latency_seconds: token gaps without the client."""
        return self.histogram_totals("luffy:inter_token_latency_seconds")

    def histogram_totals(self, name: str) -> tuple[float, float]:
        """(sum, count) of one of the server's histograms."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found = {m.group(1): float(m.group(2)) for m in re.finditer(
            rf"^{re.escape(name)}_(sum|count)\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)}
        return found.get("sum", 0.0), found.get("count", 0.0)

    def rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the server (SIGTERM: drain, exit 0), killing it after ``timeout`` s; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def prefix_ttft(url: str, model: str, vocab: int, prefix_len: int, suffix_len: int, rounds: int, seed: int) -> dict:
    """TTFT of a request whose first ``prefix_len`` tokens a previous request sent (a prefix-cache hit) against
    one whose prefix is new (cold), alternated; medians and their ratio."""
    rng = np.random.default_rng(seed + 1)
    cold, warm = [], []
    for _ in range(rounds):
        prefix = rng.integers(3, vocab, prefix_len).tolist()
        first = asyncio.run(_drive(url, model, [(prefix + rng.integers(3, vocab, suffix_len).tolist(), 2)], 1, None,
                                   seed, lambda r: None))[0][0]
        second = asyncio.run(_drive(url, model, [(prefix + rng.integers(3, vocab, suffix_len).tolist(), 2)], 1, None,
                                    seed, lambda r: None))[0][0]
        cold.append(first["ttft"])
        warm.append(second["ttft"])
    return {"prefix_len": prefix_len, "suffix_len": suffix_len, "cold_ttft_s": latency_summary(cold),
            "hit_ttft_s": latency_summary(warm), "ratio": float(np.median(warm) / np.median(cold)),
            "rounds": [{"cold_s": c, "hit_s": w} for c, w in zip(cold, warm)]}


def in_process_tpot(engine, prompt: list[int], n: int) -> float:
    stamps = []
    engine.generate([prompt], max_new_tokens=n, eos_token_id=None, streamer=lambda _: stamps.append(time.perf_counter()))
    return time_per_output_token(stamps)


def _streamed_tpot(url: str, model: str, prompt: list[int], n: int) -> float:
    import httpx

    stamps = []
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"choices": []' not in line:
                stamps.append(time.perf_counter())
    return time_per_output_token(stamps)


def streaming_overhead(engine, url: str, model: str, requests, rounds: int) -> dict:
    """Per-token time of the same request streamed through the server vs Engine.generate in this process,
    alternated request by request so that drift in the host's speed hits both alike; median of the ratios.

    The stream is read with a plain synchronous httpx client, the lightest reader there is: on a 2-core machine
    any client shares the server's cores, and this measures what streaming costs the server rather than what
    the load generator's own parsing costs (the async OpenAI client's share shows in the concurrency-1 row)."""
    pairs = []
    for prompt, n in requests[:rounds]:
        local = in_process_tpot(engine, prompt, n)
        served = _streamed_tpot(url, model, prompt, n)
        pairs.append({"in_process_tpot_s": local, "served_tpot_s": served, "ratio": served / local})
    return {"rounds": pairs, "median_ratio": float(np.median([p["ratio"] for p in pairs])) if pairs else None}


def static_runs(engine, requests, batch_sizes: list[int]) -> list[dict]:
    """The same requests through Engine.generate in this process, one static batch after another."""
    engine.generate([requests[0][0]], max_new_tokens=2, eos_token_id=None)  # warm-up
    runs = []
    for size in batch_sizes:
        start, useful, results = time.perf_counter(), 0, []
        for i in range(0, len(requests), size):
            chunk = requests[i:i + size]
            longest = max(n for _, n in chunk)
            t0, first = time.perf_counter(), []
            engine.generate([p for p, _ in chunk], max_new_tokens=longest, eos_token_id=None,
                            streamer=lambda _: first or first.append(time.perf_counter()))
            end = time.perf_counter()
            useful += sum(n for _, n in chunk)
            for _, n in chunk:
                results.append({"ok": True, "prompt_tokens": 0, "tokens": n, "ttft": first[0] - t0, "e2e": end - t0,
                                "itl": [], "tpot": (end - first[0]) / max(longest - 1, 1)})
        runs.append({"system": f"Engine.generate static batch {size}", "batch": size,
                     **run_metrics(results, time.perf_counter() - start, {})})
    return runs


DEFINITIONS = {
    "ttft": "request sent -> its first token's chunk", "itl": "gap between two token chunks of a request",
    "tpot": "(e2e - ttft) / (output tokens - 1)", "e2e": "request sent -> its last chunk",
    "server_itl_mean_s": "mean gap between a request's tokens as the server's scheduler produced them "
                         "(luffy:inter_token_latency_seconds), i.e. without the client's own time",
    "output_throughput": "output tokens of completed requests / run duration",
    "goodput": "requests meeting every SLO / run duration",
    "static": "Engine.generate in-process, batches in request order, each row generating its batch's "
              "longest output; only the requested tokens count",
    "streaming_overhead": "served TPOT (streamed, one request at a time, read by a plain httpx client) / "
                          "Engine.generate TPOT in this process for the same request, alternated; median",
}


def bench_serve(artifact: str | Path, load: ServeLoad, concurrency: list[int], request_rate: float | None = None,
                slos: dict | None = None, server_args: list[str] | None = None, static_batches=(1, 16),
                threads: int | None = None, progress=None, overhead_rounds: int = 6,
                shared_prefix: tuple[int, int] | None = None) -> dict:
    """Run the load at each concurrency (or the request rate) against a fresh server; returns the report dict."""
    artifact = Path(artifact)
    say = progress or (lambda *a: None)
    say("static batches in-process", 0, 1)
    engine = load_engine(artifact, threads=threads)
    requests = load.requests(engine.vocab)
    static = static_runs(engine, requests, list(static_batches))
    args = [*(server_args or []), *(["--threads", str(threads)] if threads else [])]
    server = ServeProcess(artifact, args).start()
    try:
        server.wait_ready()
        model = artifact.resolve().name
        asyncio.run(_drive(server.url, model, requests[:2], 2, None, load.seed, lambda r: None))  # warm-up
        points = [("rate", request_rate)] if request_rate else [("concurrency", c) for c in concurrency]
        runs, rss = _served_runs(server, model, requests, points, slos or {}, load.seed, say)
        say("streaming overhead, alternated", len(points), len(points) + 1)
        overhead = streaming_overhead(engine, server.url, model, requests, overhead_rounds)
        prefix = None
        if shared_prefix is not None:
            say("prefix-cache hits, alternated with cold prompts", len(points), len(points) + 1)
            prefix = prefix_ttft(server.url, model, engine.vocab, shared_prefix[0], shared_prefix[1], 5, load.seed)
    finally:
        exit_code = server.stop()
    return {
        "artifact": str(artifact), "machine": describe_machine(), "load": load.__dict__, "server_args": args,
        "slos_s": slos or {}, "static": static, "served": runs, "server_rss_mib": rss,
        "streaming_overhead": overhead, "prefix_cache": prefix, "server_exit_code": exit_code,
        "definitions": DEFINITIONS,
    }


def _served_runs(server, model: str, requests, points, slos: dict, seed: int, say) -> tuple[list[dict], dict]:
    """Every load point against the running server; the server's RSS after its 100th request and at the end."""
    runs, rss, served = [], {}, [0]

    def done(_):
        served[0] += 1
        if served[0] == 100:
            rss["after_100"] = server.rss_mib()

    for i, (kind, value) in enumerate(points):
        say(f"{kind} {value}", i, len(points))
        itl_before = server.itl_totals()
        results, duration = asyncio.run(_drive(server.url, model, requests, value if kind == "concurrency" else None,
                                               value if kind == "rate" else None, seed, done))
        itl_after = server.itl_totals()
        gaps = itl_after[1] - itl_before[1]
        runs.append({"system": "luffy serve", kind: value, **run_metrics(results, duration, slos),
                     "server_itl_mean_s": (itl_after[0] - itl_before[0]) / gaps if gaps else None,
                     "errors": sorted({r["error"] for r in results if r["error"]})[:3]})
    rss["after_all"], rss["requests"] = server.rss_mib(), served[0]
    return runs, rss


def to_markdown(report: dict) -> str:
    def ms(stats, key, digits=0):
        value = stats[key]
        return "—" if value is None else f"{value * 1000:.{digits}f}"

    def server_itl(run):
        value = run.get("server_itl_mean_s")
        return "—" if value is None else f"{value * 1000:.1f}"

    lines = ["| system | load | req/s | output tok/s | TTFT ms mean / median / p99 | TPOT ms median | "
             "ITL ms median / p99 | server ITL ms mean | E2E s median |", "|---|---|---|---|---|---|---|---|---|"]
    for run in report["static"] + report["served"]:
        load = (f"concurrency {run['concurrency']}" if "concurrency" in run else
                f"rate {run['rate']}/s" if "rate" in run else f"batch {run['batch']}")
        lines.append(
            f"| {run['system']} | {load} | {run['request_throughput']:.2f} | {run['output_throughput']:.1f} | "
            f"{ms(run['ttft_s'], 'mean')} / {ms(run['ttft_s'], 'median')} / {ms(run['ttft_s'], 'p99')} | "
            f"{ms(run['tpot_s'], 'median', 1)} | {ms(run['itl_s'], 'median', 1)} / {ms(run['itl_s'], 'p99')} | "
            f"{server_itl(run)} | {(run['e2e_s']['median'] or 0):.2f} |")
    overhead = report.get("streaming_overhead") or {}
    if overhead.get("median_ratio") is not None:
        lines.append(f"\nStreaming through the server (read by a plain httpx client) vs Engine.generate in-process, per "
                     f"token, same request, alternated over {len(overhead['rounds'])} requests: median ratio "
                     f"{overhead['median_ratio']:.3f}.")
    prefix = report.get("prefix_cache")
    if prefix:
        lines.append(f"\nPrefix cache: TTFT of a request whose first {prefix['prefix_len']} tokens were sent before "
                     f"(then {prefix['suffix_len']} new ones): median {prefix['hit_ttft_s']['median'] * 1e3:.0f} ms, "
                     f"against {prefix['cold_ttft_s']['median'] * 1e3:.0f} ms cold: {prefix['ratio']:.3f}x "
                     f"({len(prefix['rounds'])} pairs, alternated).")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Output throughput against TTFT p99, one point per served concurrency, static batches for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    served = [r for r in report["served"] if "concurrency" in r]
    ax.plot([r["ttft_s"]["p99"] for r in served], [r["output_throughput"] for r in served], "o-", label="luffy serve")
    for r in served:
        ax.annotate(f"c={r['concurrency']}", (r["ttft_s"]["p99"], r["output_throughput"]))
    for r, color in zip(report["static"], ("tab:gray", "tab:green", "tab:red", "tab:purple")):
        ax.axhline(r["output_throughput"], linestyle="--", linewidth=1, color=color, label=r["system"])
    ax.set_xlabel("TTFT p99 (s)")
    ax.set_ylabel("output tokens / s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(report: dict, json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=float) + "\n")
    if markdown_path is not None:
        Path(markdown_path).write_text(to_markdown(report))

