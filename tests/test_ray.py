"""`luffy serve --replicas/--min-replicas/--max-replicas` on a real local Ray cluster, driven through the real
server process with OpenAI's client and httpx (tests/server_process.py), llama-pydoc as in test_serving.py.

One Ray application serves the whole module (a cluster start costs ~20 s on 2 cores), so the tests run in file
order and each first brings the deployment to the state it needs, every wait bounded:
  1. under load it scales from 1 replica to 2, and requests through both equal Engine.generate alone;
  2. the same prompt prefix lands on the replica that holds it, and spills to the other when that one is full;
  3. a SIGKILLed replica: requests on it end at once with a 5xx, the rest succeed, Ray Serve replaces it;
  4. idle, it scales back to 1;
  5. SIGTERM lets a stream in flight finish, then stops the application and every process of the Ray cluster.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install 'luffy[serve]') is not installed")
pytest.importorskip("openai", reason="the openai client is not installed")

from luffy.benchmarks.ray_serve import Traffic, descendants  # noqa: E402

from .server_process import ServerProcess  # noqa: E402
from .test_serving import PROMPTS, alone  # noqa: E402

KEY = "ray-test-key"
# four "system prompts" of 4+ full 16-token blocks each (the byte tokenizer: about a token per character)
SYSTEMS = [f"# System {i}: " + text * 3 for i, text in enumerate(
    ["You document Python functions in one line. ", "You write unit tests for parsers and lexers. ",
     "You explain shell commands to beginners. ", "You review pull requests for style only. "])]


def _needs_ray():
    pytest.importorskip("ray.serve.request_router", reason="the ray extra (pip install 'luffy[ray]') is not installed")


@pytest.fixture(scope="module")
def cluster(pydoc):
    """`luffy serve` on a local Ray cluster: 1-2 replicas of 2 slots each, one ORT thread per replica."""
    _needs_ray()
    server = ServerProcess(pydoc.path, "--min-replicas", "1", "--max-replicas", "2", "--threads", "1",
                           "--max-num-seqs", "2", "--upscale-delay", "1", "--downscale-delay", "8",
                           "--drain-timeout", "20", "--served-model-name", "pydoc", api_key=KEY, start_timeout=180)
    with server:
        yield server


def _post(server, prompt, max_tokens, timeout=60.0, **extra) -> httpx.Response:
    body = {"model": "pydoc", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=timeout)


def _running(server) -> int:
    response = httpx.get(f"{server.url}/health", timeout=10)
    return response.json().get("replicas", {}).get("RUNNING", 0) if response.status_code == 200 else 0


def _wait(condition, timeout: float, what: str, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def Load(server, clients: int, max_tokens: int = 300):
    """``clients`` threads sending long requests back to back (at most 90 s); ``.seen``: (time, status, replica)."""
    return Traffic(lambda i: _post(server, PROMPTS[i % len(PROMPTS)], max_tokens, ignore_eos=True), clients, 90.0)


def _two_replicas(server):
    if _running(server) < 2:
        with Load(server, clients=6):
            _wait(lambda: _running(server) >= 2, 90, "a second replica under load")


def test_without_the_ray_extra_serve_replicas_says_which_extra_in_one_line(pydoc):
    code = ("import sys; sys.modules['ray'] = None; from luffy.cli.main import main; "
            f"sys.exit(main(['serve', {str(pydoc.path)!r}, '--replicas', '2']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 8, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'luffy[ray]'" in lines[0], done.stderr


def test_scales_up_under_load_and_both_replicas_answer_like_generate_alone(cluster, engine):
    assert _running(cluster) == 1
    expected = {p: alone(engine, p, 24, eos_token_id=None)[0] for p in PROMPTS[:8]}
    start = time.monotonic()
    with Load(cluster, clients=6) as load:
        _wait(lambda: _running(cluster) >= 2, 90, "a second replica under load")
        scaled = time.monotonic() - start
        client = cluster.client()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda p: client.completions.with_raw_response.create(
                model="pydoc", prompt=p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}), expected))
    got = {p: r.parse().choices[0].text for p, r in zip(expected, replies)}
    assert got == expected
    names = {r.headers["x-luffy-replica"] for r in replies} | {name for _, _, name in load.seen[-40:] if name}
    assert len(names) == 2, (names, scaled)
    assert all(status == 200 for _, status, _ in load.seen), sorted({s for _, s, _ in load.seen})
    # the single-process server's routes, errors, auth and streaming, through the ingress
    assert httpx.post(f"{cluster.url}/v1/completions", json={"model": "pydoc", "prompt": "a"}).status_code == 401
    wrong = _post(cluster, "Return the", 4, model_typo=1)
    assert wrong.status_code == 400 and wrong.json()["error"]["type"] == "invalid_request_error"
    too_long = _post(cluster, "Return the", 5000)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    chunks = list(client.chat.completions.create(model="pydoc", messages=[{"role": "user", "content": "Open the"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # the API surface's routes and fields reach the replicas through the ingress too
    ids = engine.tokenizer.encode("Return the").ids
    tokens = httpx.post(f"{cluster.url}/tokenize", headers=cluster.headers, json={"prompt": "Return the"}).json()
    assert tokens["tokens"] == ids and client.models.retrieve("pydoc").id == "pydoc"
    scored = client.completions.create(model="pydoc", prompt=["Return the", "Open the"], n=2, max_tokens=4,
                                       temperature=0, echo=True, logprobs=1, extra_body={"ignore_eos": True})
    greedy = alone(engine, "Return the", 4, eos_token_id=None)[0]
    assert [c.text for c in scored.choices][:2] == ["Return the" + greedy] * 2
    assert len(scored.choices) == 4 and scored.choices[0].logprobs.token_logprobs[0] is None
    # the edge of serving/edge.py at the ingress (router, chunked body limit) and in the replicas (strict JSON)
    edge = [httpx.get(f"{cluster.url}/v1/nope", headers=cluster.headers),
            httpx.post(f"{cluster.url}/v1/completions", headers=cluster.headers,
                       content=iter([b'{"prompt": "' + b"x" * 65536] * 20)),
            httpx.post(f"{cluster.url}/v1/completions", headers=cluster.headers,
                       content=b'{"model": "pydoc", "prompt": "\\ud800 \ud800"}')]
    assert [r.status_code for r in edge] == [404, 413, 400]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in edge)
    assert "lone UTF-16 surrogate" in edge[2].json()["error"]["message"]
    text = _wait(lambda: (t := httpx.get(f"{cluster.url}/metrics", headers=cluster.headers, timeout=10).text)
                 .count("luffy:generation_tokens_total{") >= 2 and t, 10, "both replicas in /metrics")
    assert all(f'replica="{name}"' in text for name in names)
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # one valid exposition, merged
    tokens = {s.labels["replica"]: s.value for s in families["luffy:generation_tokens"].samples}
    assert set(tokens) == names and all(v > 0 for v in tokens.values())


def test_a_prefix_goes_to_the_replica_that_holds_it_until_that_one_is_full(cluster):
    _two_replicas(cluster)
    homes = {}
    for system in SYSTEMS[:2]:
        first = _post(cluster, system + "def f(", 4)
        assert first.status_code == 200, first.text
        homes[system] = first.headers["x-luffy-replica"]
        for i in range(3):  # sequential: every replica idle, so only the prefix decides
            again = _post(cluster, system + f"def g{i}(", 4)
            assert again.headers["x-luffy-replica"] == homes[system], (i, homes)
    # six at once with one prefix: the holder takes what its 2 slots hold, the other replica the rest
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        burst = list(pool.map(lambda i: _post(cluster, SYSTEMS[0] + f"x{i} = ", 200, ignore_eos=True), range(6)))
    assert all(r.status_code == 200 for r in burst)
    assert len({r.headers["x-luffy-replica"] for r in burst}) == 2


def _together(n: int, request) -> list:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(request, range(n)))


def test_a_killed_replica_fails_its_requests_at_once_and_is_replaced(cluster):
    _two_replicas(cluster)
    before = {r.headers["x-luffy-replica"] for r in _together(4, lambda i: _post(cluster, PROMPTS[i], 100,
                                                                                   ignore_eos=True))}
    replicas = [pid for pid, cmd in descendants(cluster.proc.pid).items() if "ServeReplica:luffy:LuffyReplica" in cmd]
    assert len(replicas) == 2 and len(before) == 2, (replicas, before)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        def long_request(i):
            response = _post(cluster, PROMPTS[i] * 8, 800, ignore_eos=True)
            return response, time.monotonic()
        futures = [pool.submit(long_request, i) for i in range(4)]
        time.sleep(0.6)  # the four are running: each replica's 2 slots hold 2 of them
        killed_at = time.monotonic()
        os.kill(replicas[0], signal.SIGKILL)
        with Load(cluster, clients=2, max_tokens=200) as load:  # traffic on: the autoscaler keeps wanting 2
            results = [f.result(timeout=120) for f in futures]
            failed = [(r, end - killed_at) for r, end in results if r.status_code >= 500]
            served = [r for r, _ in results if r.status_code == 200]
            assert len(failed) == 2 and len(served) == 2, [(r.status_code, r.text[:80]) for r, _ in results]
            assert all(r.json()["error"]["type"] == "server_error" for r, _ in failed)
            assert max(after for _, after in failed) < 15, failed  # ended promptly after the kill, nothing hung
            survivor = {r.headers["x-luffy-replica"] for r in served}
            assert len(survivor) == 1 and survivor <= before
            new = _wait(lambda: {name for _, status, name in load.seen if status == 200} - before, 90,
                        "a replacement replica serving")
    assert new and len(replicas) == 2
    assert _wait(lambda: _running(cluster) == 2, 30, "two replicas running")


def test_scales_back_down_when_idle(cluster):
    _wait(lambda: _running(cluster) == 1, 60, "back to one replica once idle")
    assert _post(cluster, "Return the", 4).status_code == 200


def test_sigterm_drains_then_stops_the_application_and_every_ray_process(cluster):
    started = descendants(cluster.proc.pid)
    assert any("raylet" in cmd for cmd in started.values()) and any("gcs_server" in cmd for cmd in started.values())
    body = {"model": "pydoc", "prompt": "Return the", "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True}
    lines = []
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, headers=cluster.headers,
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and not lines:  # the stream is under way: now SIGTERM
                cluster.proc.send_signal(signal.SIGTERM)
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]" and sum('"text"' in line for line in lines) == 300  # drained, not cut
    assert cluster.proc.wait(timeout=90) == 0, "".join(cluster.log)[-2000:]  # (a second SIGTERM: stop at once)
    _wait(lambda: not [p for p in started if Path(f"/proc/{p}").exists() and _alive(p)], 30,
          f"every Ray process stopped: {[started[p] for p in started if _alive(p)]}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
