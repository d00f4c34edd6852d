"""Grammars for structured outputs: what a request asks for (a JSON schema, a regex, a list of choices, a Lark or
GBNF grammar) compiled once by llguidance and cached by content.

llguidance (no dependencies; xgrammar's wheel needs torch, transformers and triton, which a serving machine must
not) builds its tokenizer from the artifact's tokenizer.json text alone (``LLTokenizer(json_text)``; its ``hf``
helper would import transformers). A compiled grammar is a pristine ``LLMatcher``: each request gets a
``deep_copy`` of it (microseconds), so the costly part (parsing the schema, building the lexer) runs once per
(kind, spec, strict). Compiling runs on a small thread pool, never on the scheduler's thread, with a time limit;
llguidance's own fuel limits bound the work a hostile schema can cause.

What a grammar lets grow without end is bounded, as vLLM and llguidance do: ``strict`` JSON schemas are compact
(llguidance's ``whitespace_flexible`` off); other JSON allows at most ``MAX_WHITESPACE`` characters of whitespace
at each place JSON allows it (llguidance's ``whitespace_pattern``, matched once per place).
Strings with no ``maxLength`` are not capped: the constraint closes them when the token budget runs short
(runtimes/json_closing.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass

import llguidance

from ..errors import UsageError
from .constraint import BatchMasker, GrammarConstraint
from .json_closing import OUTSIDE, TokenTable, closing_need

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_WHITESPACE = 32  # per place in non-strict JSON: pretty-printing a few levels deep fits
_BOUNDED_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{1,{MAX_WHITESPACE}}}"


class GrammarError(UsageError):
    """A schema, regex or grammar llguidance refuses, or one past a limit; the message names the construct."""


@dataclass(frozen=True)
class GrammarLimits:
    """``max_spec_bytes``: the longest spec (its JSON text); ``compile_timeout``: seconds a compile may take;
    ``cache_size``: compiled grammars kept (least recently used go first)."""

    max_spec_bytes: int = 64 << 10
    compile_timeout: float = 10.0
    cache_size: int = 128

    def __post_init__(self):
        if self.max_spec_bytes < 1 or self.compile_timeout <= 0 or self.cache_size < 1:
            raise UsageError(f"grammar limits must be positive, got {self}")


@dataclass(frozen=True)
class GrammarSpec:
    """What one request constrains its output to. ``spec`` is a JSON schema (dict or JSON text) for
    ``json_schema``, ignored for ``json_object``, a regex string, a list of strings for ``choice``, or a Lark
    / GBNF grammar text for ``grammar``.

    >>> GrammarSpec("choice", ["yes", "no"]).key
    ('choice', '["yes", "no"]', False, False)
    """

    kind: str
    spec: object = None
    strict: bool = False
    closes_json: bool | None = None  # the output is JSON, closed near the budget; default: the json kinds

    @property
    def key(self) -> tuple[str, str, bool, bool]:
        """The cache key: kind, the spec as canonical text, strict, closes_json."""
        if self.kind not in KINDS:
            raise GrammarError(f"unknown structured output kind {self.kind!r}; luffy takes {', '.join(KINDS)}")
        return self.kind, _canonical_text(self.kind, self.spec), self.strict, self.is_json

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_schema", "json_object") if self.closes_json is None else self.closes_json


def _canonical_text(kind: str, spec) -> str:
    if kind == "json_object":
        return ""
    if kind in ("regex", "grammar"):
        if not isinstance(spec, str) or not spec:
            raise GrammarError(f"{kind}: expected a non-empty string, got {type(spec).__name__}")
        return spec
    if kind == "choice":
        if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise GrammarError("choice: expected a non-empty list of non-empty strings")
        return json.dumps(list(spec), ensure_ascii=False)
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise GrammarError(f"json_schema: not valid JSON ({exc})") from None
    if not isinstance(spec, (dict, bool)):
        raise GrammarError(f"json_schema: a schema is a JSON object, got {type(spec).__name__}")
    return json.dumps(spec, ensure_ascii=False)  # key order kept: llguidance emits properties in it


def llguidance_grammar(kind: str, text: str, strict: bool) -> str:
    """The llguidance grammar for a canonical spec (``GrammarSpec.key``'s text)."""
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))
    if kind == "grammar":
        try:
            return llguidance.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark
        except ValueError as exc:
            raise GrammarError(f"grammar: {one_line(str(exc))}") from None
    schema = exact_dates(json.loads(text) if text else {"type": "object"})
    whitespace = {"whitespace_flexible": False} if strict else {"whitespace_pattern": _BOUNDED_WHITESPACE}
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=whitespace)


# RFC 3339 dates and times as validators read them. llguidance's own formats also take a leap second at any
# minute (12:01:60) and February 29 of any year, which RFC 3339's rules (and jsonschema's checker) refuse; these
# patterns take neither (so no leap second at all) and years 0001-9999.
_MONTH_DAY = r"((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))"
_YEAR = r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = rf"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
DATE_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}[Tt]{_TIME}$"}


def exact_dates(schema):
    """``schema`` with each ``format`` of date, time or date-time that has no ``pattern`` beside it replaced by
    the equivalent RFC 3339 pattern (DATE_PATTERNS)."""
    if isinstance(schema, list):
        return [exact_dates(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: exact_dates(v) for k, v in schema.items()}
    if isinstance(schema.get("format"), str) and schema["format"] in DATE_PATTERNS and "pattern" not in schema:
        out["pattern"] = DATE_PATTERNS[out.pop("format")]
    return out


def one_line(message: str) -> str:
    """llguidance's multi-line errors (a regex with a caret under it, a grammar excerpt) as one line."""
    kept = []
    for line in message.strip().splitlines():
        text = line.strip()
        if not text or set(text) <= {"^", " "} or text.split("|", 1)[0].strip().isdigit():
            continue
        kept.append(text)
    return " ".join(kept)


@dataclass
class CompiledGrammar:
    """A pristine matcher for one spec, and for JSON the tokens closing the document takes from its start (the
    closing rule's first measure, runtimes/json_closing.py)."""

    spec: GrammarSpec
    matcher: object  # llguidance.LLMatcher in its initial state: copied, never advanced
    closing_need: int | None
    seconds: float


class GrammarCompiler:
    """Compiles grammars for one tokenizer and caches them by content; hands out per-request constraints.

    ``listener(seconds, hit)``, when set, hears every lookup: the compile time of a miss (0 for a hit).

    >>> compiler = GrammarCompiler(open("build/tiny/tokenizer.json").read(), vocab=320, eos_ids=[257])  # doctest: +SKIP
    >>> compiled = compiler.compile(GrammarSpec("regex", r"[0-9]{3}"))                                  # doctest: +SKIP
    >>> constraint = compiler.constraint(compiled, max_tokens=16)                                       # doctest: +SKIP
    """

    def __init__(self, tokenizer_json: str, vocab: int, eos_ids, limits: GrammarLimits | None = None,
                 source: str = "tokenizer.json"):
        self.limits = limits or GrammarLimits()
        eos = [int(t) for t in eos_ids] if eos_ids else None
        try:
            self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError for what it cannot read
            raise UsageError(f"{source}: llguidance cannot build a tokenizer from it ({one_line(str(exc))})") from None
        self.vocab = vocab
        self.tokens = TokenTable(self.tokenizer, vocab)
        self._executor = None  # llguidance's thread pool, made only for a parallel BatchMasker
        self.listener = None
        self._cache: collections.OrderedDict[tuple, concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        # compiles run here, never on the scheduler's thread; two workers: one slow schema cannot hold up the rest
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="luffy-grammar")

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for ``spec``, from the cache or compiled now (waits at most the compile
        timeout); GrammarError names what llguidance refused or the limit passed."""
        key = spec.key
        size = len(key[1].encode())
        if size > self.limits.max_spec_bytes:
            raise GrammarError(f"{spec.kind} of {size} bytes exceeds the limit of {self.limits.max_spec_bytes} bytes")
        with self._lock:
            future = self._cache.get(key)
            hit = future is not None
            if hit:
                self._cache.move_to_end(key)
            else:
                future = self._cache[key] = self._pool.submit(self._build, spec, key)
                while len(self._cache) > self.limits.cache_size:
                    self._cache.popitem(last=False)
        try:
            compiled = future.result(timeout=self.limits.compile_timeout)
        except concurrent.futures.TimeoutError:
            self._forget(key, future)
            raise GrammarError(f"{spec.kind}: compiling took longer than the limit of "
                               f"{self.limits.compile_timeout:g} s") from None
        except GrammarError:
            self._forget(key, future)
            raise
        if self.listener is not None:
            self.listener(0.0 if hit else compiled.seconds, hit)
        return compiled

    def constraint(self, compiled: CompiledGrammar, max_tokens: int) -> GrammarConstraint:
        """A fresh constraint for one request of at most ``max_tokens`` output tokens."""
        return GrammarConstraint(compiled.matcher.deep_copy(), self.tokens, max_tokens, compiled.closing_need)

    def constraints(self, spec: GrammarSpec, rows: int, max_tokens: int) -> list[GrammarConstraint]:
        """``rows`` fresh constraints for ``spec`` (compiled or from the cache), each for ``max_tokens`` tokens."""
        compiled = self.compile(spec)
        return [self.constraint(compiled, max_tokens) for _ in range(rows)]

    def masker(self, parallel: bool = False) -> BatchMasker:
        """What fills a decode batch's masks (one after another unless ``parallel``: see BatchMasker)."""
        if parallel and self._executor is None:
            self._executor = llguidance.LLExecutor()
        return BatchMasker(self._executor, parallel)

    def _build(self, spec: GrammarSpec, key: tuple) -> CompiledGrammar:
        start = time.perf_counter()
        try:
            grammar = llguidance_grammar(*key[:3])
        except ValueError as exc:
            raise GrammarError(f"{spec.kind}: {one_line(str(exc))}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.kind}: {one_line(matcher.get_error())}")
        need = closing_need(matcher, self.tokens, OUTSIDE) if spec.is_json else None
        return CompiledGrammar(spec, matcher, need, time.perf_counter() - start)

    def _forget(self, key: tuple, future) -> None:
        with self._lock:
            if self._cache.get(key) is future:
                del self._cache[key]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
