"""The HTTP routes of `luffy serve`, behind the edge of serving/edge.py (errors, body limits, strict JSON, auth).

Every error is OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for bad parameters,
401 for a missing or wrong API key, 404 for another model's name, 408 and 413 for a slow or oversized body,
429 with Retry-After when the queue is full, 500 when the request failed inside the server (others go on),
503 while loading or draining. /openapi.json declares each route's statuses and content types.
"""

from __future__ import annotations

import asyncio
import copy

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import protocol
from .edge import error_responses, error_status, install_edge, require_api_key, sse, watch_disconnect
from .metrics import CONTENT_TYPE
from .protocol import ChatCompletionRequest, CompletionRequest, ProtocolError
from .requests import Request
from .state import ServingState

GENERATION_RESPONSES = {
    200: {"description": "The completion as JSON, or with stream=true server-sent events (text/event-stream): one "
                         "chunk per token, a usage chunk if asked, an error event if the request fails, then [DONE].",
          "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 408, 413, 429, 500, 503)}


def add_routes(app: FastAPI, state: ServingState) -> None:
    """Install the edge and register the routes on ``app``."""
    install_edge(app, state.settings.max_request_bytes, state.settings.body_timeout, state.metrics.http_error)
    edge_schema = app.openapi
    app.openapi = lambda: declare_model_limits(edge_schema(), state)
    auth = [require_api_key(state.settings.api_key)]

    @app.get("/health", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}},
                                   **error_responses(503)})
    async def health():
        state.require_ready()
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth, responses=error_responses(401, 503))
    async def models():
        state.require_ready()
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.artifact.stat().st_mtime),
            "owned_by": "luffy", "root": str(state.artifact), "max_model_len": state.scheduler.capacity}]}

    @app.get("/metrics", dependencies=auth, response_class=Response, responses={
        200: {"description": "Prometheus text exposition (luffy:* named like vLLM's vllm:*).",
              "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}, **error_responses(401, 503)})
    async def metrics():
        state.require_ready()
        state.metrics.gauges(state.scheduler.running, state.scheduler.waiting, state.scheduler.kv_cache_usage)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=auth, response_class=JSONResponse, responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_request(state, body)
        prompt = body.single_prompt()
        # a long text takes a while to tokenize: off the event loop, which every stream's tokens go through
        ids = prompt if isinstance(prompt, list) else await asyncio.to_thread(_encode, state, prompt, True)
        max_tokens = body.max_tokens or body.max_completion_tokens or 16  # OpenAI's default for completions
        return await _generate(state, http, body, ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth, response_class=JSONResponse, responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        _check_request(state, body)
        if state.chat_template is None:
            raise ProtocolError(400, f"artifact {state.artifact.name} has no chat template; compile from a model "
                                     "directory whose tokenizer has one, or use /v1/completions", param="messages")
        messages = [m.for_template() for m in body.messages]
        text = await asyncio.to_thread(state.chat_template.render, messages, body.add_generation_prompt)
        ids = _encode(state, text, add_special_tokens=False)  # the template writes its own special tokens
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, state.scheduler.capacity - len(ids))
        return await _generate(state, http, body, ids, max_tokens, chat=True)


def declare_model_limits(schema: dict, state: ServingState) -> dict:
    """``schema`` with the loaded model's limits, which the routes enforce (400): token ids in [0, vocab) and
    ``max_tokens`` below the context (a prompt takes at least one position). Before the load, as it is."""
    if not state.ready.is_set():
        return schema
    if state.limited_schema is None:
        limited = copy.deepcopy(schema)
        vocab, capacity = state.scheduler.vocab, state.scheduler.capacity
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = limited["components"]["schemas"][name]["properties"]
            for key in ("max_tokens", "max_completion_tokens"):
                for form in _forms(props[key]):
                    form["maximum"] = capacity - 1
            for key in ("prompt", "stop_token_ids"):
                for form in _forms(props.get(key, {})):
                    form.update(minimum=0, maximum=vocab - 1)
        state.limited_schema = limited
    return state.limited_schema


def _forms(prop: dict) -> list[dict]:
    """The integer schemas inside ``prop`` (through anyOf and array items)."""
    found, todo = [], [prop]
    while todo:
        item = todo.pop()
        todo += item.get("anyOf", []) + ([item["items"]] if isinstance(item.get("items"), dict) else [])
        if item.get("type") == "integer":
            found.append(item)
    return found


def _check_request(state: ServingState, body) -> None:
    state.require_ready()
    if body.model != state.model_name:
        raise ProtocolError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                            param="model", code="model_not_found")
    body.refuse_unsupported()


def _encode(state: ServingState, text: str, add_special_tokens: bool) -> list[int]:
    if not state.engine.manifest.get("tokenizer"):
        raise ProtocolError(400, f"artifact {state.artifact.name} has no tokenizer; send the prompt as token ids",
                            param="prompt")
    return state.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


async def _generate(state: ServingState, http: HttpRequest, body, ids: list[int], max_tokens: int, chat: bool):
    queue: asyncio.Queue = asyncio.Queue()
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    try:
        params = body.sampling(max_tokens)
        request = state.scheduler.submit(Request(list(ids), params, state.router.emitter(queue), request_id=rid))
    except Exception as exc:  # noqa: BLE001 - UsageError / CapacityError / QueueFull / Draining -> HTTP
        raise error_status(exc) from None
    headers = {"x-luffy-replica": state.settings.replica} if state.settings.replica else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(state, request, queue, rid, body.model, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    outputs = await _collect(state, request, queue, http)
    last = outputs[-1]
    if last.finish_reason in ("error", "abort"):
        raise _failure(last)
    text = "".join(o.text for o in outputs)
    use = protocol.usage(last.prompt_tokens, last.completion_tokens)
    make = protocol.chat_body if chat else protocol.completion_body
    return JSONResponse(make(rid, body.model, text, last.finish_reason, use), headers=headers)


async def _collect(state: ServingState, request: Request, queue: asyncio.Queue, http: HttpRequest) -> list:
    """All outputs of a non-streamed request; a client that disconnects meanwhile cancels it."""
    outputs = []
    gone = asyncio.ensure_future(watch_disconnect(http.receive))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                state.scheduler.cancel(request)
                raise asyncio.CancelledError("client disconnected")
            outputs.append(getter.result())
            if outputs[-1].finish_reason is not None:
                return outputs
    finally:
        gone.cancel()
        if not outputs or outputs[-1].finish_reason is None:
            state.scheduler.cancel(request)


async def _stream(state, request: Request, queue: asyncio.Queue, rid: str, model: str, chat: bool,
                  include_usage: bool):
    """Server-sent events: one chunk per step that adds text, the finish reason, usage if asked, [DONE].
    Starlette cancels this generator when the client disconnects; the finally cancels the request."""
    finished = False
    obj = "chat.completion.chunk" if chat else "text_completion"
    token_chunk = protocol.ChunkWriter(rid, model, chat)
    try:
        if chat:
            yield sse(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        while True:
            out = await queue.get()
            if out.finish_reason in ("error", "abort"):
                finished = True
                yield sse(_failure(out).body())
                break
            if out.token_ids or out.text or out.finish_reason:  # one chunk per token, even one that adds no text
                yield token_chunk(out.text, out.finish_reason)
            if out.finish_reason is not None:
                finished = True
                if include_usage:
                    yield sse(protocol.usage_chunk(rid, model, obj, protocol.usage(out.prompt_tokens,
                                                                                    out.completion_tokens)))
                break
        yield sse("[DONE]")
    finally:
        if not finished:
            state.scheduler.cancel(request)


def _failure(out) -> ProtocolError:
    """The error of a request that ended inside the server: "error" (a step failed: 500, this request alone) or
    "abort" (the server stopped: 503)."""
    if out.finish_reason == "error":
        return ProtocolError(500, out.error or "the request failed", "server_error")
    return ProtocolError(503, out.error or "the request was aborted", "server_error", code="aborted")
