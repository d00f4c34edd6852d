"""The KV cache issue's targets: tokens held per precision, quality, long-context decode speed, bounded memory.

    python -m luffy.benchmarks.kv_cache capacity ART_FP32 ART_FP16 ART_INT8 --kv-cache-memory 1GiB
    python -m luffy.benchmarks.kv_cache quality ART_FP32 ART_FP16 ART_INT8 --eval heldout.txt
    python -m luffy.benchmarks.kv_cache speed ART_FP32 ART_INT8 --context 2048 --sequences 8
    python -m luffy.benchmarks.kv_cache serve ART --kv-cache-memory 1GiB --clients 32 --prompt-len 512 --new-tokens 128

capacity: the tokens a pool of --kv-cache-memory holds for each artifact (its KV precision's bytes per token,
in whole blocks). quality: each artifact's perplexity on --eval windows (a prompt pass per window, and a
decoding pass through the cache over the first --decoding-windows) and its greedy tokens (64 new, on
prompts cut from the same text) against the first artifact's. speed: batched decode at --context tokens x
--sequences rows, artifacts alternated run by run (host drift hits all alike), median step time. serve: a
real `luffy serve` under the limit, --clients concurrent greedy requests; the server's RSS and
luffy:kv_cache_bytes sampled throughout, every answer compared with Engine.generate of that request alone.
Each prints one JSON object (with the machine) and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
from pathlib import Path

import numpy as np

from ..runtimes import load
from ..runtimes.kv_memory import ReservedMemory
from ..serving.kv_pool import KVPool
from ..serving.options import parse_bytes
from .machine import describe_machine
from .serve_bench import ServeProcess


def capacity(artifacts: list[str], memory: str, slots: int, context: int | None) -> list[dict]:
    rows = []
    for path in artifacts:
        engine = load(path)
        cache = engine.open_slots(slots, context or engine.max_seq_len, allocate=ReservedMemory()).cache
        pool = KVPool(cache, parse_bytes(memory))
        kv = engine.manifest["kv_cache"]
        rows.append({"artifact": path, "kv_dtype": kv["dtype"], "bytes_per_token": kv["bytes_per_token"],
                     "block_tokens": cache.block_tokens, "tokens_held": pool.tokens})
    for row in rows:
        row["vs_first"] = round(row["tokens_held"] / rows[0]["tokens_held"], 3)
    return rows


def _windows(engine, text_file: str, window: int, count: int | None) -> list[list[int]]:
    ids = engine.tokenizer.encode(Path(text_file).read_text(encoding="utf-8")).ids
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    return windows[:count] if count else windows


def _perplexity(engine, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = engine.score([ids])[0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return float(np.exp(nll / count))


def _decoding_perplexity(engine, windows: list[list[int]]) -> float:
    """Perplexity with every token fed alone, as decoding feeds it: each prediction attends to a past read back
    from the KV cache in its precision. `_perplexity` scores a window in one prompt pass, whose attention may
    read the keys and values it just computed, before they are stored (GroupQueryAttention does for an fp16
    cache: a prompt-pass perplexity can not tell fp16 KV from fp32)."""
    slots = engine.open_slots(1, max(len(ids) for ids in windows))
    nll, count = 0.0, 0
    for ids in windows:
        slots.cache.clear(0)
        for position in range(len(ids) - 1):
            logits = slots.step(0, 1, np.array([[ids[position]]]))[0, -1].astype(np.float64)
            logits -= logits.max()
            nll -= logits[ids[position + 1]] - np.log(np.exp(logits).sum())
            count += 1
    return float(np.exp(nll / count))


def quality(artifacts: list[str], eval_file: str, prompts: int, prompt_len: int, new_tokens: int,
            decoding_windows: int = 16) -> list[dict]:
    engines = [load(path) for path in artifacts]
    windows = _windows(engines[0], eval_file, 256, None)
    starts = _windows(engines[0], eval_file, prompt_len, None)[::7][:prompts]  # prompts spread over the text
    base = engines[0].generate(starts, max_new_tokens=new_tokens, eos_token_id=None)
    rows = []
    for path, engine in zip(artifacts, engines):
        out = base if engine is engines[0] else engine.generate(starts, max_new_tokens=new_tokens, eos_token_id=None)
        same = sum(bool((out[i] == base[i]).all()) for i in range(len(starts)))
        rows.append({"artifact": path, "kv_dtype": engine.manifest["kv_cache"]["dtype"],
                     "perplexity": round(_perplexity(engine, windows), 5),
                     "decoding_perplexity": round(_decoding_perplexity(engine, windows[:decoding_windows]), 5),
                     "decoding_tokens": sum(len(ids) - 1 for ids in windows[:decoding_windows]),
                     "greedy_identical": f"{same}/{len(starts)}", "greedy_identical_pct": round(100 * same / len(starts), 1)})
    for row in rows:
        row["perplexity_vs_first_pct"] = round(100 * (row["perplexity"] / rows[0]["perplexity"] - 1), 4)
        row["decoding_perplexity_vs_first_pct"] = round(
            100 * (row["decoding_perplexity"] / rows[0]["decoding_perplexity"] - 1), 4)
    return rows


def _decode_steps(engine, context: int, sequences: int, steps: int, seed: int) -> list[float]:
    """Fill ``sequences`` slots with ``context`` random tokens (chunked multi-row prefill), then time ``steps``
    batched decode steps; seconds per step."""
    rng = np.random.default_rng(seed)
    slots = engine.open_slots(sequences, context + steps + 1)
    ids = rng.integers(3, engine.vocab, (sequences, context))
    for start in range(0, context, 256):
        slots.step(0, sequences, ids[:, start:start + 256])
    token = rng.integers(3, engine.vocab, (sequences, 1))
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        token = slots.step(0, sequences, token)[:, -1].argmax(-1)[:, None]
        times.append(time.perf_counter() - began)
    return times


def speed(artifacts: list[str], context: int, sequences: int, steps: int, runs: int) -> list[dict]:
    engines = [load(path) for path in artifacts]
    for engine in engines:
        _decode_steps(engine, 64, sequences, 4, 0)  # warm-up: sessions, arenas
    medians = {path: [] for path in artifacts}
    for run in range(runs):  # alternated: each artifact once per run
        for path, engine in zip(artifacts, engines):
            medians[path].append(float(np.median(_decode_steps(engine, context, sequences, steps, run))))
    rows = []
    for path, engine in zip(artifacts, engines):
        step = float(np.median(medians[path]))
        rows.append({"artifact": path, "kv_dtype": engine.manifest["kv_cache"]["dtype"], "context": context,
                     "sequences": sequences, "step_ms": round(1e3 * step, 2), "tok_s": round(sequences / step, 1),
                     "runs_ms": [round(1e3 * m, 2) for m in medians[path]]})
    for row in rows:
        row["vs_first"] = round(row["tok_s"] / rows[0]["tok_s"], 3)
    return rows


class _Sampler:
    """The server's RSS and luffy:kv_cache_bytes, every ``period`` seconds, in a thread; the largest of each."""

    def __init__(self, server, period: float = 0.25):
        self.server, self.period = server, period
        self.rss_mib = self.kv_bytes = 0.0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import httpx

        while not self.stopped.wait(self.period):
            self.rss_mib = max(self.rss_mib, self.server.rss_mib() or 0.0)
            text = httpx.get(f"{self.server.url}/metrics", timeout=10).text
            found = re.search(r"^luffy:kv_cache_bytes\{[^}]*\} (\S+)$", text, re.MULTILINE)
            self.kv_bytes = max(self.kv_bytes, float(found.group(1)) if found else 0.0)


async def _ask_all(url: str, model: str, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)

    async def one(prompt):
        reply = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                                extra_body={"ignore_eos": True})
        return {"text": reply.choices[0].text, "finish_reason": reply.choices[0].finish_reason}

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def serve(artifact: str, memory: str, clients: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    import httpx

    engine = load(artifact)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, engine.vocab, prompt_len).tolist() for _ in range(clients)]
    args = ["--kv-cache-memory", memory, "--max-num-seqs", str(clients), "--max-model-len",
            str(prompt_len + new_tokens), "--served-model-name", "kv"]
    server = ServeProcess(Path(artifact), args).start()
    try:
        server.wait_ready(1800)
        idle_mib = server.rss_mib()
        sampler = _Sampler(server)
        sampler.thread.start()
        began = time.perf_counter()
        answers = asyncio.run(_ask_all(server.url, "kv", prompts, new_tokens))
        seconds = time.perf_counter() - began
        sampler.stopped.set()
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    alone = [engine.tokenizer.decode(engine.generate([p], max_new_tokens=new_tokens, eos_token_id=None)[0, prompt_len:]
                                     .tolist()) for p in prompts]
    weights = sum(f.stat().st_size for f in Path(artifact).glob("model.onnx*"))
    preempted = re.search(r"^luffy:num_preemptions_total\{[^}]*\} (\S+)$", metrics, re.MULTILINE)
    return {"artifact": artifact, "kv_cache_memory": memory, "clients": clients, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "seconds": round(seconds, 1), "answered": sum(a["finish_reason"] == "length"
                                                                                  for a in answers),
            "identical_to_alone": sum(a["text"] == b for a, b in zip(answers, alone)),
            "preemptions": float(preempted.group(1)) if preempted else None, "weights_mib": round(weights / 2**20, 1),
            "rss_idle_mib": idle_mib, "rss_peak_mib": round(sampler.rss_mib, 1),
            "kv_bytes_peak_mib": round(sampler.kv_bytes / 2**20, 1)}


def _table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.kv_cache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("capacity")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int)
    p = sub.add_parser("quality")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--eval", required=True)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decoding-windows", type=int, default=16,
                   help="256-token windows scored a token at a time through the cache (the decoding perplexity)")
    p = sub.add_parser("speed")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p = sub.add_parser("serve")
    p.add_argument("artifact")
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    if a.what == "capacity":
        rows = capacity(a.artifacts, a.kv_cache_memory, a.max_num_seqs, a.max_model_len)
    elif a.what == "quality":
        rows = quality(a.artifacts, a.eval, a.prompts, a.prompt_len, a.new_tokens, a.decoding_windows)
    elif a.what == "speed":
        rows = speed(a.artifacts, a.context, a.sequences, a.steps, a.runs)
    else:
        rows = [serve(a.artifact, a.kv_cache_memory, a.clients, a.prompt_len, a.new_tokens, a.seed)]
    print(json.dumps({"benchmark": f"kv_cache {a.what}", "machine": describe_machine(), "rows": rows}, indent=2))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
