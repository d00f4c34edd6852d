"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions, and its error shape.

Request bodies are pydantic models that refuse unknown fields (OpenAI answers "Unrecognized request
argument"); accepted fields luffy cannot honour (``suffix``, ``best_of`` > 1) are refused with a 400 naming the
field rather than silently ignored. vLLM's extras ``ignore_eos``, ``min_tokens``, ``top_k``, ``min_p``,
``repetition_penalty``, ``stop_token_ids`` and ``structured_outputs`` are accepted; ``response_format`` and
``tools`` are enforced while decoding (serving/structured.py). The response bodies (with their logprobs) are
built in serving/choices.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from .requests import MAX_LOGPROBS, SamplingParams


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


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema; ``strict`` makes the JSON compact."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: Union[dict, bool, None] = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a schema), ``regex``, ``choice``, ``grammar``
    (Lark or GBNF) or ``json_object``; ``disable_any_whitespace`` makes JSON compact."""

    model_config = ConfigDict(extra="forbid")
    json_: Union[dict, str, None] = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class _Sampling(BaseModel):
    model_config = STRICT

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128, description="Choices per prompt; they share one prefill.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: Int64 | None = Field(default=None, description=(
        "Signed 64-bit as OpenAI and vLLM take it; a negative seed draws as its two's complement (seed + 2**64), "
        "so Engine.generate(seed=seed % 2**64) gives the same tokens."))
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, description=(
        "Token id (as a string, OpenAI's form) -> bias in [-100, 100], added to the logit."))
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)  # transformers' semantics (> 1 discourages repeats)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # structured outputs (serving/structured.py): OpenAI's response_format, vLLM's structured_outputs
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ProtocolError(400, "stream_options is only allowed with stream=true", param="stream_options")
        self.token_biases()

    def token_biases(self) -> dict[int, float]:
        """logit_bias with integer token ids (the vocabulary bound is the scheduler's check)."""
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ProtocolError(400, f"logit_bias: key {key!r} is not a token id", param="logit_bias")
            if not -100 <= bias <= 100:
                raise ProtocolError(400, f"logit_bias: bias {bias} for token {key} must be in [-100, 100]",
                                    param="logit_bias")
            biases[int(key)] = float(bias)
        return biases

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(top alternatives per output token, per prompt token); None where not asked."""
        return None, None

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), seed=None if self.seed is None else self.seed % (1 << 64), stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=self.token_biases(), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(default=None, ge=0, description="0 only with echo: score the prompt.")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description=(
        "The chosen token's logprob and this many top alternatives per token (the log-softmax of the model's "
        "raw logits); with echo, for the prompt's tokens too."))
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise ProtocolError(400, "suffix is not supported by luffy", param="suffix")
        if self.best_of not in (None, 1):
            raise ProtocolError(400, "best_of is not supported by luffy", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ProtocolError(400, "max_tokens=0 generates nothing; it is for scoring a prompt with echo=true",
                                param="max_tokens")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts: one text, one list of token ids, or a list of either."""
        prompt = self.prompt
        prompts = list(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [
            prompt]
        for i, one in enumerate(prompts):
            if isinstance(one, list) and not one:
                raise ProtocolError(400, "prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty",
                                    param="prompt")
        if not prompts or (isinstance(prompt, list) and not prompt):
            raise ProtocolError(400, "prompt is empty", param="prompt")
        return prompts


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
        for call in message.get("tool_calls") or []:  # templates format the arguments themselves: give a dict
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                function["arguments"] = _json_object_or(function["arguments"])
        return message


def _json_object_or(text: str):
    """``text`` parsed when it is a JSON object, else ``text``."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True  # vLLM's extra
    tools: list[dict] | None = None  # OpenAI's {"type": "function", "function": {...}} (serving/tools.py)
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: bool = True
    logprobs: bool = Field(default=False, description="Each output token's logprob (log-softmax of the raw logits).")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description=(
        "With logprobs: this many most likely alternatives per token."))

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a ``prompt`` (``add_special_tokens`` as in completions), or chat ``messages`` rendered
    through the chat template as /v1/chat/completions renders them."""

    model_config = STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids back to text (special tokens included)."""

    model_config = STRICT
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings: ``input`` as one text, a list of texts, one list of token ids, or a list of them."""

    model_config = STRICT
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[Union[str, list[int]]]:
        given = self.input
        inputs = list(given) if isinstance(given, list) and given and isinstance(given[0], (str, list)) else [given]
        for i, one in enumerate(inputs):
            if not one:
                raise ProtocolError(400, f"input {i} is empty" if len(inputs) > 1 else "input is empty", param="input")
        return inputs



def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    """A /v1/completions response; ``choices`` as ``completion_choice`` makes them."""
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    """A /v1/chat/completions response; ``choices`` as ``chat_choice`` makes them."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": use}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None, index: int = 0) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


class ChunkWriter:
    """The SSE line of one streamed token, with everything but the choice's index, text, logprobs and finish
    reason encoded once: it runs for every token of every stream, on the event loop the whole server shares."""

    def __init__(self, rid: str, model: str, chat: bool):
        created = int(time.time())
        if chat:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": [{"index": '
            self.text = ', "delta": {"content": '
            self.middle = '}, "logprobs": '
        else:
            head = {"id": rid, "object": "text_completion", "created": created, "model": model}
            self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": [{"index": '
            self.text = ', "text": '
            self.middle = ', "logprobs": '
        self.suffix = "}]}\n\n"

    def __call__(self, text: str, finish_reason: str | None, index: int = 0, logprobs: dict | None = None) -> str:
        return (self.prefix + str(index) + self.text + json.dumps(text, ensure_ascii=False) + self.middle
                + ("null" if logprobs is None else json.dumps(logprobs, ensure_ascii=False))
                + ', "finish_reason": ' + json.dumps(finish_reason) + self.suffix)
