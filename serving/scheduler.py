"""Continuous batching: one thread owns the engine and its KV slots; requests come and go between steps.

Each iteration, in order:
  1. drops cancelled requests (a client went away) and frees their slots;
  2. resumes preempted requests whose KV waits in host memory, when a slot and the memory are free;
  3. decodes every running sequence in one batched step (rows of different lengths, each its own
     ``seqlens_k``), chooses each one's next token, and frees the slots of those that finished; a row that
     grows into a new KV block is charged for it first, and when the pool has none the request admitted last
     is preempted (serving/kv_pool.py);
  4. spends what is left of ``max_num_batched_tokens`` on prompts: waiting requests are admitted into free
     slots while the KV pool holds their whole prompt, and the prompts part-way in are prefilled, several
     in one multi-row step where the graph takes query_seqlens (serving/prefill_plan.py decides which and
     how many tokens each), else one at a time. A prompt longer than the budget is split over iterations, so
     it never holds running streams back by more than one chunk (vLLM's chunked prefill; llama.cpp's server
     also adds generating slots' tokens first and fills the rest with prompt tokens).
A finished request's first token is chosen from its last prompt chunk's logits, so time to first token is
one prefill. Decoding slots are kept at rows [0, n) of the cache and prompts part-way in right after them
(a finished slot swaps with the last one), so one view of the cache is the whole decode batch, another the
prefill batch, and a free slot keeps what it held (the prefix cache) until the pool needs its memory.

HTTP handlers never touch the engine: ``submit`` and ``cancel`` take a lock and wake the loop, and outputs
go back through each request's ``emit`` (the server bridges it into its event loop).
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from ..errors import CapacityError
from ..runtimes.generation import check_capacity, eos_set
from ..runtimes.kv_memory import ReservedMemory
from .kv_admission import KVAdmission
from .kv_pool import KVPool
from .options import SchedulerConfig, parse_bytes
from .prefill_plan import plan_chunks
from .prefix_cache import PrefixCache
from .requests import Output, ParameterError, Request, SamplingParams
from .speculation import Speculator


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: the server answers 429."""


class Draining(Exception):
    """The scheduler is shutting down and admits nothing new: the server answers 503."""


class NoMetrics:
    """What the scheduler reports; serving/metrics.py implements it with Prometheus collectors."""

    def request_scheduled(self, request: Request) -> None: ...
    def token(self, request: Request, first: bool, seconds: float, count: int = 1) -> None: ...
    def request_finished(self, request: Request) -> None: ...
    def iteration(self, running: int, waiting: int, kv_usage: float) -> None: ...
    def prefix_lookup(self, queried: int, hit: int) -> None: ...
    def speculated(self, proposed: int, accepted: int) -> None: ...
    def grammar_masked(self, seconds: float, rows: int) -> None: ...
    def prefill_step(self, rows: int, tokens: int, padded: int) -> None: ...
    def preempted(self, request: Request, swapped: bool) -> None: ...
    def kv_cache(self, state: dict) -> None: ...


class Scheduler(KVAdmission):
    """Serves generation requests from one engine with continuous batching (KV memory: serving/kv_admission.py).

    >>> scheduler = Scheduler(luffy.load("build/pydoc"), SchedulerConfig(max_num_seqs=8)).start()  # doctest: +SKIP
    >>> scheduler.generate([256, 72, 105], SamplingParams(max_tokens=8, temperature=0)).token_ids  # doctest: +SKIP
    """

    def __init__(self, engine, config: SchedulerConfig | None = None, metrics=None):
        self.engine, self.config, self.metrics = engine, config or SchedulerConfig(), metrics or NoMetrics()
        capacity = self.config.max_model_len or engine.max_seq_len
        if engine.max_seq_len is not None and capacity > engine.max_seq_len:
            raise CapacityError(f"max_model_len {capacity} exceeds the artifact's maximum sequence length "
                                f"{engine.max_seq_len}")
        self.slots = engine.open_slots(self.config.max_num_seqs, capacity, allocate=ReservedMemory())
        memory = parse_bytes(self.config.kv_cache_memory) if self.config.kv_cache_memory else None
        self.pool = KVPool(self.slots.cache, memory, int(self.config.swap_space * (1 << 30)))
        self.multi_row = engine.graph.multi_row  # several prompts per prefill step, drafts verified together
        self.capacity, self._limit_note = capacity, ""
        if self.pool.tokens < capacity:  # one sequence of the whole context must fit the pool, as in vLLM
            if self.config.max_model_len is not None:
                raise CapacityError(f"--max-model-len {capacity} exceeds the {self.pool.tokens:,} tokens the KV cache "
                                    f"holds ({self.pool.describe()}); raise --kv-cache-memory or lower --max-model-len")
            self.capacity = self.pool.tokens
            self._limit_note = f" (all the KV cache holds: {self.pool.describe()})"
        self.vocab = engine.vocab
        self.eos_ids = tuple(eos_set(engine.manifest.get("generation", {}).get("eos_token_id")).tolist())
        self.tokenizer = engine.tokenizer if engine.manifest.get("tokenizer") else None
        self.batched_decode = engine.graph.shared_kv  # concat graphs step each row alone (equal lengths only)
        self.prefix = PrefixCache(self.config.prefix_cache_mb << 20) if self.config.prefix_cache else None
        self.speculator = None
        if self.config.speculation is not None:
            self.speculator = Speculator(engine, self.config.max_num_seqs, capacity, self.config.speculation,
                                         self.metrics)
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._owner: list[Request | None] = [None] * self.config.max_num_seqs
        self._decoding = 0  # decoding requests hold slots [0, _decoding)
        self._prefilling: list[Request] = []  # prompts part-way in, in line order
        self._freed_at = [0.0] * self.config.max_num_seqs  # when each slot's request left (the pool takes LRU first)
        self._cancelled: list[Request] = []
        self._stopping = self._draining = False
        self._stop_error: str | None = None
        self._thread: threading.Thread | None = None
        self._masker = None  # fills a decode batch's grammar masks, row by row; made for the first constraint

    # -- the handlers' side ---------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self.metrics.kv_cache(self.kv_cache_state())  # the pool's limit is scraped before the first iteration sets it
        self._thread = threading.Thread(target=self._loop, name="luffy-scheduler", daemon=True)
        self._thread.start()
        return self

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse, before any work, a request the artifact cannot hold (one-line UsageError/CapacityError)."""
        if not prompt_ids:
            raise ParameterError("prompt", "the prompt is empty")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ParameterError("prompt", f"token id {bad} is outside the vocabulary of size {self.vocab}")
        params.check(self.vocab)  # stop_token_ids and logit_bias ids inside the vocabulary
        try:
            check_capacity(len(prompt_ids), params.max_tokens, self.capacity, "max_tokens",
                           "the maximum context length")
        except CapacityError as exc:  # a context lowered to the KV pool says so
            raise CapacityError(f"{exc}{self._limit_note}") from None

    def submit(self, request: Request) -> Request:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[Request]:
        """Queue several requests at once (the choices of one HTTP request), all or none: each is checked, and
        the queue must have room for all of them."""
        if len(requests) > self.config.max_queue:
            raise ParameterError("n", f"{len(requests)} choices in one request exceed the queue's "
                                      f"{self.config.max_queue} places (--max-queue); send fewer prompts or a smaller n")
        for request in requests:
            self.check(request.prompt_ids, request.params)
        with self._lock:
            if self._draining or self._stopping:
                raise Draining("the server is shutting down")
            if len(self._waiting) + len(requests) > self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.config.max_queue})")
            self._waiting.extend(requests)
            self._lock.notify()
        return requests

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (its client went away); its slot is free after the current iteration."""
        with self._lock:
            if request.finish_reason is None and not request.cancelled:
                request.cancelled = True
                self._cancelled.append(request)
                self._lock.notify()

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float = 600.0) -> Output:
        """Submit and wait (for tests and scripts): all of the request's tokens and text in one Output."""
        done, outputs = threading.Event(), []

        def emit(output: Output):
            outputs.append(output)
            if output.finish_reason is not None:
                done.set()

        request = self.submit(Request(list(prompt_ids), params, emit))
        if not done.wait(timeout):
            self.cancel(request)
            raise TimeoutError(f"request {request.request_id} did not finish within {timeout} s")
        return Output.merge(outputs)

    def begin_drain(self) -> None:
        """Admit nothing more: new submits raise Draining, waiting requests end "abort", running ones go on."""
        with self._lock:
            self._draining = True
            self._lock.notify()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every request in flight to end; True when they did (a drain
        after ``begin_drain``)."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.active

    def stop(self, error: str | None = None) -> None:
        """End the loop; requests still waiting or running end "abort", with ``error`` as their message."""
        with self._lock:
            self._stopping = True
            self._stop_error = self._stop_error or error
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        """Requests holding a slot or waiting for one."""
        return sum(r is not None for r in self._owner) + len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._owner)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV pool's blocks held by requests in flight (vLLM's kv_cache_usage_perc)."""
        return self.kv_cache_state()["blocks_used"] / self.pool.total

    def kv_cache_state(self) -> dict:
        """The KV pool now: blocks held by requests in flight, blocks free slots keep for the prefix cache, the
        memory both hold, and preempted requests' KV in host memory."""
        owned = sum(int(self.pool.charged[s]) for s, r in enumerate(self._owner) if r is not None)
        block = self.slots.cache.block_bytes
        return {"blocks_total": self.pool.total, "blocks_used": owned, "blocks_cached": self.pool.used - owned,
                "bytes": self.pool.used * block, "limit_bytes": self.pool.limit_bytes,
                "swapped_bytes": self.pool.swapped_bytes,
                "swapped_requests": sum(r.swapped is not None for r in list(self._waiting))}

    # -- the engine's side ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self.running or self._cancelled or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as exc:  # noqa: BLE001 - a fault outside any one request's step (the steps catch
                # their own, see _fail): the scheduler's state is suspect, so every request in flight ends
                self._fail_all(_one_line(exc))
        self._abort_all("abort", self._stop_error or "the server stopped")

    def _iteration(self) -> None:
        self._drop_cancelled()
        if self._draining:
            self._abort_waiting()
        self._resume_swapped()
        decoded = self._decode()
        self._prefill(self.config.max_num_batched_tokens - decoded)
        self.metrics.iteration(self.running, self.waiting, self.kv_cache_usage)
        self.metrics.kv_cache(self.kv_cache_state())

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, []
            for request in cancelled:
                if request in self._waiting:
                    self._waiting.remove(request)
        for request in cancelled:
            if request.finish_reason is None:
                self._finish(request, request.finish("abort"))
            self._forget_swapped(request)

    def _decode(self) -> int:
        """One token for every decoding request; returns how many tokens that was."""
        speculate = self.speculator is not None and 0 < self._decoding <= self.speculator.config.max_batch
        self._make_room(1 + (self.speculator.initial_k if speculate else 0))
        n = self._decoding
        if n == 0:
            return 0
        if speculate and n <= self.speculator.config.max_batch:
            return self._speculate(n)
        requests = [self._owner[row] for row in range(n)]
        try:
            logits = self._decode_logits(n)
            self._fill_masks(requests)
        except Exception as exc:  # noqa: BLE001 - the batched step failed: it ends the requests it held, only
            self._fail(requests, exc)
            return n
        now = time.monotonic()
        finished = []
        for row, request in enumerate(requests):
            try:
                if self._deliver(request, [request.accept(request.choose(logits[row]), logits[row])], now):
                    finished.append(request)
            except Exception as exc:  # noqa: BLE001 - this row's choice or text failed: this request alone ends
                self._fail([request], exc)
        for request in finished:
            self._release(request)
        return n

    def _decode_logits(self, n: int) -> np.ndarray:
        """The next-token logits [n, vocab] of decoding rows [0, n)."""
        tokens = np.array([[self._owner[row].next_input] for row in range(n)], dtype=np.int64)
        if self.batched_decode:
            return self.slots.step(0, n, tokens)[:, -1, :]
        # each step's logits live in a buffer the next step reuses: copy them out one by one
        return np.stack([self.slots.step(row, row + 1, tokens[row:row + 1])[0, -1, :].copy() for row in range(n)])

    def _fill_masks(self, requests: list[Request]) -> None:
        """Fill the grammar masks of the batch's constrained requests, one row after another on this thread (the
        masker's default; ``parallel=True`` would make it one llguidance call on llguidance's threads), before
        each row's chooser applies its own (runtimes/constraint.py); free rows cost nothing. Only the fill (with
        the closing rule) is timed for ``structured_output_mask_seconds``: applying the masks is not."""
        constraints = [r.constraint for r in requests if r.constraint is not None]
        if not constraints:
            return
        if self._masker is None:
            self._masker = self.engine.grammars.masker()
        start = time.perf_counter()
        self._masker.fill(constraints)
        self.metrics.grammar_masked(time.perf_counter() - start, len(constraints))

    def _speculate(self, n: int) -> int:
        """One speculative round for each of the ``n`` decoding requests (verified in one step where the graph
        takes several rows of several tokens); returns the target tokens computed."""
        requests = [self._owner[row] for row in range(n)]
        if self.multi_row and n > 1:
            try:
                rounds = self.speculator.rounds(self.slots, requests)
            except Exception as exc:  # noqa: BLE001 - the shared step failed: it ends the requests it held, only
                self._fail(requests, exc)
                return n
        else:
            rounds = []
            for request in requests:
                try:
                    rounds.append(self.speculator.round(self.slots, request))
                except Exception as exc:  # noqa: BLE001 - its round touched its slot alone
                    self._fail([request], exc)
                    rounds.append(None)
        computed, finished, now = 0, [], time.monotonic()
        for request, done in zip(requests, rounds):
            if done is None:
                continue
            computed += done[1]
            self.pool.settle(request.slot)  # a rolled-back slot gives its rejected positions' blocks back
            try:
                if self._deliver(request, done[0], now):
                    finished.append(request)
            except Exception as exc:  # noqa: BLE001 - this request's delivery failed: it alone ends
                self._fail([request], exc)
        for request in finished:
            self._release(request)
        return computed

    def _deliver(self, request: Request, outputs: list[Output], now: float) -> bool:
        """Report and emit one iteration's outputs for ``request`` (one per token it kept); True when it
        finished."""
        self.metrics.token(request, False, now - request.last_token_at, len(outputs))
        request.last_token_at = now
        request.emit(outputs[0] if len(outputs) == 1 else Output.merge(outputs))
        return outputs[-1].finish_reason is not None

    def _prefill(self, budget: int) -> int:
        """Spend up to ``budget`` prompt tokens (padded rows count whole); returns how many were computed."""
        spent = 0
        while budget - spent > 0:
            self._admit_prompts(budget - spent)
            rows, width = self._prefill_plan(budget - spent)
            if rows == 0:
                break
            requests = self._prefilling[:rows]
            try:
                self._prefill_rows(requests, width)
            except Exception as exc:  # noqa: BLE001 - the step touched these requests' slots alone
                self._fail(requests, exc)
            spent += rows * width
        return spent

    def _prefill_plan(self, budget: int) -> tuple[int, int]:
        """(rows, width) of the next prefill step over the first prompts in line. One row when the graph takes
        one multi-token row at a time, or when the first needs every position's logits (prompt logprobs)."""
        line = self._prefilling if self.multi_row else self._prefilling[:1]
        if line and line[0].params.prompt_logprobs is not None:
            line = line[:1]
        else:
            line = line[:next((i for i, r in enumerate(line) if r.params.prompt_logprobs is not None), len(line))]
        remaining = [len(r.context_ids()) - r.prefilled for r in line]
        room = [self.capacity - r.prefilled for r in line]
        plan = plan_chunks(remaining, budget, room)
        if plan == (0, 0) and not self._decoding:  # nothing else would move: a one-token chunk it is
            plan = plan_chunks(remaining, budget, room, single_tokens=True)
        return plan

    def _prefill_rows(self, requests: list[Request], width: int) -> None:
        """Prefill up to ``width`` more of each request's prompt in one step (slots right after the decoding ones);
        a prompt that is in chooses its first token from its last logits."""
        start = self._decoding
        for i, request in enumerate(requests):  # into one run of slots, in line order
            self._move(request.slot, start + i)
        chunks = [r.context_ids()[r.prefilled:r.prefilled + width] for r in requests]
        ids = np.zeros((len(chunks), max(len(c) for c in chunks)), dtype=np.int64)
        for row, chunk in enumerate(chunks):
            ids[row, :len(chunk)] = chunk
        scoring = requests[0].params.prompt_logprobs is not None and not requests[0].output_ids
        counts = [len(c) for c in chunks] if self.multi_row else None
        logits = self.slots.step(start, start + len(requests), ids, keep=None if scoring else 1, counts=counts)
        self.metrics.prefill_step(len(requests), sum(len(c) for c in chunks), ids.size)
        if scoring:  # a row of its own (_prefill_plan): every position's logits
            requests[0].book_prompt_logprobs(requests[0].prefilled, logits[0])
        last = np.array(logits[:, -1])  # the buffer is the next step's: moves and first tokens run no step, but copy
        for request, chunk, row_logits in zip(requests, chunks, last):
            request.prefilled += len(chunk)
            if request.prefilled == len(request.context_ids()):
                self._prefilling.remove(request)
                try:
                    self._first_token(request, row_logits)
                except Exception as exc:  # noqa: BLE001 - its choice or delivery failed: this request alone ends
                    self._fail([request], exc)

    def _admit_prompts(self, budget: int) -> None:
        """Admit waiting requests into free slots while the pool holds their prompts, until the prompts part-way
        in fill ``budget`` (one at a time where the graph prefills one row per step)."""
        while self._waiting and (not self._prefilling or self.multi_row):
            if sum(len(r.context_ids()) - r.prefilled for r in self._prefilling) >= budget:
                return
            if any(self._waiting[0] in r.siblings for r in self._prefilling):
                return  # n > 1: the leader's prompt KV is copied to it once the leader's prompt is in
            request = self._admit()
            if request is None:
                return
            self._prefilling.append(request)

    def _admit(self) -> Request | None:
        """The next waiting request, placed in a free slot and charged for its prompt; None when none waits, no
        slot is free, or the KV pool cannot hold its prompt even after taking back what free slots keep."""
        while True:
            with self._lock:
                if not self._waiting or None not in self._owner[self._decoding:] or self._waiting[0].swapped:
                    return None
                request = self._waiting.popleft()
            if self.pool.cache.blocks(len(request.context_ids())) > self.pool.free + self._cached_blocks():
                with self._lock:
                    self._waiting.appendleft(request)  # it waits for memory, first in line
                return None
            try:
                self._place(request)
                return request
            except Exception as exc:  # noqa: BLE001 - setting this request up failed: it alone ends
                self._fail([request], exc)

    def _place(self, request: Request) -> None:
        """Give ``request`` the free slot that holds the longest prefix of its prompt (any free one, emptied, when
        it needs its prompt's logprobs), charge it for the whole prompt, and set up its per-request state."""
        free = self._free_slots()
        if self.prefix is not None and request.params.prompt_logprobs is None:
            slot, request.prefilled = self.prefix.place(self.slots.cache, free, request.context_ids())
            self.metrics.prefix_lookup(len(request.prompt_ids), request.prefilled)
        else:  # prompt logprobs need every position's logits: nothing cached can stand in
            slot, request.prefilled = self._empty_slot(free), 0
        self.pool.settle(slot)
        self._charge(slot, len(request.context_ids()))
        self._take_slot(request, slot)

    def _free_slots(self) -> list[int]:
        return [s for s in range(self._decoding, self.config.max_num_seqs) if self._owner[s] is None]

    def _empty_slot(self, free: list[int]) -> int:
        """The free slot holding least, cleared (its full blocks saved to the prefix store first)."""
        slot = min(free, key=lambda s: int(self.slots.cache.lengths[s]))
        if self.prefix is not None and self.prefix.store is not None:
            self.prefix.store.save(self.slots.cache, slot)
        self.slots.cache.clear(slot)
        self.pool.settle(slot)
        return slot

    def _take_slot(self, request: Request, slot: int) -> None:
        if self.speculator is not None:
            self.speculator.source.clear(slot)  # the slot's draft KV belonged to its last request
        self._owner[slot], request.slot = request, slot
        if request.chooser is None:  # a preempted request resumes with its own state
            request.start(self.tokenizer, self.eos_ids)
            request.scheduled_at = time.monotonic()
            self.metrics.request_scheduled(request)

    def _first_token(self, request: Request, logits: np.ndarray) -> None:
        """The prompt is in: choose the first token from the last position's ``logits`` (or, scoring a prompt
        with max_tokens 0, end with its logprobs); then the request's siblings (n > 1) copy its prompt's KV
        into free slots and choose theirs from the same logits. A preempted request that recomputed its KV
        goes back to decoding instead: its next input is the token it had chosen."""
        if request.output_ids:
            self._start_decoding(request)
            return
        request.first_token_at = request.last_token_at = time.monotonic()
        if request.params.max_tokens == 0:
            output = request.finish("length")
        else:
            self._start_decoding(request)
            output = request.accept(request.choose(logits), logits)
        self.metrics.token(request, True, request.last_token_at - request.arrival, len(output.token_ids))
        request.emit(output)
        self._admit_siblings(request, logits)  # after the first output: it carries the prompt's logprobs
        if output.finish_reason is not None:
            self._release(request)

    def _start_decoding(self, request: Request) -> None:
        self._move(request.slot, self._decoding)
        self._decoding += 1

    def _admit_siblings(self, leader: Request, logits: np.ndarray) -> None:
        """Give each waiting sibling of ``leader`` a free slot holding a copy of the prompt's KV, and its first
        token from the prompt's last logits: n choices cost one prefill. Siblings left without a slot (or KV
        memory) stay in the queue and are prefilled when admitted (the prefix cache may still spare most of it)."""
        with self._lock:
            waiting = [r for r in leader.siblings if r in self._waiting and not r.cancelled]
        for sibling in waiting:
            free = self._free_slots()
            if not free:
                return
            slot = self._empty_slot(free)
            if not self._charge(slot, len(leader.prompt_ids)):
                return
            with self._lock:
                self._waiting.remove(sibling)
            try:
                self.slots.cache.copy_prefix(leader.slot, slot, len(leader.prompt_ids))
                sibling.prefilled = len(sibling.prompt_ids)
                self.metrics.prefix_lookup(sibling.prefilled, sibling.prefilled)  # as vLLM counts n > 1 children
                self._take_slot(sibling, slot)
                self._first_token(sibling, logits)
            except Exception as exc:  # noqa: BLE001 - this sibling's setup or first token failed: it alone ends
                self._fail([sibling], exc)

    def _move(self, slot: int, target: int) -> None:
        """Swap slots ``slot`` and ``target`` (contents, owners, what the pool charges them)."""
        if slot == target:
            return
        self.slots.cache.swap(slot, target)
        if self.speculator is not None:
            self.speculator.source.swap(slot, target)
        pair = [slot, target]
        self.pool.charged[pair] = self.pool.charged[pair[::-1]]
        self._owner[slot], self._owner[target] = self._owner[target], self._owner[slot]
        self._freed_at[slot], self._freed_at[target] = self._freed_at[target], self._freed_at[slot]
        for index in (slot, target):
            if self._owner[index] is not None:
                self._owner[index].slot = index

    def _vacate(self, request: Request) -> None:
        """Take ``request`` off its slot, keeping decoding slots at [0, n); the slot keeps its contents."""
        slot = request.slot
        if slot is not None and slot < self._decoding:
            self._move(slot, self._decoding - 1)
            self._decoding -= 1
            slot = request.slot
        if request in self._prefilling:
            self._prefilling.remove(request)
        if slot is not None:
            self._owner[slot] = None
            self._freed_at[slot] = time.monotonic()
            request.slot = None

    def _release(self, request: Request) -> None:
        """Free a finished request's slot; it keeps its contents for the prefix cache."""
        self._vacate(request)
        self.metrics.request_finished(request)

    def _finish(self, request: Request, output: Output) -> None:
        try:
            request.emit(output)
        except Exception:  # noqa: BLE001 - its client cannot be told (its event loop is gone); the slot is freed
            pass
        self._forget_swapped(request)
        if request.slot is not None or request in self._prefilling:
            self._release(request)
        else:
            self.metrics.request_finished(request)

    def _fail(self, requests: list, exc: Exception) -> None:
        """End ``requests`` with an error after a step that touched them failed: each gets its error output
        (an error event, then [DONE], on a stream), its slot is cleared (it may hold half a step's KV, which the
        prefix cache must not reuse) and freed, and every other request goes on."""
        error = _one_line(exc)
        for request in requests:
            if request is None or (request.finish_reason is not None and request.slot is None):
                continue  # admission found nothing, or it already ended
            if request.slot is not None:  # cleared before it is freed: freeing moves slots around
                self.slots.cache.clear(request.slot)
                self.pool.settle(request.slot)
                if self.speculator is not None:
                    self.speculator.source.clear(request.slot)
            self._finish(request, request.finish("error", error))

    def _abort_waiting(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            self._finish(request, request.finish("abort", "the server is shutting down"))

    def _abort_all(self, reason: str, error: str | None = None) -> None:
        self._abort_waiting()
        for request in [r for r in self._owner if r is not None]:
            self._finish(request, request.finish(reason, error))

    def _fail_all(self, error: str) -> None:
        self._abort_all("error", error)


def _one_line(exc: Exception) -> str:
    """An exception as the one-line error a failed request carries."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
