"""The HTTP routes of `luffy serve`, their auth, request-size limit and error handling.

Every error is OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for bad parameters,
401 for a missing or wrong API key, 404 for another model's name, 413 for a body over the limit, 429 with
Retry-After when the queue is full, 503 while loading or draining.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import protocol, structured, tools
from .protocol import ChatCompletionRequest, CompletionRequest, ProtocolError
from .requests import Request
from .server import ServingState, error_status, sse, watch_disconnect


def add_routes(app: FastAPI, state: ServingState) -> None:
    """Register the routes, the exception handlers and the body-size limit on ``app``."""
    app.add_middleware(BodyLimit, limit=state.settings.max_request_bytes, state=state)
    auth = [Depends(_auth(state))]

    @app.exception_handler(ProtocolError)
    async def protocol_error(request, exc: ProtocolError):
        return _error_response(state, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error_response(state, ProtocolError(400, f"{where}: {first['msg']}" if where else first["msg"],
                                                     param=where or None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return _error_response(state, error_status(exc))

    @app.get("/health")
    async def health():
        state.require_ready()
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        state.require_ready()
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.artifact.stat().st_mtime),
            "owned_by": "luffy", "root": str(state.artifact), "max_model_len": state.scheduler.capacity}]}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        from .metrics import CONTENT_TYPE

        state.require_ready()
        state.metrics.gauges(state.scheduler.running, state.scheduler.waiting, state.scheduler.kv_cache_usage)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_request(state, body)
        prompt = body.single_prompt()
        ids = prompt if isinstance(prompt, list) else _encode(state, prompt, add_special_tokens=True)
        max_tokens = body.max_tokens or body.max_completion_tokens or 16  # OpenAI's default for completions
        return await _generate(state, http, body, ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        _check_request(state, body)
        if state.chat_template is None:
            raise ProtocolError(400, f"artifact {state.artifact.name} has no chat template; compile from a model "
                                     "directory whose tokenizer has one, or use /v1/completions", param="messages")
        messages, tool_plan = _with_tools(state, body, [m.for_template() for m in body.messages])
        text = await asyncio.to_thread(state.chat_template.render, messages, body.add_generation_prompt, body.tools)
        ids = _encode(state, text, add_special_tokens=False)  # the template writes its own special tokens
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, state.scheduler.capacity - len(ids))
        return await _generate(state, http, body, ids, max_tokens, chat=True, tool_plan=tool_plan)


def _with_tools(state: ServingState, body: ChatCompletionRequest, messages: list[dict]):
    """(messages, ToolPlan or None): a template that does not show the model its tools gets luffy's system
    message that does (serving/tools.py)."""
    try:
        tool_plan = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls, state.chat_template.source)
    except tools.ToolError as exc:
        raise ProtocolError(400, str(exc), param=exc.param) from None
    if body.tools and body.tool_choice != "none" and not tools.renders_tools(state.chat_template.source):
        messages = [tools.system_message(body.tools), *messages]
    return messages, tool_plan


def _auth(state: ServingState):
    key = state.settings.api_key

    async def check(http: HttpRequest):
        if key is None:
            return
        given = http.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):  # constant time: no timing oracle on the key
            raise ProtocolError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                                code="invalid_api_key")

    return check


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


async def _generate(state: ServingState, http: HttpRequest, body, ids: list[int], max_tokens: int, chat: bool,
                    tool_plan=None):
    queue: asyncio.Queue = asyncio.Queue()
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    grammar = structured.grammar_request(body, tool_plan)
    constraint = await structured.constraint(state, grammar, max_tokens) if grammar is not None else None
    try:
        params = body.sampling(max_tokens)
        request = state.scheduler.submit(Request(list(ids), params, state.router.emitter(queue), request_id=rid,
                                                 constraint=constraint))
    except Exception as exc:  # noqa: BLE001 - UsageError / CapacityError / QueueFull / Draining -> HTTP
        raise error_status(exc) from None
    headers = {"x-luffy-replica": state.settings.replica} if state.settings.replica else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(state, request, queue, rid, body.model, chat, include_usage, tool_plan)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    outputs = await _collect(state, request, queue, http)
    last = outputs[-1]
    if last.finish_reason in ("error", "abort"):
        status = 500 if last.finish_reason == "error" else 503
        raise ProtocolError(status, last.error or "the request was aborted", "server_error")
    text = "".join(o.text for o in outputs)
    use = protocol.usage(last.prompt_tokens, last.completion_tokens)
    if not chat:
        return JSONResponse(structured.noted(protocol.completion_body(rid, body.model, text, last.finish_reason, use),
                                             last.grammar), headers=headers)
    message, finish_reason = structured.chat_message(text, tool_plan, last.finish_reason)
    response = protocol.chat_body(rid, body.model, text, finish_reason, use)
    response["choices"][0]["message"] = message
    return JSONResponse(structured.noted(response, last.grammar), headers=headers)


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
                  include_usage: bool, tool_plan=None):
    """Server-sent events: one chunk per step that adds text, the finish reason, usage if asked, [DONE].
    Starlette cancels this generator when the client disconnects; the finally cancels the request."""
    finished = False
    obj = "chat.completion.chunk" if chat else "text_completion"
    token_chunk = protocol.ChunkWriter(rid, model, chat)
    if tool_plan is not None:  # tool calls leave as tool_calls deltas (serving/structured.py)
        token_chunk = structured.ToolChunks(rid, model, tool_plan)
    try:
        if chat:
            yield sse(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        while True:
            out = await queue.get()
            if out.finish_reason in ("error", "abort"):
                finished = True
                status = error_status(RuntimeError(out.error or "aborted"))
                yield sse({"error": {**status.body()["error"], "message": out.error or "the request was aborted"}})
                break
            if out.finish_reason is not None and out.grammar is not None and tool_plan is None:
                yield sse(structured.last_chunk(rid, model, chat, out))
            elif out.token_ids or out.text or out.finish_reason:  # one chunk per token, even one adding no text
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


def _error_response(state: ServingState, exc: ProtocolError) -> JSONResponse:
    if state.metrics is not None:
        state.metrics.http_error(exc.status)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before they are parsed (pure ASGI middleware)."""

    def __init__(self, app, limit: int, state: ServingState):
        self.app, self.limit, self.state = app, limit, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        error = ProtocolError(413, f"request body over {self.limit} bytes (--max-request-bytes)")
        await _error_response(self.state, error)(scope, receive, send)


class _TooLarge(Exception):
    pass

