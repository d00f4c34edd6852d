"""The HTTP edge that `luffy serve` and the Ray Serve ingress share: what every request passes before a route.

- Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``: a route's refusal (ProtocolError),
  a body that does not validate (400, not FastAPI's 422), the router's own 404 and 405, an unexpected exception
  (500); each is counted by status (``count_error``).
- Request bodies are read whole before any route runs, bounded in size whether declared or chunked (413) and in
  time (408: a client that sends its body slowly holds no connection forever).
- JSON bodies are strict (``StrictJsonRoute``): UTF-8 only, no lone UTF-16 surrogates, no NaN or Infinity; the
  request models refuse coerced types (``"10"`` or ``true`` for an integer, ``0`` for a boolean).
- The API key check (constant time), and the server-sent event framing both servers' streams use.

vLLM's ``entrypoints/openai`` builds every error through one function in the same way; FastAPI's own 422 and
``{"detail"}`` shapes never reach a client here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CapacityError, UsageError
from .protocol import ProtocolError
from .scheduler import Draining, QueueFull

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every status but 200 answers with it."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for ``statuses``, each with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": _STATUS_DESCRIPTIONS[status]} for status in statuses}


_STATUS_DESCRIPTIONS = {
    400: "A parameter is malformed, of the wrong JSON type, or outside the model's limits (context, vocabulary); "
         "or the body is not UTF-8 JSON.",
    401: "The API key is missing or wrong.", 404: "Another model's name.",
    408: "The request body did not arrive within --body-timeout seconds.",
    413: "The request body is over --max-request-bytes (declared or chunked).",
    429: "The waiting queue is full (Retry-After: 1).",
    500: "The request failed inside the server; other requests are unaffected.",
    503: "The model is loading, failed to load, or the server is draining.",
}


def error_status(exc: Exception) -> ProtocolError:
    """The OpenAI-shaped HTTP error for an exception raised while handling a request."""
    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, QueueFull):
        return ProtocolError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, Draining):
        return ProtocolError(503, str(exc), "server_error", code="draining")
    if isinstance(exc, CapacityError):
        return ProtocolError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, UsageError):
        return ProtocolError(400, str(exc), param=getattr(exc, "param", None))
    return ProtocolError(500, f"{type(exc).__name__}: {exc}", "server_error")


def error_response(exc: ProtocolError, count_error: Callable[[int], None]) -> JSONResponse:
    count_error(exc.status)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def install_edge(app: FastAPI, max_request_bytes: int, body_timeout: float, count_error: Callable[[int], None]) -> None:
    """Put the edge in front of ``app``'s routes (call it before adding them): its error handlers, the body guard,
    strict JSON bodies and a truthful /openapi.json."""
    app.router.route_class = StrictJsonRoute
    app.add_middleware(BodyGuard, limit=max_request_bytes, timeout=body_timeout, count_error=count_error)

    @app.exception_handler(ProtocolError)
    async def protocol_error(request, exc: ProtocolError):
        return error_response(exc, count_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error_response(validation_message(exc.errors()), count_error)

    @app.exception_handler(StarletteHTTPException)
    async def router_error(request, exc: StarletteHTTPException):  # the router's own 404 and 405
        return error_response(router_status(request, exc), count_error)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return error_response(error_status(exc), count_error)

    app.openapi = lambda: openapi_schema(app)


def validation_message(errors: list) -> ProtocolError:
    """The first pydantic error as a 400 naming the field (OpenAI answers 400, never 422)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    forms = [e["loc"][2] for e in errors if len(e.get("loc", ())) > 2 and e["loc"][:2] == first["loc"][:2]
             and isinstance(e["loc"][2], str)]
    if len(set(forms)) > 1:  # a union (prompt, stop, content): name the forms it takes, not the first one's error
        return ProtocolError(400, f"{loc[0]}: expected one of {', '.join(dict.fromkeys(forms))}", param=str(loc[0]))
    where, message = ".".join(str(p) for p in loc), first["msg"].removeprefix("Value error, ")
    return ProtocolError(400, f"{where}: {message}" if where else message, param=where or None)


def router_status(request, exc: StarletteHTTPException) -> ProtocolError:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {(exc.headers or {}).get('Allow')})"
    else:
        message = str(exc.detail)
    return ProtocolError(exc.status_code, message, _ERROR_TYPES.get(exc.status_code, "server_error"),
                         code="not_found" if exc.status_code == 404 else None, headers=dict(exc.headers or {}))


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema without what this server never returns: its 422 and the validation-error models."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def require_api_key(api_key: str | None):
    """A route dependency: with ``api_key`` set, "Authorization: Bearer KEY" or 401."""

    async def check(http: Request):
        if api_key is None:
            return
        given = http.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):  # constant time: no timing oracle on the key
            raise ProtocolError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                                code="invalid_api_key")

    return Depends(check)


class BodyGuard:
    """Reads a request's whole body before the app sees it (pure ASGI middleware): over ``limit`` bytes, declared
    or counted as chunks arrive, is 413; not all there within ``timeout`` seconds is 408. The app then reads the
    body at once, and later receives (a client going away) pass through."""

    def __init__(self, app, limit: int, timeout: float, count_error: Callable[[int], None]):
        self.app, self.limit, self.timeout, self.count_error = app, limit, timeout, count_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(self._too_large(), scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except _Refused as refused:
            return await self._refuse(refused.error, scope, receive, send)
        except asyncio.TimeoutError:
            error = ProtocolError(408, f"the request body did not arrive within {self.timeout:g} s (--body-timeout)",
                                  code="request_timeout", headers={"Connection": "close"})
            return await self._refuse(error, scope, receive, send)
        if body is None:  # the client went away while sending
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                raise _Refused(self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> ProtocolError:
        return ProtocolError(413, f"request body over {self.limit} bytes (--max-request-bytes)",
                             headers={"Connection": "close"})

    async def _refuse(self, error: ProtocolError, scope, receive, send):
        await error_response(error, self.count_error)(scope, receive, send)


class _Refused(Exception):
    def __init__(self, error: ProtocolError):
        super().__init__(error.message)
        self.error = error


class StrictJsonRoute(APIRoute):
    """A route whose JSON body is parsed strictly (``strict_json``) before FastAPI validates it: a body that is not
    UTF-8 JSON is a 400 naming the fault, not FastAPI's generic one (or, for a lone surrogate, a 500 later)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request):
            request = _StrictJsonRequest(request.scope, request.receive)
            await request.json()  # raises ProtocolError(400) here, outside FastAPI's catch-all for body errors
            return await handler(request)

        return strict


class _StrictJsonRequest(Request):
    async def json(self):
        if not hasattr(self, "_strict_json"):
            self._strict_json = strict_json(await self.body())
        return self._strict_json


def strict_json(raw: bytes):
    """``raw`` parsed as JSON text, or a 400: not UTF-8, not JSON (NaN and Infinity are not JSON), or a string
    holding a lone UTF-16 surrogate (an escape like "\\ud800" that encodes no character)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(400, f"the request body is not UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        value = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise ProtocolError(400, f"the request body is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") \
            from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, an integer of over 4300 digits, deep nesting
        raise ProtocolError(400, f"the request body is not JSON luffy accepts: {str(exc)[:200]}") from None
    _refuse_surrogates(value)
    return value


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _refuse_surrogates(value) -> None:
    """Walk ``value`` (iteratively: nesting is as deep as the parser allowed) for strings that are not text."""
    stack = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                stack.append((f"{where}.{key}" if where else str(key), key))
                stack.append((f"{where}.{key}" if where else str(key), child))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), child) for i, child in enumerate(item))
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(item[exc.start])
                raise ProtocolError(400, f"{where or 'body'}: a lone UTF-16 surrogate (\\u{code:04x}) is not text",
                                    param=where or None) from None


def sse(payload: dict | str) -> str:
    """One server-sent event: a JSON object or the closing ``[DONE]``."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def watch_disconnect(receive) -> None:
    """Returns when the client goes away (the request body has been read, so the next message is that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0)
