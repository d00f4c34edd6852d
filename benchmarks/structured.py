"""Structured outputs: the JSON-schema corpus run (correctness) and constrained-vs-free throughput, against a real
`luffy serve` process driven by OpenAI's client.

    python -m luffy.benchmarks.structured corpus ARTIFACT [--seeds 3] [--json out.json]
    python -m luffy.benchmarks.structured throughput ARTIFACT [--requests 16] [--rounds 3]

corpus: every schema of structured_schemas.json (60 API-style schemas: nested objects, bounded arrays, enums,
patterns, nullable fields, anyOf, $ref, formats) as ``response_format`` json_schema with ``strict``, at
temperature 0.7 and the largest max_tokens the artifact's context leaves after the prompt (512 when it allows);
on a model whose free output is noise (llama-tiny's random weights) every output must parse, validate (jsonschema,
with its format checker) and end with finish_reason "stop". A correctness run: timing does not matter.

throughput: ``--requests`` concurrent requests constrained by corpus schemas, then the same requests free
(``ignore_eos``, max_tokens set to what each constrained one produced), alternated over ``--rounds``; reports
generated tokens per second of each and their ratio (the target: constrained >= 0.9x free). Timing: run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import first_line
from .machine import describe_machine
from .serve_bench import ServeProcess

CORPUS_FILE = Path(__file__).with_name("structured_schemas.json")


def corpus() -> list[dict]:
    """The schema corpus: ``{"name", "covers", "schema"}`` entries."""
    return json.loads(CORPUS_FILE.read_text())


def schemas() -> dict[str, dict]:
    """The corpus as name -> schema."""
    return {entry["name"]: entry["schema"] for entry in corpus()}


def validate(value, schema: dict) -> None:
    """Raise jsonschema's ValidationError unless ``value`` follows ``schema``, formats included (the checker of
    the schema's own draft: jsonschema's draft-3 ``time`` check would refuse fractional seconds)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)
    validator(schema, format_checker=validator.FORMAT_CHECKER).validate(value)


def _served(artifact: Path, max_num_seqs: int):
    server = ServeProcess(artifact, ["--max-num-seqs", str(max_num_seqs)]).start()
    server.wait_ready()
    return server


def _budget(artifact: Path, prompt: str, max_tokens: int) -> tuple[int, int]:
    """(prompt tokens, the max_tokens the artifact's context leaves: at most ``max_tokens``)."""

    manifest = json.loads((artifact / "manifest.json").read_text())
    prompt_len = len(Tokenizer.from_file(str(artifact / manifest["tokenizer"])).encode(prompt).ids)
    return prompt_len, min(max_tokens, (manifest.get("max_seq_len") or 1 << 30) - prompt_len)


def _format(entry: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {
        "name": entry["name"], "schema": entry["schema"], "strict": True}}}


def _check(entry: dict, choice) -> str | None:
    """Why a corpus output fails (None: it parses, validates and ended with "stop")."""
    if choice.finish_reason != "stop":
        return f"finish_reason {choice.finish_reason}"
    try:
        validate(json.loads(choice.text), entry["schema"])
    except ValueError as exc:
        return f"does not parse: {exc}"
    except Exception as exc:  # noqa: BLE001 - jsonschema's ValidationError
        return f"does not validate: {first_line(exc)}"
    return None


def run_corpus(artifact: str | Path, seeds: int = 1, temperature: float = 0.7, max_tokens: int = 512,
               concurrency: int = 8, prompt: str = "JSON:") -> dict:
    """Every corpus schema x ``seeds`` through a real server; the outcome of each and a summary."""

    artifact = Path(artifact)
    prompt_len, budget = _budget(artifact, prompt, max_tokens)
    server = _served(artifact, concurrency)
    try:
        client = _client(server.url)
        model = client.models.list().data[0].id

        def one(job):
            entry, seed = job
            choice = client.completions.create(model=model, prompt=prompt, max_tokens=budget, temperature=temperature,
                                               seed=seed, extra_body=_format(entry)).choices[0]
            return {"name": entry["name"], "seed": seed, "finish_reason": choice.finish_reason,
                    "structured_output": (choice.model_extra or {}).get("structured_output"),
                    "chars": len(choice.text), "failure": _check(entry, choice)}

        jobs = [(entry, seed) for entry in corpus() for seed in range(seeds)]
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            rows = list(pool.map(one, jobs))
    finally:
        server.stop()
    passed = sum(r["failure"] is None for r in rows)
    return {"artifact": str(artifact), "schemas": len(corpus()), "seeds": seeds, "temperature": temperature,
            "prompt_tokens": prompt_len, "max_tokens": budget, "outputs": len(rows), "passed": passed,
            "closed_early": sum(r["structured_output"] == "closed_early" for r in rows), "rows": rows}


def run_throughput(artifact: str | Path, requests: int = 16, rounds: int = 3, max_tokens: int = 256,
                   temperature: float = 0.7) -> dict:
    """``requests`` concurrent constrained requests, then the same free (as many tokens each), alternated
    ``rounds`` times; generated tokens per second of each, their ratio, and the server's mask time per step."""


    artifact = Path(artifact)
    entries = [corpus()[i % len(corpus())] for i in range(requests)]
    prompts = [f"JSON {i}:" for i in range(requests)]
    budget = min(_budget(artifact, p, max_tokens)[1] for p in prompts)
    server = _served(artifact, requests)
    try:
        client = _client(server.url)
        model = client.models.list().data[0].id
        rates, counts = {"constrained": [], "free": []}, None
        for round_ in range(rounds):
            # alternate (drift on a busy machine hits both alike); the free batch takes the constrained one's
            # token counts, which a seed fixes, so the first round goes constrained first
            order = ("constrained", "free") if counts is None or round_ % 2 == 0 else ("free", "constrained")
            for case in order:
                if case == "constrained":
                    rate, counts = _batch(client, model, prompts, [budget] * requests, temperature, entries)
                else:
                    rate, _ = _batch(client, model, prompts, counts, temperature, None)
                rates[case].append(rate)
        mask = server.histogram_totals("luffy:structured_output_mask_seconds")
    finally:
        server.stop()
    median = {case: statistics.median(values) for case, values in rates.items()}
    return {"artifact": str(artifact), "requests": requests, "rounds": rounds, "max_tokens": budget,
            "tokens_per_second": median, "ratio": median["constrained"] / median["free"], "runs": rates,
            "mask_ms_per_step": 1e3 * mask[0] / mask[1] if mask[1] else None, "machine": describe_machine()}


def _batch(client, model: str, prompts: list[str], max_tokens: list[int], temperature: float,
           entries: list[dict] | None) -> tuple[float, list[int]]:
    """Send one request per prompt at once; (generated tokens per second of wall time, tokens of each)."""

    def one(i):
        extra = _format(entries[i]) if entries is not None else {"ignore_eos": True}
        done = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens[i],
                                         temperature=temperature, seed=i, extra_body=extra)
        return done.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        counts = list(pool.map(one, range(len(prompts))))
    return sum(counts) / (time.perf_counter() - start), counts


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def corpus_markdown(report: dict) -> str:
    lines = [f"{report['passed']}/{report['outputs']} outputs parse, validate and end with finish_reason stop "
             f"({report['schemas']} schemas x {report['seeds']} seeds, temperature {report['temperature']}, "
             f"max_tokens {report['max_tokens']} after a {report['prompt_tokens']}-token prompt; "
             f"{report['closed_early']} closed early by the token budget)", ""]
    failures = [r for r in report["rows"] if r["failure"]]
    if failures:
        lines += ["| schema | seed | failure |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['seed']} | {r['failure']} |" for r in failures]
    return "\n".join(lines)


def throughput_markdown(report: dict) -> str:
    rate = report["tokens_per_second"]
    mask = report["mask_ms_per_step"]
    return "\n".join([
        "| batch | generated tok/s (median) |", "|---|---|",
        f"| {report['requests']} constrained | {rate['constrained']:.1f} |",
        f"| {report['requests']} free, as many tokens | {rate['free']:.1f} |",
        "", f"ratio constrained/free: {report['ratio']:.3f} ({report['rounds']} alternated rounds, max_tokens "
            f"{report['max_tokens']}); grammar mask: " + (f"{mask:.3f} ms per decode step" if mask else "n/a")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.structured", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus_run = sub.add_parser("corpus", help="every corpus schema through a server (correctness)")
    corpus_run.add_argument("artifact", type=Path)
    corpus_run.add_argument("--seeds", type=int, default=1)
    corpus_run.add_argument("--temperature", type=float, default=0.7)
    corpus_run.add_argument("--max-tokens", type=int, default=512)
    throughput = sub.add_parser("throughput", help="constrained vs free batches (timing: a quiet machine)")
    throughput.add_argument("artifact", type=Path)
    throughput.add_argument("--requests", type=int, default=16)
    throughput.add_argument("--rounds", type=int, default=3)
    throughput.add_argument("--max-tokens", type=int, default=256)
    for command in (corpus_run, throughput):
        command.add_argument("--json", type=Path, help="write the whole report here")
    args = parser.parse_args(argv)
    if args.command == "corpus":
        report = run_corpus(args.artifact, args.seeds, args.temperature, args.max_tokens)
        print(corpus_markdown(report))
        ok = report["passed"] == report["outputs"]
    else:
        report = run_throughput(args.artifact, args.requests, args.rounds, args.max_tokens)
        print(throughput_markdown(report))
        ok = True
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
