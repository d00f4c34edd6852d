"""`luffy.benchmarks.bench` (defined here, in api.py): the Python API behind `luffy bench`.

    report = bench("llama-tiny", prompt_len=32, gen_len=16, vs=["torch", "ort-export"])
    print(report.to_markdown())

Flow: resolve the target (an artifact, or a model source compiled first, timed) -> build the peers from the
same Hugging Face directory, each in a throwaway process -> measure streaming-read bandwidth -> load every
system in its own worker process -> interleaved timed runs (luffy.measure) -> peak RSS per worker -> report.
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
from ..compiler.sources.resolve import resolve_source
from ..errors import CapacityError, LuffyError, UsageError
from ..measure import CpuAccount, interleaved_rounds, prompt_ids, spread, wait_for_quiet_cpu
from ..runtimes.generation import check_capacity
from ..runtimes.manifest import MANIFEST, read_manifest
from .bandwidth import BandwidthProbe, streaming_read_bandwidth
from .machine import describe_machine
from .peers import PEERS, RUNNERS, SUBJECT, Runner, TorchRunner
from .report import DEFINITIONS, BenchReport, batch_result, count
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
        settings = _Settings(batches, prompt_len, gen_len, repeats, warmup, opt_level, bandwidth, bandwidth_mib, seed,
                             description)
        return _BenchRun(target, peers, settings, work, say, workdir is not None, speculative,
                         parse_peer_paths(peer_paths)).run(account)


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


def artifact_hf_dir(manifest: dict, work: Path) -> tuple[Path | None, str | None]:
    """(the Hugging Face directory an artifact was compiled from, None), or (None, why there is none). A zoo
    model is saved to ``work/hf/NAME`` (reused when already there); the peers read that directory."""
    source = manifest.get("source") or {}
    kind, spec = source.get("kind"), source.get("spec")
    if kind == "hf-dir" and source.get("path") and Path(source["path"]).is_dir():
        return Path(source["path"]), None
    if kind == "zoo":
        return _zoo_hf_dir(spec, work)
    where = source.get("path") or spec
    return None, (f"needs the Hugging Face directory the artifact was compiled from; its manifest names "
                  f"{kind} {where}" + (" (no longer there)" if kind == "hf-dir" else ""))


def _resolve(model: str, work: Path, opt_level: int) -> _Target:
    if (Path(model) / MANIFEST).is_file():
        manifest = read_manifest(model)
        if manifest.get("kind") != "causal-lm":
            raise UsageError(f"{model}: luffy bench times causal LMs; this artifact is {manifest.get('kind')!r}")
        hf_dir, reason = artifact_hf_dir(manifest, work)
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


@dataclass
class _Settings:
    """What `bench` was asked for, after validation."""

    batches: list[int]
    prompt_len: int
    gen_len: int
    repeats: int
    warmup: int
    opt_level: int
    bandwidth: bool
    bandwidth_mib: int
    seed: int
    description: str | None


class _BenchRun:
    """One `bench` call: build every system in a throwaway process, measure bandwidth, load each system in its
    own worker, time them in interleaved rounds, and assemble the report. The luffy engine (SUBJECT) failing
    fails the bench; a peer failing is reported in its row."""

    def __init__(self, target: _Target, peers: list[str], settings: _Settings, work: Path, say, keep: bool,
                 speculative: dict, peer_paths: dict | None = None):
        self.target, self.cfg, self.work, self.say, self.keep = target, settings, work, say, keep
        self.names = [SUBJECT, *speculative, *peers]
        self.entries = {n: {"name": n, "label": n, "status": "ok", "reason": None} for n in self.names}
        self.paths = {name: {"hf_dir": str(target.hf_dir) if target.hf_dir else None, "artifact": str(target.artifact),
                             "build_dir": str(work / "builds" / name), "compile_source": target.compile_source,
                             "opt_level": settings.opt_level, "peer_path": (peer_paths or {}).get(name),
                             **speculative.get(name, {})} for name in self.names}
        for name in self.names:
            runner = RUNNERS[name]
            reason = runner.unavailable_with(self.paths[name])
            if reason is None and runner.needs_hf_dir and target.hf_dir is None:
                reason = target.hf_reason
            if reason:
                self.entries[name].update(status="skipped", reason=reason)
            elif runner.max_batch is not None and max(settings.batches) > runner.max_batch:
                self.entries[name]["note"] = f"batch {runner.max_batch} only"  # llama-bench times one sequence
        self.done, self.workers = 0, {}
        self.probe, self.bandwidth, self.per_round, self.round_bandwidth = None, None, [], None

    def failed(self, name: str, exc: WorkerFailed) -> None:
        if name == SUBJECT:
            raise _as_luffy_error(exc, self.keep) from None
        where = f" (log: {exc.log})" if self.keep else ""
        self.entries[name].update(status="failed", reason=f"{exc.error}: {exc.message}{where}")

    def active(self) -> list[str]:
        return [n for n in self.names if self.entries[n]["status"] == "ok"]

    def builds(self) -> list[str]:
        return [n for n in self.active()
                if (n != SUBJECT or self.target.compile_source) and RUNNERS[n].build is not Runner.build]

    def total(self) -> int:
        live = len(self.active())
        return len(self.builds()) + live + live * len(self.cfg.batches) * (self.cfg.warmup + self.cfg.repeats)

    def tick(self, what: str) -> None:
        self.say(what, self.done, self.total())
        self.done += 1

    def check_capacity(self, limit: int | None, whose: str = "the artifact's") -> None:
        check_capacity(self.cfg.prompt_len, self.cfg.gen_len, limit, "gen length", f"{whose} maximum sequence length")

    def run(self, account: CpuAccount) -> BenchReport:
        if not self.target.compile_source:  # before any peer is built: the artifact's limit is known
            manifest = read_manifest(self.target.artifact, verify_files=False)
            self.check_capacity(manifest.get("max_seq_len"))
            self.entries[SUBJECT].update(build_s=(manifest.get("report") or {}).get("seconds_total"),
                                         build_source="manifest")
        self.build_all()
        self.measure_bandwidth()
        try:
            self.load_workers()
            timings, tokens = self.time_runs()
            self.read_peak_rss()
        finally:
            for worker in self.workers.values():
                worker.close()
            if self.probe:
                self.probe.close()
        self.say("done", self.total(), self.total())
        return self.report(timings, tokens, account)

    def build_all(self) -> None:
        """Builds, each in a throwaway worker so its memory never counts against a system."""
        for name in self.builds():
            self.tick(f"building {name}" if name != SUBJECT else f"compiling {self.target.spec}")
            shutil.rmtree(self.paths[name]["build_dir"], ignore_errors=True)
            try:
                built = one_shot("build", self.work / "logs" / f"{name}-build.log", system=name, paths=self.paths[name])
            except WorkerFailed as exc:
                self.failed(name, exc)
                continue
            self.entries[name].update(build_s=built.get("build_s"), build_source="measured")
            if name == SUBJECT:
                self.entries[name]["parity"] = built.get("parity")
                self.check_capacity(read_manifest(self.target.artifact, verify_files=False).get("max_seq_len"))

    def measure_bandwidth(self) -> None:
        if self.cfg.bandwidth:
            self.say("measuring streaming-read bandwidth", self.done, self.total())
            self.probe = BandwidthProbe(self.cfg.bandwidth_mib)
            self.bandwidth = streaming_read_bandwidth(passes=BANDWIDTH_PASSES, probe=self.probe)

    def load_workers(self) -> None:
        for name in list(self.active()):
            self.tick(f"loading {name}")
            worker = Worker(self.work / "logs" / f"{name}.log")
            self.workers[name] = worker
            try:
                info = worker.request("load", system=name, paths=self.paths[name])
            except WorkerFailed as exc:
                self.workers.pop(name).close()
                self.failed(name, exc)
                continue
            baseline = info.pop("baseline_rss_bytes")
            self.entries[name].update(info, baseline_rss_mib=round(baseline / 2**20, 1))
            try:
                self.check_capacity(info.get("max_seq_len"), f"{name}'s")
            except CapacityError as exc:
                if name == SUBJECT:
                    raise
                self.workers.pop(name).close()
                self.entries[name].update(status="failed", reason=str(exc))

    def time_runs(self) -> tuple[dict, dict]:
        """Every system once per round, start rotated per round (luffy.measure.interleaved_rounds), per batch
        size; all get the same seeded prompt. The bandwidth probe runs before every timed round while every
        worker idles, and each run waits out the last one's spinning threads first (``settle_s``)."""
        cfg, live = self.cfg, self.active()
        timings = {name: {} for name in live}
        tokens = {name: {} for name in live}
        for batch in cfg.batches:
            ids = prompt_ids(batch, cfg.prompt_len, self.entries[SUBJECT]["vocab"], cfg.seed).tolist()
            runs = interleaved_rounds(live, cfg.warmup, cfg.repeats,
                                      lambda name, rnd: self.timed_run(name, batch, rnd, ids, tokens),
                                      self.before_round)
            for name in live:
                timings[name][batch] = runs[name]
        return timings, tokens

    def pause_workers(self, but: str | None = None) -> None:
        """Every worker but ``but`` stopped until its next request: the system timed runs alone."""
        for name, worker in self.workers.items():
            if name != but:
                worker.pause()

    def before_round(self, rnd: int) -> None:
        self.round_bandwidth = None
        if self.probe is not None and rnd >= self.cfg.warmup:  # the same method, fewer passes
            self.pause_workers()
            wait_for_quiet_cpu()
            self.round_bandwidth = self.probe.measure(ROUND_PASSES)["gb_per_s"]
            self.per_round.append(self.round_bandwidth)

    def timed_run(self, name: str, batch: int, rnd: int, ids: list, tokens: dict) -> dict | None:
        if self.entries[name]["status"] != "ok" or batch > (RUNNERS[name].max_batch or batch):
            return None
        warm = rnd < self.cfg.warmup
        self.tick(f"{name} batch {batch} " + (f"warm-up {rnd + 1}" if warm else f"run {rnd - self.cfg.warmup + 1}/"
                                              f"{self.cfg.repeats}"))
        self.pause_workers(but=name)
        settled = wait_for_quiet_cpu()
        try:
            result = self.workers[name].request("run", ids=ids, new_tokens=self.cfg.gen_len)
        except WorkerFailed as exc:
            self.failed(name, exc)
            return None
        tokens[name][batch] = result["tokens"]
        timing = {"ttft_s": result["ttft_s"], "total_s": result["total_s"]}
        if "speculation" in result:
            timing["speculation"] = result["speculation"]
        if self.round_bandwidth is not None:
            timing["bandwidth_gb_s"] = self.round_bandwidth
        timing["settle_s"] = settled
        return timing

    def read_peak_rss(self) -> None:
        for name in self.active():
            try:
                self.entries[name]["peak_rss_mib"] = round(self.workers[name].request("rss")["peak_rss_bytes"] / 2**20, 1)
            except WorkerFailed as exc:
                self.failed(name, exc)

    def results(self, name: str, timings: dict, tokens: dict, gb_s: float | None) -> list[dict]:
        """One result per batch size: the run statistics, agreement with luffy's tokens, speculation."""
        out = []
        for b in self.cfg.batches:
            if not timings[name][b]:  # above the system's max_batch: said in its entry's note
                continue
            result = batch_result(b, self.cfg.gen_len, timings[name][b], self.entries[name].get("streamed_weight_bytes"),
                                  gb_s)
            ref, mine = tokens[SUBJECT].get(b, []), tokens[name].get(b)
            agree = next((i for i, (x, y) in enumerate(zip(ref, mine or [])) if x != y), min(len(ref), len(mine or [])))
            # leading new tokens of row 0 identical to luffy's (None: the system reports no tokens, e.g. llama-bench)
            result["tokens_agree_with_luffy"] = agree if mine is not None else None
            rates = [r["speculation"]["acceptance_rate"] for r in result["runs"] if r.get("speculation")]
            if rates:
                result["acceptance_rate"] = float(np.median([r for r in rates if r is not None] or [0.0]))
                result["tokens_per_target_step"] = float(np.median(
                    [r["speculation"]["mean_tokens_per_target_step"] for r in result["runs"]]))
            out.append(result)
        return out

    def report(self, timings: dict, tokens: dict, account: CpuAccount) -> BenchReport:
        bw, cfg = self.bandwidth, self.cfg
        if bw and self.per_round:
            bw["per_round"] = {"passes": ROUND_PASSES, "gb_per_s": self.per_round, **spread(self.per_round)}
        for name in self.active():
            self.entries[name]["results"] = self.results(name, timings, tokens, bw["gb_per_s"] if bw else None)
        model_info = _model_info(self.target, self.entries[SUBJECT])
        return BenchReport({
            "tool": "luffy bench",
            "luffy_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": describe_machine(),
            "model": {**model_info, "description": cfg.description or model_info["description"]},
            "settings": {"prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len, "batches": cfg.batches,
                         "repeats": cfg.repeats, "warmup": cfg.warmup, "seed": cfg.seed, "opt_level": cfg.opt_level,
                         "order": "interleaved: each round runs every system once, start rotated per round"},
            "bandwidth": bw,
            "definitions": DEFINITIONS,
            "systems": [self.entries[n] for n in self.names],
            "cpu_account": account.stop(),
        })


def _model_info(target: _Target, subject: dict) -> dict:
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
