"""`luffy run ARTIFACT`: generate from a compiled causal LM (greedy, sampled or speculative)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from .console import printable


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--input-ids {text!r}: expected comma-separated integers like 1,2,3") from None


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
    from ..runtimes import load, share_thread_pool

    if (prompt is None) == (input_ids is None):
        raise UsageError("give exactly one of --prompt TEXT or --input-ids 1,2,3")
    if draft is not None:  # target and draft take turns: one thread pool, or their spinning threads fight
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
