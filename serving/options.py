"""`luffy serve`'s options, each declared once as a field (luffy/options.py ``option``).

The scheduler's (``SchedulerConfig``), speculative decoding's (``SpeculationConfig``), the server's own
(``ServerSettings``) and Ray Serve's (``RayOptions``) together are one flat set of keys: the CLI's flags and
--help are generated from them (cli/serve.py), and Ray Serve's builder (``serve run luffy.serving.ray:build_app
k=v``, or a Serve config file's ``args:``) takes the same keys through ``serve_options``. This module imports
nothing heavy, so `luffy --help` stays quick.

>>> settings, ray = serve_options({"artifact": "build/pydoc", "max_num_seqs": "8", "replicas": 2})[1:]
>>> settings.scheduler.max_num_seqs, ray.replicas
(8, 2)
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..options import option, option_fields, option_key

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}


def parse_bytes(text: str, flag: str = "--kv-cache-memory") -> int:
    """``"1GiB"``, ``"512MiB"``, ``"1.5G"``, ``"2000000000"`` as bytes (K/M/G alone are binary, as in vLLM)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in _UNITS:
        raise UsageError(f"{flag} {text!r}: expected a size such as 1GiB, 512MiB or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise UsageError(f"{flag} {text!r} must be at least one byte")
    return value


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_num_seqs`` slots of ``max_model_len`` positions each (the KV cache's address space, reserved once;
    its memory is ``kv_cache_memory``, taken as sequences grow); ``max_num_batched_tokens``: decode tokens plus
    prompt tokens per iteration; ``max_queue``: waiting requests beyond which submit refuses. Each field is
    also a `luffy serve` flag (serving/options.py)."""

    max_num_seqs: int = option(16, "Sequences decoded together (KV slots).", min=1)
    max_model_len: int | None = option(
        None, "Positions per KV slot (prompt + max_tokens) [the artifact's max_seq_len]; memory is taken as "
        "sequences grow, up to --kv-cache-memory.", min=2)
    max_num_batched_tokens: int = option(
        512, "Decode plus prompt tokens per scheduler iteration; longer prompts are prefilled in chunks, so running "
        "streams wait at most one chunk.", min=1)
    max_queue: int = option(256, "Waiting requests beyond which new ones get 429.", min=1)
    # reuse free slots' contents and a host-RAM block store (serving/prefix_cache.py)
    prefix_cache: bool = option(True, "Reuse the KV of prompt prefixes seen before (free slots' contents, then a "
                                "host-RAM block store).", "--prefix-cache/--no-prefix-cache")
    prefix_cache_mb: int = option(256, "Host RAM for cached prefix blocks (0: only what free slots hold).", min=0)
    kv_cache_memory: str | None = option(
        None, "Memory for the KV cache, e.g. 1GiB (taken as sequences grow; requests wait or are preempted beyond "
        "it) [every slot full, at most half the machine's available memory].", metavar="SIZE")
    swap_space: float = option(4.0, "GiB of host memory holding preempted requests' KV until they resume (vLLM's "
                               "--swap-space); past it a preempted request recomputes.", min=0)
    speculation: object = None  # a SpeculationConfig (serving/speculation.py), or None

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)  # refused at startup, not at the first request


@dataclass(frozen=True)
class SpeculationConfig:
    """``draft``: a draft engine (``luffy serve --draft``); ``prompt_lookup``: tokens proposed by prompt lookup
    (``--prompt-lookup K``); ``num_tokens``: the draft's initial K (adaptive); ``max_batch``: speculate while at
    most this many requests decode."""

    draft: object = None  # the engine; `luffy serve --draft ARTIFACT` names its artifact (ServerSettings.draft)
    prompt_lookup: int | None = option(None, "Speculative decoding with up to K tokens copied from the context.",
                                       min=1, metavar="K")
    num_tokens: int = option(4, "Most tokens the draft proposes per round (fewer while it is rejected).", min=1,
                             key="num_assistant_tokens")
    max_batch: int = option(1, "Speculate while at most this many requests decode (a batched step already shares "
                            "the weights).", min=1, key="speculative_max_batch")


@dataclass(frozen=True)
class ServerSettings:
    """Everything `luffy serve` takes besides the artifact; ``scheduler`` sizes the KV cache and batching."""

    host: str = option("127.0.0.1", "Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = option(8000, "Port (0: one the OS picks; the log says which).", min=0, max=65535)
    served_model_name: str | None = option(None, "Model name in the API [the artifact directory's name].")
    api_key: str | None = option(None, "Require 'Authorization: Bearer KEY' on every route but /health.",
                                 envvar="LUFFY_API_KEY")
    drain_timeout: float = option(30.0, "On SIGTERM, seconds requests in flight may take to finish; then the rest "
                                  "end with an error event and [DONE].", min=0)
    max_request_bytes: int = option(1 << 20, "Largest request body, declared or chunked (413 beyond).", min=1024)
    header_timeout: float = option(10.0, "Seconds a client may take to send a request's headers (408, then the "
                                   "connection closes).", min=0.1)
    body_timeout: float = option(30.0, "Seconds a client may take to send a request's body (408).", min=0.1)
    threads: int | None = option(None, "ONNX Runtime intra-op threads [all cores].", min=1)
    spin: bool = option(True, "ONNX Runtime's threads spin between steps (lowest latency) or sleep (cores free for "
                        "HTTP and other processes).", "--spin/--no-spin")
    draft: Path | None = option(None, "Speculative decoding with this draft artifact (same tokenizer; e.g. the "
                                "--precision int8 --block-size 128 build).", metavar="ARTIFACT")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    replica: str | None = None  # scale-out: the name in x-luffy-replica and the metrics' replica label


@dataclass(frozen=True)
class RayOptions:
    """How many replicas and where: a fixed ``replicas``, or autoscaling between ``min_replicas`` and
    ``max_replicas`` on requests in flight per replica (``target_ongoing_requests``, default the replica's KV
    slots: a replica is added while requests wait for slots, removed while slots sit free)."""

    replicas: int | None = option(None, "Run N replicas on Ray Serve behind one endpoint (extra 'ray'); with "
                                  "--min/--max-replicas: the initial count.", min=1)
    min_replicas: int | None = option(None, "Autoscale on Ray Serve, down to this many replicas.", min=0)
    max_replicas: int | None = option(None, "Autoscale on Ray Serve, up to this many replicas.", min=1)
    target_ongoing_requests: float | None = option(
        None, "Autoscaling target: requests in flight per replica (in a slot or waiting) [--max-num-seqs: add "
        "replicas while requests wait for slots].", min=0.1)
    upscale_delay_s: float = option(5.0, "Seconds over target before a replica is added.", "--upscale-delay", min=0)
    downscale_delay_s: float = option(30.0, "Seconds under target before a replica is removed.", "--downscale-delay",
                                      min=0)
    look_back_period_s: float = 5.0
    routing: str = option("prefix", "Ray Serve routing: prefix (the replica holding the longest cached prefix, unless "
                          "it is busier) or pow2 (Ray's default).")
    imbalance: int = option(2, "Prefix routing: a replica more than this many requests busier than the least busy "
                            "one is passed over.", "--routing-imbalance", min=0)
    replica_cpus: float | None = None  # Ray CPUs a replica reserves [--threads, else 1]
    address: str | None = option(None, "Join this Ray cluster (auto, or the head's host:port) instead of starting a "
                                 "local one.", "--ray-address")
    app_name: str = "luffy"
    health_check_period_s: float = 2.0

    def __post_init__(self):
        if self.routing not in ("prefix", "pow2"):
            raise UsageError(f"--routing {self.routing!r}: expected prefix or pow2")
        for name in ("replicas", "min_replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "min_replicas" else 1):
                raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'min_replicas' else 1}, got {value}")
        if self.autoscaling:
            low, high = self.min_replicas or 1, self.max_replicas or max(self.min_replicas or 1, self.replicas or 1)
            if low > high:
                raise UsageError(f"--min-replicas {low} exceeds --max-replicas {high}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def autoscaling_config(self, slots: int) -> dict | None:
        if not self.autoscaling:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas or 1)
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": self.replicas or max(low, 1),
                "target_ongoing_requests": self.target_ongoing_requests or slots,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s, "metrics_interval_s": min(1.0, self.look_back_period_s)}

    @property
    def most_replicas(self) -> int:
        return max(self.replicas or 1, self.max_replicas or 1, self.min_replicas or 1)

    @property
    def cpus(self) -> float:
        return self.replica_cpus or 1.0


# The sections of `luffy serve`'s options, in --help's order; a key names one field of one section.
SECTIONS = ((ServerSettings, None), (SchedulerConfig, "Scheduler"), (SpeculationConfig, "Speculative decoding"),
            (RayOptions, "Ray Serve"))
RAY_KEYS = ("replicas", "min_replicas", "max_replicas", "address")  # any of these set: serve on Ray


def serve_fields() -> list[tuple[dataclasses.Field, type, str | None]]:
    """Every `luffy serve` option: (field, its type, its --help panel), in order."""
    found = []
    for cls, panel in SECTIONS:
        hints = typing.get_type_hints(cls)
        found += [(f, hints[f.name], panel) for f in option_fields(cls)]
    return found


def serve_options(values: dict) -> tuple[Path, ServerSettings, RayOptions | None]:
    """(artifact, server settings, Ray options or None) from a flat mapping of option keys, typed or strings (a
    Serve config's ``args``, ``serve run``'s k=v); keys left out take their defaults, an environment variable's
    first (``api_key``: $LUFFY_API_KEY). An unknown key is a UsageError listing the known ones."""
    values = {k: v for k, v in values.items() if v is not None}
    if "artifact" not in values:
        raise UsageError("the serve options need artifact=PATH")
    fields = serve_fields()
    unknown = sorted(set(values) - {option_key(f) for f, _, _ in fields} - {"artifact"})
    if unknown:
        raise UsageError(f"unknown serve option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(option_key(f) for f, _, _ in fields)}")
    sections: dict[type, dict] = {cls: {} for cls, _ in SECTIONS}
    for cls, _ in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            value = values.get(option_key(f), os.environ.get(f.metadata["cli"].get("envvar") or "", None))
            if value is not None:
                sections[cls][f.name] = _coerce(option_key(f), value, hints[f.name])
    return Path(values["artifact"]), *_build(sections)


def _build(sections: dict) -> tuple[ServerSettings, RayOptions | None]:
    server, speculation = sections[ServerSettings], sections[SpeculationConfig]
    if server.get("draft") is not None and speculation.get("prompt_lookup") is not None:
        raise UsageError("give --draft or --prompt-lookup, not both")
    spec = None
    if server.get("draft") is not None or speculation.get("prompt_lookup") is not None:
        spec = SpeculationConfig(**speculation)  # the draft engine is loaded by the server (ServerSettings.draft)
    settings = ServerSettings(**server, scheduler=SchedulerConfig(**sections[SchedulerConfig], speculation=spec))
    ray = sections[RayOptions]
    if not any(ray.get(key) is not None for key in RAY_KEYS):
        return settings, None
    return settings, RayOptions(**ray, replica_cpus=float(settings.threads or 1))  # a replica's CPUs: its threads


def _coerce(key: str, value, kind):
    """``value`` as an option of type ``kind`` (str, int, float, bool, Path, or one of these | None)."""
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    if isinstance(value, str) and base is not str:
        if base is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"{key}={value!r}: expected true or false")
            return value.lower() in ("true", "1", "yes")
        try:
            return base(value)
        except ValueError:
            raise UsageError(f"{key}={value!r}: expected {base.__name__}") from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is Path:
        return Path(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UsageError(f"{key}={value!r}: expected {base.__name__}")
    return value
