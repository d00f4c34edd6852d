"""`luffy serve ARTIFACT`: the OpenAI-compatible server, or replicas on Ray Serve (extras 'serve', 'ray')."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from ..extras import require_serve_extra


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
