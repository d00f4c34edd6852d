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

from . import protocol
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ProtocolError, TokenizeRequest
from .choices import ChoiceSet, Prompt
from .server import ServingState, error_status


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
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str):
        state.require_ready()
        listed = _model_card(state)
        if model != listed["id"]:
            raise ProtocolError(404, f"model {model!r} does not exist; this server serves {state.model_name!r}",
                                param="model", code="model_not_found")
        return listed

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        if body.messages is not None:
            ids = await _chat_ids(state, body.messages, body.add_generation_prompt)
        else:
            ids = _encode(state, body.prompt, add_special_tokens=body.add_special_tokens)
        strs = [state.token_text.text(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.scheduler.capacity, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < state.scheduler.vocab), None)
        if bad is not None:
            raise ProtocolError(400, f"token id {bad} is outside the vocabulary of size {state.scheduler.vocab}",
                                param="tokens")
        return {"prompt": _tokenizer(state).decode(body.tokens, skip_special_tokens=False)}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        from .metrics import CONTENT_TYPE

        state.require_ready()
        state.metrics.gauges(state.scheduler.running, state.scheduler.waiting, state.scheduler.kv_cache_usage)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_request(state, body)
        prompts = [_prompt(state, p, body.echo) for p in body.prompts()]
        max_tokens = next((m for m in (body.max_tokens, body.max_completion_tokens) if m is not None), 16)  # OpenAI's
        return await _generate(state, http, body, prompts, max_tokens, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        _check_request(state, body)
        ids = await _chat_ids(state, body.messages, body.add_generation_prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, state.scheduler.capacity - len(ids))
        return await _generate(state, http, body, [Prompt(ids, "")], max_tokens, chat=True)


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


def _model_card(state: ServingState) -> dict:
    return {"id": state.model_name, "object": "model", "created": int(state.artifact.stat().st_mtime),
            "owned_by": "luffy", "root": str(state.artifact), "max_model_len": state.scheduler.capacity}


def _check_model(state: ServingState, model: str | None) -> None:
    """Ready, and ``model`` (when given) is the one served."""
    state.require_ready()
    if model is not None and model != state.model_name:
        raise ProtocolError(404, f"model {model!r} does not exist; this server serves {state.model_name!r}",
                            param="model", code="model_not_found")


def _check_request(state: ServingState, body) -> None:
    _check_model(state, body.model)
    body.refuse_unsupported()


async def _chat_ids(state: ServingState, messages, add_generation_prompt: bool) -> list[int]:
    """The chat's prompt ids: the template places the control tokens, special-token strings inside content stay
    text (serving/chat.py ChatTokens)."""
    if state.chat_template is None or state.chat_tokens is None:
        raise ProtocolError(400, f"artifact {state.artifact.name} has no chat template; compile from a model "
                                 "directory whose tokenizer has one, or use /v1/completions", param="messages")
    rendered = [m.for_template() for m in messages]
    return await asyncio.to_thread(state.chat_tokens.encode, state.chat_template, rendered, add_generation_prompt)


def _tokenizer(state: ServingState):
    if not state.engine.manifest.get("tokenizer"):
        raise ProtocolError(400, f"artifact {state.artifact.name} has no tokenizer; send the prompt as token ids",
                            param="prompt")
    return state.engine.tokenizer


def _encode(state: ServingState, text: str, add_special_tokens: bool) -> list[int]:
    return _tokenizer(state).encode(text, add_special_tokens=add_special_tokens).ids


def _prompt(state: ServingState, prompt, echo: bool) -> Prompt:
    """A completions prompt (text, or token ids) as ids and the text echo returns."""
    if isinstance(prompt, str):
        return Prompt(_encode(state, prompt, add_special_tokens=True), prompt)
    known = all(0 <= t < state.scheduler.vocab for t in prompt)  # the scheduler refuses the others, by name
    text = _tokenizer(state).decode(prompt, skip_special_tokens=True) if echo and known else ""
    return Prompt(list(prompt), text)


async def _generate(state: ServingState, http: HttpRequest, body, prompts: list[Prompt], max_tokens: int,
                    chat: bool):
    """Submit the request's choices (n for each prompt) and answer with all of them, or stream them."""
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    try:
        choices = ChoiceSet(state, body, rid, prompts, max_tokens, chat)
        state.scheduler.submit_all(choices.requests)
    except Exception as exc:  # noqa: BLE001 - UsageError / CapacityError / QueueFull / Draining -> HTTP
        raise error_status(exc) from None
    headers = {"x-luffy-replica": state.settings.replica} if state.settings.replica else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(choices.stream(include_usage), media_type="text/event-stream", headers=headers)
    return JSONResponse(await choices.collect(http.receive), headers=headers)


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

