"""Start and stop a real ``litellm --config ...`` proxy on loopback (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProxyProcess:
    """A LiteLLM proxy subprocess bound to 127.0.0.1 with a fresh strong master key."""

    def __init__(self, config: str | Path, port: Optional[int] = None, log_path: Optional[str | Path] = None,
                 env: Optional[dict[str, str]] = None, cwd: Optional[str | Path] = None) -> None:
        self.config = Path(config).resolve()
        self.port = port or free_port()
        self.master_key = "sk-routenlp-" + secrets.token_hex(16)
        self.log_path = Path(log_path) if log_path else None
        self.extra_env = env or {}
        self.cwd = Path(cwd) if cwd else self.config.parent
        self.process: Optional[subprocess.Popen] = None
        self.start_seconds: Optional[float] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "ProxyProcess":
        litellm_bin = shutil.which("litellm", path=str(Path(sys.executable).parent)) or "litellm"
        env = {**os.environ, "LITELLM_MASTER_KEY": self.master_key, "HF_HUB_OFFLINE": "1",
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false", **self.extra_env}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [litellm_bin, "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with status {self.process.returncode} during start-up"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.base_url + "/health/liveliness", timeout=2) as reply:
                    if reply.status == 200:
                        self.start_seconds = time.perf_counter() - started
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"proxy not healthy after {timeout:.0f}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=timeout)

    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
