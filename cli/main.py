"""`luffy compile | run | inspect | zoo | bench`.

Errors print one line naming the cause and exit with the error kind's code (see luffy.errors); add
--debug (or LUFFY_DEBUG=1) for the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import shlex
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..errors import LuffyError, UsageError
from ..extras import require_serve_extra

app = typer.Typer(
    name="luffy",
    help="Ahead-of-time compiler for LLM inference.\n\nExample: luffy compile llama-tiny -o build/llama-tiny && "
    "luffy run build/llama-tiny --prompt 'Hello'",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)
_state = {"debug": bool(os.environ.get("LUFFY_DEBUG"))}


def _quiet_libraries() -> None:
    # transformers draws its own tqdm bars while loading weights; the CLI shows one status line instead.
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # deprecation notices between torch and transformers are for their developers, not a compile's log
    warnings.filterwarnings("ignore", category=FutureWarning)


@contextlib.contextmanager
def _progress(title: str, bar: bool = False):
    """``say(stage)`` for long work: an animated status line on a terminal; elsewhere (a pipe, a CI log) one
    plain line per stage with the elapsed time, and no carriage returns or colours. With ``bar``, on a terminal
    ``say.step(what, done, total)`` also draws a progress bar (a compile's weights written layer by layer)."""
    if err.is_terminal and bar:
        with _progress_bar(title) as say:
            yield say
        return
    if err.is_terminal:
        with err.status(title) as status:
            yield lambda message: status.update(f"{title}: {message}")
        return
    start = time.perf_counter()
    last = [None]

    def say(message: str) -> None:
        if message != last[0]:
            last[0] = message
            print(f"luffy: {title}: {message} ({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)

    yield say


@contextlib.contextmanager
def _progress_bar(title: str):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bars:
        task = bars.add_task(title, total=None)

        def say(message: str) -> None:
            bars.update(task, description=f"{title}: {message}", total=None, completed=0)

        say.step = lambda what, done, total: bars.update(task, description=f"{title}: {what}", completed=done,
                                                         total=total)
        yield say


def _version(value: bool):
    if value:
        out.print(f"luffy {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    _state["debug"] = _state["debug"] or debug


def compile_cmd(source: str, output: Path, report_json: bool, **options):
    """Compile a model into an artifact directory.

    Example: luffy compile ./my-llama -o build/my-llama --target ort -O2

    Example (int4 by GPTQ, perplexity before/after): luffy compile llama-pydoc -o build/q4 --precision int4
    --calib calib.txt --eval heldout.txt

    Example (TensorRT, compiled on a CPU CI job, built on the GPU machine): luffy compile ./my-llama -o build/trt
    --target trt --precision fp16 --defer-build; then there: luffy build build/trt
    """
    from ..extras import import_compiler

    compile_artifact = import_compiler("luffy.compiler.compile").compile
    _quiet_libraries()
    with _progress(f"compiling {source}", bar=True) as say:
        artifact = compile_artifact(source, output=output, progress=say, **options)
    report = artifact.report
    if report_json:
        print(json.dumps(report, indent=2))
        return
    parity = report.get("parity")
    parity_text = f"max |Δ| {parity['max_abs_diff']:.2e} vs PyTorch" if parity else "not checked"
    err.print(
        f"[green]✓[/green] {output}  {report['capture']['nodes']} → {report['nodes']} nodes, "
        f"{report['parameters']:,} parameters, {report['seconds_total']:.1f}s, parity {parity_text}", soft_wrap=True,
    )
    if artifact.manifest.get("state") == "needs-build":
        err.print(f"  needs-build: TensorRT engine not built here; on the GPU machine run: luffy build {output}",
                  soft_wrap=True)
    if report.get("auto"):
        err.print(auto_table(report["auto"]))
    quality = report.get("quality")
    if quality:
        ref = quality["perplexity_reference"]
        change = f" ({quality['perplexity_increase_pct']:+.2f}% vs {ref:.4f} {quality['reference']})" if ref else ""
        err.print(f"  perplexity {quality['perplexity']:.4f}{change} on {quality['tokens_scored']:,} tokens", soft_wrap=True)


def _compile_parameters() -> list[inspect.Parameter]:
    """compile_cmd's signature: SOURCE, -o, --json, then one flag per LuffyConfig option field (in field order;
    compiler/config.py `option` is where an option is added, not here)."""
    from ..compiler.config import LuffyConfig  # plain dataclasses: no torch, no compiler imports

    fixed = [
        ("source", str, typer.Argument(..., help="Zoo name, local Hugging Face directory, .onnx file or "
                                                 "package.module:factory.")),
        ("output", Path, typer.Option(..., "-o", "--output", help="Artifact directory to write (replaced atomically).")),
        ("report_json", bool, typer.Option(False, "--json", help="Print the compile report as JSON on stdout.")),
    ]
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
              for name, kind, default in fixed]
    hints = typing.get_type_hints(LuffyConfig)
    panels = {"trt": "TensorRT", "auto": "Auto"}
    for f in dataclasses.fields(LuffyConfig):
        meta = f.metadata
        if "flags" not in meta:
            continue
        kind = List[str] if f.name.endswith("_passes") else hints[f.name]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        option = typer.Option(default, *flags, help=meta["help"], rich_help_panel=panels.get(meta["group"]), **meta["cli"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    return params


compile_cmd.__signature__ = inspect.Signature(_compile_parameters())
app.command("compile")(compile_cmd)


@contextlib.contextmanager
def _bench_progress():
    """``progress(what, done, total)``: a bar on a terminal, one line per step in a pipe or CI log."""
    if not err.is_terminal:
        with _progress("bench") as say:
            yield lambda what, done, total: say(f"{what} ({min(done + 1, total)}/{total})")
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        yield lambda what, done, total: bar.update(task, description=what, completed=done, total=total)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--input-ids {text!r}: expected comma-separated integers like 1,2,3") from None


@app.command("run")
def run_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `luffy compile`."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt (needs the artifact's tokenizer)."),
    input_ids: Optional[str] = typer.Option(None, "--input-ids", help="Comma-separated token ids, e.g. 1,2,3."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=0),
    min_new_tokens: int = typer.Option(0, "--min-new-tokens", min=0),
    do_sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k", min=0),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    no_eos: bool = typer.Option(False, "--no-eos", help="Never stop early at the end-of-sequence token."),
    draft: Optional[Path] = typer.Option(None, "--draft", metavar="ARTIFACT", help="Speculative decoding with this "
                                         "draft artifact (same tokenizer, e.g. the --precision int8 build)."),
    prompt_lookup: Optional[int] = typer.Option(None, "--prompt-lookup", min=1, metavar="K", help="Speculative "
                                                "decoding with up to K tokens copied from the context."),
    as_json: bool = typer.Option(False, "--json", help="Print token ids, text and speculation statistics as JSON."),
):
    """Generate from a compiled causal LM.

    Example: luffy run build/pydoc --prompt "Return the" --max-new-tokens 32

    Example (speculative): luffy run build/ref --input-ids 1,2,3 --draft build/ref-int8 --json
    """
    from ..runtimes import load

    if (prompt is None) == (input_ids is None):
        raise UsageError("give exactly one of --prompt TEXT or --input-ids 1,2,3")
    if draft is not None:  # two engines take turns: one thread pool, or their spinning threads fight
        from ..runtimes import share_thread_pool

        share_thread_pool()
    engine = load(artifact)
    kwargs = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed,
    )
    if no_eos:
        kwargs["eos_token_id"] = None
    if draft is not None:
        kwargs["assistant_model"] = load(draft)
    if prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    ids = engine.tokenizer.encode(prompt).ids if prompt is not None else _parse_ids(input_ids)
    result = engine.generate([ids], **kwargs)[0]
    new = [int(t) for t in result[len(ids):]]
    text = engine.tokenizer.decode(new, skip_special_tokens=True) if engine.manifest.get("tokenizer") else None
    if as_json:
        print(json.dumps({"input_ids": ids, "output_ids": new, "text": text,
                          "speculation": getattr(engine, "generation_stats", None)}))
    elif text is not None:
        print(printable((prompt or "") + text))
    else:
        print(",".join(map(str, [*ids, *new])))


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` with control characters (but newline and tab) escaped as \\xNN / \\uNNNN: generated bytes
    must not move the cursor, clear the screen or set the window title of the user's terminal.

    >>> printable("ok\\x1b[2J\\n")
    'ok\\\\x1b[2J\\n'
    """
    import unicodedata

    def escape(ch: str) -> str:
        # C0/C1 controls and the bidirectional overrides (which can make text read differently than it is)
        if ch in "\n\t" or not (unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS):
            return ch
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"

    return "".join(escape(ch) for ch in text)


@app.command("serve")
def serve_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory of a causal LM (`luffy compile` output)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: one the OS picks; the log says which)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", min=1, help="Sequences decoded together (KV slots)."),
    max_num_batched_tokens: int = typer.Option(
        512, "--max-num-batched-tokens", min=1, help="Decode plus prompt tokens per scheduler iteration; longer "
        "prompts are prefilled in chunks, so running streams wait at most one chunk."),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", min=2, help="Positions per KV slot (prompt + max_tokens) [the artifact's max_seq_len]; "
        "the KV cache is max-num-seqs x this, allocated once."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Waiting requests beyond which new ones get 429."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LUFFY_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model name in the API [the "
                                                    "artifact directory's name]."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0, help="On SIGTERM, seconds requests in flight "
                                        "may take to finish."),
    max_request_bytes: int = typer.Option(1 << 20, "--max-request-bytes", min=1024, help="Largest request body."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="ONNX Runtime intra-op threads [all cores]."),
    spin: bool = typer.Option(True, "--spin/--no-spin", help="ONNX Runtime's threads spin between steps (lowest "
                              "latency) or sleep (cores free for HTTP and other processes)."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Reuse the KV of prompt prefixes "
                                      "seen before (free slots' contents, then a host-RAM block store)."),
    prefix_cache_mb: int = typer.Option(256, "--prefix-cache-mb", min=0, help="Host RAM for cached prefix blocks."),
    draft: Optional[Path] = typer.Option(None, "--draft", metavar="ARTIFACT", help="Speculative decoding with this "
                                         "draft artifact (same tokenizer; e.g. the --precision int8 --block-size 128 "
                                         "build)."),
    num_assistant_tokens: int = typer.Option(4, "--num-assistant-tokens", min=1, help="Most tokens the draft "
                                             "proposes per round (fewer while it is rejected)."),
    prompt_lookup: Optional[int] = typer.Option(None, "--prompt-lookup", min=1, metavar="K", help="Speculative "
                                                "decoding with up to K tokens copied from the context."),
    speculative_max_batch: int = typer.Option(1, "--speculative-max-batch", min=1, help="Speculate while at most "
                                              "this many requests decode (a batched step already shares the weights)."),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="Run N replicas on Ray Serve behind one "
                                           "endpoint (extra 'ray'); with --min/--max-replicas: the initial count."),
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", min=0, help="Autoscale on Ray Serve, down to "
                                               "this many replicas."),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1, help="Autoscale on Ray Serve, up to "
                                               "this many replicas."),
    target_ongoing_requests: Optional[float] = typer.Option(
        None, "--target-ongoing-requests", min=0.1, help="Autoscaling target: requests in flight per replica (in a "
        "slot or waiting) [--max-num-seqs: add replicas while requests wait for slots]."),
    upscale_delay: float = typer.Option(5.0, "--upscale-delay", min=0, help="Seconds over target before a replica "
                                        "is added."),
    downscale_delay: float = typer.Option(30.0, "--downscale-delay", min=0, help="Seconds under target before a "
                                          "replica is removed."),
    routing: str = typer.Option("prefix", "--routing", help="Ray Serve routing: prefix (the replica holding the "
                                "longest cached prefix, unless it is busier) or pow2 (Ray's default)."),
    routing_imbalance: int = typer.Option(2, "--routing-imbalance", min=0, help="Prefix routing: a replica more "
                                          "than this many requests busier than the least busy one is passed over."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (auto, or "
                                              "the head's host:port) instead of starting a local one."),
):
    """Serve an artifact over an OpenAI-compatible HTTP API with continuous batching.

    Routes: POST /v1/completions, /v1/chat/completions (stream=true for server-sent events); GET /v1/models,
    /health, /metrics (Prometheus, luffy:* named like vLLM's vllm:*).

    Example: luffy serve build/pydoc --port 8000 --max-num-seqs 16

    Example (Ray Serve): luffy serve build/pydoc --replicas 2 --threads 1, or --min-replicas 1 --max-replicas 4

    Example (client): curl -s localhost:8000/v1/completions -H 'Content-Type: application/json'
    -d '{"model": "pydoc", "prompt": "Return the", "max_tokens": 32, "temperature": 0}'
    """
    from ..serving.scheduler import SchedulerConfig
    from ..serving.server import ServerSettings, serve

    require_serve_extra()
    if draft is not None and prompt_lookup is not None:
        raise UsageError("give --draft or --prompt-lookup, not both")
    settings = ServerSettings(
        host=host, port=port, served_model_name=served_model_name, api_key=api_key, drain_timeout=drain_timeout,
        max_request_bytes=max_request_bytes, threads=threads, spin=spin, draft=draft,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                  max_num_batched_tokens=max_num_batched_tokens, max_queue=max_queue,
                                  prefix_cache=prefix_cache, prefix_cache_mb=prefix_cache_mb,
                                  speculation=_speculation(draft, num_assistant_tokens, prompt_lookup,
                                                           speculative_max_batch)),
    )
    if any(v is not None for v in (replicas, min_replicas, max_replicas, ray_address)):
        from ..serving.ray import RayOptions, serve_on_ray

        options = RayOptions(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                             target_ongoing_requests=target_ongoing_requests, upscale_delay_s=upscale_delay,
                             downscale_delay_s=downscale_delay, routing=routing, imbalance=routing_imbalance,
                             address=ray_address,
                             replica_cpus=float(threads or 1))
        raise typer.Exit(serve_on_ray(artifact, settings, options))
    raise typer.Exit(serve(artifact, settings))


def _speculation(draft, num_assistant_tokens, prompt_lookup, max_batch):
    if draft is None and prompt_lookup is None:
        return None
    from ..serving.speculation import SpeculationConfig

    # the draft engine itself is loaded by the server with the target (ServerSettings.draft)
    return SpeculationConfig(prompt_lookup=prompt_lookup, num_tokens=num_assistant_tokens, max_batch=max_batch)


@app.command("build")
def build_cmd(
    artifact: Path = typer.Argument(..., help="A --target trt artifact in state needs-build (compile --defer-build)."),
    timing_cache: Optional[Path] = typer.Option(
        None, "--timing-cache", metavar="FILE", help="Persistent timing cache, safe to share between concurrent builds "
        "[the one given at compile, else ~/.cache/luffy/trt-timing.cache].",
    ),
):
    """Build the TensorRT engine of a deferred artifact, on the GPU machine that will run it.

    Checks the graph against the installed TensorRT's ONNX parser first, builds with the artifact's
    profiles, and records TensorRT, CUDA, GPU and compute capability in the manifest; the artifact is
    replaced only when the engine is written.

    Example: luffy compile ./my-llama -o build/trt --target trt --defer-build   (CPU CI job)
    then:    luffy build build/trt                                               (GPU job)
    """
    from ..compiler.trt_build import build_artifact

    with _progress(f"building {artifact}") as say:
        manifest = build_artifact(artifact, timing_cache, say=say)
    build = manifest["tensorrt"]["build"]
    err.print(f"[green]✓[/green] {artifact}  TensorRT {build['tensorrt']} engine for {build['gpu']} "
              f"(sm {build['compute_capability']}), {build['seconds']:.1f}s")


@app.command("verify")
def verify_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory to check."),
    parity: Optional[str] = typer.Option(None, "--parity", metavar="SOURCE", help="Also rerun the parity check "
                                         "against this source (the zoo name, HF directory or factory it was compiled from)."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
):
    """Check an artifact before trusting it: file hashes, runtime compatibility, load, a smoke run.

    Each check is one line; the first failure is one line and exit code 6.

    Example: luffy verify build/pydoc --parity llama-pydoc
    """
    from ..compiler.artifact_check import verify_artifact

    if parity is not None:
        _quiet_libraries()
    with _progress(f"verifying {artifact}") as say:
        result = verify_artifact(artifact, parity, say=say)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for item in result["checks"]:
        out.print(f"[green]✓[/green] {item['check']}: {item['detail']} ({item['seconds']:.2f}s)", highlight=False,
                  soft_wrap=True)


@app.command("inspect")
def inspect_cmd(
    target: str = typer.Argument(..., help="Artifact directory, .onnx file, zoo name or Hugging Face directory."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
):
    """Summarize an artifact (manifest, op histogram, parameters) or a model source.

    Example: luffy inspect build/llama-tiny --json
    """
    from ..compiler.inspect import inspect_path

    if not (Path(target) / "manifest.json").is_file():
        _quiet_libraries()
    info = inspect_path(target)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=f"luffy inspect {target}", show_header=False)
    for key, value in info.items():
        if key in ("op_histogram", "io", "auto"):
            continue
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    out.print(table)
    if info.get("io"):
        io = Table(title="I/O")
        for col in ("", "name", "dtype", "shape"):
            io.add_column(col)
        for direction in ("inputs", "outputs"):
            for v in info["io"][direction]:
                io.add_row(direction[:-1], v["name"], v["dtype"], str(v["shape"]))
        out.print(io)
    if info.get("auto"):
        try:
            out.print(auto_table(info["auto"]))
        except (KeyError, TypeError, ValueError, AttributeError):  # the report is informational: say so, go on
            out.print("--auto: report['auto'] is not in the form this luffy writes; see --json")
    if info.get("op_histogram"):
        ops = Table(title="ops")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for op, count in info["op_histogram"].items():
            ops.add_row(op, str(count))
        out.print(ops)


def auto_table(auto: dict) -> Table:
    """report["auto"] as a table: one row per candidate measured, the chosen one marked, what was skipped."""
    table = Table(title=f"--auto: the fastest within {auto['max_quality_loss_pct']:g}% quality loss",
                  caption="; ".join(filter(None, [f"chosen: {auto['chosen']}", auto["choice_rule"], (
                      f"skipped: {', '.join(s['name'] for s in auto['skipped'])} ({auto['skipped'][0]['reason']})"
                      if auto["skipped"] else "")])))
    for col in ("candidate", "loss %", "decode tok/s", "prefill ms", "MB", "in budget"):
        table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=col == "candidate")
    for c in auto["candidates"]:
        def num(value, fmt):
            return "—" if value is None else format(value, fmt)

        table.add_row(("▶ " if c["name"] == auto["chosen"] else "  ") + c["name"], num(c["quality_loss_pct"], "+.3f"),
                      num(c["decode_tokens_per_s"], ".0f"), num(c["prefill_ms"], ".1f"),
                      num(None if c["size_bytes"] is None else c["size_bytes"] / 1e6, ".2f"),
                      c.get("error") or ("yes" if c["within_budget"] else "no"))
    return table


@app.command("zoo")
def zoo_cmd(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the built-in models (no download needed).

    Example: luffy zoo
    """
    from ..models_zoo import ZOO

    if as_json:
        print(json.dumps([{"name": e.name, "kind": e.kind, "description": e.description} for e in ZOO.values()], indent=2))
        return
    table = Table(title="luffy zoo")
    for col in ("name", "kind", "description"):
        table.add_column(col)
    for e in ZOO.values():
        table.add_row(e.name, e.kind, e.description)
    out.print(table)


@app.command("bench")
def bench_cmd(
    target: Optional[str] = typer.Argument(
        None, metavar="ARTIFACT|MODEL",
        help="Artifact directory, or a model source (zoo name, HF directory) compiled first. With --suite: optional, "
        "replaces the reference model."),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="Prompt tokens per sequence [128]."),
    gen_len: Optional[int] = typer.Option(None, "--gen-len", help="New tokens per sequence, no early stop [128]."),
    batch: Optional[str] = typer.Option(None, "--batch",
                                        help="Batch size, or a list for batch scaling: 1,4,16 [1; suite 1,4,16]."),
    vs: Optional[str] = typer.Option(None, "--vs", help="Peers on the same weights: torch, ort-export, genai, genai-int4, "
                                     "luffy-int4 (luffy's own int4 build), or all [none; suite all]."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per system and batch."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed runs per system and batch first."),
    opt_level: int = typer.Option(2, "-O", "--opt-level", min=0, max=3, help="luffy -O level when compiling the model."),
    json_file: Optional[str] = typer.Option(None, "--json", help="Write the full report as JSON to FILE ('-': stdout)."),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", help="Write the markdown table to FILE."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Bar chart of decode tok/s to FILE.png (needs matplotlib)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keep builds and worker logs here [temporary]."),
    bandwidth: bool = typer.Option(True, "--bandwidth/--no-bandwidth", help="Measure streaming-read bandwidth (roofline)."),
    bandwidth_mib: int = typer.Option(1024, "--bandwidth-mib", min=16, help="Buffer size for the bandwidth measurement."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt token ids."),
    draft: Optional[Path] = typer.Option(None, "--draft", metavar="ARTIFACT", help="Add a row generating with "
                                         "speculative decoding from this draft artifact (e.g. the int8 build)."),
    prompt_lookup: Optional[int] = typer.Option(None, "--prompt-lookup", min=1, metavar="K", help="Add a row "
                                                "generating with prompt-lookup speculation (up to K tokens)."),
    suite: bool = typer.Option(False, "--suite", help="Rerun the README's benchmark table (reference model, all peers)."),
    out_dir: Path = typer.Option(Path("bench-results"), "--out", help="With --suite: where bench.json / bench.md go."),
):
    """Time luffy against its peers: prefill, decode and end-to-end tok/s, peak RSS, compile time, roofline.

    `luffy bench serve ARTIFACT` load-tests the HTTP server instead (see `luffy bench serve --help`).

    Example: luffy bench build/my-llama --prompt-len 128 --gen-len 128 --batch 1,4 --vs torch,ort-export --json bench.json

    Decode tok/s = batch x (new tokens - 1) / (generation time - time to first token); prefill = time to first
    token. Each system runs in its own process (its peak RSS), runs are interleaved across systems after a
    warm-up, cells are median [min-max]. `luffy bench --suite` rebuilds the README table.
    """
    from ..benchmarks.api import bench, parse_batches, parse_peers

    if plot is not None:
        from ..benchmarks.report import require_matplotlib

        require_matplotlib()
    if target is None and not suite:
        raise UsageError("give an artifact directory or a model source (or --suite)")
    settings = dict(
        prompt_len=128 if prompt_len is None else prompt_len, gen_len=128 if gen_len is None else gen_len,
        repeats=repeats, warmup=warmup, bandwidth_mib=bandwidth_mib,
        vs=parse_peers(vs if vs is not None else ("all" if suite else None)),
        batch=parse_batches(batch if batch is not None else ("1,4,16" if suite else "1")),
    )
    _quiet_libraries()
    with _bench_progress() as progress:
        if suite:
            from ..benchmarks.suite import run_suite

            report = run_suite(
                out_dir, model=target, workdir=workdir, batches=settings.pop("batch"), opt_level=opt_level, seed=seed,
                command="luffy " + " ".join(shlex.quote(a) for a in sys.argv[1:]), progress=progress, **settings,
            )
        else:
            report = bench(target, opt_level=opt_level, workdir=workdir, bandwidth=bandwidth, seed=seed, progress=progress,
                           draft=draft, prompt_lookup=prompt_lookup, **settings)
    if suite:
        err.print(f"[green]✓[/green] wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    if markdown_file is not None:
        report.write_markdown(markdown_file)
    if plot is not None:
        report.plot(plot)
    if json_file == "-":
        print(report.to_json(), end="")
        return
    if json_file is not None:
        report.write_json(json_file)
    print(report.to_markdown(), end="")


@app.command("bench-serve", hidden=True)  # reached as `luffy bench serve` (see main)
def bench_serve_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory of a causal LM."),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="Clients in flight (closed loop), a list runs each."),
    request_rate: Optional[float] = typer.Option(None, "--request-rate", min=0.001, help="Poisson arrivals per second "
                                                 "instead of a fixed concurrency."),
    num_prompts: int = typer.Option(64, "--num-prompts", min=1, help="Requests per run."),
    input_len: str = typer.Option("112:144", "--input-len", help="Prompt tokens: N or LOW:HIGH (uniform)."),
    output_len: str = typer.Option("112:144", "--output-len", help="Output tokens (ignore_eos): N or LOW:HIGH."),
    goodput: List[str] = typer.Option([], "--goodput", help="SLO as ttft:MS, tpot:MS or e2e:MS (repeatable)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", min=1, help="The server's KV slots."),
    max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens", min=1),
    static_batch: str = typer.Option("1,16", "--static-batch", help="In-process Engine.generate batch sizes to compare."),
    overhead_rounds: int = typer.Option(6, "--overhead-rounds", min=0, help="Requests timed alternately in-process "
                                        "and streamed through the server (the per-token cost of streaming)."),
    shared_prefix: Optional[str] = typer.Option(None, "--shared-prefix", metavar="PREFIX:SUFFIX", help="Also time "
                                                "TTFT of prompts whose first PREFIX tokens were sent before (prefix "
                                                "cache hits) against new ones, e.g. 1024:32."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="ORT intra-op threads (server and in-process)."),
    seed: int = typer.Option(0, "--seed"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the full report here."),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", help="Write the table here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Throughput vs TTFT p99 to FILE.png (needs matplotlib)."),
):
    """Load-test `luffy serve ARTIFACT` with OpenAI's async client, as `vllm bench serve` measures.

    Reports request and output-token throughput, TTFT / TPOT / ITL / E2E (mean, median, p99) and goodput,
    beside the same requests in-process through Engine.generate (one at a time and static batches).

    Example: luffy bench serve build/ref --concurrency 1,4,16 --num-prompts 64 --json serve.json --plot serve.png
    """
    from ..benchmarks import serve_bench

    if plot is not None:
        from ..benchmarks.report import require_matplotlib

        require_matplotlib()
    require_serve_extra()
    load = serve_bench.ServeLoad(num_prompts, serve_bench.parse_range(input_len, "--input-len"),
                                 serve_bench.parse_range(output_len, "--output-len"), seed)
    with _bench_progress() as progress:
        report = serve_bench.bench_serve(
            artifact, load, [int(c) for c in concurrency.split(",")], request_rate, serve_bench.parse_goodput(goodput),
            ["--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens)],
            [int(b) for b in static_batch.split(",") if b], threads, progress=progress,
            overhead_rounds=overhead_rounds,
            shared_prefix=serve_bench.parse_prefix(shared_prefix) if shared_prefix else None)
    serve_bench.write(report, json_file, markdown_file)
    if plot is not None:
        serve_bench.plot(report, plot)
    print(serve_bench.to_markdown(report), end="")


def _is_usage_error(exc: BaseException) -> bool:
    # click's ClickException, or the copy typer >= 0.29 vendors as typer._click: matched by what they do
    # (an exit code and show()), not by class, so a typer release that moves the class again changes nothing.
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "show", None))


class _Signals:
    """SIGINT and SIGTERM become exceptions inside the command, so staged writes clean up (their ``finally``
    runs) and the CLI reports the signal itself, whatever the CLI library does with a KeyboardInterrupt."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        import signal

        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. nohup, or a shell's background job: keep ignoring
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum
        raise KeyboardInterrupt

    def __exit__(self, *exc_info):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _error_line(message: str) -> None:
    err.print(f"luffy: error: {message}", markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; a LuffyError becomes one line on stderr and its exit code, a usage error
    click's message and 2, Ctrl-C one line and 130 (SIGTERM: 143)."""
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:  # `luffy bench serve` is its own command: bench's first argument is a path
        argv = ["bench-serve", *argv[2:]]
    with _Signals() as signals:
        try:
            result = app(args=argv, standalone_mode=False)
        except LuffyError as exc:
            if _state["debug"]:
                raise
            _error_line(str(exc))
            return exc.exit_code
        except (typer.Exit, typer.Abort, KeyboardInterrupt) as exc:
            result = getattr(exc, "exit_code", 1 if signals.received is None else 0)
        except Exception as exc:  # noqa: BLE001 - usage errors and anything unexpected
            if _is_usage_error(exc) and signals.received is None:
                exc.show()
                return exc.exit_code
            if _state["debug"]:
                raise
            if signals.received is None:
                _error_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
                return 1
            result = 1
    if signals.received is not None:
        name = "interrupted (Ctrl-C)" if signals.received == signal.SIGINT else "terminated (SIGTERM)"
        _error_line(name)
        return 128 + signals.received
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
