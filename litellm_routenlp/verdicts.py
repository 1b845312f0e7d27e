"""Quality verdicts (issue 13 item 4): durable records, each joined to its decision by request id.

A verdict says whether the answer the client got for one request was acceptable.  Two sources write
them: the shadow audit (``source: "audit"``, :mod:`shadow_audit`) and clients (``source: "client"``)
through the proxy's authenticated route ``POST /routenlp/verdicts`` (:func:`mount_verdict_route`) or
the ``routenlp verdicts --file X.jsonl`` CLI.  There is no open route: the route runs LiteLLM's own
``user_api_key_auth`` dependency, so it takes a LiteLLM key like every other proxy route.

Why a separate JSONL next to the decision log and not a field of the decision record: a verdict
arrives after the record is on disk (seconds for the audit, days for a person), and the decision log
is append-only.  The verdict file uses the same writer (:class:`decision_log.DecisionLog`: one write
on an ``O_APPEND`` descriptor, ``fsync`` before the caller is told it is stored), and its lines are
what ``routenlp report --verdicts`` / ``routenlp check --verdicts`` already read
(``coopt.ops_report.read_verdicts``: ``{request_id, acceptable, source}``, plus fields it ignores).

Joining.  A verdict names the plugin's request id (the ``x-routenlp-request-id`` header, the decision
record's ``request_id``).  :class:`DecisionIndex` reads the decision log incrementally (new lines
only, from the last offset) and a request id it does not find there is refused with
:class:`VerdictError` -- a verdict that joins nothing would count in no report.  One verdict per
request and source: a second one is refused too (a retried upload must not double-count).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

# FastAPI (LiteLLM's proxy server) resolves the route's annotations from this module's globals
from fastapi import Request
from fastapi.responses import JSONResponse

from . import prometheus_metrics
from .decision_log import DecisionLog

SOURCES = ("audit", "client")
ROUTE_PATH = "/routenlp/verdicts"
MAX_NOTE = 500


class VerdictError(ValueError):
    """A verdict that cannot be stored; the message says why (unknown request id, bad field...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Decided:
    """What a verdict needs to know of its decision."""

    task: Optional[str]
    final_tier: Optional[str]
    policy: Optional[str]


@dataclass(frozen=True)
class VerdictRecord:
    request_id: str
    acceptable: bool
    source: str
    ts: str
    task: Optional[str]
    final_tier: Optional[str]
    note: Optional[str] = None
    score: Optional[float] = None        # audit: the task metric of the answer against the top tier's
    metric: Optional[str] = None         # audit: which metric gave the score
    reference_tier: Optional[str] = None  # audit: the tier whose answer was the reference

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "verdict", **{k: v for k, v in asdict(self).items() if v is not None or k == "task"}}


class DecisionIndex:
    """request id -> :class:`Decided`, read from the decision log incrementally."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._offset = 0
        self._known: dict[str, Decided] = {}
        self._lock = threading.Lock()

    def _read_new(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # a line being written: read it next time
                self._offset += len(raw)
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("request_id"), str):
                    continue
                if record.get("outcome", "answered") == "answered":
                    policy = record.get("policy")
                    self._known[record["request_id"]] = Decided(
                        task=record.get("task"), final_tier=record.get("final_tier"),
                        policy=policy.get("name") if isinstance(policy, dict) else None)
                else:  # failed, or retracted after the answer: nothing the client kept to judge
                    self._known.pop(record["request_id"], None)

    def get(self, request_id: str) -> Optional[Decided]:
        with self._lock:
            found = self._known.get(request_id)
            if found is None:
                self._read_new()
                found = self._known.get(request_id)
            return found


class VerdictStore:
    """Validates verdicts against the decision log and appends them durably to the verdict log."""

    def __init__(self, verdicts_path: str | os.PathLike[str], decision_log_path: str | os.PathLike[str],
                 fsync: bool = True) -> None:
        self.path = Path(verdicts_path)
        self.decisions = DecisionIndex(decision_log_path)
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        if self.path.exists():
            for record in _read_lines(self.path):
                self._seen.add((str(record.get("request_id")), str(record.get("source"))))
        self.log = DecisionLog(self.path, fsync=fsync)

    def prepare(self, request_id: Any, acceptable: Any, source: str, note: Any = None,
                where: str = "verdict", **audit: Any) -> VerdictRecord:
        """The record to store, or :class:`VerdictError` naming ``where`` and the field."""
        if source not in SOURCES:
            raise VerdictError(f"{where}: source must be one of {SOURCES}, got {source!r}")
        if not isinstance(request_id, str) or not request_id.strip():
            raise VerdictError(f"{where}: `request_id` must be the x-routenlp-request-id of a request (a string)")
        if not isinstance(acceptable, bool):
            raise VerdictError(f"{where}: `acceptable` must be true or false, got {acceptable!r}")
        if note is not None and not isinstance(note, str):
            raise VerdictError(f"{where}: `note` must be a string")
        decided = self.decisions.get(request_id)
        if decided is None:
            raise VerdictError(f"{where}: unknown request id {request_id!r}: no answered request with this "
                               "x-routenlp-request-id in the decision log", status=404)
        with self._lock:
            if (request_id, source) in self._seen:
                raise VerdictError(f"{where}: request {request_id!r} already has a {source} verdict", status=409)
        return VerdictRecord(request_id=request_id, acceptable=acceptable, source=source,
                             ts=datetime.now(timezone.utc).isoformat(), task=decided.task,
                             final_tier=decided.final_tier, note=None if note is None else note[:MAX_NOTE], **audit)

    def _claim(self, record: VerdictRecord) -> None:
        with self._lock:
            key = (record.request_id, record.source)
            if key in self._seen:
                raise VerdictError(f"request {record.request_id!r} already has a {record.source} verdict", status=409)
            self._seen.add(key)

    def _count(self, record: VerdictRecord, tasks: Iterable[str]) -> None:
        task = record.task if record.task in set(tasks) else "unknown"
        prometheus_metrics.observe_verdict(task, record.acceptable, record.source)

    async def store_async(self, record: VerdictRecord, tasks: Iterable[str] = ()) -> VerdictRecord:
        """Append (fsync'd) and count; returns once the record is on disk."""
        self._claim(record)
        try:
            await self.log.append_async(record.to_dict())
        except Exception:
            self._unclaim(record)
            raise
        self._count(record, tasks)
        return record

    def store(self, record: VerdictRecord, tasks: Iterable[str] = ()) -> VerdictRecord:
        self._claim(record)
        try:
            self.log.append(record.to_dict())
        except Exception:
            self._unclaim(record)
            raise
        self._count(record, tasks)
        return record

    def _unclaim(self, record: VerdictRecord) -> None:
        """A verdict that did not reach the disk may be sent again."""
        with self._lock:
            self._seen.discard((record.request_id, record.source))

    def close(self) -> None:
        self.log.close()


def _read_lines(path: Path) -> Iterable[dict[str, Any]]:
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                yield record


def read_client_file(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(file:line, object)`` per non-blank line of a client's verdict JSONL; a bad line is an error
    naming it (the whole file is checked before anything is stored)."""
    out = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise VerdictError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(item, dict):
                raise VerdictError(f"{where}: expected an object {{request_id, acceptable, note?}}")
            unknown = sorted(set(item) - {"request_id", "acceptable", "note"})
            if unknown:
                raise VerdictError(f"{where}: unknown field(s) {unknown}; a verdict has request_id, acceptable, note")
            out.append((where, item))
    return out


# ------------------------------------------------------------------------------------------ the route
def mount_verdict_route(callback: Any) -> bool:
    """Add ``POST /routenlp/verdicts`` to the running LiteLLM proxy's FastAPI app, behind LiteLLM's
    ``user_api_key_auth`` (a LiteLLM key is required; a virtual key needs the route in its
    ``allowed_routes``, LiteLLM's rule for non-LLM routes).  Returns False outside a proxy."""
    import sys

    proxy_server = sys.modules.get("litellm.proxy.proxy_server")
    app = getattr(proxy_server, "app", None) if proxy_server else None
    if app is None:
        return False
    if any(getattr(route, "path", None) == ROUTE_PATH for route in app.routes):
        return True
    from fastapi import Depends
    from litellm.proxy.auth.user_api_key_auth import user_api_key_auth

    async def post_verdicts(request: Request, _key: Any = Depends(user_api_key_auth)) -> JSONResponse:
        try:
            body = await request.json()
        except Exception:
            return _error(400, "body must be JSON: {\"verdicts\": [{\"request_id\", \"acceptable\", \"note\"?}]} "
                               "or one such object")
        items = body.get("verdicts") if isinstance(body, dict) and "verdicts" in body else [body]
        if not isinstance(items, list) or not items:
            return _error(400, "`verdicts` must be a non-empty list")
        try:
            # the join may read new decision-log lines: off the event loop
            records = [await asyncio.to_thread(callback.prepare_client_verdict, item, f"verdicts[{index}]")
                       for index, item in enumerate(items)]
            stored = [await callback.store_verdict(record) for record in records]
        except VerdictError as error:
            return _error(error.status, str(error))
        return JSONResponse({"stored": [r.to_dict() for r in stored]})

    app.add_api_route(ROUTE_PATH, post_verdicts, methods=["POST"], tags=["routenlp"])
    return True


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": str(status)}}, status_code=status)
