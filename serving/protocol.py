"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions, and its error shape.

Request bodies are pydantic models that refuse unknown fields (OpenAI answers "Unrecognized request
argument"); accepted fields luffy cannot honour (``n`` > 1, ``logprobs``, ``echo``, penalties) are refused
with a 400 naming the field rather than silently ignored. vLLM's extras ``ignore_eos``, ``min_tokens``,
``top_k`` and ``stop_token_ids`` are accepted.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from .requests import SamplingParams


class ProtocolError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Strict: JSON's types as they are (OpenAI refuses "10" or true for an integer and 0 for a boolean; coercing
# them would accept requests that mean something else). An integer is a number, so float fields take 1 as 1.0.
STRICT = ConfigDict(extra="forbid", strict=True)
INT64 = (-(1 << 63), (1 << 63) - 1)  # OpenAI's and vLLM's seed range


def _int64(value: int) -> int:
    if not INT64[0] <= value <= INT64[1]:
        raise ValueError("must be a signed 64-bit integer, in [-2**63, 2**63 - 1]")
    return value


# OpenAPI's int64 format states the bounds exactly (a minimum/maximum would pass through FastAPI's float fields,
# and 2**63 - 1 would be declared as 2**63)
Int64 = Annotated[int, AfterValidator(_int64), WithJsonSchema({"type": "integer", "format": "int64"})]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = STRICT

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: Int64 | None = Field(default=None, description=(
        "Signed 64-bit as OpenAI and vLLM take it; a negative seed draws as its two's complement (seed + 2**64), "
        "so Engine.generate(seed=seed % 2**64) gives the same tokens."))
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None
    logit_bias: dict | None = None
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise ProtocolError(400, f"n={self.n}: luffy returns one choice per request; send n=1", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ProtocolError(400, f"{name} is not supported by luffy; send 0 or leave it out", param=name)
        for name in ("logprobs", "logit_bias"):
            if getattr(self, name):
                raise ProtocolError(400, f"{name} is not supported by luffy; leave it out", param=name)
        if self.stream_options is not None and not self.stream:
            raise ProtocolError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), seed=None if self.seed is None else self.seed % (1 << 64), stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise ProtocolError(400, f"{name} is not supported by luffy", param=name)
        if self.best_of not in (None, 1):
            raise ProtocolError(400, "best_of is not supported by luffy", param="best_of")

    def single_prompt(self) -> Union[str, list[int]]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ProtocolError(400, f"{len(prompt)} prompts in one request; luffy takes one prompt per "
                                         "request (send them concurrently instead)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ProtocolError(400, "prompt is empty", param="prompt")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id, ... go to the template as they are
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # OpenAI's content parts: text only
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ProtocolError(400, f"content part of type {part.get('type')!r}: luffy serves text only",
                                        param="messages")
                texts.append(part["text"])
            message["content"] = "".join(texts)
        return message


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True  # vLLM's extra


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish_reason: str | None, use: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish_reason: str | None, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


class ChunkWriter:
    """The SSE line of one streamed token, with everything but the text and finish reason encoded once: it runs
    for every token of every stream, on the event loop the whole server shares."""

    def __init__(self, rid: str, model: str, chat: bool):
        created = int(time.time())
        if chat:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": [{"index": 0, "delta": {"content": '
            self.middle = '}, "logprobs": null, "finish_reason": '
        else:
            head = {"id": rid, "object": "text_completion", "created": created, "model": model}
            self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": [{"index": 0, "text": '
            self.middle = ', "logprobs": null, "finish_reason": '
        self.suffix = "}]}\n\n"

    def __call__(self, text: str, finish_reason: str | None) -> str:
        return self.prefix + json.dumps(text, ensure_ascii=False) + self.middle + json.dumps(finish_reason) + self.suffix
