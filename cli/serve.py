"""`luffy serve ARTIFACT`: the OpenAI-compatible server, or replicas on Ray Serve (extras 'serve', 'ray').

Its flags are generated from the option fields of serving/options.py, which Ray Serve's builder and its YAML
config read too: an option is added there, not here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from ..extras import require_serve_extra
from ..serving.options import serve_fields, serve_options  # plain dataclasses: no numpy, no FastAPI
from .flags import flag_parameter


def serve_cmd(artifact: Path, **options):
    """Serve an artifact over an OpenAI-compatible HTTP API with continuous batching.

    Routes: POST /v1/completions, /v1/chat/completions (stream=true for server-sent events), /tokenize,
    /detokenize; GET /v1/models, /v1/models/{id}, /health, /metrics (Prometheus, luffy:* named like vLLM's
    vllm:*), /openapi.json. An encoder artifact serves POST /v1/embeddings instead of completions.

    Example: luffy serve build/pydoc --port 8000 --max-num-seqs 16

    Example (Ray Serve): luffy serve build/pydoc --replicas 2 --threads 1, or --min-replicas 1 --max-replicas 4

    Example (client): curl -s localhost:8000/v1/completions -H 'Content-Type: application/json'
    -d '{"model": "pydoc", "prompt": "Return the", "max_tokens": 32, "temperature": 0}'
    """
    require_serve_extra()
    artifact, settings, ray = serve_options({"artifact": artifact, **options})
    if ray is not None:
        from ..serving.ray import serve_on_ray

        raise typer.Exit(serve_on_ray(artifact, settings, ray))
    from ..serving.server import serve

    raise typer.Exit(serve(artifact, settings))


def _serve_parameters() -> list[inspect.Parameter]:
    """serve_cmd's signature: ARTIFACT, then one flag per option field of serving/options.py, in --help panels."""
    artifact = typer.Argument(..., help="Artifact directory of a causal LM, or of an encoder for /v1/embeddings "
                              "(`luffy compile` output).")
    params = [inspect.Parameter("artifact", inspect.Parameter.KEYWORD_ONLY, default=artifact, annotation=Path)]
    return params + [flag_parameter(f, kind, panel) for f, kind, panel in serve_fields()]


serve_cmd.__signature__ = inspect.Signature(_serve_parameters())
