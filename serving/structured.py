"""Structured outputs at the HTTP edge: which grammar a request asks for, compiled before the request reaches the
scheduler, and tool calls turned back into OpenAI's ``message.tool_calls`` (whole, or streamed as deltas).

A request names at most one of: ``response_format`` (OpenAI: ``json_object``, or ``json_schema`` with
``strict``), ``structured_outputs`` (vLLM: ``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) or
``tools`` with a ``tool_choice`` other than "none" (serving/tools.py). Compiling runs in the grammar compiler's
own threads (runtimes/grammar.py) while the handler awaits it, so neither the event loop nor the scheduler's
thread waits for a slow schema; a spec llguidance refuses, or one past a limit, is a 400 naming the field.
"""

from __future__ import annotations

import asyncio

from ..errors import UsageError
from ..runtimes.grammar import GrammarError, GrammarSpec
from . import protocol, tools
from .protocol import ProtocolError
from .edge import sse


def grammar_request(body, tool_plan: tools.ToolPlan | None) -> tuple[GrammarSpec, str] | None:
    """(the grammar, the request field it came from) of a completion or chat request, or None."""
    asked = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append((GrammarSpec("json_object"), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ProtocolError(400, "response_format json_schema needs json_schema.schema",
                                param="response_format.json_schema")
        asked.append((GrammarSpec("json_schema", fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict)),
                      "response_format.json_schema.schema"))
    if body.structured_outputs is not None:
        asked.append(_vllm_structured(body.structured_outputs))
    if tool_plan is not None:
        asked.append((tool_plan.grammar(), "tools"))
    if len(asked) > 1:
        raise ProtocolError(400, f"{' and '.join(p.split('.')[0] for _, p in asked)} each constrain the output; "
                                 "send one (with tools, tool_choice none frees the output)", param=asked[1][1])
    return asked[0] if asked else None


def _vllm_structured(outputs) -> tuple[GrammarSpec, str]:
    given = {name: value for name, value in (("json", outputs.json_), ("regex", outputs.regex),
                                             ("choice", outputs.choice), ("grammar", outputs.grammar),
                                             ("json_object", outputs.json_object or None)) if value is not None}
    if len(given) != 1:
        raise ProtocolError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object"
                                 f"; got {', '.join(given) or 'none'}", param="structured_outputs")
    (name, value), = given.items()
    kind = {"json": "json_schema", "json_object": "json_object"}.get(name, name)
    return (GrammarSpec(kind, None if kind == "json_object" else value, strict=outputs.disable_any_whitespace),
            f"structured_outputs.{name}")


async def constraint(state, grammar: tuple[GrammarSpec, str], max_tokens: int):
    """The request's grammar constraint: compiled (or taken from the cache) off the event loop and the
    scheduler's thread; a 400 naming ``grammar``'s field when llguidance refuses it or a limit is passed."""
    spec, param = grammar
    try:
        grammars = state.engine.grammars
    except UsageError as exc:  # the artifact's tokenizer is one llguidance cannot read (logged at load)
        raise ProtocolError(400, f"{param}: structured outputs are unavailable for this model: {exc}",
                            param=param) from None
    try:
        compiled = await asyncio.to_thread(grammars.compile, spec)
    except GrammarError as exc:
        reason = str(exc).removeprefix(f"{spec.kind}: ")
        raise ProtocolError(400, f"{param}: {reason}", param=param) from None
    return grammars.constraint(compiled, max_tokens)


def chat_message(text: str, tool_plan: tools.ToolPlan | None, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message of a finished chat request (tool calls parsed when it had tools) and the finish
    reason, "tool_calls" when it called any."""
    if tool_plan is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = tools.parse(text, tool_plan)
    if not calls:
        return {"role": "assistant", "content": content or ""}, finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


class ToolCallStream:
    """Splits a streamed chat output into content deltas and tool-call deltas. In the hermes format text streams
    as content except what might start a call (the trigger, or a prefix of it), which is held back; a finished
    call goes out as one delta with its id, name and arguments. In the JSON formats the first non-space
    character decides: the call's opener holds the output until it ends (then parsed whole), anything else
    streams as content."""

    def __init__(self, tool_plan: tools.ToolPlan):
        self.plan, self.held, self.calls = tool_plan, "", 0
        self.mode = "prose" if tool_plan.format == "hermes" else "undecided"

    def feed(self, text: str) -> list[dict]:
        """The deltas ``text`` (the next piece of output) releases."""
        self.held += text
        if self.mode == "undecided":
            stripped = self.held.lstrip()
            if not stripped:
                return []
            self.mode = "calls" if stripped[0] == ("{" if self.plan.format == "llama3_json" else "[") else "prose"
        if self.mode == "calls":
            return []
        if self.plan.format != "hermes":
            released, self.held = self.held, ""
            return self._content(released)
        return self._hermes()

    def _hermes(self) -> list[dict]:
        deltas = []
        while True:
            start = self.held.find(_TRIGGER)
            end = self.held.find(_END, start) if start >= 0 else -1
            if start < 0:  # keep a possible start of the trigger
                start = len(self.held) - _partial_suffix(self.held, _TRIGGER)
            deltas += self._content(self.held[:start])
            if end < 0:
                self.held = self.held[start:]
                return deltas
            deltas += self._call_deltas(self.held[start:end + len(_END)])
            self.held = self.held[end + len(_END):]

    def finish(self) -> list[dict]:
        """The deltas of what is still held when the output ends."""
        held, self.held = self.held, ""
        content, calls = tools.parse(held, self.plan) if held else (None, [])
        return self._content(content or "") + [self._call_delta(call) for call in calls]

    def _content(self, text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def _call_deltas(self, text: str) -> list[dict]:
        content, calls = tools.parse(text, self.plan)
        return [self._call_delta(c) for c in calls] if calls else self._content(text)

    def _call_delta(self, call: dict) -> dict:
        delta = {"tool_calls": [{"index": self.calls, **call}]}
        self.calls += 1
        return delta


_TRIGGER, _END = "<tool_call>", "</tool_call>"


def _partial_suffix(text: str, trigger: str) -> int:
    """The length of the longest end of ``text`` that begins ``trigger``."""
    for size in range(min(len(text), len(trigger) - 1), 0, -1):
        if trigger.startswith(text[-size:]):
            return size
    return 0


def noted(choice: dict, grammar: str | None) -> dict:
    """``choice`` (of a response or a chunk) with ``structured_output`` set when the request had a grammar:
    "complete", "closed_early" (the budget ran short and the closing rule ended strings early) or "incomplete"
    (cut off by max_tokens: it does not parse; finish_reason is "length")."""
    if grammar is not None:
        choice["structured_output"] = grammar
    return choice


def last_chunk(rid: str, model: str, chat: bool, out, index: int = 0, logprobs: dict | None = None) -> dict:
    """The final streamed chunk of a constrained request's choice ``index``: its text, finish reason, logprobs
    and ``structured_output``."""
    if chat:
        chunk = protocol.chat_chunk(rid, model, {"content": out.text} if out.text else {}, out.finish_reason, index)
        chunk["choices"][0]["logprobs"] = logprobs
    else:
        chunk = protocol.completion_body(rid, model, [protocol.completion_choice(index, out.text, out.finish_reason,
                                                                                 logprobs)], None)
    noted(chunk["choices"][0], out.grammar)
    return chunk


class ToolChunks:
    """The SSE lines of a chat stream with tools: content and tool-call deltas (ToolCallStream), then the finish
    reason ("tool_calls" when the output called any)."""

    def __init__(self, rid: str, model: str, tool_plan: tools.ToolPlan, index: int = 0):
        self.rid, self.model, self.split, self.index = rid, model, ToolCallStream(tool_plan), index

    def __call__(self, text: str, finish_reason: str | None) -> str:
        deltas = self.split.feed(text) + (self.split.finish() if finish_reason is not None else [])
        lines = [sse(protocol.chat_chunk(self.rid, self.model, delta, None, self.index)) for delta in deltas]
        if finish_reason is not None:
            reason = "tool_calls" if self.split.calls and finish_reason == "stop" else finish_reason
            lines.append(sse(protocol.chat_chunk(self.rid, self.model, {}, reason, self.index)))
        return "".join(lines)
