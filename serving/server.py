"""`luffy serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of one artifact's scheduler.

Routes (serving/routes.py): POST /v1/completions and /v1/chat/completions (streamed as server-sent events when
asked), /tokenize and /detokenize, GET /v1/models and /v1/models/{id}, /health (503 while loading or draining)
and /metrics (Prometheus), behind the edge of serving/edge.py; an encoder artifact serves POST /v1/embeddings
(serving/embeddings.py) instead of completions. Handlers never touch the engine: they submit to the scheduler thread and read its outputs from
an asyncio queue. A client that disconnects cancels its request (its slot is free after the scheduler's current
iteration); one that sends its headers too slowly gets 408 (``GuardedHttp``). SIGTERM stops admission, lets
requests in flight finish for up to the drain timeout, ends those still running with an error event and
[DONE], and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..runtimes.manifest import read_manifest
from .malloc import keep_freed_memory
from .options import ServerSettings
from .protocol import ProtocolError
from .routes import add_routes
from .state import OutputRouter, ServingState, log


def build_app(artifact: str | Path, settings: ServerSettings | None = None, engine=None):
    """The FastAPI application serving ``artifact`` (loaded in the background when the app starts).

    >>> app = build_app("build/pydoc", ServerSettings(api_key="secret"))   # doctest: +SKIP
    """
    from fastapi import FastAPI

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

    manifest = read_manifest(artifact, verify_files=False)  # fail at once on what cannot be served
    if manifest["kind"] not in ("causal-lm", "encoder"):
        raise UsageError(f"{artifact}: luffy serve generates text (a causal LM) or embeddings (an encoder); this "
                         f"artifact is {manifest['kind']!r}")
    keep_freed_memory()  # before the engine loads: the step's large temporaries reuse the heap (serving/malloc.py)
    app = build_app(artifact, settings)
    state: ServingState = app.state.luffy
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=max(1, int(settings.drain_timeout)),
                            access_log=False, lifespan="on",
                            http=guarded_http(settings.header_timeout, state.metrics.http_error))

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not state.draining:
                log(f"signal {sig}: draining (up to {settings.drain_timeout:g} s for requests in flight)")
                state.begin_drain()
                threading.Thread(target=self._exit_when_drained, daemon=True).start()
            else:
                super().handle_exit(sig, frame)

        def _exit_when_drained(self):
            if state.scheduler is not None and not state.scheduler.wait_idle(settings.drain_timeout):
                # the drain expired: the requests still running end now, each with an error event and [DONE]
                state.scheduler.stop(f"the server shut down before this request finished (--drain-timeout "
                                     f"{settings.drain_timeout:g} s)")
            time.sleep(0.2)  # the last responses' bytes leave before the listener closes
            self.should_exit = True

    server = DrainingServer(config)
    shown = f"[{host}]" if ":" in host else host
    log(f"listening on http://{shown}:{port} (model {state.model_name})")
    server.run(sockets=[sock])
    return 0


def guarded_http(header_timeout: float, count_error: Callable[[int], None]) -> type:
    """uvicorn's HTTP protocol with a deadline on request headers: from a connection's start (and from the end of
    each response on a kept-alive connection) a request's headers must be complete within ``header_timeout``
    seconds, else 408 in OpenAI's shape and the connection closes. uvicorn has no such timeout: without it a
    client that sends a header byte every few seconds holds a connection forever (its keep-alive timer is reset
    by any byte)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHttp(AutoHTTPProtocol):
        _deadline = None
        _cycle_at_arm = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._cycle_at_arm:  # a request's headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._cycle_at_arm = self.cycle
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.cycle is not self._cycle_at_arm:
                return
            count_error(408)
            error = ProtocolError(408, f"the request headers did not arrive within {header_timeout:g} s "
                                       "(--header-timeout)", code="request_timeout")
            body = json.dumps(error.body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return GuardedHttp


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
