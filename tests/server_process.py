"""A real `luffy serve` process for the tests: started on 127.0.0.1 with a port the OS picks, stopped by the test
that started it. Every wait is bounded. The process itself is `luffy bench serve`'s ServeProcess."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from luffy.benchmarks.serve_bench import ServeProcess


class ServerProcess(ServeProcess):
    """``with ServerProcess(artifact, "--max-num-seqs", "4") as server: server.url ...``"""

    def __init__(self, artifact: Path, *args: str, api_key: str | None = None, start_timeout: float = 120.0):
        env = {**os.environ, **({"LUFFY_API_KEY": api_key} if api_key else {})}
        super().__init__(artifact, [str(a) for a in args], env)
        self.api_key, self.start_timeout = api_key, start_timeout

    def __enter__(self) -> "ServerProcess":
        self.start().wait_ready(self.start_timeout)
        return self

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every luffy:* sample without labels' noise: 'name{labels}' -> value."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line.startswith("luffy:"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def metric(self, name: str) -> float:
        return next(v for k, v in self.metrics().items() if k.split("{")[0] == name)

    def rss_bytes(self) -> int:
        return int(self.rss_mib() * 2**20)

    def __exit__(self, *exc) -> None:
        self.stop()
