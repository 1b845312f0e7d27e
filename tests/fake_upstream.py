"""One fake OpenAI-compatible upstream for the tests that need a tier they can slow down, break or count.

A real HTTP server on 127.0.0.1 (port 0: the kernel picks a free one, so no race with other tests)
that serves every tier on one port: tier ``k`` is ``http://127.0.0.1:<port>/t<k>/v1`` (point a
deployment's ``api_base`` there). Per tier the test sets, while the proxy is running:

* ``delay_s[k]``: seconds to wait before answering (a slow tier, tests/test_sla_routing.py);
* ``mode[k]``: ``"ok"`` (an answer), ``"error"`` (HTTP 500 whose message quotes the prompt, as some
  providers do), ``"hang"`` (never answers until :meth:`close`: a timeout);
* ``logprob``: the log-probability of every answer token, or ``None`` for an answer without logprobs
  (a provider like Anthropic or Ollama);

and reads ``calls[k]`` (requests received per tier) or :attr:`requests` (all tiers).

``FakeUpstream(listening=False)`` binds the port but does not listen: connecting is refused, as with a
tier that is down, until :meth:`serve` or :meth:`listen`.

``http.server`` from the standard library: the tests need a few canned answers, not a framework, and
its thread-per-request server lets one request hang while the others are answered.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TIERS = (1, 2, 3, 4)
MODES = ("ok", "error", "hang")
_TIER_PATH = re.compile(r"^/t(\d+)/v1/chat/completions/?$")


class _Server(ThreadingHTTPServer):
    """One handler thread per request, daemonic so a hanging request never blocks the test's exit."""

    daemon_threads = True
    block_on_close = False


class FakeUpstream:
    """Loopback OpenAI-compatible chat completions for tiers ``/t<k>/v1``; see the module docstring."""

    def __init__(self, *, logprob: float | None = -0.001, tokens: tuple[str, ...] = ("card", "_arrival"),
                 listening: bool = True, hang_s: float = 60.0) -> None:
        self.logprob = logprob
        self.tokens = tokens
        self.delay_s: dict[int, float] = {k: 0.0 for k in TIERS}
        self.mode: dict[int, str] = {k: "ok" for k in TIERS}
        self.calls: Counter[int] = Counter({k: 0 for k in TIERS})
        self.hang_s = hang_s
        self._release = threading.Event()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._server = _Server(("127.0.0.1", 0), self._handler(), bind_and_activate=False)
        try:
            self._server.server_bind()
        except OSError:
            self._server.server_close()
            raise
        self.port: int = self._server.server_address[1]
        if listening:
            self.listen()

    @property
    def requests(self) -> int:
        """Requests received on every tier together."""
        return sum(self.calls.values())

    def api_base(self, tier: int) -> str:
        """The ``api_base`` of tier ``tier``'s deployment."""
        return f"http://127.0.0.1:{self.port}/t{tier}/v1"

    def listen(self) -> None:
        """Start accepting connections (once; later calls do nothing)."""
        if self._thread is not None:
            return
        self._server.server_activate()
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fake-upstream-{self.port}",
                                        daemon=True)
        self._thread.start()

    def serve(self, tier: int, mode: str) -> None:
        """Tier ``tier`` answers in ``mode`` from now on, and the server listens."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode[tier] = mode
        self.listen()

    def close(self) -> None:
        """Release hanging requests, stop serving and free the port."""
        self._release.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    # ------------------------------------------------------------------------------------- answers
    def _answer(self, tier: int) -> dict:
        content = "".join(self.tokens)
        logprobs = None if self.logprob is None else {"content": [
            {"token": token, "logprob": self.logprob, "top_logprobs": []} for token in self.tokens]}
        return {"id": f"chatcmpl-fake-t{tier}-{next(self._ids)}", "object": "chat.completion",
                "created": int(time.time()), "model": f"fake-t{tier}",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": len(self.tokens),
                          "total_tokens": 12 + len(self.tokens)}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_POST(self):  # noqa: N802 (http.server naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                match = _TIER_PATH.match(self.path)
                if match is None or int(match.group(1)) not in TIERS:
                    return self._send(404, {"error": {"message": f"no tier at {self.path}", "type": "not_found"}})
                tier = int(match.group(1))
                with upstream._lock:
                    upstream.calls[tier] += 1
                time.sleep(upstream.delay_s[tier])
                mode = upstream.mode[tier]
                if mode == "hang":  # no answer at all: the client's timeout fires; the connection closes later
                    upstream._release.wait(upstream.hang_s)
                    return
                if mode == "error":
                    try:
                        messages = json.loads(raw or b"{}").get("messages") or [{}]
                        quoted = str(messages[-1].get("content"))[:200]
                    except (ValueError, AttributeError):
                        quoted = ""
                    return self._send(500, {"error": {"message": f"internal error while processing: {quoted}",
                                                      "type": "server_error"}})
                self._send(200, upstream._answer(tier))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
