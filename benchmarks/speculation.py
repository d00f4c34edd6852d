"""Speculative decoding against plain decoding, in one process, runs alternated (host drift hits both alike).

    python -m luffy.benchmarks.speculation ARTIFACT --draft DRAFT --prompt-lookup 10 --runs 5

Cases, each on the same random prompts (128 tokens, 128 new, batch 1):
  - greedy: plain, with the draft, with prompt lookup; outputs must be identical to plain's;
  - sampled (temperature 1): plain and prompt lookup. A random-weight model's samples almost never repeat, so
    lookups find (almost) nothing: this is the "nothing matches" case, where lookup must cost nothing.
Reports median decode tok/s per case, the ratio to plain, acceptance, and tokens per target step.
`luffy bench ART --draft DRAFT --prompt-lookup K` gives the greedy rows in the bench's own format.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ..measure import decode_tokens_per_s, engine_generate, time_generation
from ..runtimes import load, share_thread_pool


def _decode_rate(engine, prompt: list[int], new_tokens: int, **kwargs) -> tuple[float, list[int], dict | None]:
    """Decode tok/s as `luffy bench` defines it (luffy.measure), the new tokens, the speculation statistics."""
    ids = np.asarray([prompt], dtype=np.int64)
    run = time_generation(lambda first: engine_generate(engine, ids, new_tokens, first, **kwargs), new_tokens)
    return decode_tokens_per_s(1, new_tokens, run), run["tokens"], engine.generation_stats


def compare(artifact: str, draft: str | None, lookup: int | None, runs: int, prompt_len: int, new_tokens: int,
            seed: int = 0, shared_pool: bool = True) -> dict:
    if draft and shared_pool:  # target and draft take turns on the cores: one ONNX Runtime pool (share_thread_pool)
        share_thread_pool()
    target = load(artifact)
    cases = {"plain": {}}
    if draft:
        cases["draft"] = {"assistant_model": load(draft)}
    if lookup:
        cases["prompt-lookup"] = {"prompt_lookup_num_tokens": lookup}
        cases["sampled plain"] = {"do_sample": True, "seed": 1}
        cases["sampled prompt-lookup"] = {"do_sample": True, "seed": 1, "prompt_lookup_num_tokens": lookup}
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, target.vocab, prompt_len).tolist() for _ in range(runs)]
    _decode_rate(target, prompts[0], 8)  # warm-up
    rates = {name: [] for name in cases}
    stats = {name: [] for name in cases}
    identical = {name: True for name in cases}
    for prompt in prompts:
        plain_tokens = None
        for name, kwargs in cases.items():  # alternated: every case once per prompt
            rate, tokens, st = _decode_rate(target, prompt, new_tokens, **kwargs)
            rates[name].append(rate)
            if st:
                stats[name].append(st)
            if name == "plain":
                plain_tokens = tokens
            elif not name.startswith("sampled"):
                identical[name] &= tokens == plain_tokens
    out = {}
    for name in cases:
        base = "sampled plain" if name.startswith("sampled") else "plain"
        out[name] = {
            "decode_tok_s": float(np.median(rates[name])),
            "ratio_to_plain": float(np.median(np.array(rates[name]) / np.array(rates[base]))),
            "identical_to_plain": identical[name] if not name.startswith("sampled") and name != "plain" else None,
            "acceptance_rate": _median(stats[name], "acceptance_rate"),
            "tokens_per_target_step": _median(stats[name], "mean_tokens_per_target_step"),
        }
    return {"artifact": artifact, "draft": draft, "shared_pool": bool(draft and shared_pool), "prompt_lookup": lookup,
            "runs": runs, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "cases": out}


def _median(stats: list[dict], key: str):
    values = [s[key] for s in stats if s.get(key) is not None]
    return float(np.median(values)) if values else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--draft")
    parser.add_argument("--prompt-lookup", type=int)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--own-pools", action="store_true",
                        help="load target and draft as Python's luffy.load does by default (a pool each, no "
                             "share_thread_pool call) instead of the one pool luffy run/serve --draft make")
    args = parser.parse_args(argv)
    print(json.dumps(compare(args.artifact, args.draft, args.prompt_lookup, args.runs, args.prompt_len,
                             args.new_tokens, shared_pool=not args.own_pools), indent=2))


if __name__ == "__main__":
    main()
