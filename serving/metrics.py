"""The server's Prometheus metrics, named as vLLM names them (``vllm:x`` -> ``luffy:x``) so dashboards carry over.

Histograms use vLLM's bucket boundaries. Every metric carries ``model_name``; a scale-out deployment adds
``replica``. Each server owns its registry (no process-global state), and the scheduler thread reports
into it through the methods below.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
GRAMMAR_COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GRAMMAR_MASK_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Prometheus collectors for one served model; implements the scheduler's metrics interface."""

    def __init__(self, model_name: str, labels: dict[str, str] | None = None):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, **(labels or {})}
        names = list(self.labels)

        def make(kind, name, doc, **kw):
            return kind(f"luffy:{name}", doc, names, registry=self.registry, **kw).labels(**self.labels)

        self.running = make(Gauge, "num_requests_running", "Requests holding a KV slot (prefilling or decoding).")
        self.waiting = make(Gauge, "num_requests_waiting", "Requests waiting for a KV slot.")
        self.kv_usage = make(Gauge, "kv_cache_usage_perc", "Fraction of the KV pool's blocks held by requests in "
                             "flight, 0-1.")
        self.kv_bytes = make(Gauge, "kv_cache_bytes", "Memory the KV cache holds now: requests' blocks and those free "
                             "slots keep for the prefix cache.")
        self.kv_limit = make(Gauge, "kv_cache_limit_bytes", "The KV pool's memory limit (--kv-cache-memory).")
        self.kv_blocks = Gauge("luffy:kv_cache_blocks", "KV pool blocks by state (used: held by requests in flight; "
                               "cached: kept by free slots for the prefix cache; free).", names + ["state"],
                               registry=self.registry)
        self.swapped = make(Gauge, "num_requests_swapped", "Preempted requests whose KV waits in host memory.")
        self.swapped_bytes = make(Gauge, "kv_cache_swapped_bytes", "Host memory holding preempted requests' KV.")
        self.prefill_steps = make(Counter, "prefill_steps", "Prefill steps (one or more prompts' chunks each).")
        self.prefill_rows = make(Counter, "prefill_rows", "Prompt chunks prefilled (rows of prefill steps).")
        self.prefill_padding = make(Counter, "prefill_padding_tokens", "Right padding computed in multi-row prefill "
                                    "steps (rows shorter than the step's widest).")
        self.preemptions = make(Counter, "num_preemptions", "Requests preempted for KV memory (swapped or to "
                                "recompute).")
        # a counter as well as the gauges: a request swapped for a moment between two scrapes still shows
        self.swaps = make(Counter, "num_preemptions_swapped", "Preempted requests whose KV went to host memory "
                          "(--swap-space; the others recompute).")
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt tokens of finished and running requests.")
        self.generation_tokens = make(Counter, "generation_tokens", "Tokens generated.")
        self.iterations = make(Counter, "scheduler_iterations", "Scheduler iterations (one batched decode each).")
        self.ttft = make(Histogram, "time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS)
        self.itl = make(Histogram, "inter_token_latency_seconds", "Time between two tokens of a request.",
                        buckets=ITL_BUCKETS)
        # vLLM keeps its older name for the same per-step gaps (dashboards built on it still work), and adds TPOT
        # as `vllm bench serve` defines it: per request, (last token - first token) / (output tokens - 1)
        self.tpot = make(Histogram, "time_per_output_token_seconds", "Time between two tokens of a request (vLLM's "
                         "older name of inter_token_latency_seconds).", buckets=ITL_BUCKETS)
        self.request_tpot = make(Histogram, "request_time_per_output_token_seconds", "Per finished request: time "
                                 "after its first token over its further tokens (TPOT).", buckets=ITL_BUCKETS)
        self.e2e = make(Histogram, "e2e_request_latency_seconds", "Arrival to last token.", buckets=REQUEST_BUCKETS)
        self.queue_time = make(Histogram, "request_queue_time_seconds", "Arrival to getting a KV slot.",
                               buckets=REQUEST_BUCKETS)
        self.prefix_queries = make(Counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = make(Counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled).")
        self.spec_drafts = make(Counter, "spec_decode_num_drafts", "Speculative rounds that proposed tokens.")
        self.spec_draft_tokens = make(Counter, "spec_decode_num_draft_tokens", "Tokens proposed by the draft or lookup.")
        self.spec_accepted = make(Counter, "spec_decode_num_accepted_tokens", "Proposed tokens the target accepted.")
        self.grammar_compile = make(Histogram, "structured_output_compile_seconds", "Compile time of a grammar not in "
                                    "the cache (what a request with a new schema waits).", buckets=GRAMMAR_COMPILE_BUCKETS)
        self.grammar_hits = make(Counter, "structured_output_cache_hits", "Grammars found compiled in the cache.")
        self.grammar_mask = make(Histogram, "structured_output_mask_seconds", "Time to fill a decode step's grammar "
                                 "masks (all constrained rows, one after another; applying them is not timed).",
                                 buckets=GRAMMAR_MASK_BUCKETS)
        self.grammar_rows = make(Counter, "structured_output_masked_rows", "Rows masked by a grammar in decode steps.")
        self.grammar_outcomes = Counter("luffy:structured_output_requests", "Finished constrained requests by how "
                                        "their output stands (complete, closed_early, incomplete).",
                                        names + ["structured_output"], registry=self.registry)
        self.success = Counter("luffy:request_success", "Finished requests by finish reason.",
                               names + ["finished_reason"], registry=self.registry)
        self.http_errors = Counter("luffy:http_errors", "Requests refused with an HTTP error, by status.",
                                   names + ["status"], registry=self.registry)

    # -- the scheduler's interface ----------------------------------------------------------------------
    def request_scheduled(self, request) -> None:
        self.queue_time.observe(request.scheduled_at - request.arrival)
        self.prompt_tokens.inc(len(request.prompt_ids))

    def token(self, request, first: bool, seconds: float, count: int = 1) -> None:
        """``count`` tokens arrived for ``request`` after ``seconds`` (vLLM: one latency per iteration)."""
        self.generation_tokens.inc(count)
        if first:
            self.ttft.observe(seconds)
        else:
            self.itl.observe(seconds)
            self.tpot.observe(seconds)

    def prefix_lookup(self, queried: int, hit: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def speculated(self, proposed: int, accepted: int) -> None:
        self.spec_drafts.inc()
        self.spec_draft_tokens.inc(proposed)
        self.spec_accepted.inc(accepted)

    def grammar_compiled(self, seconds: float, hit: bool) -> None:
        """The grammar compiler's listener (runtimes/grammar.py): a lookup's compile time, or a cache hit."""
        if hit:
            self.grammar_hits.inc()
        else:
            self.grammar_compile.observe(seconds)

    def grammar_masked(self, seconds: float, rows: int) -> None:
        self.grammar_mask.observe(seconds)
        self.grammar_rows.inc(rows)

    def request_finished(self, request) -> None:
        outcome = request.grammar_state() if request.finish_reason in ("stop", "length") else None
        if outcome is not None:
            self.grammar_outcomes.labels(**self.labels, structured_output=outcome).inc()
        if request.finish_reason in ("stop", "length"):
            self.e2e.observe((request.last_token_at or request.arrival) - request.arrival)
            if len(request.output_ids) > 1 and request.first_token_at is not None:
                self.request_tpot.observe((request.last_token_at - request.first_token_at) /
                                          (len(request.output_ids) - 1))
        self.success.labels(**self.labels, finished_reason=request.finish_reason or "abort").inc()

    def iteration(self, running: int, waiting: int, kv_usage: float) -> None:
        self.gauges(running, waiting, kv_usage)
        self.iterations.inc()

    def gauges(self, running: int, waiting: int, kv_usage: float) -> None:
        """The scheduler's state now (also refreshed at each scrape, so an idle server's gauges are current)."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def prefill_step(self, rows: int, tokens: int, padded: int) -> None:
        self.prefill_steps.inc()
        self.prefill_rows.inc(rows)
        self.prefill_padding.inc(padded - tokens)

    def preempted(self, request, swapped: bool) -> None:
        self.preemptions.inc()
        if swapped:
            self.swaps.inc()

    def kv_cache(self, state: dict) -> None:
        """The KV pool now (the scheduler's kv_cache_state), after every iteration."""
        self.kv_bytes.set(state["bytes"])
        self.kv_limit.set(state["limit_bytes"])
        free = state["blocks_total"] - state["blocks_used"] - state["blocks_cached"]
        for name, value in (("used", state["blocks_used"]), ("cached", state["blocks_cached"]), ("free", free)):
            self.kv_blocks.labels(**self.labels, state=name).set(value)
        self.swapped.set(state["swapped_requests"])
        self.swapped_bytes.set(state["swapped_bytes"])

    def http_error(self, status: int) -> None:
        self.http_errors.labels(**self.labels, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_exposition(texts: list[str]) -> str:
    """Several registries' text exposition as one (Ray Serve: every replica's metrics in one scrape): each
    family's HELP and TYPE once, then its samples from every text (the ``replica`` label keeps them apart)."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for text in texts:
        current = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                current = line.split(" ", 3)[2]
                headers, _ = families.setdefault(current, ([], []))
                if line not in headers:
                    headers.append(line)
            elif line and current is not None:
                families[current][1].append(line)
    return "".join("\n".join(headers + samples) + "\n" for headers, samples in families.values())
