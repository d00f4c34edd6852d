"""Speculative decoding inside the scheduler: decoding requests propose and verify several tokens.

At batch 1 a decode step reads every weight for one token, so checking several proposed tokens in one step
is nearly free; once several requests decode together the batched step already shares that read. So the
scheduler speculates only while at most ``max_batch`` requests are decoding (default 1), and decodes
batched otherwise. With a multi-row graph (GroupQueryAttention's query_seqlens) the rows' proposals are
verified in one target step (``rounds``); other graphs verify row by row (``round``). The acceptance rules
and candidate sources are the runtime's (runtimes/speculative.py), so served output equals Engine.generate's.
"""

from __future__ import annotations

from ..runtimes.speculative import AdaptiveK, DraftModel, PromptLookup, check_draft, speculate_round, speculate_rows
from .options import SpeculationConfig
from .requests import Output, Request


class Speculator:
    """Candidate source plus per-request state; the draft's KV slots mirror the target's slot by slot."""

    def __init__(self, engine, num_slots: int, capacity: int, config: SpeculationConfig, metrics):
        self.config, self.metrics = config, metrics
        if config.draft is not None:
            check_draft(engine, config.draft)
            self.source = DraftModel(config.draft, num_slots, capacity)
            self.initial_k = config.num_tokens
        else:
            self.source = PromptLookup()
            self.initial_k = config.prompt_lookup
        self.name = self.source.name

    def round(self, slots, request: Request) -> tuple[list[Output], int]:
        """Propose, verify in one target step, accept; returns one Output per kept token (the last may finish)
        and the tokens the target's step computed."""
        self._start(request)
        seq, remaining, k, chooser, rng = self._row(request)
        proposed, n, token, verify = speculate_round(slots, request.slot, seq, remaining, self.source, k, chooser, rng)
        return self._accept(request, proposed, n, token, verify)

    def rounds(self, slots, requests: list[Request]) -> list[tuple[list[Output], int]]:
        """``round`` for the requests in slots [0, len(requests)), verified together in one target step."""
        for request in requests:
            self._start(request)
        results = speculate_rows(slots, [self._row(r) for r in requests], self.source)
        return [self._accept(r, *result) for r, result in zip(requests, results)]

    def _start(self, request: Request) -> None:
        if request.spec_k is None:
            request.spec_k = AdaptiveK(self.initial_k)

    @staticmethod
    def _row(request: Request) -> tuple:
        return (request.prompt_ids + request.output_ids, request.params.max_tokens - len(request.output_ids),
                request.spec_k, request.chooser, request.rng)

    def _accept(self, request: Request, proposed, n: int, token: int, verify) -> tuple[list[Output], int]:
        if proposed:
            self.metrics.speculated(len(proposed), n)
        outputs = []
        for i, t in enumerate([*proposed[:n], token]):
            outputs.append(request.accept(t, verify[i]))  # the target's logits at the position that chose t
            if outputs[-1].finish_reason is not None:
                break
        return outputs, len(proposed) + 1
