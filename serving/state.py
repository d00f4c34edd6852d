"""What the routes of one server share: the artifact's engine and scheduler, its metrics and chat template, and
the bridge that carries the scheduler thread's outputs into the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
from pathlib import Path

from ..errors import LuffyError, UsageError
from ..runtimes import load, share_thread_pool
from ..runtimes.batch_invariance import variance_warning
from .chat import ChatTemplate, ChatTokens
from .embeddings import Embedder
from .logprobs import TokenText
from .metrics import ServerMetrics
from .options import ServerSettings
from .protocol import ProtocolError
from .scheduler import Scheduler
from .warmup import warm_up


class ServingState:
    """What the routes share: the engine, scheduler, metrics and chat template, once loaded."""

    def __init__(self, artifact: Path, settings: ServerSettings):
        self.artifact, self.settings = Path(artifact), settings
        self.model_name = settings.served_model_name or self.artifact.resolve().name
        labels = {"replica": settings.replica} if settings.replica else None
        self.metrics = ServerMetrics(self.model_name, labels)  # before the load: errors meanwhile are counted too
        self.engine = self.scheduler = self.chat_template = None
        self.token_text: TokenText | None = None  # token strings for logprobs
        self.chat_tokens: ChatTokens | None = None  # chat prompts' ids, content kept as text
        self.embedder: Embedder | None = None  # an encoder artifact serves /v1/embeddings instead of a scheduler
        self.ready = threading.Event()
        self.draining = False
        self.router: OutputRouter | None = None
        self.load_error: str | None = None
        self.limited_schema: dict | None = None  # /openapi.json with the model's limits (routes.py), once loaded

    def load(self, engine=None) -> None:
        """Load the artifact and start the scheduler (in a thread, so /health can say 503 meanwhile)."""
        try:
            if self.settings.draft is not None and engine is None:  # target and draft take turns: one thread pool
                share_thread_pool(self.settings.threads)
            self.engine = engine or load(self.artifact, threads=self.settings.threads, spin=self.settings.spin)
            if self.engine.kind == "encoder":
                self.embedder = Embedder(self.engine)
                self.token_text = TokenText(self.embedder.tokenizer)
                log(f"embeddings: {self.model_name}, {self.embedder.dimensions} dimensions, mean pooling, "
                    f"inputs up to {self.embedder.max_len} tokens")
                self.ready.set()
                return
            scheduler = Scheduler(self.engine, self._scheduler_config(), self.metrics)
            warmed = warm_up(scheduler)  # before the scheduler thread owns the engine, and before /health is ready
            self.scheduler = scheduler.start()
            if self.engine.manifest.get("tokenizer"):  # structured outputs: the grammar compiler, made once here
                self._start_grammars()
            self.chat_template = ChatTemplate.from_artifact(self.engine.path, self.engine.manifest)
            self.token_text = TokenText(self.scheduler.tokenizer)
            if self.chat_template is not None and self.scheduler.tokenizer is not None:
                self.chat_tokens = ChatTokens(self.scheduler.tokenizer)
            kv = self.engine.manifest["kv_cache"]
            log(f"KV cache ({self.model_name}, {kv.get('dtype')}, {kv.get('mode')}): {self.scheduler.pool.describe()}")
            variance = variance_warning(self.engine.manifest)  # a request batched can differ from it alone: say so
            if variance:
                log(f"note: {variance}")
            config = self.scheduler.config
            if config.prefix_cache:
                log(f"prefix cache: free slots' contents + {config.prefix_cache_mb} MiB of host RAM for blocks")
            if self.scheduler.speculator is not None:
                source = self.scheduler.speculator.source
                extra = f", draft KV {source.slots.cache.nbytes / 2**20:.1f} MiB" if hasattr(source, "slots") else ""
                log(f"speculative decoding: {self.scheduler.speculator.name} while at most "
                     f"{config.speculation.max_batch} request(s) decode{extra}")
            log(f"warm-up: {warmed['steps']} steps in {warmed['seconds']:.2f} s")
            self.ready.set()
        except Exception as exc:  # noqa: BLE001 - /health and every route report it; the process stays up
            self.load_error = str(exc) if isinstance(exc, LuffyError) else f"{type(exc).__name__}: {exc}"
            log(f"error: {self.load_error}")

    def _start_grammars(self) -> None:
        """Make the structured-output grammar compiler; a tokenizer llguidance cannot read turns structured outputs
        off for this model (logged; such requests get a 400 naming why), never the model itself."""
        try:
            self.engine.grammars.listener = self.metrics.grammar_compiled
        except UsageError as exc:
            log(f"structured outputs unavailable: {exc}")

    def _scheduler_config(self):
        """The scheduler's settings, with the draft engine loaded when one is configured."""
        config = self.settings.scheduler
        if self.settings.draft is not None and config.speculation is not None:
            draft = load(self.settings.draft, spin=self.settings.spin)
            config = dataclasses.replace(config, speculation=dataclasses.replace(config.speculation, draft=draft))
        return config

    @property
    def max_model_len(self) -> int | None:
        return self.scheduler.capacity if self.scheduler is not None else self.engine.max_seq_len

    @property
    def vocab(self) -> int | None:
        return self.scheduler.vocab if self.scheduler is not None else self.embedder.vocab

    def require_ready(self) -> None:
        if self.draining:
            raise ProtocolError(503, "the server is shutting down", "server_error", code="draining")
        if not self.ready.is_set():
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ProtocolError(503, message, "server_error", code="loading", headers={"Retry-After": "1"})

    def begin_drain(self) -> None:
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.begin_drain()


class OutputRouter:
    """Carries scheduler outputs into the event loop with one wake-up per batch, not one per token: an
    iteration that decodes 16 streams would otherwise write the loop's self-pipe 16 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list = []
        self.lock = threading.Lock()
        self.scheduled = False

    def emitter(self, queue: asyncio.Queue):
        """The ``emit`` for one request: called from the scheduler thread."""

        def emit(output) -> None:
            with self.lock:
                self.pending.append((queue, output))
                if self.scheduled:
                    return
                self.scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

        return emit

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, output in pending:
            queue.put_nowait(output)


def log(message: str) -> None:
    """One line on stderr, as `luffy serve` reports what it does."""
    print(f"luffy serve: {message}", file=sys.stderr, flush=True)
