"""A real `luffy serve` process for the tests: started on 127.0.0.1 with a port the OS picks, stopped by the test
that started it. Every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


class ServerProcess:
    """``with ServerProcess(artifact, "--max-num-seqs", "4") as server: server.url ...``"""

    def __init__(self, artifact: Path, *args: str, api_key: str | None = None, start_timeout: float = 120.0):
        self.artifact, self.args, self.api_key, self.start_timeout = artifact, args, api_key, start_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log: list[str] = []

    def __enter__(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "luffy", "serve", str(self.artifact), "--host", "127.0.0.1", "--port", "0", *self.args]
        env = {**os.environ, **({"LUFFY_API_KEY": self.api_key} if self.api_key else {})}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        threading.Thread(target=self._read_log, daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"luffy serve did not start: {''.join(self.log)[-2000:]}")
            time.sleep(0.02)
        self.wait_ready(deadline)
        return self

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                self.url = match.group(1)

    def wait_ready(self, deadline: float) -> list[int]:
        """Poll /health until 200; returns every status seen (503 while the model loads)."""
        seen = []
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{self.url}/health", timeout=5).status_code
            except httpx.TransportError:
                status = 0
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.01)
        raise AssertionError(f"/health never answered 200: {seen[-5:]}, log: {''.join(self.log)[-2000:]}")

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
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
