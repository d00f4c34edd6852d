"""The benchmark suite: the README's table, rerun with one command.

    luffy bench --suite --out bench-results            # or: python -c "from luffy.benchmarks import run_suite; run_suite()"

Builds the reference model (random-weight Llama, hidden 1024, 8 layers, 16 heads / 4 KV heads, FFN 2816,
vocab 32000, ~156M parameters; seeded, saved with save_pretrained to a local directory), compiles it with
luffy, runs every peer that is installed (transformers eager, plain torch.onnx export + ORT loop,
onnxruntime-genai fp32 and int4) at prompt 128 / 128 new tokens / batch 1, 4, 16, and writes
``bench.json`` and ``bench.md`` (machine description included) to the output directory.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable

from .api import Progress, bench
from .api import _workdir as _suite_workdir  # the given directory (kept), or a temporary one
from .models import REFERENCE_LLAMA
from .peers import PEERS
from .report import BenchReport, count
from .worker import one_shot

SUITE_BATCHES = (1, 4, 16)


def run_suite(
    out_dir: str | Path = "bench-results",
    *,
    model: str | None = None,
    model_overrides: dict | None = None,
    workdir: str | Path | None = None,
    prompt_len: int = 128,
    gen_len: int = 128,
    batches: Iterable[int] = SUITE_BATCHES,
    vs: str | Iterable[str] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    bandwidth_mib: int = 1024,
    opt_level: int = 2,
    seed: int = 0,
    plot: bool = False,
    command: str | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Run the suite; write ``out_dir``/bench.json, bench.md (and bench.png with ``plot``); return the report.

    ``model`` replaces the reference model (an artifact or model source); ``model_overrides`` changes the
    reference config (the tests use a tiny one). ``vs`` defaults to every peer; uninstalled ones are
    listed as skipped with the reason. ``command`` is the command line printed in bench.md.
    """
    out_dir = Path(out_dir)
    say = progress or (lambda what, done, total: None)
    batches = list(batches)
    model_arg = model
    with _suite_workdir(workdir) as work:
        description = None
        if model is None:
            say("building the reference model", 0, 1)
            config = {**REFERENCE_LLAMA, **(model_overrides or {})}
            built = one_shot("call", work / "logs" / "reference-model.log", func="luffy.benchmarks.models:reference_llama",
                             kwargs={"out": str(work / "reference-llama"), **(model_overrides or {})})
            model = built["path"]
            description = (
                f"reference Llama, random weights (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
                f"{config['num_attention_heads']} heads / {config['num_key_value_heads']} KV heads, FFN "
                f"{config['intermediate_size']}, vocab {config['vocab_size']}; {count(built['parameters'])} parameters, fp32)"
            )
        report = bench(
            model, prompt_len=prompt_len, gen_len=gen_len, batch=batches, vs=list(PEERS) if vs is None else vs,
            repeats=repeats, warmup=warmup, workdir=work / "bench", bandwidth_mib=bandwidth_mib, description=description,
            opt_level=opt_level, seed=seed, progress=progress,
        )
    settings = {"model": model_arg, "prompt-len": prompt_len, "gen-len": gen_len, "batch": ",".join(map(str, batches)),
                "vs": vs if vs is None or isinstance(vs, str) else ",".join(vs), "repeats": repeats, "warmup": warmup,
                "bandwidth-mib": bandwidth_mib, "opt-level": opt_level, "seed": seed}
    report.data["suite"] = {"command": command or _default_command(out_dir, settings),
                            "reference_model": None if model_arg else {**REFERENCE_LLAMA, **(model_overrides or {})}}
    report.write_json(out_dir / "bench.json")
    (out_dir / "bench.md").write_text(suite_markdown(report))
    if plot:
        report.plot(out_dir / "bench.png")
    return report


def suite_markdown(report: BenchReport) -> str:
    command = report.data.get("suite", {}).get("command")
    head = f"Measured {report.data['created']}" + (f" with `{command}`" if command else "") + ".\n\n"
    return head + report.to_markdown()


_SUITE_DEFAULTS = {"model": None, "prompt-len": 128, "gen-len": 128, "batch": "1,4,16", "vs": None, "repeats": 3,
                   "warmup": 1, "bandwidth-mib": 1024, "opt-level": 2, "seed": 0}


def _default_command(out_dir: Path, settings: dict) -> str:
    """The `luffy bench --suite` command line that reproduces these settings."""
    parts = ["luffy", "bench", "--suite", "--out", shlex.quote(str(out_dir))]
    if settings["model"]:
        parts.insert(2, shlex.quote(str(settings["model"])))
    for key, value in settings.items():
        if key != "model" and value != _SUITE_DEFAULTS[key]:
            parts += [f"--{key}", shlex.quote(str(value))]
    return " ".join(parts)
