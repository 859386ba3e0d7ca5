"""`llama-vision serve` in a subprocess on 127.0.0.1, for the tests that talk to a real server.

A module of its own (not conftest.py) so that test files can import it: `make test` collects tests/ and notebooks/
together, and each has a conftest.py.
"""

import os


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningServer:
    """`llama-vision serve` on 127.0.0.1 in a subprocess; `url` is its OpenAI base URL."""

    def __init__(self, log_path, *extra: str, env: dict | None = None) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        command = [sys.executable, "-m", "llama_vision_helpers.cli", "serve", "--model", "tiny-random",
                   "--port", str(self.port), *extra]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> "RunningServer":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{open(self.log_path).read()[-3000:]}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"the server did not start in {timeout:.0f} s:\n{open(self.log_path).read()[-3000:]}")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url.removesuffix("/v1") + "/health", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except Exception:  # noqa: BLE001
            self.process.kill()
        self.log.close()
