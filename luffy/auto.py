"""`luffy compile --auto`: compile every precision the target runs, measure each one's quality and speed on
this machine, and publish only the fastest within the quality budget.

The decider sits above the compiler: it calls the compiler's ``compile()`` once per candidate, and the
compiler never imports it. ``luffy.compile`` is :func:`compile` below, which dispatches here when
``auto=True`` and to the compiler otherwise.

    >>> art = luffy.compile("llama-pydoc", output="build/auto", auto=True, max_quality_loss=0.5,
    ...                     eval_file="heldout.txt", calib="calib.txt")            # doctest: +SKIP
    >>> art.report["auto"]["chosen"], art.manifest["precision"]                   # doctest: +SKIP
    ('int4-b32-gptq', 'int4')

Quality: decoders, the perplexity increase on ``eval_file`` against PyTorch fp32 (the compile's own
``report["quality"]``); encoders, 100 x (1 - the lowest mean-pooled embedding cosine over the file's lines)
against PyTorch fp32. fp32 is within every budget: it is the source's own precision, its logits held to 1e-4
of PyTorch by the compile's parity check, so its measured difference is float rounding. Speed: the bench's
own timing (luffy/measure.py) on a short run. Every candidate is compiled by `compile()` into a private
staging directory beside the output; the chosen one is moved into place atomically, the rest removed.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .compiler import compile as compiler_compile
from .compiler.capture.onnx_file import load_onnx_source
from .compiler.capture.reuse import CaptureCache
from .compiler.compile import Artifact, check_paths, config_with
from .compiler.config import LuffyConfig
from .compiler.emit.artifact import check_output_location, staged_directory, write_manifest
from .compiler.quality.calibration import load_tokenizer
from .compiler.report.inspect import fusion_summary
from .compiler.sources.resolve import CAUSAL_LM, ENCODER, resolve_source
from .compiler.sources.torch_model import load_torch_model
from .errors import LuffyError, UsageError, first_line
from .measure import (decode_tokens_per_s, engine_generate, interleaved_rounds, prefill_ms, prompt_ids, time_generation,
                      wait_for_quiet_cpu)
from .runtimes import load

PROMPT_TOKENS, NEW_TOKENS, WARMUP, REPEATS = 64, 16, 1, 7  # short and bounded: the ranking, not the table
# A timed decode lasts at least this long: 16 tokens of a 3M-parameter model take ~20 ms, less than a shared
# machine's scheduling noise. After the warm-up round every candidate decodes the same number of tokens,
# enough for the fastest to take this long (16 at least; bounded by the artifacts' max_seq_len).
MIN_DECODE_SECONDS = 0.2
MAX_SENTENCES = 64  # encoder --eval lines used for the cosine
# Speeds this close to the fastest are a tie, which the least loss wins: twins of the same size and graph
# (GPTQ and round-to-nearest at one block size) measured 0-12 % apart in two runs on a shared 2-core machine.
SPEED_TIE = 0.05


@dataclass(frozen=True)
class Candidate:
    name: str
    precision: str
    block_size: int | None = None  # weight-only int8/int4
    method: str | None = None  # "rtn" (round-to-nearest) or "gptq" (needs --calib)
    why: str = ""


# Measured in this order; a time budget cuts the tail. fp32 first: the reference and the fallback. Then the
# fewest weight bytes per decode step first (batch-1 decode on a CPU streams every weight once per token):
# int4, int8, int8-dynamic. With --calib, GPTQ before its round-to-nearest twin (the same bytes and speed,
# usually less loss). Not here: fp16 and bf16, for which ONNX Runtime's CPU provider has few or no kernels.
ORT_CANDIDATES = (
    Candidate("fp32", "fp32", why="the reference precision; within every budget"),
    Candidate("int4-b128-gptq", "int4", 128, "gptq", why="fewest bytes per token: the fastest decode if its loss fits"),
    Candidate("int4-b32-gptq", "int4", 32, "gptq", why="4x the scales of block 128: less loss, a few more bytes"),
    Candidate("int8-b32-gptq", "int8", 32, "gptq", why="twice int4's bytes, loss near fp32's"),
    Candidate("int4-b128-rtn", "int4", 128, "rtn", why="round-to-nearest, no calibration; int4's fewest bytes"),
    Candidate("int4-b32-rtn", "int4", 32, "rtn", why="round-to-nearest int4 with 4x the scales of block 128"),
    Candidate("int8-b32-rtn", "int8", 32, "rtn", why="round-to-nearest int8: twice int4's bytes, loss near fp32's"),
    Candidate("int8-dynamic", "int8-dynamic", why="int8 activations too: int8 products in prefill (fast on VNNI CPUs)"),
)


def candidates(cfg: LuffyConfig) -> list[Candidate]:
    """The candidates for ``cfg`` in measuring order: GPTQ ones only with ``calib``; a ``precision`` other than
    fp32 keeps only that precision's variants (``--auto --precision int4``: the best int4 build).

    >>> [c.name for c in candidates(LuffyConfig(auto=True, max_quality_loss=1, eval_file="e.txt"))]
    ['fp32', 'int4-b128-rtn', 'int4-b32-rtn', 'int8-b32-rtn', 'int8-dynamic']
    """
    listed = [c for c in ORT_CANDIDATES if c.method != "gptq" or cfg.calib is not None]
    if cfg.precision == "fp32":
        return listed
    precisions = sorted({c.precision for c in listed})
    if cfg.precision not in precisions:
        raise UsageError(f"--auto --precision {cfg.precision}: --auto chooses among {', '.join(precisions)} "
                         f"(ONNX Runtime's CPU provider)")
    return [c for c in listed if c.precision == cfg.precision]


@functools.wraps(compiler_compile.compile)  # luffy.compile: the compiler's signature and docstring
def compile(source, target=None, output=None, precision=None, opt_level=None, config=None, *,  # noqa: A001
            progress=None, captures=None, **options) -> Artifact:
    cfg = config_with(config, target=target, precision=precision, opt_level=opt_level, **options)
    if not cfg.auto:
        return compiler_compile.compile(source, target, output, precision, opt_level, config, progress=progress,
                                        captures=captures, **options)
    check_paths(cfg, output)  # the compiler's own checks of the output, --eval and --calib paths
    return compile_auto(source, output, cfg, progress)


def compile_auto(source, output, cfg: LuffyConfig, progress=None):
    """The decider behind ``compile(..., auto=True)``: see the module docstring.

    >>> art = luffy.compile("llama-pydoc", output="build/auto", auto=True, max_quality_loss=1.0,
    ...                     eval_file="heldout.txt", auto_time_budget=60)                   # doctest: +SKIP
    >>> [(c["name"], c["within_budget"]) for c in art.report["auto"]["candidates"]]      # doctest: +SKIP
    [('fp32', True), ('int4-b128-rtn', True), ...]
    """
    say = progress or (lambda message: None)  # compile() above checked the output, --eval and --calib paths
    listed = candidates(cfg)
    output = Path(output)
    check_output_location(output)  # before minutes of compiles
    started = time.perf_counter()
    quality = _QualityProbe(source, cfg)
    captures = CaptureCache()  # every candidate compiles the same capture (torch.export once, not once each)
    # A sibling of the output (same filesystem: the final move is a rename); the name matches the staging
    # pattern artifact.py removes after a killed compile.
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-auto-", dir=output.parent))
    try:
        rows, built, skipped = _build_all(source, cfg, listed, quality, work, started, say, captures)
        speeds = measure_speeds({name: art.path for name, art in built.items()}, quality.decoder, say)
        for row in rows:
            row.update(speeds.get(row["name"], {}))
            say(f"auto: {row['name']}: {_summary(row)}")
        chosen = choose(rows, quality.decoder)
        if chosen is None:
            raise UsageError(_nothing_fits(cfg, rows, skipped))
        auto = _auto_report(cfg, quality, rows, skipped, chosen, built, time.perf_counter() - started)
        say(f"auto: chose {chosen['name']}; writing it to {output}")
        return _publish(built[chosen["name"]], output, cfg, auto)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_all(source, cfg, listed, quality, work, started, say, captures=None):
    """Compile each candidate and measure its quality, in order, until the time budget runs out: the budget is
    checked before each further candidate against the slowest one so far. Returns (rows, built, skipped)."""
    rows, built, skipped, slowest = [], {}, [], 0.0
    for i, cand in enumerate(listed, 1):
        elapsed = time.perf_counter() - started
        if rows and cfg.auto_time_budget is not None and elapsed + slowest > cfg.auto_time_budget:
            reason = (f"--auto-time-budget {cfg.auto_time_budget:g}s: {elapsed:.0f}s used, a candidate takes "
                      f"up to {slowest:.0f}s")
            skipped = [{"name": c.name, "reason": reason} for c in listed[i - 1:]]
            say(f"auto: skipped {', '.join(s['name'] for s in skipped)} ({reason})")
            break
        t0 = time.perf_counter()
        tag = f"auto: candidate {i}/{len(listed)} {cand.name}"
        row = {**asdict(cand), "quality_loss_pct": None, "decode_tokens_per_s": None, "prefill_ms": None,
               "size_bytes": None}
        try:
            artifact = _compile_candidate(source, cfg, cand, quality, work, lambda m, tag=tag: say(f"{tag}: {m}"),
                                          captures)
            row.update(quality.measure(artifact), size_bytes=model_bytes(artifact.manifest))
            built[cand.name] = artifact
        except LuffyError as exc:  # one candidate the model cannot take (an op, a pass) is not the end...
            if not rows:
                raise  # ...but the first one failing (a bad --eval, an unsupported model) fails them all
            row["error"] = first_line(exc)
        row["within_budget"] = within_budget(row, cfg.max_quality_loss)
        row["compile_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        slowest = max(slowest, time.perf_counter() - t0)
        say(f"{tag}: " + (f"failed: {row['error']}" if "error" in row else
                          f"loss {row['quality_loss_pct']:+.3f}%{'' if row['within_budget'] else ' (over budget)'}"))
    return rows, built, skipped


def _compile_candidate(source, cfg, cand, quality, work, say, captures=None):
    one = replace(cfg, auto=False, max_quality_loss=None, auto_time_budget=None, precision=cand.precision,
                  block_size=cand.block_size or cfg.block_size, calib=cfg.calib if cand.method == "gptq" else None,
                  eval_file=cfg.eval_file if quality.decoder else None)  # --eval on an encoder: cosine, here
    return compiler_compile.compile(source, output=work / cand.name, config=one, progress=say, captures=captures)


def within_budget(row: dict, max_quality_loss: float) -> bool:
    """A measured row's loss is at most the budget; fp32 always is (the source's own precision, held to 1e-4
    of PyTorch by the parity check: its measured difference is float rounding, on either side of 0)."""
    if "error" in row or row["quality_loss_pct"] is None:
        return False
    return row["precision"] == "fp32" or row["quality_loss_pct"] <= max_quality_loss


def choose(rows: list[dict], decoder: bool = True) -> dict | None:
    """The fastest row within budget, None when no row is within budget. Fastest: the highest decode tok/s for
    decoders, the lowest forward ms for encoders; rows within ``SPEED_TIE`` of the fastest count as equally
    fast, and of those the least loss wins (then speed).

    >>> choose([{"name": "a", "within_budget": True, "decode_tokens_per_s": 5, "prefill_ms": 1, "quality_loss_pct": 0},
    ...         {"name": "b", "within_budget": False, "decode_tokens_per_s": 9, "prefill_ms": 1, "quality_loss_pct": 2}])["name"]
    'a'
    """
    eligible = [r for r in rows if r.get("within_budget")]
    if not eligible:
        return None
    speed = (lambda r: r["decode_tokens_per_s"]) if decoder else (lambda r: 1.0 / r["prefill_ms"])
    fastest = max(speed(r) for r in eligible)
    tied = [r for r in eligible if speed(r) >= fastest * (1.0 - SPEED_TIE)]
    return min(tied, key=lambda r: (r["quality_loss_pct"], -speed(r)))


def model_bytes(manifest: dict) -> int:
    """Bytes of the graph and its weights (model.onnx and model.onnx.data)."""
    return sum(f["size"] for name, f in manifest["files"].items() if name.startswith(manifest["model_file"]))


def _summary(row: dict) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    speed = (f"{row['decode_tokens_per_s']:.0f} tok/s decode, " if row["decode_tokens_per_s"] is not None else "")
    return (f"loss {row['quality_loss_pct']:+.3f}%, {speed}{row['prefill_ms']:.1f} ms "
            f"{'prefill' if row['decode_tokens_per_s'] is not None else 'forward'}, "
            f"{row['size_bytes'] / 1e6:.2f} MB{'' if row['within_budget'] else ', over budget'}")


def _nothing_fits(cfg, rows, skipped) -> str:
    measured = ", ".join(f"{r['name']} {r['quality_loss_pct']:+.3f}%" if "error" not in r else f"{r['name']} failed"
                         for r in rows)
    tail = f"; skipped for --auto-time-budget: {', '.join(s['name'] for s in skipped)}" if skipped else ""
    return f"--max-quality-loss {cfg.max_quality_loss:g}%: no candidate within budget ({measured}){tail}; nothing written"


class _QualityProbe:
    """Quality loss of one candidate artifact, by the source's kind: a decoder's perplexity increase (the
    compile measured it into report["quality"]), an encoder's embedding cosine against PyTorch (here)."""

    def __init__(self, source, cfg: LuffyConfig):
        self.src, self.cfg, self.tm, self.reference = resolve_source(source), cfg, None, None
        if self.src.kind == "onnx":
            kind, self.layers = load_onnx_source(self.src.path).kind, None
        else:
            tm = load_torch_model(self.src)
            kind = tm.kind
            self.layers = getattr(getattr(tm.module, "config", None), "num_hidden_layers", None)
            self.tm = None if kind == CAUSAL_LM else tm  # a decoder's module is not needed again: let it go
        self.decoder = kind == CAUSAL_LM
        if kind not in (CAUSAL_LM, ENCODER) or (kind == ENCODER and self.tm is None):
            raise UsageError(f"--auto measures causal LMs (perplexity) and encoders with a PyTorch reference "
                             f"(embedding cosine); {self.src.spec} is {'an .onnx encoder' if kind == ENCODER else 'a ' + kind}")
        self.metric = ("perplexity increase % on --eval vs PyTorch fp32" if self.decoder else
                       "100 x (1 - lowest mean-pooled embedding cosine over --eval lines) vs PyTorch fp32")

    def measure(self, artifact) -> dict:
        if self.decoder:
            q = artifact.report["quality"]
            # an .onnx source compiled at fp32 has no other reference than itself
            loss = q["perplexity_increase_pct"] if q["perplexity_increase_pct"] is not None else 0.0
            return {"quality_loss_pct": loss, "perplexity": q["perplexity"], "perplexity_reference": q["perplexity_reference"]}
        engine = load(artifact.path)
        rows = self._encoded(engine)
        output = engine.manifest["io"]["outputs"][0]["name"]
        got = [_mean_pool(engine.run(feeds)[output]) for feeds in rows]
        if self.reference is None:
            self.reference = [_mean_pool(self._torch(feeds, output)) for feeds in rows]
        cos = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(got, self.reference)]
        return {"quality_loss_pct": 100.0 * (1.0 - min(cos)), "min_cosine": min(cos), "sentences": len(cos)}

    def _encoded(self, engine) -> list[dict]:
        tokenizer = load_tokenizer(self.src, self.tm)
        if tokenizer is None:
            raise UsageError(f"--auto on an encoder measures embedding cosine on --eval text; {self.src.spec} has no tokenizer")
        lines = [ln.strip() for ln in Path(self.cfg.eval_file).read_text(errors="replace").splitlines() if ln.strip()]
        if not lines:
            raise UsageError(f"--eval {self.cfg.eval_file}: no lines of text to embed")
        limit = engine.max_seq_len or 512
        rows = []
        for enc in tokenizer.encode_batch(lines[:MAX_SENTENCES]):
            ids = np.asarray([enc.ids[:limit]], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            rows.append({k: v for k, v in feeds.items() if k in engine.input_types})
        return rows

    def _torch(self, feeds: dict, output: str):
        import torch

        with torch.no_grad():
            out = self.tm.module(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
        return out[output].float().numpy()


def _mean_pool(hidden):
    return hidden[0].astype("float64").mean(axis=0)  # one sentence per row, no padding: every token counts


def _prompt_len(max_seq_len: int | None) -> int:
    return max(1, min(PROMPT_TOKENS, (max_seq_len or 2048) - NEW_TOKENS - 1))


def _decode_length(warm_rates: list[float], engines) -> int:
    """New tokens per timed run: the fastest warm-up rate times MIN_DECODE_SECONDS, within the artifacts' room."""
    room = min((e.max_seq_len or 2048) - _prompt_len(e.max_seq_len) - 1 for e in engines)
    wanted = math.ceil(max(warm_rates, default=0.0) * MIN_DECODE_SECONDS)
    return max(min(NEW_TOKENS, room), min(wanted, room))


def measure_speeds(paths: dict[str, Path], decoder: bool = True, say=lambda message: None) -> dict[str, dict]:
    """Median decode tok/s and prefill ms per artifact (decoders: batch 1, a ``PROMPT_TOKENS`` prompt, new tokens
    enough for the fastest warm-up to last ``MIN_DECODE_SECONDS``, at least ``NEW_TOKENS``; the bench's timing) or forward ms (encoders: one ``PROMPT_TOKENS``-token row), ``WARMUP`` runs discarded.

    The artifacts are timed in interleaved rounds, each round starting one further along, so a slow drift of a
    shared machine spreads over all of them instead of penalising whichever ran last; all are loaded at once
    when they fit in a quarter of the available memory, else one at a time.

    >>> measure_speeds({"fp32": Path("build/fp32"), "int4": Path("build/int4")})          # doctest: +SKIP
    {'fp32': {'decode_tokens_per_s': 601.2, 'prefill_ms': 9.8}, 'int4': {...}}
    """
    sizes = {name: sum(f.stat().st_size for f in Path(path).iterdir()) for name, path in paths.items()}
    together = sum(sizes.values()) <= _available_memory() // 4
    groups = [list(paths)] if together else [[name] for name in paths]
    samples, timing = {}, {"new_tokens": None, "warm_rates": []}
    for group in groups:
        samples.update(_time_group({name: paths[name] for name in group}, decoder, timing, say))
    return {name: {"decode_tokens_per_s": statistics.median(d for d, _ in runs) if decoder else None,
                   "prefill_ms": statistics.median(p for _, p in runs), "timed_new_tokens": timing["new_tokens"]}
            for name, runs in samples.items()}


def _time_group(paths: dict[str, Path], decoder: bool, timing: dict, say) -> dict[str, list]:
    """The interleaved rounds over artifacts loaded together (released when this returns)."""
    engines = {name: load(path) for name, path in paths.items()}
    return interleaved_rounds(list(engines), WARMUP, REPEATS,
                              lambda name, rnd: _timed_sample(engines[name], decoder, rnd, timing),
                              lambda rnd: _next_round(list(engines), rnd, engines, decoder, timing, say))


def _next_round(group, rnd, engines, decoder, timing, say) -> None:
    """Say which round starts; after the warm-up, fix one decode length for every candidate and group."""
    say(f"auto: timing {', '.join(group)} (round {rnd + 1}/{WARMUP + REPEATS}{', warm-up' if rnd < WARMUP else ''})")
    if rnd == WARMUP and decoder and timing["new_tokens"] is None:
        timing["new_tokens"] = _decode_length(timing["warm_rates"], engines.values())


def _timed_sample(engine, decoder: bool, rnd: int, timing: dict) -> tuple[float | None, float]:
    """One timed run (decode tok/s, prefill or forward ms); a warm-up run's decode rate is kept for the length."""
    decode, prefill = _timed_run(engine, decoder, timing["new_tokens"] or NEW_TOKENS)
    if rnd < WARMUP and decoder:
        timing["warm_rates"].append(decode)
    return decode, prefill


def _timed_run(engine, decoder: bool, new_tokens: int = NEW_TOKENS) -> tuple[float | None, float]:
    ids = prompt_ids(1, _prompt_len(engine.max_seq_len), engine.vocab or 100, seed=0)
    wait_for_quiet_cpu(limit_s=0.25)  # the last run's spinning threads; bounded, as the machine may be shared
    if decoder:
        run = time_generation(lambda first: engine_generate(engine, ids, new_tokens, first), new_tokens, "--auto")
        return decode_tokens_per_s(1, new_tokens, run), prefill_ms(run)
    feeds = {"input_ids": ids, "attention_mask": ids * 0 + 1, "token_type_ids": ids * 0}
    t0 = time.perf_counter()
    engine.run({k: v for k, v in feeds.items() if k in engine.input_types})
    return None, (time.perf_counter() - t0) * 1e3


def _available_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: time them one at a time


def _analysis(artifact, quality: _QualityProbe) -> dict:
    """What the decider knows about the model, from the unquantized build when there is one."""
    manifest, report = artifact.manifest, artifact.report
    kv = manifest.get("kv_cache")
    layers = kv["num_layers"] if kv else quality.layers
    fusions = fusion_summary(report, layers)
    return {"kind": manifest["kind"], "parameters": report["parameters"], "layers": layers,
            "kv_bytes_per_token": kv["bytes_per_token"] if kv else None,
            "fusion_coverage": {name: entry for name, entry in fusions.items() if entry["matches"]}}


def _auto_report(cfg, quality, rows, skipped, chosen, built, seconds) -> dict:
    first = built.get("fp32") or next(iter(built.values()))
    rule = (f"{'highest decode tok/s' if quality.decoder else 'lowest forward ms'} within budget; within "
            f"{SPEED_TIE:.0%} of the fastest, the least loss")
    return {
        "metric": quality.metric, "max_quality_loss_pct": cfg.max_quality_loss, "eval_file": cfg.eval_file,
        "calib": cfg.calib, "time_budget_s": cfg.auto_time_budget, "seconds": round(seconds, 1),
        "speed": {"batch": 1, "prompt_tokens": _prompt_len(first.manifest.get("max_seq_len")),
                  "new_tokens": next((r["timed_new_tokens"] for r in rows if r.get("timed_new_tokens")), None),
                  "min_decode_seconds": MIN_DECODE_SECONDS if quality.decoder else None,
                  "warmup": WARMUP, "repeats": REPEATS,
                  "statistic": "median", "timing": "luffy/measure.py (the bench's)"},
        "analysis": _analysis(first, quality),
        "choice_rule": rule + "; fp32 is within every budget",
        "candidates": rows, "skipped": skipped, "chosen": chosen["name"],
    }


def _publish(artifact, output: Path, cfg: LuffyConfig, auto: dict):
    """Move the chosen candidate's files into a fresh staging directory and publish it with report["auto"]
    (write_manifest recomputes the file table, so the hashes stay right)."""
    manifest = dict(artifact.manifest)
    manifest["options"] = {**manifest["options"], "eval_file": cfg.eval_file, "auto": True,
                           "max_quality_loss": cfg.max_quality_loss, "auto_time_budget": cfg.auto_time_budget}
    # seconds_total: the whole decider run (each candidate's own compile time is in its row)
    manifest["report"] = {**manifest["report"], "seconds_total": auto["seconds"], "auto": auto}
    with staged_directory(output) as stage:
        for item in artifact.path.iterdir():
            os.replace(item, stage / item.name)
        manifest = write_manifest(stage, manifest)
    return Artifact(output, manifest)
