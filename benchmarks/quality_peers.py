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
- PPL = exp(mean NLL) and its +/- = sqrt((mean NLL^2 - mean NLL^2) / (count - 1)) * PPL.

Tokenizers may split a text differently, so absolute perplexities are compared only when both tools produce
the same token ids (recorded, with the counts, when llama-tokenize is built beside llama-perplexity); the
comparison is each tool's quantized perplexity against its own f32 / fp32. Prints one JSON object (with the
machine) and a markdown table; --out also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
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
_VERSION = re.compile(r"version: (\S+) \((\w+)\)")


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


def scored_nll(logits: np.ndarray, chunk: list[int]) -> np.ndarray:
    """Negative log-likelihoods of a chunk's scored tokens: logits [n_ctx, vocab] at positions n_ctx/2 .. n_ctx-2
    against the tokens one further on (llama.cpp's process_logits over its n_ctx - 1 - first outputs)."""
    first = len(chunk) // 2
    rows = logits[first:len(chunk) - 1].astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    log_probs = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    targets = np.asarray(chunk[first + 1:])
    return -log_probs[np.arange(len(targets)), targets]


def estimate(nll: np.ndarray) -> dict:
    """llama-perplexity's final estimate from the per-token NLLs: PPL and its +/- (the standard error of the
    mean NLL carried through exp)."""
    mean = float(nll.mean())
    variance = float((nll ** 2).mean()) - mean * mean
    ppl = float(np.exp(mean))
    error = float(np.sqrt(variance / (len(nll) - 1))) * ppl if variance > 0 and len(nll) > 1 else None
    return {"ppl": ppl, "ppl_error": error, "scored_tokens": int(len(nll))}


def chunked_perplexity(score, ids: list[int], n_ctx: int, bos_id: int | None, rows: int = 8) -> dict:
    """llama-perplexity's scheme over ``ids`` with ``score`` (rows of token ids -> logits [rows, n_ctx, vocab]),
    ``rows`` chunks per call: PPL, +/-, chunks and scored tokens."""
    chunks = llama_chunks(ids, n_ctx, bos_id)
    nll = []
    for start in range(0, len(chunks), rows):
        batch = chunks[start:start + rows]
        logits = score(batch)
        nll.extend(scored_nll(logits[i], chunk) for i, chunk in enumerate(batch))
    return {**estimate(np.concatenate(nll)), "chunks": len(chunks)}


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


def parse_version(output: str) -> str | None:
    """'BUILD (COMMIT)' from a llama.cpp binary's --version output, None if absent."""
    found = _VERSION.search(output)
    return f"{found.group(1)} ({found.group(2)})" if found else None


# -- the measurements --------------------------------------------------------------------------------------
def luffy_perplexity(artifact: Path, text: str, n_ctx: int) -> dict:
    """One artifact scored with llama-perplexity's scheme through its Engine (ONNX Runtime, no torch)."""
    engine = load(artifact)
    bos = tokenizer_bos(engine.tokenizer)
    ids = engine.tokenizer.encode(text).ids
    result = chunked_perplexity(engine.score, ids, n_ctx, bos)
    weights = sum(f.stat().st_size for f in Path(artifact).iterdir() if f.name.startswith("model."))
    scheme = (engine.manifest.get("report") or {}).get("precision", {}).get("scheme")  # block, method, level
    return {**result, "text_tokens": len(ids), "bos_id": bos, "model_bytes": weights, "scheme": scheme,
            "token_ids": ids}


def _llama(command: list[str], what: str) -> str:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"{what} exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    return proc.stdout + proc.stderr


def llama_perplexity(bin_dir: Path, gguf: Path, text_file: Path, n_ctx: int) -> dict:
    """`llama-perplexity -m GGUF -f TEXT -c N` on every usable core; its parsed estimate and the command."""
    command = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
               "-t", str(usable_cores())]
    output = _llama(command, "llama-perplexity")
    return {**parse_llama_perplexity(output), "model_bytes": gguf.stat().st_size, "command": command}


def llama_token_ids(bin_dir: Path, gguf: Path, text_file: Path) -> list[int] | None:
    """The text's token ids as llama.cpp tokenizes it (llama-tokenize --ids, BOS added as llama-perplexity
    does); None when llama-tokenize is not built."""
    if not (bin_dir / "llama-tokenize").is_file():
        return None
    output = subprocess.run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", str(text_file), "--ids",
                             "--log-disable"], capture_output=True, text=True, check=True).stdout
    listed = [ln for ln in output.splitlines() if ln.startswith("[")]
    return json.loads(listed[-1]) if listed else None


def build_ggufs(bin_dir: Path, hf_dir: Path, work: Path) -> tuple[dict, dict]:
    """f32, q8_0 and q4_0 GGUFs of ``hf_dir`` under ``work``: (type -> path, step -> command)."""
    tree = llama_cpp_tree(bin_dir)
    if tree is None:
        raise UsageError(f"--llama-cpp {bin_dir}: no convert_hf_to_gguf.py in it or the three folders above")
    work.mkdir(parents=True, exist_ok=True)
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


def _llama_rows(bin_dir: Path, hf_dir: Path, text_file: Path, n_ctx: int, work: Path) -> tuple[list, dict]:
    files, commands = build_ggufs(bin_dir, hf_dir, work / "gguf")
    rows = [{"system": "llama.cpp", "precision": kind, **llama_perplexity(bin_dir, files[kind], text_file, n_ctx)}
            for kind in PAIRS.values()]
    tokens = llama_token_ids(bin_dir, files["f32"], text_file)
    version = parse_version(_llama([str(bin_dir / "llama-perplexity"), "--version"], "llama-perplexity --version"))
    return rows, {"commands": commands, "version": version, "token_ids": tokens}


def measure(bin_dir: Path, n_ctx: int, work: Path, given: dict[str, str], text_file: Path) -> dict:
    """The whole comparison: llama.cpp's three GGUFs and luffy's three artifacts on ``text_file``."""
    hf_dir = Path(zoo_hf_dir(MODEL, str(work / "hf"))["path"])
    llama_rows, llama = _llama_rows(bin_dir, hf_dir, text_file, n_ctx, work)
    artifacts, compiles = luffy_artifacts(given, work)
    text = text_file.read_text(encoding="utf-8")
    luffy_rows = [{"system": "luffy", "precision": precision, "artifact": str(path),
                   **luffy_perplexity(path, text, n_ctx)} for precision, path in artifacts.items()]
    luffy_ids = luffy_rows[0]["token_ids"]
    for row in luffy_rows:
        row.pop("token_ids")
    llama_ids = llama.pop("token_ids")
    return {
        "benchmark": "quality_peers", "model": MODEL, "hf_dir": str(hf_dir), "text": str(text_file),
        "text_bytes": len(text.encode("utf-8")), "n_ctx": n_ctx,
        "scheme": f"llama-perplexity's: chunks of {n_ctx} tokens from an empty cache, BOS first, tokens "
                  f"{n_ctx // 2 + 1}..{n_ctx - 1} of each scored ({n_ctx - n_ctx // 2 - 1} per chunk)",
        "tokens": {"luffy": len(luffy_ids), "llama.cpp": len(llama_ids) if llama_ids is not None else None,
                   "same_token_ids": llama_ids == luffy_ids if llama_ids is not None else None},
        "llama.cpp": {"bin": str(bin_dir), **llama}, "luffy": {"commands": compiles},
        "machine": describe_machine(), "rows": _with_deltas(llama_rows + luffy_rows),
    }


def table(result: dict) -> str:
    """The markdown table: per system and precision, perplexity +/- , change vs its own f32 / fp32, tokens."""
    lines = ["| system | precision | perplexity | vs own f32 | scored tokens | model MB |", "|---|---|---|---|---|---|"]
    pair = {kind: precision for precision, kind in PAIRS.items()}
    order = sorted(result["rows"], key=lambda r: (list(PAIRS).index(pair.get(r["precision"], r["precision"])),
                                                 r["system"] != "llama.cpp"))
    for row in order:
        error = f" ± {row['ppl_error']:.4f}" if row.get("ppl_error") is not None else ""
        lines.append(f"| {row['system']} | {row['precision']} | {row['ppl']:.4f}{error} | {row['delta_pct']:+.3f} % | "
                     f"{row['scored_tokens']:,} | {row['model_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def _given_artifacts(values: list[str]) -> dict[str, str]:
    given = {}
    for value in values:
        precision, _, path = value.partition("=")
        if precision not in PAIRS or not path:
            raise UsageError(f"--luffy {value}: give PRECISION=ARTIFACT with PRECISION one of {', '.join(PAIRS)}")
        if not (Path(path) / "manifest.json").is_file():
            raise UsageError(f"--luffy {value}: {path} holds no manifest.json (not a luffy artifact)")
        given[precision] = path
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
        result = measure(bin_dir, args.ctx, Path(args.work), _given_artifacts(args.luffy), Path(args.text))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
