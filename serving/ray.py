"""`luffy serve ARTIFACT --replicas N`: the server and scheduler of serving/server.py in N Ray Serve replicas behind
one OpenAI-compatible ingress (extra ``ray``: ``pip install 'luffy[ray]'``).

    HTTP ──▶ Serve proxy ──▶ LuffyIngress ──handle (PrefixAwareRouter)──▶ LuffyReplica × N
                             tokenizes the prompt for routing,            each: build_app(artifact) from
                             /health (replicas running), /metrics         server.py, its scheduler thread
                             (every replica's, merged)                    and engine; the request runs
                                                                          through that ASGI app as is

A replica runs the single-process server's FastAPI app in-process (no socket): the ingress forwards the HTTP
request (method, path, headers, body) and streams back the app's response messages, so routes, errors, auth,
streaming and cancellation are the same code as `luffy serve` without Ray. Each replica's name is its Serve
replica id: the ``x-luffy-replica`` header and the ``replica`` label of its metrics. Replicas push their
metrics to a small board actor every second; the ingress's /metrics is all of them merged.

``build_app(args)`` is the Serve application builder: ``serve run luffy.serving.ray:build_app
artifact=build/pydoc replicas=2`` and a Serve config file deploy the same application as the CLI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from tokenizers import Tokenizer

from ..errors import LuffyError, UsageError, first_line
from ..extras import require_ray_extra
from ..runtimes.manifest import read_manifest
from .chat import ChatTemplate
from .edge import install_edge, require_api_key, sse
from .malloc import keep_freed_memory
from .options import RayOptions, ServerSettings, serve_options
from .prefix_cache import block_keys
from .protocol import ProtocolError

METRICS_PERIOD_S = 1.0  # how often a replica pushes its metrics to the board
FORWARDED = ("/v1/completions", "/v1/chat/completions")


@dataclass
class HttpCall:
    """One HTTP request as the ingress forwards it; ``prefix``: the prompt's block keys, read by the router."""

    method: str
    path: str
    query: bytes
    headers: list
    body: bytes
    prefix: list


class MetricsBoard:
    """A plain Ray actor: the latest metrics text of each replica (pushed every second), for the ingress."""

    def __init__(self):
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def collect(self, max_age_s: float) -> list[str]:
        now = time.monotonic()
        for name in [n for n, (at, _) in self.texts.items() if now - at > max_age_s]:
            del self.texts[name]  # a replica that stopped pushing (killed, scaled down) leaves the scrape
        return [text for _, text in sorted(self.texts.values())]


def _board(app_name: str, create: bool):
    import ray

    name = f"luffy-metrics-{app_name}"
    if create:
        actor = ray.remote(num_cpus=0)(MetricsBoard)
        return actor.options(name=name, namespace="luffy", get_if_exists=True).remote()
    return ray.get_actor(name, namespace="luffy")


class LuffyReplica:
    """One engine + scheduler + the FastAPI app of serving/server.py, driven through ASGI by ``handle``."""

    async def __init__(self, artifact: str, settings: ServerSettings):
        from ray import serve

        from .server import build_app
        from .state import OutputRouter

        keep_freed_memory()  # a replica is a server process of its own (serving/malloc.py)
        context = serve.get_replica_context()
        self.name, self.app_name = context.replica_id.unique_id, context.app_name
        self.app = build_app(artifact, dataclasses.replace(settings, replica=self.name))
        self.state = self.app.state.luffy
        self.state.router = OutputRouter(asyncio.get_running_loop())
        await asyncio.to_thread(self.state.load)
        if self.state.load_error:  # Serve marks the replica failed and retries; the CLI reports the reason
            raise RuntimeError(f"luffy replica {self.name}: {self.state.load_error}")
        self.pusher = asyncio.ensure_future(self._push_metrics())

    async def handle(self, call: HttpCall):
        """Run ``call`` through the app; yields the response's start ({"status", "headers"}), then body chunks.
        Closing the generator (the client went away, or the ingress cancelled) cancels the request."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call.method,
                 "scheme": "http", "path": call.path, "raw_path": call.path.encode(), "query_string": call.query,
                 "root_path": "", "headers": call.headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
        task = asyncio.ensure_future(self.app(scope, receive, messages.put))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                    if not any(k.lower() == "x-luffy-replica" for k, _ in headers):  # errors carry it too
                        headers.append(("x-luffy-replica", self.name))
                    yield {"status": message["status"], "headers": headers}
                elif message.get("body"):
                    yield message["body"]
            task.result()  # an exception the app let through
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait([task], timeout=5)
                task.cancel()

    async def _push_metrics(self) -> None:
        board = None
        while True:
            try:
                board = board or _board(self.app_name, create=False)
                state = self.state
                state.metrics.gauges(state.scheduler.running, state.scheduler.waiting, state.scheduler.kv_cache_usage)
                board.put.remote(self.name, state.metrics.render().decode())
            except Exception:  # noqa: BLE001 - the board is not up yet, or was restarted: look it up again
                board = None
            await asyncio.sleep(METRICS_PERIOD_S)

    def check_health(self) -> None:
        if self.state.scheduler is None or not self.state.scheduler._thread.is_alive():
            raise RuntimeError(f"luffy replica {self.name}: the scheduler thread is not running")

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None and state.scheduler is not None:
            state.scheduler.stop()


class LuffyIngress:
    """The HTTP entry: a FastAPI app with the edge of serving/edge.py (errors, body limits, auth), /health and
    /metrics here, every other route forwarded to a replica chosen by the router (whose app, the single-process
    server's, validates the request)."""

    def __init__(self, artifact: str, settings: ServerSettings, replicas):
        from prometheus_client import CollectorRegistry, Counter
        from ray import serve

        self.artifact, self.settings, self.replicas = Path(artifact), settings, replicas
        self.app_name = serve.get_replica_context().app_name
        manifest = read_manifest(self.artifact, verify_files=False)
        self.tokenizer = None
        if manifest.get("tokenizer"):
            self.tokenizer = Tokenizer.from_file(str(self.artifact / manifest["tokenizer"]))
        self.chat = ChatTemplate.from_artifact(self.artifact, manifest)
        self.board = _board(self.app_name, create=True)
        self.status_cache: tuple[float, dict] = (0.0, {})
        self.registry = CollectorRegistry()
        self.errors = Counter("luffy:ingress_http_errors", "Requests the ingress answered with an error, by status.",
                              ["status"], registry=self.registry)

    def __serve_build_asgi_app__(self):
        """Serve's ingress app (``serve.ingress()`` calls it once the constructor ran)."""
        # /openapi.json is the replicas' (forwarded): their app is the one whose routes it describes
        app = FastAPI(title="luffy", docs_url=None, redoc_url=None, openapi_url=None)
        install_edge(app, self.settings.max_request_bytes, self.settings.body_timeout, self._count_error)

        @app.get("/health")
        async def health():
            return await self._health()

        @app.get("/metrics", dependencies=[require_api_key(self.settings.api_key)])
        async def metrics():
            return Response(await self._metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
        async def forward(path: str, http: Request):
            body = await http.body()  # the edge has read it whole, within its limits
            call = HttpCall(http.method, http.url.path, http.url.query.encode(), list(http.headers.raw), body,
                            self._prefix(http.url.path, body))
            return await self._forward(call)

        return app

    def _count_error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def _prefix(self, path: str, body: bytes) -> list[int]:
        """The prompt's block keys as the replica will tokenize it; [] when it cannot tell (the replica then
        answers whatever is wrong with the request)."""
        if path not in FORWARDED or not body:
            return []
        try:
            data = json.loads(body)
            if path == "/v1/completions":
                prompt = data.get("prompt")
                prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int) \
                    else prompt
                ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens=True).ids
            else:
                from .protocol import ChatCompletionRequest

                chat = ChatCompletionRequest.model_validate(data)
                text = self.chat.render([m.for_template() for m in chat.messages], chat.add_generation_prompt)
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            return block_keys([int(t) for t in ids])
        except Exception:  # noqa: BLE001 - malformed requests are the replica's to refuse
            return []

    async def _forward(self, call: HttpCall):
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError

        try:
            stream = self.replicas.options(stream=True).handle.remote(call)
            start = await stream.__anext__()
        except BackPressureError:
            raise ProtocolError(429, "too many requests are waiting for a replica (--max-queue)", "rate_limit_error",
                                code="queue_full", headers={"Retry-After": "1"}) from None
        except (RayError, StopAsyncIteration) as exc:
            raise _replica_failed(exc) from None

        async def body():
            try:
                async for chunk in stream:
                    yield chunk
            except RayError as exc:  # the replica died mid-stream: the status is sent, so end with an error event
                self._count_error(503)
                yield sse(_replica_failed(exc).body()).encode()
                if streamed:
                    yield sse("[DONE]").encode()
            finally:
                stream.cancel()

        headers = {k: v for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
        streamed = any(v.startswith("text/event-stream") for k, v in headers.items() if k.lower() == "content-type")
        if not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "application/json"
        return StreamingResponse(body(), status_code=start["status"], headers=headers)

    def _replicas_running(self) -> dict:
        """Replica states from the Serve controller (cached for half a second: /health is polled)."""
        at, states = self.status_cache
        if time.monotonic() - at > 0.5:
            from ray import serve

            app = serve.status().applications.get(self.app_name)
            deployment = app.deployments.get("LuffyReplica") if app else None
            states = dict(deployment.replica_states) if deployment else {}
            self.status_cache = (time.monotonic(), states)
        return states

    async def _health(self):

        states = await asyncio.to_thread(self._replicas_running)
        if not states.get("RUNNING"):
            raise ProtocolError(503, f"no replica is running yet ({states or 'none started'})", "server_error",
                                code="loading", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "replicas": states})

    async def _metrics(self) -> bytes:
        from prometheus_client import generate_latest

        from .metrics import merge_exposition

        texts = await self.board.collect.remote(3 * METRICS_PERIOD_S + 1)
        return merge_exposition([*texts, generate_latest(self.registry).decode()]).encode()


def _replica_failed(exc: Exception) -> ProtocolError:
    reason = first_line(exc)
    return ProtocolError(503, f"the replica serving this request failed ({type(exc).__name__}: {reason[:200]}); "
                              "retry", "server_error", code="replica_failed", headers={"Retry-After": "1"})


def application(artifact: str | Path, settings: ServerSettings, options: RayOptions):
    """The Serve application: ``LuffyIngress`` bound to ``LuffyReplica``, configured from ``options``."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    slots = settings.scheduler.max_num_seqs
    replica_config = dict(
        name="LuffyReplica", max_ongoing_requests=slots, max_queued_requests=settings.scheduler.max_queue,
        ray_actor_options={"num_cpus": options.cpus},
        health_check_period_s=options.health_check_period_s, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=max(1.0, settings.drain_timeout), graceful_shutdown_wait_loop_s=0.5)
    scaling = options.autoscaling_config(slots)
    if scaling:
        replica_config["autoscaling_config"] = scaling
    else:
        replica_config["num_replicas"] = options.replicas or 1
    if options.routing == "prefix":
        replica_config["request_router_config"] = RequestRouterConfig(
            request_router_class="luffy.serving.ray_router:PrefixAwareRouter",
            request_router_kwargs={"imbalance": options.imbalance})
    replica = serve.deployment(LuffyReplica, **replica_config).bind(str(artifact), settings)
    ingress = serve.deployment(serve.ingress()(LuffyIngress), name="LuffyIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1 << 16, graceful_shutdown_timeout_s=max(1.0, settings.drain_timeout),
                               graceful_shutdown_wait_loop_s=0.5)
    return ingress.bind(str(artifact), settings, replica)


def build_app(args: dict):
    """Serve's application builder: ``serve run luffy.serving.ray:build_app artifact=PATH replicas=2`` or a config
    file's ``import_path: luffy.serving.ray:build_app`` with ``args``. The keys are `luffy serve`'s options
    (serving/options.py: ``max_num_seqs``, ``replicas``, ``min_replicas``, ``routing``, ``api_key`` [default
    $LUFFY_API_KEY], ...), each as the CLI flag's name with underscores, except ``upscale_delay_s``,
    ``downscale_delay_s``, ``imbalance`` and ``address`` (--upscale-delay, --downscale-delay, --routing-imbalance,
    --ray-address)."""
    artifact, settings, options = serve_options(dict(args))
    return application(artifact, settings, options or RayOptions(replica_cpus=float(settings.threads or 1)))


def _free_port(host: str, port: int) -> int:
    """``port``, checked free on ``host``; port 0 picks one (Ray Serve's proxy binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"--host {host} --port {port}: cannot bind ({exc.strerror or exc})") from None
        return sock.getsockname()[1]


def _log(message: str) -> None:
    print(f"luffy serve: {message}", file=sys.stderr, flush=True)


def serve_on_ray(artifact: str | Path, settings: ServerSettings, options: RayOptions) -> int:
    """Deploy on a local Ray cluster (started here, stopped on exit) or on ``options.address``; serve until SIGTERM
    or Ctrl-C, then delete the application (replicas drain up to the drain timeout) and stop what was started."""
    require_ray_extra()
    manifest = read_manifest(artifact, verify_files=False)
    if manifest["kind"] != "causal-lm":
        raise UsageError(f"{artifact}: luffy serve generates text; this artifact is {manifest['kind']!r}")
    artifact = Path(artifact).resolve()  # replicas may start in another working directory
    if settings.draft is not None:
        settings = dataclasses.replace(settings, draft=Path(settings.draft).resolve())
    local = options.address is None
    if local:
        port = _free_port(settings.host, settings.port)
    elif settings.port == 0:
        raise UsageError("--port 0 picks a free port on this machine; with --ray-address Serve's proxies listen on "
                         "the cluster's nodes: give a port")
    else:
        port = settings.port  # bound by the cluster's proxies (unless Serve already runs there with its own)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local cluster reports nothing anywhere
    import ray
    from ray import serve

    stop = threading.Event()
    previous: dict = {}
    try:
        _log(f"starting {'a local Ray cluster' if local else f'on the Ray cluster at {options.address}'}")
        if local:
            cpus = max(os.cpu_count() or 1, int(options.most_replicas * options.cpus + 0.999))
            ray.init(include_dashboard=False, num_cpus=cpus, _node_ip_address="127.0.0.1", log_to_driver=False,
                     object_store_memory=128 << 20, configure_logging=False)
        else:
            try:
                ray.init(address=options.address, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                raise UsageError(f"--ray-address {options.address}: cannot join ({exc})") from None
        # after ray.init, which installs its own SIGTERM handler (stop the node's processes, exit 1, no drain)
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        serve.start(http_options={"host": settings.host, "port": port}, logging_config={"log_level": "WARNING"})
        try:
            serve.run(application(artifact, settings, options), name=options.app_name, route_prefix="/")
        except RuntimeError as exc:
            raise LuffyError(f"Ray Serve could not deploy {artifact.name}: {str(exc).strip().splitlines()[-1]}") \
                from None
        model = settings.served_model_name or artifact.name
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        count = (f"{options.replicas or 1} replica(s)" if not options.autoscaling else
                 f"autoscaling {options.autoscaling_config(1)['min_replicas']}-"
                 f"{options.autoscaling_config(1)['max_replicas']} replicas")
        _log(f"listening on http://{shown}:{port} (model {model}, {count}, {options.routing} routing, Ray Serve)")
        while not stop.wait(0.5):
            pass
        _log("stopping: deleting the application (replicas drain requests in flight)")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray.is_initialized():
            try:  # the proxy stays up while the deployments drain (serve.shutdown alone cuts open streams)
                serve.delete(options.app_name)
                if local:
                    serve.shutdown()
            finally:
                ray.shutdown()
    return 0
