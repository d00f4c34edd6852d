"""The choices of one HTTP request: ``n`` for each prompt of the request, each one a scheduler Request, gathered
into OpenAI's response body or streamed as chunks that name their choice.

Choice ``i`` of prompt ``p`` has index ``p * n + i`` (OpenAI's and vLLM's order). A prompt's first choice
prefills it and the others copy its KV (``Request.siblings``, serving/scheduler.py): n choices cost one
prefill. Choice i > 0 of a seeded request draws with ``seed + i``, so every choice equals Engine.generate with
its own seed. ``echo`` puts the prompt's text before the completion's and, with ``logprobs``, the prompt
tokens' logprobs before the completion's (the first prompt token's are null: nothing predicts it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from . import protocol, structured
from .edge import sse, watch_disconnect
from .logprobs import TextOffsets, chat_logprobs, completion_logprobs
from .protocol import ProtocolError
from .requests import Output, Request, SamplingParams

SEEDS = 1 << 64  # numpy's generator takes seeds in [0, 2**64)


@dataclass
class Prompt:
    """One prompt: its token ids and the text ``echo`` returns (the prompt as sent, or its ids decoded)."""

    ids: list[int]
    text: str


@dataclass
class Choice:
    index: int
    prompt_index: int
    prompt: Prompt
    request: Request
    outputs: list[Output] = field(default_factory=list)
    offsets: TextOffsets | None = None  # where streamed tokens start in the choice's text (completions logprobs)
    tool_chunks: structured.ToolChunks | None = None  # a chat stream with tools: this choice's call deltas

    @property
    def done(self) -> bool:
        return bool(self.outputs) and self.outputs[-1].finish_reason is not None


class ChoiceSet:
    """The requests behind one completion or chat request, and the response they make.

    >>> choices = ChoiceSet(state, body, "cmpl-1", [Prompt(ids, "Return the")], max_tokens=16, chat=False)  # doctest: +SKIP
    >>> state.scheduler.submit_all(choices.requests)                                                       # doctest: +SKIP
    """

    def __init__(self, state, body, rid: str, prompts: list[Prompt], max_tokens: int, chat: bool, tool_plan=None,
                 constraints: list | None = None):
        self.state, self.body, self.rid, self.chat, self.tool_plan = state, body, rid, chat, tool_plan
        self.prompts = prompts
        self.queue: asyncio.Queue = asyncio.Queue()
        self.strings = state.token_text
        emit = state.router.emitter(self.queue)
        params, n = body.sampling(max_tokens), body.n
        self.choices: list[Choice] = []
        for p, prompt in enumerate(prompts):
            group = [Choice(k, p, prompt, Request(list(prompt.ids), _seeded(params, i), emit, request_id=f"{rid}-{k}",
                                                  constraint=constraints[k] if constraints else None))
                     for i, k in ((i, p * n + i) for i in range(n))]
            group[0].request.siblings = [c.request for c in group[1:]]
            if tool_plan is not None:
                for choice in group:
                    choice.tool_chunks = structured.ToolChunks(rid, body.model, tool_plan, choice.index)
            self.choices += group
        self._by_id = {c.request.request_id: c for c in self.choices}
        self._prompt_logprobs: dict[int, list] = {}  # prompt index -> its tokens' logprobs (from its first choice)

    @property
    def requests(self) -> list[Request]:
        return [c.request for c in self.choices]

    @property
    def echo(self) -> bool:
        return bool(getattr(self.body, "echo", False))

    def cancel(self) -> None:
        for choice in self.choices:
            if not choice.done:
                self.state.scheduler.cancel(choice.request)

    def _receive(self, output: Output) -> Choice:
        choice = self._by_id[output.request_id]
        if output.prompt_logprobs is not None:
            self._prompt_logprobs[choice.prompt_index] = output.prompt_logprobs
        choice.outputs.append(output)
        return choice

    # -- the whole response ------------------------------------------------------------------------------
    async def collect(self, receive) -> dict:
        """Wait for every choice (a client that disconnects meanwhile cancels them all); the response body."""
        gone = asyncio.ensure_future(watch_disconnect(receive))
        try:
            while not all(c.done for c in self.choices):
                getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise asyncio.CancelledError("client disconnected")
                output = getter.result()
                self._receive(output)
                if output.finish_reason in ("error", "abort"):
                    raise failure(output)
        finally:
            gone.cancel()
            self.cancel()
        return self.response()

    def response(self) -> dict:
        merged = [Output.merge(c.outputs) for c in self.choices]
        make = self._chat_choice if self.chat else self._completion_choice
        choices = [make(c, out) for c, out in zip(self.choices, merged)]
        use = protocol.usage(sum(len(p.ids) for p in self.prompts), sum(o.completion_tokens for o in merged))
        if self.chat:
            return protocol.chat_body(self.rid, self.body.model, choices, use)
        return protocol.completion_body(self.rid, self.body.model, choices, use)

    def _completion_choice(self, choice: Choice, out: Output) -> dict:
        text = (choice.prompt.text if self.echo else "") + out.text
        logprobs = self._completion_logprobs(choice, out)
        return structured.noted(protocol.completion_choice(choice.index, text, out.finish_reason, logprobs), out.grammar)

    def _completion_logprobs(self, choice: Choice, out: Output, first: bool = True) -> dict | None:
        """The completions logprobs of ``out`` (with the prompt's before them when echoing and ``first``)."""
        if self.body.logprobs is None:
            return None
        tokens, entries = list(out.token_ids), list(out.logprobs or [])
        if self.echo and first:
            prompt = self._prompt_logprobs.get(choice.prompt_index) or [None] * len(choice.prompt.ids)
            tokens, entries = choice.prompt.ids + tokens, prompt + entries
        if choice.offsets is None or first:
            choice.offsets = TextOffsets(self.strings)
        return completion_logprobs(self.strings, tokens, entries, choice.offsets)

    def _chat_choice(self, choice: Choice, out: Output) -> dict:
        logprobs = chat_logprobs(self.strings, out.logprobs or []) if self.body.logprobs else None
        message, finish_reason = structured.chat_message(out.text, self.tool_plan, out.finish_reason)
        body = protocol.chat_choice(choice.index, out.text, finish_reason, logprobs)
        body["message"] = message  # with tools: content and tool_calls parsed from the text
        return structured.noted(body, out.grammar)

    # -- the stream ----------------------------------------------------------------------------------------
    async def stream(self, include_usage: bool):
        """Server-sent events: per choice one chunk per step that adds a token or text, its finish reason; usage
        if asked; an error event if a choice fails; then [DONE]. Starlette cancels this generator when the
        client disconnects; the finally cancels what is left."""
        writer = protocol.ChunkWriter(self.rid, self.body.model, self.chat)
        try:
            if self.chat:
                for choice in self.choices:
                    yield sse(protocol.chat_chunk(self.rid, self.body.model, {"role": "assistant", "content": ""},
                                                  None, choice.index))
            failed = False
            while not failed and not all(c.done for c in self.choices):
                output = await self.queue.get()
                choice = self._receive(output)
                failed = output.finish_reason in ("error", "abort")
                chunk = sse(failure(output).body()) if failed else self._chunk(writer, choice, output)
                if chunk is not None:
                    yield chunk
            if include_usage and not failed:
                obj = "chat.completion.chunk" if self.chat else "text_completion"
                use = protocol.usage(sum(len(p.ids) for p in self.prompts),
                                     sum(c.outputs[-1].completion_tokens for c in self.choices))
                yield sse(protocol.usage_chunk(self.rid, self.body.model, obj, use))
            yield sse("[DONE]")
        finally:
            self.cancel()

    def _chunk(self, writer, choice: Choice, output: Output) -> str | None:
        first = len(choice.outputs) == 1
        text = (choice.prompt.text if self.echo and first and not self.chat else "") + output.text
        if not (output.token_ids or text or output.finish_reason):
            return None
        if choice.tool_chunks is not None:  # tool calls leave as tool_calls deltas (serving/structured.py)
            return choice.tool_chunks(text, output.finish_reason) or None
        if self.chat:
            logprobs = chat_logprobs(self.strings, output.logprobs or []) if self.body.logprobs else None
        else:
            logprobs = self._completion_logprobs(choice, output, first)
        if output.finish_reason is not None and output.grammar is not None:
            last = dataclasses.replace(output, text=text)
            return sse(structured.last_chunk(self.rid, self.body.model, self.chat, last, choice.index, logprobs))
        return writer(text, output.finish_reason, choice.index, logprobs)


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % SEEDS)


def failure(out: Output) -> ProtocolError:
    """The error of a choice that ended inside the server: "error" (500) or "abort" (the server stopped: 503)."""
    if out.finish_reason == "error":
        return ProtocolError(500, out.error or "the request failed", "server_error")
    return ProtocolError(503, out.error or "the request was aborted", "server_error", code="aborted")

