"""Train `llama-pydoc`: the zoo's small decoder with real (trained) weights, for measuring quantization.

Random weights say nothing about quantization quality: their activations have no outliers and their
perplexity is the vocabulary size whatever you do to them. So luffy trains its own small Llama on text
every Python install has -- the docstrings of the standard library -- on a CPU, in minutes:

    python -m luffy.models_zoo.train_pydoc_llama            # writes models_zoo/weights/pydoc-llama/
    python -m luffy.models_zoo.train_pydoc_llama --steps 50 --out /tmp/quick   # a smoke run

Every 20th standard-library file (in sorted path order) is held out; the first HELDOUT_BYTES of its
docstrings are committed as heldout.txt, so perplexity is measured on the same text on every machine,
whatever its Python version; calibration.txt (for GPTQ) is the first CALIB_BYTES of the training text.
Weights are stored as fp16 safetensors (≈6.6 MB) and loaded as fp32.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sysconfig
import time
from pathlib import Path

from .byte_tokenizer import BOS_ID, EOS_ID, PAD_ID
from .tiny import VOCAB

from .trained import CALIB_FILE, HELDOUT_FILE, PYDOC_LLAMA_DIR as OUT_DIR

CALIB_BYTES = 32_000
HELDOUT_EVERY = 20
HELDOUT_BYTES = 24_000
SEQ = 256
MAX_POSITIONS = 1024
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


def model_config():
    """Hidden 256, 4 layers, 8 query heads over 4 KV heads, FFN 768: every K divides 128 (int4 blocks)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def stdlib_docstrings() -> tuple[str, str]:
    """(training text, held-out text): docstrings of the standard library's modules, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    train, held = [], []
    for i, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [
            ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        docs = [d for d in docs if d and len(d) >= 40]
        (held if i % HELDOUT_EVERY == 0 else train).extend(docs)
    return "\n\n".join(train), "\n\n".join(held)


def calibration_text(train_text: str) -> str:
    return train_text.encode("utf-8")[:CALIB_BYTES].decode("utf-8", errors="ignore")


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def train(steps: int, batch: int, lr: float, seed: int, out: Path, log=print) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    train_text, held_text = stdlib_docstrings()
    held_text = held_text.encode("utf-8")[:HELDOUT_BYTES].decode("utf-8", errors="ignore")
    data = torch.tensor(byte_ids(train_text), dtype=torch.long)
    log(f"corpus: {len(data):,} training bytes, {len(held_text):,} held-out characters")

    model = LlamaForCausalLM(model_config())
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,))
        x = torch.stack([data[s:s + SEQ] for s in starts])
        bos = torch.full((batch, 1), BOS_ID, dtype=torch.long)
        x = torch.cat([bos, x], dim=1)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:7.1f}s")

    model.eval()
    ppl = heldout_perplexity(model, held_text)
    log(f"held-out perplexity (per byte): {ppl:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    (out / HELDOUT_FILE).write_text(held_text, encoding="utf-8")
    (out / CALIB_FILE).write_text(calibration_text(train_text), encoding="utf-8")
    info = {"steps": steps, "batch": batch, "seq": SEQ, "lr": lr, "seed": seed,
            "train_bytes": len(data), "seconds": round(time.perf_counter() - started, 1),
            "heldout_perplexity_fp32_training_weights": round(ppl, 4), "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def heldout_perplexity(model, text: str, window: int = SEQ) -> float:
    """Per-byte perplexity over non-overlapping windows, each starting with <bos>."""
    import torch

    ids = byte_ids(text)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([[BOS_ID] + ids[start:start + window]])
            logits = model(input_ids=chunk).logits.float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            nll -= logp.gather(1, chunk[0, 1:, None]).sum().item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    train(args.steps, args.batch, args.lr, args.seed, args.out)


if __name__ == "__main__":
    main()
