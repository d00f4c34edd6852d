"""Quantization quality against llama.cpp: each tool's int8 / int4 perplexity relative to its own fp32, on the
same text, with llama-perplexity's window scheme for both.

    python -m luffy.benchmarks.quality_peers --llama-cpp /work/peers/llama.cpp/build/bin \\
        --out benchmarks/results/quality-peers-pydoc.json

The model is the zoo's trained llama-pydoc, saved as a Hugging Face directory (benchmarks/models.py: zoo_hf_dir,
what `luffy bench` gives the peers); the text is its held-out file. llama.cpp: convert_hf_to_gguf.py to f32
(native_peers.convert_to_gguf), llama-quantize to q8_0 and q4_0, and `llama-perplexity -m F.gguf -f TEXT -c N`
on each, its "Final estimate: PPL = P +/- E" parsed. luffy: llama-pydoc compiled at fp32, int8 and int4 with
luffy's defaults (or the artifacts --luffy names), scored through the artifact's Engine with the same scheme
(llama.cpp tools/perplexity/perplexity.cpp, perplexity()):

- the whole text is tokenized once, with the tokenizer's special tokens (a BOS first where it adds one);
- it is cut into floor(tokens / N) chunks of N tokens, the rest dropped; each chunk runs alone from an empty
  cache, its first token replaced by BOS where the tokenizer adds one;
- only the second half is scored: the logits at positions N/2 .. N-2 predict tokens N/2+1 .. N-1, so
  N - N/2 - 1 tokens per chunk;
- PPL = exp(mean NLL) and its +/- = sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)) * PPL.

Each quantized model is also set against its own f32 token by token, as `llama-perplexity --kl-divergence`
does against the f32 run's saved log-probabilities (--kl-divergence-base): PPL(Q)/PPL(base) with the paired
uncertainty (the +/- of each perplexity is mostly the text's own spread, common to both), mean KL divergence
and how often both rank the same token first; luffy's from its fp32 artifact's exact log-probabilities.

Tokenizers may split a text differently, so absolute perplexities are comparable only when both tools evaluate
the same token ids: the ids llama-perplexity evaluated (read back from its --kl-divergence-base file) are
compared with luffy's. The comparison made either way is each tool's quantized perplexity against its own
f32 / fp32. Prints one JSON object (with the machine) and a markdown table; --out also writes the JSON. Needs
the compile and bench extras (torch, transformers; sentencepiece for convert_hf_to_gguf.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import luffy

from ..errors import UsageError
from ..models_zoo.trained import heldout_text_path
from ..runtimes import load
from ..runtimes.cpu_features import usable_cores
from .machine import describe_machine
from .models import zoo_hf_dir
from .native_peers import convert_to_gguf, llama_cpp_bin, llama_cpp_tree, quantize_gguf

MODEL = "llama-pydoc"
# luffy's precision -> the GGUF type compared with it (native_peers.LLAMA_TYPES, the bench's pairing)
PAIRS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")
_VERSION = re.compile(r"version: (.+)")
# runs of a llama.cpp tool whose log lost the lines parsed (_llama_parsed; 2 of 3 full-text f32 runs once here)
ATTEMPTS = 6
# llama-perplexity --kl-divergence's lines -> paired_vs_base's keys
_KLD_LINES = {"ppl_ratio": "Mean PPL(Q)/PPL(base)", "kld": "Mean    KLD", "same_top_pct": "Same top p"}


# -- the window scheme -------------------------------------------------------------------------------------
def llama_chunks(ids: list[int], n_ctx: int, bos_id: int | None) -> list[list[int]]:
    """The chunks llama-perplexity evaluates: floor(len / n_ctx) runs of n_ctx tokens, the rest dropped, each
    chunk's first token replaced by ``bos_id`` (None: the tokenizer adds no BOS, chunks kept as they are)."""
    if n_ctx < 4 or n_ctx % 2:
        raise UsageError(f"--ctx {n_ctx}: give an even context of at least 4 tokens")
    if len(ids) < 2 * n_ctx:
        raise UsageError(f"the text tokenizes to {len(ids)} tokens; a context of {n_ctx} needs at least {2 * n_ctx} "
                         "(llama-perplexity's limit)")
    chunks = [list(ids[start:start + n_ctx]) for start in range(0, len(ids) // n_ctx * n_ctx, n_ctx)]
    if bos_id is not None:
        for chunk in chunks:
            chunk[0] = bos_id
    return chunks


def scored_log_probs(logits: np.ndarray, chunk: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's scored positions: log-probabilities [n_ctx - n_ctx/2 - 1, vocab] (float64) from the logits
    [n_ctx, vocab] at positions n_ctx/2 .. n_ctx-2, and the tokens one further on they predict (llama.cpp's
    process_logits over its n_ctx - 1 - first outputs)."""
    first = len(chunk) // 2
    rows = logits[first:len(chunk) - 1].astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True)), np.asarray(chunk[first + 1:])


def estimate(nll: np.ndarray) -> dict:
    """llama-perplexity's final estimate from the per-token NLLs: PPL and its +/- (the standard error of the
    mean NLL carried through exp)."""
    mean = float(nll.mean())
    variance = float((nll ** 2).mean()) - mean * mean
    ppl = float(np.exp(mean))
    error = float(np.sqrt(variance / (len(nll) - 1))) * ppl if variance > 0 and len(nll) > 1 else None
    return {"ppl": ppl, "ppl_error": error, "scored_tokens": int(len(nll))}


def chunked_log_probs(score, chunks: list[list[int]], rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Every chunk's scored log-probabilities [tokens, vocab] and targets [tokens], in order; ``score`` maps rows
    of token ids to logits [rows, n_ctx, vocab] and gets ``rows`` chunks per call."""
    log_probs, targets = [], []
    for start in range(0, len(chunks), rows):
        batch = chunks[start:start + rows]
        logits = score(batch)
        for i, chunk in enumerate(batch):
            chunk_log_probs, chunk_targets = scored_log_probs(logits[i], chunk)
            log_probs.append(chunk_log_probs)
            targets.append(chunk_targets)
    return np.concatenate(log_probs), np.concatenate(targets)


def target_nll(log_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -log_probs[np.arange(len(targets)), targets]


def chunked_perplexity(score, ids: list[int], n_ctx: int, bos_id: int | None, rows: int = 8) -> dict:
    """llama-perplexity's scheme over ``ids`` with ``score`` (rows of token ids -> logits [rows, n_ctx, vocab]):
    PPL, +/-, chunks and scored tokens."""
    chunks = llama_chunks(ids, n_ctx, bos_id)
    return {**estimate(target_nll(*chunked_log_probs(score, chunks, rows))), "chunks": len(chunks)}


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama.cpp's mean_and_uncertainty (variance over count, then / (count-1))."""
    mean = float(values.mean())
    return mean, float(np.sqrt(max(float((values ** 2).mean()) - mean * mean, 0.0) / (len(values) - 1)))


def paired_vs_base(log_probs: np.ndarray, base: np.ndarray, targets: np.ndarray) -> dict:
    """A quantized model against its base on the same tokens, llama-perplexity --kl-divergence's statistics:
    PPL(Q)/PPL(base) with the paired uncertainty (exp of the mean per-token NLL difference), mean KLD(base || Q)
    and how often both put the same token on top (percent)."""
    ratio_log, ratio_log_error = _mean_and_error(target_nll(log_probs, targets) - target_nll(base, targets))
    kld, kld_error = _mean_and_error((np.exp(base) * (base - log_probs)).sum(axis=-1))
    same_top = float((log_probs.argmax(-1) == base.argmax(-1)).mean())
    return {"ppl_ratio": float(np.exp(ratio_log)), "ppl_ratio_error": float(np.exp(ratio_log)) * ratio_log_error,
            "kld": kld, "kld_error": kld_error, "same_top_pct": 100 * same_top,
            "same_top_pct_error": 100 * float(np.sqrt(same_top * (1 - same_top) / (len(targets) - 1)))}


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id a `tokenizers.Tokenizer` prepends when encoding with special tokens, None when it adds none
    (llama.cpp's add_bos: the text's first token and every chunk's first are then that BOS)."""
    with_specials = tokenizer.encode("a").ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    return with_specials[0] if len(with_specials) > len(plain) and with_specials[1:] == plain else None


# -- llama-perplexity's output -----------------------------------------------------------------------------
def parse_llama_perplexity(output: str) -> dict:
    """llama-perplexity's final estimate and its chunking from its log: ppl, ppl_error, chunks, n_ctx and the
    scored tokens (chunks x (n_ctx - n_ctx/2 - 1)); a ValueError naming what is missing otherwise."""
    final = _FINAL.search(output)
    if final is None:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        raise ValueError(f"llama-perplexity printed no 'Final estimate: PPL = ...' line (last: "
                         f"{lines[-1] if lines else 'no output'!r})")
    result = {"ppl": float(final.group(1)), "ppl_error": float(final.group(2))}
    chunks = _CHUNKS.search(output)
    if chunks is not None:
        count, n_ctx = int(chunks.group(1)), int(chunks.group(2))
        result.update(chunks=count, n_ctx=n_ctx, scored_tokens=count * (n_ctx - n_ctx // 2 - 1))
    return result


def parse_kl_divergence(output: str) -> dict:
    """llama-perplexity --kl-divergence's statistics in paired_vs_base's keys (ppl_ratio, kld, same_top_pct, each
    with its error); a ValueError naming the line it lacks."""
    result = {}
    for key, label in _KLD_LINES.items():
        found = re.search(re.escape(label) + r"\s*:\s*(-?[0-9.]+)\s*±\s*([0-9.]+)", output)
        if found is None:
            raise ValueError(f"llama-perplexity --kl-divergence printed no '{label}' line")
        result[key], result[f"{key}_error"] = float(found.group(1)), float(found.group(2))
    return result


def parse_version(output: str) -> str | None:
    """What follows 'version:' in a llama.cpp binary's --version output, None if absent."""
    found = _VERSION.search(output)
    return found.group(1).strip() if found else None


def read_base_tokens(path: Path) -> tuple[int, list[int]]:
    """n_ctx and the token ids llama-perplexity evaluated, from the file --kl-divergence-base writes ("_logits_",
    then int32 n_ctx, n_vocab, n_chunk and the n_chunk x n_ctx token ids, before the log-probabilities)."""
    with open(path, "rb") as file:
        if file.read(8) != b"_logits_":
            raise ValueError(f"{path}: not a llama-perplexity --kl-divergence-base file")
        n_ctx, _, n_chunk = np.frombuffer(file.read(12), dtype="<i4")
        return int(n_ctx), np.frombuffer(file.read(4 * int(n_chunk) * int(n_ctx)), dtype="<i4").tolist()


# -- the measurements --------------------------------------------------------------------------------------
def luffy_scores(artifact: Path, text: str, n_ctx: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One artifact under llama-perplexity's scheme through its Engine (ONNX Runtime, no torch): its row, and the
    scored log-probabilities and targets (for paired_vs_base)."""
    engine = load(artifact)
    bos = tokenizer_bos(engine.tokenizer)
    ids = engine.tokenizer.encode(text).ids
    chunks = llama_chunks(ids, n_ctx, bos)
    log_probs, targets = chunked_log_probs(engine.score, chunks)
    weights = sum(f.stat().st_size for f in Path(artifact).iterdir() if f.name.startswith("model."))
    scheme = (engine.manifest.get("report") or {}).get("precision", {}).get("scheme")  # block, method, level
    row = {**estimate(target_nll(log_probs, targets)), "chunks": len(chunks), "text_tokens": len(ids),
           "bos_id": bos, "model_bytes": weights, "scheme": scheme, "token_ids": ids}
    return row, log_probs, targets


def luffy_perplexity(artifact: Path, text: str, n_ctx: int) -> dict:
    """One artifact's perplexity under llama-perplexity's scheme (luffy_scores' row)."""
    return luffy_scores(artifact, text, n_ctx)[0]


def _llama(command: list[str], what: str) -> str:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode < 0:  # its weight-repacking (AMX) kernels died so on a Sapphire Rapids
        raise RuntimeError(f"{what} died of signal {-proc.returncode} ({shlex.join(command)}); if it dies in its "
                           "repacked kernels, run with --llama-args=-nr")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"{what} exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    return proc.stdout + proc.stderr


def _llama_parsed(command: list[str], what: str, parse, attempts: int = ATTEMPTS) -> tuple[dict, int]:
    """Run a llama.cpp tool (its stdout and stderr unbuffered) and parse its log, again up to ``attempts`` times
    when the lines parsed are missing: llama.cpp's logger writes from a thread of its own and is never drained at
    exit (common/log.cpp leaks it on purpose, llama.cpp issue 22142), so a run's last lines can be lost.
    (parsed, tries)."""
    unbuffered = ["stdbuf", "-o0", "-e0"] if shutil.which("stdbuf") else []
    for attempt in range(1, attempts):
        try:
            return parse(_llama(unbuffered + command, what)), attempt
        except ValueError:
            continue
    return parse(_llama(unbuffered + command, what)), attempts


def llama_perplexity(bin_dir: Path, gguf: Path, text_file: Path, n_ctx: int, base_logits: Path | None = None,
                     extra: tuple[str, ...] = ()) -> dict:
    """`llama-perplexity -m GGUF -f TEXT -c N` on every usable core (``extra`` arguments appended); its parsed
    estimate and the command (``base_logits``: also save the scored log-probabilities there, --kl-divergence-base,
    for the quantized runs)."""
    command = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
               "-t", str(usable_cores()), *extra]
    if base_logits is not None:
        command += ["--kl-divergence-base", str(base_logits)]
    parsed, tries = _llama_parsed(command, "llama-perplexity", parse_llama_perplexity)
    return {**parsed, "model_bytes": gguf.stat().st_size, "command": command, "runs": tries}


def llama_kl_divergence(bin_dir: Path, gguf: Path, base_logits: Path, n_ctx: int, extra: tuple[str, ...] = ()) -> dict:
    """`llama-perplexity -m GGUF --kl-divergence-base BASE --kl-divergence -c N`: the quantized model against the
    f32 run's saved log-probabilities on the same chunks; its statistics and the command."""
    command = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "--kl-divergence-base", str(base_logits),
               "--kl-divergence", "-c", str(n_ctx), "-t", str(usable_cores()), *extra]
    parsed, tries = _llama_parsed(command, "llama-perplexity --kl-divergence", parse_kl_divergence)
    return {**parsed, "command": command, "runs": tries}


def build_ggufs(bin_dir: Path, hf_dir: Path, work: Path) -> tuple[dict, dict]:
    """f32, q8_0 and q4_0 GGUFs of ``hf_dir`` under ``work``: (type -> path, step -> command)."""
    tree = llama_cpp_tree(bin_dir)
    if tree is None:
        raise UsageError(f"--llama-cpp {bin_dir}: no convert_hf_to_gguf.py in it or the three folders above")
    files = {kind: work / f"{MODEL}-{kind}.gguf" for kind in PAIRS.values()}
    commands = {"convert": convert_to_gguf(tree, hf_dir, files["f32"])}
    for kind in ("q8_0", "q4_0"):
        commands[f"quantize {kind}"] = quantize_gguf(bin_dir, files["f32"], files[kind], kind)
    commands["convert"][2] = "<native_peers._CONVERT: convert_hf_to_gguf.py with the byte-tokenizer workaround>"
    return files, commands


def luffy_artifacts(given: dict[str, str], work: Path) -> tuple[dict, dict]:
    """precision -> artifact: those --luffy names, the rest compiled from llama-pydoc with luffy's defaults."""
    artifacts, commands = {}, {}
    for precision in PAIRS:
        if precision in given:
            artifacts[precision] = Path(given[precision])
            continue
        out = work / f"luffy-{precision}"
        luffy.compile(MODEL, output=out, precision=precision)
        artifacts[precision] = out
        commands[precision] = f"luffy compile {MODEL} -o {out} --precision {precision}"
    return artifacts, commands


def _with_deltas(rows: list[dict]) -> list[dict]:
    """Each row's perplexity change against its own system's f32 / fp32 row, in percent."""
    base = {row["system"]: row["ppl"] for row in rows if row["precision"] in ("f32", "fp32")}
    for row in rows:
        row["delta_pct"] = round(100 * (row["ppl"] / base[row["system"]] - 1), 4)
    return rows


def llama_rows(bin_dir: Path, hf_dir: Path, text_file: Path, n_ctx: int, work: Path,
               extra: tuple[str, ...] = ()) -> tuple[list, dict]:
    """llama.cpp's three rows (perplexity, and for q8_0 / q4_0 the paired statistics against f32) and what ran."""
    files, commands = build_ggufs(bin_dir, hf_dir, work / "gguf")
    base_logits = work / "gguf" / f"{MODEL}-f32.kld"
    rows = [{"system": "llama.cpp", "precision": "f32",
             **llama_perplexity(bin_dir, files["f32"], text_file, n_ctx, base_logits, extra)}]
    for kind in ("q8_0", "q4_0"):
        rows.append({"system": "llama.cpp", "precision": kind,
                     **llama_perplexity(bin_dir, files[kind], text_file, n_ctx, extra=extra),
                     "vs_base": llama_kl_divergence(bin_dir, files[kind], base_logits, n_ctx, extra)})
    tokens = read_base_tokens(base_logits)[1]
    version = parse_version(_llama([str(bin_dir / "llama-perplexity"), "--version"], "llama-perplexity --version"))
    return rows, {"commands": commands, "version": version, "token_ids": tokens}


def luffy_rows(artifacts: dict, text: str, n_ctx: int) -> tuple[list, list[int]]:
    """luffy's rows, fp32 first (the others with paired statistics against its), and the text's token ids;
    ``artifacts``: label (a precision, or a variant's name) -> artifact."""
    rows, base = [], None
    for label, path in artifacts.items():
        row, log_probs, targets = luffy_scores(path, text, n_ctx)
        if base is None:
            base = log_probs
        else:
            row["vs_base"] = paired_vs_base(log_probs, base, targets)
        rows.append({"system": "luffy", "precision": label, "artifact": str(path), **row})
    ids = rows[0]["token_ids"]
    for row in rows:
        row.pop("token_ids")
    return rows, ids


def measure(bin_dir: Path, n_ctx: int, work: Path, text_file: Path, given: dict[str, str],
            variants: dict[str, str] | None = None, llama_args: tuple[str, ...] = ()) -> dict:
    """The whole comparison on ``text_file``: llama.cpp's three GGUFs (``llama_args`` appended to each
    llama-perplexity run), luffy's three artifacts (``given`` or compiled) and any further luffy ``variants``
    (label -> artifact), each set against its own system's f32 / fp32."""
    hf_dir = Path(zoo_hf_dir(MODEL, str(work / "hf"))["path"])
    llama, llama_info = llama_rows(bin_dir, hf_dir, text_file, n_ctx, work, llama_args)
    artifacts, compiles = luffy_artifacts(given, work)
    artifacts.update({label: Path(path) for label, path in (variants or {}).items()})
    text = text_file.read_text(encoding="utf-8")
    ours, luffy_ids = luffy_rows(artifacts, text, n_ctx)
    llama_ids = llama_info.pop("token_ids")
    return {
        "benchmark": "quality_peers", "model": MODEL, "hf_dir": str(hf_dir), "text": str(text_file),
        "text_bytes": len(text.encode("utf-8")), "n_ctx": n_ctx,
        "scheme": f"llama-perplexity's: chunks of {n_ctx} tokens from an empty cache, BOS first, tokens "
                  f"{n_ctx // 2 + 1}..{n_ctx - 1} of each scored ({n_ctx - n_ctx // 2 - 1} per chunk)",
        "tokens": {"luffy_text": len(luffy_ids), "llama.cpp_evaluated": len(llama_ids),
                   "same_evaluated_ids": llama_ids == luffy_ids[:len(llama_ids)]},
        "llama.cpp": {"bin": str(bin_dir), **llama_info}, "luffy": {"commands": compiles},
        "machine": describe_machine(), "rows": _with_deltas(llama + ours),
    }


def _cell(value: float | None, error: float | None, digits: int, scale: float = 1.0, sign: str = "") -> str:
    if value is None:
        return ""
    text = f"{value * scale:{sign}.{digits}f}"
    return text + (f" ± {error * scale:.{digits}f}" if error is not None else "")


def _precision_class(row: dict) -> str:
    """fp32 / int8 / int4: a GGUF type's luffy counterpart, a luffy row's compiled precision."""
    pair = {kind: precision for precision, kind in PAIRS.items()}
    if row["system"] == "llama.cpp":
        return pair[row["precision"]]
    bits = (row.get("scheme") or {}).get("bits")
    return f"int{bits}" if bits else "fp32"


def table(result: dict) -> str:
    """The markdown table: per precision, each system's perplexity +/-, its change against its own f32 / fp32
    (from the two perplexities; paired +/- and KLD from the --kl-divergence statistics), tokens and size."""
    lines = ["| precision | system | perplexity | vs own f32 % | paired ratio - 1, % | KLD vs f32 | same top % | "
             "scored tokens | model MB |", "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(result["rows"], key=lambda r: (list(PAIRS).index(_precision_class(r)), r["system"] != "llama.cpp"))
    for row in order:
        paired = row.get("vs_base") or {}
        ratio = paired.get("ppl_ratio")
        lines.append(f"| {_precision_class(row)} | {row['system']} {row['precision']} | "
                     f"{_cell(row['ppl'], row.get('ppl_error'), 4)} | {row['delta_pct']:+.3f} | "
                     f"{_cell(ratio - 1 if ratio else None, paired.get('ppl_ratio_error'), 3, 100, '+')} | "
                     f"{_cell(paired.get('kld'), paired.get('kld_error'), 6)} | "
                     f"{_cell(paired.get('same_top_pct'), paired.get('same_top_pct_error'), 2)} | "
                     f"{row['scored_tokens']:,} | {row['model_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def _given_artifacts(values: list[str], flag: str, labels: tuple[str, ...] | None) -> dict[str, str]:
    """LABEL=ARTIFACT arguments as a dict, each naming a luffy artifact (and, with ``labels``, one of them)."""
    given = {}
    for value in values:
        label, _, path = value.partition("=")
        if not label or not path or (labels is not None and label not in labels):
            raise UsageError(f"{flag} {value}: give LABEL=ARTIFACT" + (f" with LABEL one of {', '.join(labels)}"
                                                                     if labels else ""))
        if not (Path(path) / "manifest.json").is_file():
            raise UsageError(f"{flag} {value}: {path} holds no manifest.json (not a luffy artifact)")
        given[label] = path
    return given


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.quality_peers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", help="llama.cpp's build bin directory (default: llama-perplexity on PATH)")
    parser.add_argument("--ctx", type=int, default=256, help="llama-perplexity's -c: tokens per chunk (default 256, "
                                                             "llama-pydoc's training window)")
    parser.add_argument("--text", default=str(heldout_text_path()), help="the text (default: llama-pydoc's held-out)")
    parser.add_argument("--luffy", action="append", default=[], metavar="PRECISION=ARTIFACT",
                        help="reuse a compiled artifact instead of compiling llama-pydoc at that precision")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=ARTIFACT",
                        help="also score this luffy artifact (e.g. another block size) against luffy's fp32")
    parser.add_argument("--llama-args", default="", help="further llama-perplexity arguments, e.g. '-nr' (no weight "
                                                         "repacking, where its AMX kernels die with SIGILL)")
    parser.add_argument("--work", default="build/quality-peers", help="where the GGUFs and artifacts are written")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        bin_dir = llama_cpp_bin(args.llama_cpp, "llama-perplexity")
        if bin_dir is None:
            raise UsageError(f"llama-perplexity not found in {args.llama_cpp or 'PATH'}: build llama.cpp "
                             "(docs/benchmarks.md) and pass --llama-cpp BUILD/bin")
        if not Path(args.text).is_file():
            raise UsageError(f"--text {args.text}: no such file")
        result = measure(bin_dir, args.ctx, Path(args.work), Path(args.text),
                         _given_artifacts(args.luffy, "--luffy", tuple(PAIRS)),
                         _given_artifacts(args.variant, "--variant", None), tuple(args.llama_args.split()))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as error:  # a llama.cpp tool failed, or its log lacks the lines parsed
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
