"""`luffy serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of one artifact's scheduler.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events when asked),
GET /v1/models, /health (503 while loading or draining) and /metrics (Prometheus). Handlers never touch
the engine: they submit to the scheduler thread and read its outputs from an asyncio queue. A client that
disconnects cancels its request (its slot is free after the scheduler's current iteration). SIGTERM stops
admission, lets requests in flight finish for up to the drain timeout, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CapacityError, LuffyError, UsageError
from .protocol import ProtocolError
from .scheduler import SchedulerConfig
from .warmup import warm_up


@dataclass(frozen=True)
class ServerSettings:
    """Everything `luffy serve` takes besides the artifact; ``scheduler`` sizes the KV cache and batching."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the artifact directory's name
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer KEY"
    drain_timeout: float = 30.0
    max_request_bytes: int = 1 << 20
    threads: int | None = None  # ORT intra-op threads
    spin: bool = True  # ORT's pool threads spin between steps (see `luffy serve --help`)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    replica: str | None = None  # scale-out: the name in x-luffy-replica and the metrics' replica label
    draft: Path | None = None  # speculative decoding's draft artifact, loaded beside the target


class ServingState:
    """What the routes share: the engine, scheduler, metrics and chat template, once loaded."""

    def __init__(self, artifact: Path, settings: ServerSettings):
        self.artifact, self.settings = Path(artifact), settings
        self.model_name = settings.served_model_name or self.artifact.resolve().name
        self.engine = self.scheduler = self.metrics = self.chat_template = None
        self.ready = threading.Event()
        self.draining = False
        self.router: OutputRouter | None = None
        self.load_error: str | None = None

    def load(self, engine=None) -> None:
        """Load the artifact and start the scheduler (in a thread, so /health can say 503 meanwhile)."""
        from ..runtimes import load
        from .chat import ChatTemplate
        from .metrics import ServerMetrics
        from .scheduler import Scheduler

        try:
            # a draft loaded beside it joins the same process-wide thread pool (luffy.load)
            self.engine = engine or load(self.artifact, threads=self.settings.threads, spin=self.settings.spin)
            labels = {"replica": self.settings.replica} if self.settings.replica else None
            self.metrics = ServerMetrics(self.model_name, labels)
            scheduler = Scheduler(self.engine, self._scheduler_config(), self.metrics)
            warmed = warm_up(scheduler)  # before the scheduler thread owns the engine, and before /health is ready
            self.scheduler = scheduler.start()
            self.chat_template = ChatTemplate.from_artifact(self.engine.path, self.engine.manifest)
            cache = self.scheduler.slots.cache
            _log(f"KV cache: {cache.num_slots} slots x {cache.capacity} positions x {cache.bytes_per_token} B "
                 f"= {cache.nbytes / 2**20:.1f} MiB ({self.model_name}, {self.engine.manifest['kv_cache'].get('mode')})")
            config = self.scheduler.config
            if config.prefix_cache:
                _log(f"prefix cache: free slots' contents + {config.prefix_cache_mb} MiB of host RAM for blocks")
            if self.scheduler.speculator is not None:
                source = self.scheduler.speculator.source
                extra = f", draft KV {source.slots.cache.nbytes / 2**20:.1f} MiB" if hasattr(source, "slots") else ""
                _log(f"speculative decoding: {self.scheduler.speculator.name} while at most "
                     f"{config.speculation.max_batch} request(s) decode{extra}")
            _log(f"warm-up: {warmed['steps']} steps in {warmed['seconds']:.2f} s")
            self.ready.set()
        except Exception as exc:  # noqa: BLE001 - /health and every route report it; the process stays up
            self.load_error = str(exc) if isinstance(exc, LuffyError) else f"{type(exc).__name__}: {exc}"
            _log(f"error: {self.load_error}")

    def _scheduler_config(self):
        """The scheduler's settings, with the draft engine loaded when one is configured."""
        import dataclasses

        from ..runtimes import load

        config = self.settings.scheduler
        if self.settings.draft is not None and config.speculation is not None:
            draft = load(self.settings.draft, spin=self.settings.spin)
            config = dataclasses.replace(config, speculation=dataclasses.replace(config.speculation, draft=draft))
        return config

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


def _log(message: str) -> None:
    print(f"luffy serve: {message}", file=sys.stderr, flush=True)


def build_app(artifact: str | Path, settings: ServerSettings | None = None, engine=None):
    """The FastAPI application serving ``artifact`` (loaded in the background when the app starts).

    >>> app = build_app("build/pydoc", ServerSettings(api_key="secret"))   # doctest: +SKIP
    """
    from fastapi import FastAPI

    from .routes import add_routes

    state = ServingState(artifact, settings or ServerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.router = OutputRouter(asyncio.get_running_loop())
        loader = threading.Thread(target=state.load, args=(engine,), name="luffy-load", daemon=True)
        loader.start()
        yield
        if state.scheduler is not None:
            state.scheduler.stop()

    app = FastAPI(title="luffy", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.luffy = state
    add_routes(app, state)
    return app


def serve(artifact: str | Path, settings: ServerSettings) -> int:
    """Run the server until SIGTERM or Ctrl-C; the drain lets requests in flight finish. Returns 0."""
    import uvicorn

    from ..runtimes.manifest import read_manifest

    manifest = read_manifest(artifact, verify_files=False)  # fail at once on what cannot be served
    if manifest["kind"] != "causal-lm":
        raise UsageError(f"{artifact}: luffy serve generates text; this artifact is {manifest['kind']!r}")
    app = build_app(artifact, settings)
    state: ServingState = app.state.luffy
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=max(1, int(settings.drain_timeout)),
                            access_log=False, lifespan="on")

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not state.draining:
                _log(f"signal {sig}: draining (up to {settings.drain_timeout:g} s for requests in flight)")
                state.begin_drain()
                threading.Thread(target=self._exit_when_drained, daemon=True).start()
            else:
                super().handle_exit(sig, frame)

        def _exit_when_drained(self):
            if state.scheduler is not None:
                state.scheduler.wait_idle(settings.drain_timeout)
            time.sleep(0.1)  # the last responses' bytes leave before the listener closes
            self.should_exit = True

    server = DrainingServer(config)
    shown = f"[{host}]" if ":" in host else host
    _log(f"listening on http://{shown}:{port} (model {state.model_name})")
    server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: a streamed token is one small write, and Nagle's algorithm would hold
    # it until the client's delayed ACK (~40 ms on Linux) for the previous one
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot bind ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def error_status(exc: Exception) -> ProtocolError:
    """The OpenAI-shaped HTTP error for an exception raised while handling a request."""
    from .scheduler import Draining, QueueFull

    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, QueueFull):
        return ProtocolError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, Draining):
        return ProtocolError(503, str(exc), "server_error", code="draining")
    if isinstance(exc, CapacityError):
        return ProtocolError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, UsageError):
        return ProtocolError(400, str(exc))
    return ProtocolError(500, f"{type(exc).__name__}: {exc}", "server_error")


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def watch_disconnect(receive) -> None:
    """Returns when the client goes away (the request body has been read, so the next message is that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0)
