"""A bounded soak of `luffy serve` (issue 23): clients send good requests and, at a rate, malformed and extreme
ones (benchmarks/fuzz_requests.py) to one real server for a set time. It passes when no good request is damaged
(each equals Engine.generate of it alone and a stream ends with [DONE]), no answer is a 5xx, the process lives,
and its RSS after the warm-up grows by less than --max-growth percent (the prefix block store fills first, by
design: the warm-up is the first quarter of the run, or one minute at most).

    python -m luffy.benchmarks.soak --minutes 10 --clients 16 --bad 0.05 --json benchmarks/results/soak.json

It is a correctness and memory check, not a speed measurement: it may run on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import luffy

from .fuzz_requests import fuzz_request, send
from .serve_bench import ServeProcess

PROMPTS = ["def parse(", "Return the", "class Foo:\n", "import os\n", "The module", "If the file", "Open the",
           "Read data from"]


def good_requests(engine, count: int, seed: int) -> list[tuple[dict, str]]:
    """``count`` distinct good requests (greedy and seeded, 8-48 tokens) with the text each gets alone."""
    rng, made = random.Random(seed), []
    for i in range(count):
        prompt, tokens = rng.choice(PROMPTS), rng.randint(8, 48)
        sampled = i % 2 == 1
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8 if sampled else 0, "ignore_eos": True}
        kwargs = {"do_sample": True, "temperature": 0.8, "seed": i} if sampled else {}
        if sampled:
            body["seed"] = i
        ids = engine.tokenizer.encode(prompt).ids
        out = engine.generate([ids], max_new_tokens=tokens, eos_token_id=None, **kwargs)[0, len(ids):].tolist()
        made.append((body, engine.tokenizer.decode(out, skip_special_tokens=True)))
    return made


class Soak:
    """Clients against one server until ``deadline``; tallies outcomes and samples the server's RSS."""

    def __init__(self, server: ServeProcess, model: str, vocab: int, goods: list, bad_rate: float, seed: int):
        self.server, self.model, self.vocab, self.goods = server, model, vocab, goods
        self.bad_rate, self.seed = bad_rate, seed
        self.counts: collections.Counter = collections.Counter()
        self.damaged: list[str] = []
        self.rss: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def client(self, index: int, deadline: float) -> None:
        import httpx

        rng = random.Random(self.seed * 1000 + index)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline:
                if rng.random() < self.bad_rate:
                    self._bad(http, rng)
                else:
                    self._good(http, rng)

    def _bad(self, http, rng) -> None:
        request = fuzz_request(rng, self.model, self.vocab)
        status = send(http, self.server.url, request).status_code
        self._tally(f"bad {status}", None if status < 500 else f"{request.kind}: {status}")

    def _good(self, http, rng) -> None:
        body, expected = rng.choice(self.goods)
        body = {"model": self.model, **body, "stream": rng.random() < 0.5}
        if not body["stream"]:
            response = http.post(self.server.url + "/v1/completions", json=body)
            ok = response.status_code == 200 and response.json()["choices"][0]["text"] == expected
            return self._tally("good", None if ok else f"{response.status_code}: {response.text[:200]}")
        with http.stream("POST", self.server.url + "/v1/completions", json=body) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        text = "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1] if '"choices": [{' in line)
        ok = response.status_code == 200 and lines[-1:] == ["[DONE]"] and text == expected
        self._tally("good", None if ok else f"stream {response.status_code}: {lines[-2:]}")

    def _tally(self, outcome: str, damage: str | None) -> None:
        with self.lock:
            self.counts[outcome] += 1
            if damage is not None:
                self.damaged.append(damage)

    def sample_rss(self, start: float, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.rss.append((time.monotonic() - start, self.server.rss_mib() or 0.0))
            time.sleep(5)


def run(artifact: Path, minutes: float, clients: int, bad_rate: float, seed: int, max_growth: float) -> dict:
    engine = luffy.load(artifact)
    goods = good_requests(engine, 32, seed)
    model = artifact.resolve().name
    server = ServeProcess(artifact, ["--max-num-seqs", str(min(clients, 16))]).start()
    try:
        server.wait_ready(300)
        soak = Soak(server, model, engine.vocab, goods, bad_rate, seed)
        start = time.monotonic()
        deadline = start + minutes * 60
        threads = [threading.Thread(target=soak.client, args=(i, deadline)) for i in range(clients)]
        threads.append(threading.Thread(target=soak.sample_rss, args=(start, deadline)))
        [t.start() for t in threads]
        [t.join() for t in threads]
        alive = server.proc.poll() is None
    finally:
        server.stop()
    warm_up = min(60.0, minutes * 15)  # seconds: a quarter of the run, at most a minute
    after = [mib for at, mib in soak.rss if at >= warm_up] or [mib for _, mib in soak.rss]
    growth = 100 * (after[-1] - after[0]) / after[0] if after else 0.0
    passed = alive and not soak.damaged and growth < max_growth
    return {"minutes": minutes, "clients": clients, "bad_rate": bad_rate, "seed": seed, "outcomes": dict(soak.counts),
            "damaged": soak.damaged[:20], "damaged_count": len(soak.damaged), "alive": alive,
            "rss_mib_after_warm_up": [after[0], after[-1]] if after else None, "rss_growth_pct": round(growth, 2),
            "rss_samples": soak.rss, "passed": passed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", type=Path, help="A causal-LM artifact [llama-pydoc, compiled here].")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bad", type=float, default=0.05, help="Fraction of requests that are malformed or extreme.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth after the warm-up, in percent.")
    parser.add_argument("--json", type=Path, help="Write the result here.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        artifact = args.artifact
        if artifact is None:
            artifact = luffy.compile("llama-pydoc", output=Path(scratch) / "llama-pydoc").path
        result = run(artifact, args.minutes, args.clients, args.bad, args.seed, args.max_growth)
    summary = {k: v for k, v in result.items() if k != "rss_samples"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
