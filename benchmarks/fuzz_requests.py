"""Malformed and extreme HTTP requests for a `luffy serve` endpoint, from a seeded generator.

The serving fuzzer (tests/test_edge.py) and the soak (benchmarks/soak.py) throw these at a real server while
it serves good requests. The contract for every one: an answer below 500 (a 400-family error in OpenAI's shape,
or a 200 for the extreme-but-valid ones), and no effect on any other request. Each kind below is a way clients
and attackers have broken servers: wrong JSON types, numbers at and past every bound, token ids outside the
vocabulary, bodies that are not UTF-8 or not JSON, lone surrogates, deep nesting, oversized and chunked bodies,
unknown fields, routes and methods.

>>> import random
>>> fuzzed = fuzz_request(random.Random(0), "pydoc", vocab=320)
>>> fuzzed.method in ("GET", "POST", "PUT", "DELETE") and fuzzed.path.startswith("/")
True
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_tokens", "n", "stream", "stop",
          "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "stream_options", "prompt",
          "logprobs", "echo", "logit_bias", "min_p", "repetition_penalty")
WRONG_TYPES = ("10", True, False, None, [], {}, [1], "yes", 1.5, "", {"a": 1}, ["x", 1])
EXTREME_NUMBERS = (0, -1, 1, 2, 1e-40, 1e-320, 1e308, -1e308, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
                   2**64, 10**30, -(10**30), 0.5, 1.0000001, 3)


@dataclass
class FuzzRequest:
    """One request to send: what it is (``kind``), its method, path, headers and body bytes (``chunks``: sent
    with chunked transfer encoding instead of a length)."""

    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})
    chunks: list[bytes] | None = None


def _json(kind: str, payload, path: str = COMPLETIONS) -> FuzzRequest:
    return FuzzRequest(kind, "POST", path, json.dumps(payload).encode())


def _base(rng: random.Random, model: str) -> dict:
    return {"model": model, "prompt": rng.choice(["Return the", "def parse(", "x"]), "max_tokens": rng.randint(1, 4)}


def wrong_type(rng, model, vocab) -> FuzzRequest:
    body = _base(rng, model)
    body[rng.choice(FIELDS)] = rng.choice(WRONG_TYPES)
    return _json("wrong_type", body)


def extreme_number(rng, model, vocab) -> FuzzRequest:
    body = _base(rng, model)
    body[rng.choice(FIELDS[:7] + ("presence_penalty", "frequency_penalty", "logprobs", "min_p",
                                  "repetition_penalty"))] = rng.choice(EXTREME_NUMBERS)
    return _json("extreme_number", body)


def token_ids(rng, model, vocab) -> FuzzRequest:
    body = _base(rng, model)
    bad = rng.choice([vocab, vocab + 1, -1, 2**63, 10**20, 2**31])
    where = rng.choice(["prompt", "stop_token_ids", "stop_token_ids+min_tokens", "logit_bias", "echo"])
    if where == "prompt":
        body["prompt"] = [1, 2, bad]
    elif where == "logit_bias":
        body["logit_bias"] = {str(bad): 1.0}
    elif where == "echo":  # echo decodes the prompt: an id it cannot decode must still be a 400
        body.update(prompt=[[1, 2], [3, bad]], echo=True, logprobs=1)
    else:
        body["stop_token_ids"] = [bad]
        if where.endswith("min_tokens"):
            body["min_tokens"], body["max_tokens"] = 2, 4
    return _json("token_ids", body)


def not_utf8(rng, model, vocab) -> FuzzRequest:
    raw = json.dumps(_base(rng, model)).encode()
    at = raw.index(b'"prompt": "') + 11
    junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    return FuzzRequest("not_utf8", "POST", COMPLETIONS, raw[:at] + junk + raw[at:])


def lone_surrogate(rng, model, vocab) -> FuzzRequest:
    escape = rng.choice(["\\ud800", "\\udfff", "\\ud83d", "x\\udc00y"])
    raw = json.dumps(_base(rng, model))
    path = rng.choice([COMPLETIONS, CHAT])
    if path == CHAT:
        raw = json.dumps({"model": model, "messages": [{"role": "user", "content": "PLACE"}], "max_tokens": 2})
        return FuzzRequest("lone_surrogate", "POST", CHAT, raw.replace("PLACE", escape).encode())
    return FuzzRequest("lone_surrogate", "POST", COMPLETIONS, raw.replace('"prompt": "', '"prompt": "' + escape,
                                                                          1).encode())


def not_json(rng, model, vocab) -> FuzzRequest:
    raw = json.dumps(_base(rng, model))
    body = rng.choice([raw[: rng.randint(0, len(raw) - 1)], raw.replace('"max_tokens"', '"temperature": NaN, "max_tokens"'),
                       raw.replace('"max_tokens"', '"top_p": -Infinity, "max_tokens"'),
                       "[" * 5000 + "]" * 5000, '{"model": ' + "[" * 50000, "", "null", "[]", "42", '"text"',
                       raw.replace('"x"', "'x'"), raw + raw, '{"prompt": "x", "prompt": 1}'])
    return FuzzRequest("not_json", "POST", rng.choice([COMPLETIONS, CHAT]), body.encode())


def oversized(rng, model, vocab, limit: int = 1 << 20) -> FuzzRequest:
    body = _base(rng, model)
    body["prompt"] = "x" * (limit + rng.randint(1, 4096))
    raw = json.dumps(body).encode()
    if rng.random() < 0.5:
        size = rng.choice([4096, 65536])
        return FuzzRequest("oversized_chunked", "POST", COMPLETIONS, chunks=[raw[i:i + size]
                                                                            for i in range(0, len(raw), size)])
    return FuzzRequest("oversized", "POST", COMPLETIONS, raw)


def unknown(rng, model, vocab) -> FuzzRequest:
    choice = rng.randrange(5)
    if choice == 0:
        return _json("unknown_field", {**_base(rng, model), rng.choice(["foo", "best_of_n", "__proto__"]): 1})
    if choice == 1:
        return _json("unknown_model", {**_base(rng, model), "model": rng.choice(["gpt-4", "", model + " "])})
    if choice == 2:
        return FuzzRequest("unknown_route", rng.choice(["GET", "POST"]), rng.choice(["/v1/nope", "/v2/completions",
                                                                                    "/../etc/passwd", "/%ff"]))
    if choice == 3:
        return FuzzRequest("wrong_method", rng.choice(["GET", "PUT", "DELETE"]), rng.choice([COMPLETIONS, CHAT]))
    return FuzzRequest("wrong_content_type", "POST", COMPLETIONS, json.dumps(_base(rng, model)).encode(),
                       {"content-type": rng.choice(["text/plain", "application/x-www-form-urlencoded"])})


def bad_chat(rng, model, vocab) -> FuzzRequest:
    messages = rng.choice([[], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
                           [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                           [{"role": "user"}], "hello", [{"content": "x"}], [None]])
    return _json("bad_chat", {"model": model, "messages": messages, "max_tokens": 2}, CHAT)


def valid_extreme(rng, model, vocab) -> FuzzRequest:
    """Requests at the edges of what is allowed: each must get a 200 and a well-formed answer."""
    body = _base(rng, model)
    body.update(rng.choice([
        {"max_tokens": 1}, {"temperature": 2, "top_k": 1}, {"temperature": 0, "top_p": 1e-9}, {"seed": -(2**63)},
        {"seed": 2**63 - 1, "temperature": 1.5}, {"stop": ["\n", "the", "e", "x" * 50]}, {"top_k": -1},
        {"stream": True, "stream_options": {"include_usage": True}}, {"stop_token_ids": [0, vocab - 1]},
        {"prompt": [vocab - 1, 0, 1]}, {"prompt": "<bos><eos> special text, \u2603 \U0001f600 \u0000"},
        {"ignore_eos": True, "min_tokens": 1},
        {"n": 3, "prompt": ["a", "b"], "logprobs": 20, "seed": 1}, {"echo": True, "logprobs": 0, "max_tokens": 0},
        {"echo": True, "stream": True, "logprobs": 5, "n": 2}, {"logit_bias": {"0": -100, str(vocab - 1): 100}},
        {"repetition_penalty": 10, "presence_penalty": -2, "frequency_penalty": 2, "min_p": 1}]))
    return _json("valid_extreme", body)


KINDS = {f.__name__: f for f in (wrong_type, extreme_number, token_ids, not_utf8, lone_surrogate, not_json,
                                 oversized, unknown, bad_chat, valid_extreme)}


def fuzz_request(rng: random.Random, model: str, vocab: int) -> FuzzRequest:
    """One request of a kind drawn uniformly from ``KINDS`` (its ``kind`` may name the variant, e.g.
    oversized_chunked)."""
    return KINDS[rng.choice(sorted(KINDS))](rng, model, vocab)


def send(client, url: str, request: FuzzRequest, headers: dict | None = None):
    """Send ``request`` with an httpx.Client; returns the response (its body read whole)."""
    content = iter(request.chunks) if request.chunks is not None else request.body
    return client.request(request.method, url + request.path, content=content,
                          headers={**request.headers, **(headers or {})})
