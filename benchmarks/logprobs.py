"""What logprobs cost: served decode with and without ``logprobs`` / ``top_logprobs``, in one process, alternated.

    python -m luffy.benchmarks.logprobs ARTIFACT --streams 1,8 --top 0,5,20 --runs 5 --json logprobs.json

Each run sends ``streams`` concurrent greedy requests (random prompts, ``--prompt-len`` tokens, ``--new-tokens``
new) to an in-process Scheduler, once per case: no logprobs, then ``logprobs`` with each ``--top`` count of
alternatives; cases alternate within a run, so host drift hits them alike. Decode rate = tokens after each
request's first / the time from the first request's first token to the last request's last. Reports the median
rate per case and the median per-run ratio to the case without logprobs; the issue's bound is an overhead of at
most 10% of decode time. Tokens must be identical across cases (logprobs only observe). The cost scales with
the vocabulary (a log-softmax and a partial sort per row): measure on the 32000-token reference Llama
(`reference_llama`, benchmarks/models.py), not on llama-pydoc's 320 bytes.

End-to-end rates on a busy machine swing by more than the effect, so a second table times the work itself,
interleaved with the decode steps it rides on: per step, the logprobs of every row (``token_logprobs``) as a
share of the batched decode step.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

import luffy
from luffy.serving.scheduler import Scheduler, SchedulerConfig

from ..serving.requests import Output, Request, SamplingParams, token_logprobs
from .machine import describe_machine


def _served(scheduler, prompts: list[list[int]], new_tokens: int, top: int | None) -> tuple[float, list[list[int]]]:
    """(decode tok/s, tokens) of ``prompts`` served together, each asking ``top`` logprobs (None: none)."""
    done, stamps, outputs = threading.Event(), {}, {}
    lock = threading.Lock()

    def emit(out: Output):
        with lock:
            stamps.setdefault(out.request_id, []).append(time.perf_counter())
            outputs.setdefault(out.request_id, []).append(out)
            if sum(o[-1].finish_reason is not None for o in outputs.values()) == len(prompts):
                done.set()

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=top)
    scheduler.submit_all([Request(list(p), params, emit, request_id=f"r{i}") for i, p in enumerate(prompts)])
    if not done.wait(600):
        raise TimeoutError("the requests did not finish within 600 s")
    start = min(s[0] for s in stamps.values())
    end = max(s[-1] for s in stamps.values())
    tokens = [Output.merge(outputs[f"r{i}"]).token_ids for i in range(len(prompts))]
    return sum(len(t) - 1 for t in tokens) / (end - start), tokens


def compare(artifact: str, streams: list[int], tops: list[int], runs: int, prompt_len: int, new_tokens: int,
            seed: int = 0) -> dict:
    engine = luffy.load(artifact)
    rng = np.random.default_rng(seed)
    cases = {"none": None, **{f"top {k}": k for k in tops}}
    table = {}
    for n in streams:
        config = SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=max(512, prompt_len), prefix_cache=False)
        scheduler = Scheduler(engine, config).start()
        try:
            _served(scheduler, [rng.integers(3, engine.vocab, prompt_len).tolist()] * n, 8, None)  # warm-up
            rates, identical = {name: [] for name in cases}, True
            for _ in range(runs):
                prompts = [rng.integers(3, engine.vocab, prompt_len).tolist() for _ in range(n)]
                plain = None
                for name, top in cases.items():
                    rate, tokens = _served(scheduler, prompts, new_tokens, top)
                    rates[name].append(rate)
                    plain = tokens if plain is None else plain
                    identical &= tokens == plain
        finally:
            scheduler.stop()
        table[str(n)] = {name: {"decode_tok_s": float(np.median(rates[name])),
                                "ratio_to_none": float(np.median(np.array(rates[name]) / np.array(rates["none"])))}
                         for name in cases}
        table[str(n)]["identical_tokens"] = identical
    return {"artifact": artifact, "vocab": engine.vocab, "runs": runs, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "streams": table, "components": components(engine, streams, tops),
            "machine": describe_machine()}


def components(engine, streams: list[int], tops: list[int], steps: int = 12, prompt_len: int = 64,
               seed: int = 0) -> dict:
    """Median ms of one batched decode step and of every row's token_logprobs after it, per stream count and top
    count, the two timed alternately on the same logits."""
    rng, table = np.random.default_rng(seed), {}
    for n in streams:
        slots = engine.open_slots(n, prompt_len + steps + 1)
        for row in range(n):
            slots.step(row, row + 1, rng.integers(3, engine.vocab, (1, prompt_len)))
        times = {"step": [], **{top: [] for top in tops}}
        for _ in range(steps):
            start = time.perf_counter()
            logits = slots.step(0, n, rng.integers(3, engine.vocab, (n, 1)))[:, -1].copy()
            times["step"].append(time.perf_counter() - start)
            for top in tops:
                start = time.perf_counter()
                for row in range(n):
                    token_logprobs(logits[row:row + 1], [int(logits[row].argmax())], top)
                times[top].append(time.perf_counter() - start)
        step = float(np.median(times["step"]))
        table[str(n)] = {"step_ms": step * 1e3, **{f"top {top}": {"ms": float(np.median(times[top])) * 1e3,
                                                                  "share_of_step": float(np.median(times[top])) / step}
                                                   for top in tops}}
    return table


def to_markdown(result: dict) -> str:
    lines = [f"logprobs overhead, {result['artifact']} (vocab {result['vocab']}), {result['runs']} runs, prompt "
             f"{result['prompt_len']}, {result['new_tokens']} new tokens, greedy", "",
             "| streams | case | decode tok/s (median) | ratio to none (median) | decode time added |", "|---|---|---|---|---|"]
    for n, cases in result["streams"].items():
        for name, row in cases.items():
            if name != "identical_tokens":
                lines.append(f"| {n} | {name} | {row['decode_tok_s']:.1f} | {row['ratio_to_none']:.3f} | "
                             f"{(1 / row['ratio_to_none'] - 1) * 100:+.1f}% |")
    lines += ["", "| streams | decode step ms (median) | case | logprobs of every row, ms (median) | share of the step |",
              "|---|---|---|---|---|"]
    for n, row in result["components"].items():
        for name, cost in row.items():
            if name != "step_ms":
                lines.append(f"| {n} | {row['step_ms']:.1f} | {name} | {cost['ms']:.2f} | "
                             f"{cost['share_of_step'] * 100:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--streams", default="1,8", help="concurrent requests per run, comma-separated")
    parser.add_argument("--top", default="0,5,20", help="top_logprobs counts to compare, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = compare(args.artifact, [int(s) for s in args.streams.split(",")], [int(t) for t in args.top.split(",")],
                     args.runs, args.prompt_len, args.new_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(to_markdown(result))


if __name__ == "__main__":
    main()
