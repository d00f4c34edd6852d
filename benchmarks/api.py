"""`luffy.benchmarks.bench` (defined here, in api.py): the Python API behind `luffy bench`.

    report = bench("llama-tiny", prompt_len=32, gen_len=16, vs=["torch", "ort-export"])
    print(report.to_markdown())

Flow: resolve the target (an artifact, or a model source compiled first, timed) -> build the peers from the
same Hugging Face directory, each in a throwaway process -> measure streaming-read bandwidth -> load every
system in its own worker process -> interleaved timed runs -> peak RSS per worker -> report.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import __version__
from .. import errors as luffy_errors
from ..errors import CapacityError, LuffyError, UsageError
from .bandwidth import BandwidthProbe, streaming_read_bandwidth
from ..runtimes.timing import wait_for_quiet_cpu
from .machine import CpuAccount, describe_machine
from .measure import interleaved_runs
from .peers import PEERS, RUNNERS, SUBJECT, Runner
from .report import DEFINITIONS, BenchReport, batch_result, count, summarize
from .worker import Worker, WorkerFailed, one_shot

BANDWIDTH_PASSES = 5  # the measurement before the runs
ROUND_PASSES = 3  # the re-measurement before every timed round (~0.3 s at 1 GiB on 2 cores)

Progress = Callable[[str, int, int], None]  # (what is happening, steps done, steps in all)


@dataclass
class _Target:
    artifact: Path
    compile_source: str | None  # set when the bench compiles the model first
    hf_dir: Path | None  # what the peers read
    hf_reason: str | None  # why there is none
    spec: str


def parse_peers(vs: str | Iterable[str] | None) -> list[str]:
    """``"torch,genai"`` or a list -> validated peer names in order; ``"all"`` means every peer."""
    if vs is None:
        return []
    items = [p.strip() for p in (vs.split(",") if isinstance(vs, str) else vs) if p and p.strip()]
    if items == ["all"]:
        return list(PEERS)
    unknown = [p for p in items if p not in PEERS]
    if unknown:
        raise UsageError(f"--vs {','.join(unknown)}: unknown peer; choose from {', '.join(PEERS)} (or all)")
    return list(dict.fromkeys(items))


def parse_peer_paths(given: dict[str, str] | Iterable[str] | None) -> dict[str, str]:
    """``["llama.cpp=/opt/llama/bin", ...]`` or a dict -> {peer: path}, every name a known peer."""
    if not given:
        return {}
    pairs = given.items() if isinstance(given, dict) else [item.partition("=")[::2] for item in given]
    out = {}
    for name, path in pairs:
        if name not in PEERS or not path:
            raise UsageError(f"--peer {name}={path}: expected NAME=PATH with NAME one of {', '.join(PEERS)}")
        out[name] = str(path)
    return out


def parse_batches(batch: int | str | Iterable[int]) -> list[int]:
    """``4``, ``"1,4,16"`` or ``[1, 4, 16]`` -> [1, 4, 16]."""
    try:
        if isinstance(batch, int):
            values = [batch]
        elif isinstance(batch, str):
            values = [int(b) for b in batch.split(",") if b.strip()]
        else:
            values = [int(b) for b in batch]
    except ValueError:
        raise UsageError(f"--batch {batch!r}: expected a batch size or a comma-separated list like 1,4,16") from None
    if not values or any(b < 1 for b in values):
        raise UsageError(f"--batch {batch!r}: batch sizes must be >= 1")
    return list(dict.fromkeys(values))


def bench(
    model: str,
    *,
    prompt_len: int = 128,
    gen_len: int = 128,
    batch: int | str | Iterable[int] = 1,
    vs: str | Iterable[str] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    opt_level: int = 2,
    workdir: str | Path | None = None,
    bandwidth: bool = True,
    bandwidth_mib: int = 1024,
    seed: int = 0,
    description: str | None = None,
    progress: Progress | None = None,
    draft: str | Path | None = None,
    prompt_lookup: int | None = None,
    peer_paths: dict[str, str] | Iterable[str] | None = None,
) -> BenchReport:
    """Benchmark an artifact (or a model source, compiled first) against ``vs`` peers on the same weights.

    ``model`` is an artifact directory or anything `luffy.compile` takes (zoo name, HF directory, ...).
    Peers need the Hugging Face directory: a source HF directory, a zoo model saved to one, or the
    directory an artifact's manifest names; otherwise they are skipped with the reason. ``workdir`` keeps
    builds and worker logs (default: a temporary directory, removed afterwards). ``draft`` (an artifact) and
    ``prompt_lookup`` (K) add rows of the same artifact generating with speculative decoding. ``peer_paths`` says where
    a peer outside luffy's Python is: ``{"llama.cpp": "BUILD/bin", "openvino": "VENV/bin/python"}`` (or
    ``["llama.cpp=BUILD/bin", ...]``); unnamed ones are looked for on PATH and in luffy's own Python.

    >>> report = bench("llama-tiny", prompt_len=16, gen_len=8, vs="torch", repeats=2)   # doctest: +SKIP
    >>> report.system("luffy")["results"][0]["decode_tok_s"]["median"]                   # doctest: +SKIP
    """
    if not isinstance(model, (str, Path)):
        raise UsageError(f"bench takes an artifact directory or a model source path/name, not {type(model).__name__}")
    peers = parse_peers(vs)
    batches = parse_batches(batch)
    for name, value, low in (("--prompt-len", prompt_len, 1), ("--gen-len", gen_len, 2), ("--repeats", repeats, 1),
                             ("--warmup", warmup, 0), ("--bandwidth-mib", bandwidth_mib, 16)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    say = progress or (lambda what, done, total: None)
    account = CpuAccount()
    with _workdir(workdir) as work:
        target = _resolve(str(model), work, opt_level)
        speculative = {}
        if draft is not None:
            if not Path(draft).is_dir():
                raise UsageError(f"--draft {draft}: no such artifact directory")
            speculative["luffy-draft"] = {"draft": str(Path(draft).resolve())}
        if prompt_lookup is not None:
            if prompt_lookup < 1:
                raise UsageError(f"--prompt-lookup must be >= 1, got {prompt_lookup}")
            speculative["luffy-lookup"] = {"prompt_lookup": prompt_lookup}
        return _run(target, peers, batches, prompt_len, gen_len, repeats, warmup, opt_level, work, bandwidth,
                    bandwidth_mib, seed, description, say, account, keep=workdir is not None, speculative=speculative,
                    peer_paths=parse_peer_paths(peer_paths))


@contextlib.contextmanager
def _workdir(workdir):
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="luffy-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _resolve(model: str, work: Path, opt_level: int) -> _Target:
    from ..runtimes.manifest import MANIFEST, read_manifest
    from ..compiler.sources.resolve import resolve_source

    if (Path(model) / MANIFEST).is_file():
        manifest = read_manifest(model)
        if manifest.get("kind") != "causal-lm":
            raise UsageError(f"{model}: luffy bench times causal LMs; this artifact is {manifest.get('kind')!r}")
        source = manifest.get("source") or {}
        kind, spec = source.get("kind"), source.get("spec")
        hf_dir, reason = None, None
        if kind == "hf-dir" and source.get("path") and Path(source["path"]).is_dir():
            hf_dir = Path(source["path"])
        elif kind == "zoo":
            hf_dir, reason = _zoo_hf_dir(spec, work)
        else:
            where = source.get("path") or spec
            reason = (f"needs the Hugging Face directory the artifact was compiled from; its manifest names "
                      f"{kind} {where}" + (" (no longer there)" if kind == "hf-dir" else ""))
        return _Target(Path(model).resolve(), None, hf_dir, reason, str(model))
    src = resolve_source(model)  # SourceError with the reason for anything luffy cannot read
    hf_dir, reason = None, None
    if src.kind == "hf-dir":
        hf_dir = src.path
    elif src.kind == "zoo":
        hf_dir, reason = _zoo_hf_dir(src.spec, work)
    else:
        reason = f"needs a Hugging Face directory; {model} is a {src.kind} source"
    source = str(src.path) if src.path is not None else src.spec
    return _Target(work / "luffy-artifact", source, hf_dir, reason, str(model))


def _zoo_hf_dir(name: str, work: Path):
    from .peers import TorchRunner

    missing = TorchRunner.unavailable()
    if missing:
        return None, f"saving zoo model {name} as a Hugging Face directory needs torch: {missing}"
    result = one_shot("call", work / "logs" / "zoo.log", func="luffy.benchmarks.models:zoo_hf_dir",
                      kwargs={"name": name, "out": str(work / "hf" / name)})
    return Path(result["path"]), None


def _as_luffy_error(exc: WorkerFailed, keep: bool) -> LuffyError:
    cls = getattr(luffy_errors, exc.error, None)
    if isinstance(cls, type) and issubclass(cls, LuffyError):
        return cls(exc.message)
    where = f"log: {exc.log}" if keep else "rerun with --workdir DIR to keep the worker logs"
    return LuffyError(f"the luffy engine failed in its worker: {exc.error}: {exc.message} ({where})")


def _run(target, peers, batches, prompt_len, gen_len, repeats, warmup, opt_level, work, bandwidth, bandwidth_mib,
         seed, description, say, account, keep, speculative=None, peer_paths=None) -> BenchReport:
    speculative = speculative or {}
    names = [SUBJECT, *speculative, *peers]
    entries = {n: {"name": n, "label": n, "status": "ok", "reason": None} for n in names}
    paths = {}
    for name in names:
        runner = RUNNERS[name]
        paths[name] = {"hf_dir": str(target.hf_dir) if target.hf_dir else None, "artifact": str(target.artifact),
                       "build_dir": str(work / "builds" / name), "compile_source": target.compile_source,
                       "opt_level": opt_level, **speculative.get(name, {})}
        paths[name]["peer_path"] = (peer_paths or {}).get(name)
        reason = runner.unavailable_with(paths[name])
        if reason is None and runner.needs_hf_dir and target.hf_dir is None:
            reason = target.hf_reason
        if reason:
            entries[name].update(status="skipped", reason=reason)
        elif runner.max_batch is not None and max(batches) > runner.max_batch:
            entries[name]["note"] = f"batch {runner.max_batch} only"

    def failed(name, exc: WorkerFailed):
        if name == SUBJECT:
            raise _as_luffy_error(exc, keep) from None
        where = f" (log: {exc.log})" if keep else ""
        entries[name].update(status="failed", reason=f"{exc.error}: {exc.message}{where}")

    def active():
        return [n for n in names if entries[n]["status"] == "ok"]

    steps = {"done": 0}

    def builds():
        return [n for n in active() if (n != SUBJECT or target.compile_source) and RUNNERS[n].build is not Runner.build]

    def total():
        live = len(active())
        return len(builds()) + live + live * len(batches) * (warmup + repeats)

    def tick(what):
        say(what, steps["done"], total())
        steps["done"] += 1

    def check_capacity():  # before any peer is built: the artifact's limit is known once it exists
        from ..runtimes.manifest import read_manifest

        manifest = read_manifest(target.artifact, verify_files=False)
        limit = manifest.get("max_seq_len")
        if limit and prompt_len + gen_len > limit:
            raise CapacityError(f"prompt length {prompt_len} + gen length {gen_len} = {prompt_len + gen_len} exceeds "
                                f"the artifact's maximum sequence length {limit}")
        return manifest

    # Builds, each in a throwaway worker so its memory never counts against a system.
    if not target.compile_source:
        seconds = (check_capacity().get("report") or {}).get("seconds_total")
        entries[SUBJECT].update(build_s=seconds, build_source="manifest")
    for name in builds():
        tick(f"building {name}" if name != SUBJECT else f"compiling {target.spec}")
        shutil.rmtree(paths[name]["build_dir"], ignore_errors=True)
        try:
            built = one_shot("build", work / "logs" / f"{name}-build.log", system=name, paths=paths[name])
        except WorkerFailed as exc:
            failed(name, exc)
            continue
        entries[name].update(build_s=built.get("build_s"), build_source="measured")
        if name == SUBJECT:
            entries[name]["parity"] = built.get("parity")
            check_capacity()

    bw, probe, per_round = None, None, []
    if bandwidth:
        say("measuring streaming-read bandwidth", steps["done"], total())
        probe = BandwidthProbe(bandwidth_mib)
        bw = streaming_read_bandwidth(passes=BANDWIDTH_PASSES, probe=probe)

    def measure_round() -> float:  # the same method, fewer passes: it runs before every timed round
        gb_s = probe.measure(ROUND_PASSES)["gb_per_s"]
        per_round.append(gb_s)
        return gb_s

    workers: dict[str, Worker] = {}
    try:
        for name in list(active()):
            tick(f"loading {name}")
            worker = Worker(work / "logs" / f"{name}.log")
            workers[name] = worker
            try:
                info = worker.request("load", system=name, paths=paths[name])
            except WorkerFailed as exc:
                worker.close()
                del workers[name]
                failed(name, exc)
                continue
            baseline = info.pop("baseline_rss_bytes")
            entries[name].update(info, baseline_rss_mib=round(baseline / 2**20, 1))
            limit = info.get("max_seq_len")
            if limit and prompt_len + gen_len > limit:
                message = (f"prompt length {prompt_len} + gen length {gen_len} = {prompt_len + gen_len} exceeds "
                           f"{name}'s maximum sequence length {limit}")
                if name == SUBJECT:
                    raise CapacityError(message)
                worker.close()
                del workers[name]
                entries[name].update(status="failed", reason=message)
        vocab = entries[SUBJECT]["vocab"]
        timings, tokens = interleaved_runs(
            {n: workers[n] for n in active()}, batches, prompt_len, gen_len, warmup, repeats, vocab, seed,
            on_run=lambda name, b, rnd: tick(
                f"{name} batch {b} " + (f"warm-up {rnd + 1}" if rnd < warmup else f"run {rnd - warmup + 1}/{repeats}")),
            on_failure=failed, probe=measure_round if probe else None, settle=wait_for_quiet_cpu,
            max_batch={n: RUNNERS[n].max_batch for n in active() if RUNNERS[n].max_batch is not None},
        )
        for name in active():
            try:
                entries[name]["peak_rss_mib"] = round(workers[name].request("rss")["peak_rss_bytes"] / 2**20, 1)
            except WorkerFailed as exc:
                failed(name, exc)
    finally:
        for worker in workers.values():
            worker.close()
        if probe:
            probe.close()
    say("done", total(), total())
    if bw and per_round:
        bw["per_round"] = {"passes": ROUND_PASSES, "gb_per_s": per_round, **summarize(per_round)}

    gb_s = bw["gb_per_s"] if bw else None
    for name in names:
        entry = entries[name]
        if entry["status"] != "ok":
            continue
        entry["results"] = []
        for b in batches:
            if not timings[name][b]:  # above the system's max_batch: said in its entry
                continue
            result = batch_result(b, gen_len, timings[name][b], entry.get("streamed_weight_bytes"), gb_s)
            ref, mine = tokens[SUBJECT].get(b, []), tokens[name].get(b, [])
            agree = next((i for i, (x, y) in enumerate(zip(ref, mine or [])) if x != y), min(len(ref), len(mine or [])))
            # leading new tokens of row 0 identical to luffy's (None: the system reports no tokens)
            result["tokens_agree_with_luffy"] = agree if mine is not None else None
            rates = [r["speculation"]["acceptance_rate"] for r in result["runs"] if r.get("speculation")]
            if rates:
                result["acceptance_rate"] = float(np.median([r for r in rates if r is not None] or [0.0]))
                result["tokens_per_target_step"] = float(np.median(
                    [r["speculation"]["mean_tokens_per_target_step"] for r in result["runs"]]))
            entry["results"].append(result)
    model_info = _model_info(target, entries[SUBJECT])
    data = {
        "tool": "luffy bench",
        "luffy_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "model": {**model_info, "description": description or model_info["description"]},
        "settings": {"prompt_len": prompt_len, "gen_len": gen_len, "batches": batches, "repeats": repeats,
                     "warmup": warmup, "seed": seed, "opt_level": opt_level,
                     "order": "interleaved: each round runs every system once, start rotated per round"},
        "bandwidth": bw,
        "definitions": DEFINITIONS,
        "systems": [entries[n] for n in names],
        "cpu_account": account.stop(),
    }
    return BenchReport(data)


def _model_info(target: _Target, subject: dict) -> dict:
    from ..runtimes.manifest import read_manifest

    manifest = read_manifest(target.artifact, verify_files=False)
    params = (manifest.get("report") or {}).get("parameters")
    arch = (manifest.get("source") or {}).get("architecture") or manifest.get("kind")
    size = count(params)
    return {
        "spec": target.spec, "artifact": str(target.artifact), "hf_dir": str(target.hf_dir) if target.hf_dir else None,
        "parameters": params, "precision": manifest.get("precision"), "architecture": arch,
        "weight_bytes": subject.get("weight_bytes"), "streamed_weight_bytes": subject.get("streamed_weight_bytes"),
        "description": f"{target.spec} ({arch}, {size} parameters, {manifest.get('precision')})",
    }
