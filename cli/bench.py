"""`luffy bench` (luffy against its peers: prefill, decode, memory) and `luffy bench serve` (the HTTP server
under load, as `vllm bench serve` measures)."""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import UsageError
from ..extras import require_serve_extra
from .console import err, progress_line, quiet_libraries


@contextlib.contextmanager
def _benchprogress_line():
    """``progress(what, done, total)``: a bar on a terminal, one line per step in a pipe or CI log."""
    if not err.is_terminal:
        with progress_line("bench") as say:
            yield lambda what, done, total: say(f"{what} ({min(done + 1, total)}/{total})")
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        yield lambda what, done, total: bar.update(task, description=what, completed=done, total=total)


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
                                     "luffy-int4 (luffy's own int4 build), llama.cpp, openvino, ctranslate2, or all "
                                     "[none; suite all]."),
    peer: List[str] = typer.Option([], "--peer", metavar="NAME=PATH", help="Where a peer outside luffy's Python is: "
                                   "llama.cpp=BUILD/bin (llama-bench's directory), openvino=VENV/bin/python, "
                                   "ctranslate2=VENV/bin/python (repeatable) [PATH; luffy's own Python]."),
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
    quiet_libraries()
    with _benchprogress_line() as progress:
        if suite:
            from ..benchmarks.suite import run_suite

            report = run_suite(
                out_dir, model=target, workdir=workdir, batches=settings.pop("batch"), opt_level=opt_level, seed=seed,
                command="luffy " + " ".join(shlex.quote(a) for a in sys.argv[1:]), progress=progress, **settings,
            )
        else:
            report = bench(target, opt_level=opt_level, workdir=workdir, bandwidth=bandwidth, seed=seed, progress=progress,
                           draft=draft, prompt_lookup=prompt_lookup, peer_paths=peer, **settings)
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


def bench_serve_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory of a causal LM."),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="Clients in flight (closed loop), a list runs each."),
    request_rate: Optional[float] = typer.Option(None, "--request-rate", min=0.001, help="Poisson arrivals per second "
                                                 "instead of a fixed concurrency."),
    num_prompts: int = typer.Option(64, "--num-prompts", min=1, help="Requests per run."),
    input_len: str = typer.Option("112:144", "--input-len", help="Prompt tokens: N or LOW:HIGH (uniform)."),
    output_len: str = typer.Option("112:144", "--output-len", help="Output tokens (ignore_eos): N or LOW:HIGH."),
    goodput: List[str] = typer.Option([], "--goodput", help="SLO as ttft:MS, tpot:MS or e2e:MS (repeatable)."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", min=1, help="The server's KV slots [16; with "
                                               "--vs the largest --concurrency, for every server]."),
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
    vs: Optional[str] = typer.Option(None, "--vs", help="Also load-test these servers on the same weights, one after "
                                     "another: vllm, llama-server (comma-separated)."),
    peer: List[str] = typer.Option([], "--peer", metavar="NAME=PATH", help="Where a peer is: vllm=VENV/bin/python, "
                                   "llama-server=LLAMA_CPP/build/bin (repeatable) [luffy's Python; PATH]."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="With --vs: the GGUF cache, the zoo model's HF "
                                           "directory and the servers' logs [ARTIFACT.serve-peers next to ARTIFACT]."),
    server_timeout: float = typer.Option(600.0, "--server-timeout", min=1.0, help="With --vs: seconds a server may "
                                         "take to answer /health with 200."),
):
    """Load-test `luffy serve ARTIFACT` with OpenAI's async client, as `vllm bench serve` measures.

    Reports request and output-token throughput, TTFT / TPOT / ITL / E2E (mean, median, p99) and goodput,
    beside the same requests in-process through Engine.generate (one at a time and static batches).

    With --vs vllm,llama-server: luffy serve and each peer's server in turn (127.0.0.1, a free port), the same
    load and prompts against each, one table (output tok/s, req/s, TTFT, TPOT, the first burst's TTFT p99/median);
    a peer that is not installed is skipped with how to install it.

    Example: luffy bench serve build/ref --concurrency 1,4,16 --num-prompts 64 --json serve.json --plot serve.png
    """
    from ..benchmarks import serve_bench

    load = serve_bench.ServeLoad(num_prompts, serve_bench.parse_range(input_len, "--input-len"),
                                 serve_bench.parse_range(output_len, "--output-len"), seed)
    points = _concurrency_points(concurrency)
    if vs is not None:
        _compare_serve(artifact, load, points, request_rate, vs, peer, max_num_seqs, max_num_batched_tokens, workdir,
                       server_timeout, threads, shared_prefix, plot, json_file, markdown_file)
        return
    if plot is not None:
        from ..benchmarks.report import require_matplotlib

        require_matplotlib()
    require_serve_extra()
    max_num_seqs = 16 if max_num_seqs is None else max_num_seqs
    with _benchprogress_line() as progress:
        report = serve_bench.bench_serve(
            artifact, load, points, request_rate, serve_bench.parse_goodput(goodput),
            ["--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens)],
            [int(b) for b in static_batch.split(",") if b], threads, progress=progress,
            overhead_rounds=overhead_rounds,
            shared_prefix=serve_bench.parse_prefix(shared_prefix) if shared_prefix else None)
    serve_bench.write(report, json_file, markdown_file)
    if plot is not None:
        serve_bench.plot(report, plot)
    print(serve_bench.to_markdown(report), end="")


def _concurrency_points(text: str) -> list[int]:
    try:
        points = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        points = []
    if not points or min(points) < 1:
        raise UsageError(f"--concurrency {text!r}: expected client counts >= 1, e.g. 1,4,16")
    return points


def _compare_serve(artifact, load, points, request_rate, vs, peer, max_num_seqs, max_num_batched_tokens, workdir,
                   server_timeout, threads, shared_prefix, plot, json_file, markdown_file) -> None:
    """`luffy bench serve ARTIFACT --vs ...`: luffy serve and the peers' servers under the same load."""
    from ..benchmarks import serve_compare
    from ..benchmarks.serve_peers import parse_serve_peer_paths, parse_serve_peers

    names, paths = parse_serve_peers(vs), parse_serve_peer_paths(peer)
    if shared_prefix or plot is not None:
        raise UsageError(f"{'--shared-prefix' if shared_prefix else '--plot'} measures luffy serve alone; drop --vs")
    require_serve_extra()
    slots = max_num_seqs or (16 if request_rate else max(points))
    with _benchprogress_line() as progress:
        report = serve_compare.compare_serve(
            artifact, load, points, request_rate, names, paths, slots=slots,
            max_num_batched_tokens=max_num_batched_tokens, work=workdir, server_timeout=server_timeout,
            threads=threads, progress=progress,
            warn=lambda line: err.print(f"luffy: {line}", markup=False, highlight=False, soft_wrap=True))
    serve_compare.write(report, json_file, markdown_file)
    print(serve_compare.to_markdown(report), end="")
