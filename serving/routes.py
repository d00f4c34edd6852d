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

from . import protocol, structured, tools
from .choices import ChoiceSet, Prompt
from .edge import error_responses, error_status, install_edge, require_api_key
from .metrics import CONTENT_TYPE
from .embeddings import MAX_INPUTS, encoded
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, ProtocolError,
                       TokenizeRequest)
from .state import ServingState

GENERATION_RESPONSES = {
    200: {"description": "The completion as JSON, or with stream=true server-sent events (text/event-stream): one "
                         "chunk per token, a usage chunk if asked, an error event if the request fails, then [DONE].",
          "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 408, 413, 429, 500, 503)}
TOKENIZE_RESPONSES = {200: {"description": "count, max_model_len, tokens (ids), token_strs (when asked)."},
                      **error_responses(400, 401, 404, 408, 413, 503)}


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
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/metrics", dependencies=auth, response_class=Response, responses={
        200: {"description": "Prometheus text exposition (luffy:* named like vLLM's vllm:*).",
              "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}, **error_responses(401, 503)})
    async def metrics():
        state.require_ready()
        if state.scheduler is not None:
            state.metrics.gauges(state.scheduler.running, state.scheduler.waiting, state.scheduler.kv_cache_usage)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    add_token_routes(app, state, auth)
    add_embeddings_route(app, state, auth)

    @app.post("/v1/completions", dependencies=auth, response_class=JSONResponse, responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_request(state, body)
        # a long text takes a while to tokenize: off the event loop, which every stream's tokens go through
        prompts = await asyncio.to_thread(lambda: [_prompt(state, p, body.echo) for p in body.prompts()])
        max_tokens = next((m for m in (body.max_tokens, body.max_completion_tokens) if m is not None), 16)  # OpenAI's
        return await _generate(state, http, body, prompts, max_tokens, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth, response_class=JSONResponse, responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        _check_request(state, body)
        _require_chat_template(state)
        messages, tool_plan = _with_tools(state, body, [m.for_template() for m in body.messages])
        ids = await _chat_ids(state, messages, body.add_generation_prompt, body.tools)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, state.scheduler.capacity - len(ids))
        return await _generate(state, http, body, [Prompt(ids, "")], max_tokens, chat=True, tool_plan=tool_plan)


def add_token_routes(app: FastAPI, state: ServingState, auth: list) -> None:
    """/v1/models/{id}, and vLLM's /tokenize and /detokenize."""

    @app.get("/v1/models/{model:path}", dependencies=auth, responses=error_responses(401, 404, 503))
    async def model(model: str):
        _check_model(state, model)
        return _model_card(state)

    @app.post("/tokenize", dependencies=auth, responses=TOKENIZE_RESPONSES)
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        if body.messages is not None:
            _require_chat_template(state)
            ids = await _chat_ids(state, [m.for_template() for m in body.messages], body.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(_encode, state, body.prompt, body.add_special_tokens)
        strs = [state.token_text.text(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", dependencies=auth, responses={
        200: {"description": "prompt: the text of the token ids (special tokens included)."},
        **error_responses(400, 401, 404, 408, 413, 503)})
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < state.vocab), None)
        if bad is not None:
            raise ProtocolError(400, f"token id {bad} is outside the vocabulary of size {state.vocab}", param="tokens")
        return {"prompt": _tokenizer(state).decode(body.tokens, skip_special_tokens=False)}


def add_embeddings_route(app: FastAPI, state: ServingState, auth: list) -> None:
    """/v1/embeddings: served by an encoder artifact (serving/embeddings.py); a decoder answers 400."""

    _add_generation_routes(app, state, auth)


def _add_generation_routes(app: FastAPI, state: ServingState, auth: list) -> None:
    """The routes that run the model: /v1/embeddings, /v1/completions, /v1/chat/completions."""

    @app.post("/v1/embeddings", dependencies=auth, responses={
        200: {"description": "One unit-length, mean-pooled vector per input (floats, or base64 float32)."},
        **error_responses(400, 401, 404, 408, 413, 503)})
    async def embeddings(body: EmbeddingRequest):
        _check_model(state, body.model)
        if state.embedder is None:
            raise ProtocolError(400, f"artifact {state.artifact.name} is a causal LM; /v1/embeddings needs an "
                                     "encoder artifact (luffy serve ENCODER_ARTIFACT)", param="model")
        rows = await asyncio.to_thread(_embedding_rows, state.embedder, body)
        vectors = await asyncio.to_thread(state.embedder.embed, rows)
        data = [{"object": "embedding", "index": i, "embedding": encoded(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        tokens = sum(map(len, rows))
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


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


def declare_model_limits(schema: dict, state: ServingState) -> dict:
    """``schema`` with the loaded model's limits, which the routes enforce (400): token ids in [0, vocab) and
    ``max_tokens`` below the context (a prompt takes at least one position). Before the load, as it is."""
    if not state.ready.is_set() or state.scheduler is None:
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


def _model_card(state: ServingState) -> dict:
    return {"id": state.model_name, "object": "model", "created": int(state.artifact.stat().st_mtime),
            "owned_by": "luffy", "root": str(state.artifact), "max_model_len": state.max_model_len}


def _check_model(state: ServingState, model: str | None) -> None:
    """Ready, and ``model`` (when given) is the one served."""
    state.require_ready()
    if model is not None and model != state.model_name:
        raise ProtocolError(404, f"model {model!r} does not exist; this server serves {state.model_name!r}",
                            param="model", code="model_not_found")


def _check_request(state: ServingState, body) -> None:
    _check_model(state, body.model)
    if state.scheduler is None:
        raise ProtocolError(400, f"artifact {state.artifact.name} is an encoder: it serves /v1/embeddings, not text",
                            param="model")
    body.refuse_unsupported()


def _embedding_rows(embedder, body) -> list[list[int]]:
    """The request's inputs as token ids, each checked against the vocabulary and the artifact's length."""
    inputs = body.inputs()
    if len(inputs) > MAX_INPUTS:
        raise ProtocolError(400, f"{len(inputs)} inputs; at most {MAX_INPUTS} per request", param="input")
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise ProtocolError(400, f"dimensions {body.dimensions}: this model's embeddings have {embedder.dimensions} "
                                 "(luffy does not shorten them)", param="dimensions")
    texts = [i for i, one in enumerate(inputs) if isinstance(one, str)]
    rows = list(inputs)
    for i, ids in zip(texts, embedder.encode([inputs[i] for i in texts]) if texts else []):
        rows[i] = ids
    for i, row in enumerate(rows):
        bad = next((t for t in row if not 0 <= t < (embedder.vocab or 1 << 62)), None)
        if bad is not None:
            raise ProtocolError(400, f"input {i}: token id {bad} is outside the vocabulary of size {embedder.vocab}",
                                param="input")
        if embedder.max_len is not None and len(row) > embedder.max_len:
            raise ProtocolError(400, f"input {i} is {len(row)} tokens; the model takes at most {embedder.max_len}",
                                param="input", code="context_length_exceeded")
    return rows


def _tokenizer(state: ServingState):
    if not state.engine.manifest.get("tokenizer"):
        raise ProtocolError(400, f"artifact {state.artifact.name} has no tokenizer; send the prompt as token ids",
                            param="prompt")
    return state.embedder.tokenizer if state.embedder is not None else state.engine.tokenizer


def _encode(state: ServingState, text: str, add_special_tokens: bool) -> list[int]:
    return _tokenizer(state).encode(text, add_special_tokens=add_special_tokens).ids


def _require_chat_template(state: ServingState) -> None:
    if state.chat_template is None or state.chat_tokens is None:
        raise ProtocolError(400, f"artifact {state.artifact.name} has no chat template; compile from a model "
                                 "directory whose tokenizer has one, or use /v1/completions", param="messages")


async def _chat_ids(state: ServingState, messages: list[dict], add_generation_prompt: bool,
                    tool_specs: list[dict] | None = None) -> list[int]:
    """The chat's prompt ids: the template places the control tokens, special-token strings inside content stay
    text (serving/chat.py ChatTokens)."""
    return await asyncio.to_thread(state.chat_tokens.encode, state.chat_template, messages, add_generation_prompt,
                                   tool_specs)


def _prompt(state: ServingState, prompt, echo: bool) -> Prompt:
    """A completions prompt (text, or token ids) as ids and the text echo returns."""
    if isinstance(prompt, str):
        return Prompt(_encode(state, prompt, add_special_tokens=True), prompt)
    known = all(0 <= t < state.vocab for t in prompt)  # the scheduler refuses the others, by name
    text = _tokenizer(state).decode(prompt, skip_special_tokens=True) if echo and known else ""
    return Prompt(list(prompt), text)


async def _generate(state: ServingState, http: HttpRequest, body, prompts: list[Prompt], max_tokens: int,
                    chat: bool, tool_plan=None):
    """Submit the request's choices (n for each prompt, each with its own grammar when the request has one) and
    answer with all of them, or stream them."""
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    grammar = structured.grammar_request(body, tool_plan)
    constraints = None
    if grammar is not None:  # compiled once (cached); each choice walks its own copy of the grammar
        constraints = [await structured.constraint(state, grammar, max_tokens) for _ in range(len(prompts) * body.n)]
    try:
        choices = ChoiceSet(state, body, rid, prompts, max_tokens, chat, tool_plan, constraints)
        state.scheduler.submit_all(choices.requests)
    except Exception as exc:  # noqa: BLE001 - UsageError / CapacityError / QueueFull / Draining -> HTTP
        raise error_status(exc) from None
    headers = {"x-luffy-replica": state.settings.replica} if state.settings.replica else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(choices.stream(include_usage), media_type="text/event-stream", headers=headers)
    return JSONResponse(await choices.collect(http.receive), headers=headers)
