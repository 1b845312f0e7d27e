"""Step 1 of Algorithm 1: read what happened -- one record per client request, every tier it tried.

Three sources describe the same requests:

- **our decision log** (``litellm_routenlp.decision_log``, JSONL): already one record per request,
  with the router's choice and every attempt (tier, uncertainty, threshold, cost, escalated);
- **LiteLLM's ``LiteLLM_SpendLogs`` table** (PostgreSQL, when the proxy has a database): one row per
  *call*.  The client's call and each escalation call made by the plugin are separate rows; an
  escalation row carries ``metadata.spend_logs_metadata = {routenlp_parent_call_id, routenlp_tier,
  routenlp_previous_uncertainty}`` and is joined to the row whose ``litellm_call_id`` is that parent id;
- **the JSON of ``GET /spend/logs``** (or ``/spend/logs/v2``): the same rows as the table, serialised
  by the proxy (``metadata`` as an object or as a JSON string, times as ISO strings).

Whatever the source, the result is a list of :class:`RequestRecord`: the request id (the plugin's
own uuid4, the decision log's ``request_id``, which the plugin also writes into the client call's
``spend_logs_metadata.routenlp_request_id`` and into each escalation's ``routenlp_parent_request_id``;
logs written before that carry LiteLLM's ``litellm_call_id`` there, and are read the old way), task,
query text, and the calls in path order.  The client's own ``x-litellm-call-id`` is only
``client_call_id``: a client can choose it, so two requests may share it.

Which links are trusted.  A spend row says it is an escalation of another request through
``spend_logs_metadata``, which a client could fill in on its own call (the plugin removes client-sent
``routenlp*`` keys and ``routenlp-*`` tags at the door since issue 11, but older rows, or rows of a
proxy without the plugin, may carry forged ones).  Given the decision log (``decisions=``), the
join trusts a link only when the decision record of the parent lists that row's call id among its
attempts (the plugin chooses each escalation's call id and records it); a row whose link is not
listed is read as a client call of its own.  Decision records older than that list no call ids:
a link to one is trusted when the row's tier is one of the record's escalated-to tiers, once per
tier.  Without ``decisions`` nothing can be verified and links are taken as written; the CLI
(``routenlp coopt read-logs``) and the co-optimisation loop always pass the decision log.  A request *escalated* when it has more than one call; its cheapest call is
where the portfolio failed.

What a spend-log row can tell depends on the proxy's settings: the query text and the task come from
the stored request body (``general_settings.store_prompts_in_spend_logs: true``) and the answers from
the ``response`` column (same switch).  Without them, :func:`merge_sources` fills the gaps from the
decision log (same request id).  The tier of the client's own call is not in the row: it is looked up
from the deployment id (``model_info.id`` -> ``model_info.routenlp_tier`` of the proxy config,
:func:`tier_names_by_model_id`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from routenlp_core.decision_record import DecisionRecord, number_or_none
from litellm_routenlp.config import read_yaml
from litellm_routenlp.decision_log import read_records
from litellm_routenlp.request_fields import query_text

SPEND_LOGS_TABLE = "LiteLLM_SpendLogs"
PARENT_KEY = "routenlp_parent_call_id"
TIER_KEY = "routenlp_tier"
PREVIOUS_U_KEY = "routenlp_previous_uncertainty"
REQUEST_ID_KEY = "routenlp_request_id"                 # the client call's row: the plugin's request id
PARENT_REQUEST_KEY = "routenlp_parent_request_id"      # an escalation row: the plugin id of its request
# Columns read from the table; the ones only newer LiteLLM schemas have are added when present.
_BASE_COLUMNS = ("request_id", "call_type", "spend", "prompt_tokens", "completion_tokens", "startTime", "endTime",
                 "model", "model_id", "model_group", "metadata", "messages", "response", "status")
_OPTIONAL_COLUMNS = ("litellm_call_id", "proxy_server_request")


@dataclass(frozen=True)
class TierCall:
    """One tier's answer to a request: a decision-log attempt or one spend-log row."""

    tier: Optional[str]                 # "T1".. ; None when the source cannot tell
    uncertainty: Optional[float] = None
    cost_usd: float = 0.0
    escalated: bool = False             # this answer was judged too uncertain and the next tier asked
    model_id: Optional[str] = None
    call_id: Optional[str] = None       # spend-log request_id of the call (decision log: None)
    output: Optional[str] = None        # the answer text, when the source stores it
    error: Optional[str] = None


@dataclass(frozen=True)
class RequestRecord:
    """One client request with every tier it tried, cheapest first."""

    request_id: str
    task: Optional[str]
    prompt: Optional[str]
    calls: tuple[TierCall, ...]
    source: str                         # decision_log | spend_logs_db | spend_logs_json | merged
    routed_tier: Optional[str] = None   # the router's choice (decision log only)
    ts: Optional[str] = None
    client_call_id: Optional[str] = None  # the client's x-litellm-call-id (not unique: clients choose it)

    @property
    def path(self) -> list[str]:
        return [call.tier or "?" for call in self.calls if call.error is None]

    @property
    def escalated(self) -> bool:
        """More than one tier answered: the first answer was not trusted."""
        return len([call for call in self.calls if call.error is None]) > 1

    @property
    def failed_tier(self) -> Optional[str]:
        """The tier whose answer was escalated first (where the cheaper portfolio failed)."""
        for call in self.calls:
            if call.escalated and call.error is None:
                return call.tier
        return self.calls[0].tier if self.escalated else None

    @property
    def final_tier(self) -> Optional[str]:
        answered = [call for call in self.calls if call.error is None]
        return answered[-1].tier if answered else None

    @property
    def total_cost_usd(self) -> float:
        return float(sum(call.cost_usd for call in self.calls))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["calls"] = [asdict(call) for call in self.calls]
        return out

    @classmethod
    def from_decision(cls, record: DecisionRecord) -> "RequestRecord":
        """The decision log's view of a request (its attempts as calls, the router's choice)."""
        calls = tuple(TierCall(tier=a.tier_name, uncertainty=a.uncertainty, cost_usd=a.cost_usd, escalated=a.escalated,
                               model_id=a.model_id, call_id=a.call_id, error=a.error) for a in record.attempts)
        return cls(request_id=record.request_id, task=record.task, prompt=record.prompt, calls=calls,
                   source="decision_log", routed_tier=record.router.routed_tier if record.router else None,
                   ts=record.ts, client_call_id=record.client_call_id)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RequestRecord":
        calls = tuple(TierCall(**call) for call in raw.get("calls") or [])
        return cls(request_id=str(raw["request_id"]), task=raw.get("task"), prompt=raw.get("prompt"), calls=calls,
                   source=str(raw.get("source", "unknown")), routed_tier=raw.get("routed_tier"), ts=raw.get("ts"),
                   client_call_id=raw.get("client_call_id"))


# --------------------------------------------------------------------------------------------------
# (a) the decision log


def read_decision_log(path: str | os.PathLike[str]) -> list[RequestRecord]:
    """Every complete request of a RouteNLP decision log, any record version (failed requests without
    attempts are skipped, as is a request retracted by a later ``failed_after_answer`` record)."""
    out: dict[str, RequestRecord] = {}
    retracted: set[str] = set()
    for record in read_records(path):
        if record.outcome == "failed_after_answer":
            retracted.add(record.request_id)  # answered, then lost on the way out: not served
            continue
        if record.attempts:
            out.setdefault(record.request_id, RequestRecord.from_decision(record))
    return [record for request_id, record in out.items() if request_id not in retracted]


# --------------------------------------------------------------------------------------------------
# (b) the LiteLLM_SpendLogs table and (c) the /spend/logs JSON: rows, then the join


def read_spend_logs_postgres(dsn: str, since: Optional[datetime] = None, model_group: Optional[str] = None,
                             limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Rows of ``LiteLLM_SpendLogs`` (oldest first), as dicts keyed by column name.

    ``dsn`` is a libpq connection string or URL (LiteLLM's ``DATABASE_URL``).  ``model_group`` keeps the
    rows of one model alias (the plugin's escalation calls use the same alias, so nothing is lost).
    Only reads; psycopg (3) is imported here, not by the proxy.
    """
    import psycopg  # local: only the PostgreSQL source needs it (train extra); the JSON sources do not
    from psycopg import sql
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, row_factory=dict_row) as connection:
        present = {row["column_name"] for row in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (SPEND_LOGS_TABLE,))}
        if not present:
            raise ValueError(f"table {SPEND_LOGS_TABLE} not found in the database ({_redact(dsn)}); "
                             "is this LiteLLM's database, and has the proxy run its migrations?")
        columns = [c for c in _BASE_COLUMNS if c in present] + [c for c in _OPTIONAL_COLUMNS if c in present]
        conditions, params = [], []
        if since is not None:
            conditions.append(sql.SQL('"startTime" >= %s'))
            params.append(since)
        if model_group is not None:
            conditions.append(sql.SQL("model_group = %s"))
            params.append(model_group)
        query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                                                    sql.Identifier(SPEND_LOGS_TABLE))
        if conditions:
            query = query + sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions)
        query = query + sql.SQL(' ORDER BY "startTime", request_id')
        if limit is not None:
            query = query + sql.SQL(" LIMIT %s")
            params.append(int(limit))
        return [dict(row) for row in connection.execute(query, params)]


def read_spend_logs_json(source: str | os.PathLike[str] | Any) -> list[dict[str, Any]]:
    """Rows from a ``GET /spend/logs`` answer: a file path, or the already decoded JSON.

    Accepts a list of rows (``/spend/logs``) or an object with ``data`` (``/spend/logs/v2``) or
    ``response`` (LiteLLM's ``LiteLLM_SpendLogs_ResponseObject``).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    else:
        document = source
    if isinstance(document, Mapping):
        for key in ("data", "response", "logs"):
            if isinstance(document.get(key), list):
                document = document[key]
                break
    if not isinstance(document, list):
        raise ValueError("spend logs JSON: expected a list of rows, or an object with a `data` list")
    rows = [row for row in document if isinstance(row, Mapping)]
    if len(rows) != len(document):
        raise ValueError("spend logs JSON: every row must be an object")
    return [dict(row) for row in rows]


def tier_names_by_model_id(config_path: str | os.PathLike[str]) -> dict[str, str]:
    """``model_info.id`` -> ``T<routenlp_tier>`` for the deployments of a proxy config."""
    out = {}
    for deployment in read_yaml(Path(config_path)).get("model_list") or []:
        info = deployment.get("model_info") or {}
        if info.get("id") is not None and isinstance(info.get("routenlp_tier"), int):
            out[str(info["id"])] = f"T{info['routenlp_tier']}"
    return out


class _LinkVerifier:
    """Which (parent request, child row) links the decision log vouches for (module docstring)."""

    def __init__(self, decisions: Sequence[RequestRecord]) -> None:
        self.call_ids: dict[str, set[str]] = {}
        self.legacy_tiers: dict[str, list[str]] = {}
        self.by_client_call: dict[str, list[str]] = {}
        for record in decisions:
            listed = {call.call_id for call in record.calls[1:] if call.call_id}
            if listed or record.client_call_id is not None:
                self.call_ids[record.request_id] = listed
            else:  # written before decision records listed call ids
                self.legacy_tiers[record.request_id] = [c.tier for c in record.calls[1:] if c.tier and c.error is None]
            if record.client_call_id:
                self.by_client_call.setdefault(record.client_call_id, []).append(record.request_id)

    def parent_of(self, row: Mapping[str, Any]) -> Optional[str]:
        """The request id the row is a verified escalation of, or None."""
        extra = row["spend_logs_metadata"]
        parent = extra.get(PARENT_REQUEST_KEY)
        candidates = [str(parent)] if parent else []
        legacy_parent = extra.get(PARENT_KEY)
        if legacy_parent:
            candidates += [str(legacy_parent)] + self.by_client_call.get(str(legacy_parent), [])
        for request_id in candidates:
            if row["call_id"] in self.call_ids.get(request_id, ()):
                return request_id
            tiers = self.legacy_tiers.get(request_id)
            tier = extra.get(TIER_KEY)
            if tiers is not None and tier in tiers:
                tiers.remove(tier)  # each escalated-to tier vouches for one row
                return request_id
        return None


def join_spend_logs(rows: Iterable[Mapping[str, Any]], tier_by_model_id: Optional[Mapping[str, str]] = None,
                    model_group: Optional[str] = None, source: str = "spend_logs",
                    decisions: Optional[Sequence[RequestRecord]] = None) -> list[RequestRecord]:
    """Join spend-log rows into one :class:`RequestRecord` per client request.

    A row with a parent link in ``spend_logs_metadata`` (``routenlp_parent_request_id``, or in older
    rows ``routenlp_parent_call_id``) is an escalation call of that parent -- when ``decisions`` (the
    decision log's records) vouch for it, see the module docstring; a link they do not vouch for is
    ignored and the row read as a client call.  All other rows are client calls, keyed by the
    plugin's ``routenlp_request_id`` (older rows: their call id).  Within a request the calls are
    ordered by tier (then start time); each call's uncertainty is the ``routenlp_previous_uncertainty``
    the next hop recorded (the last answer's is unknown here), and every call but the last counts as
    escalated.  Escalation rows whose parent is missing (e.g. cut off by a time window) are grouped
    under the parent id anyway.  ``model_group`` keeps one alias.
    """
    tier_by_model_id = dict(tier_by_model_id or {})
    verifier = _LinkVerifier(decisions) if decisions is not None else None
    parents: dict[str, dict[str, Any]] = {}
    children: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []
    for raw in rows:
        row = _normalise_row(raw)
        if model_group is not None and row["model_group"] not in (None, "", model_group):
            continue
        extra = row["spend_logs_metadata"]
        claimed = extra.get(PARENT_REQUEST_KEY) or extra.get(PARENT_KEY)
        if claimed and verifier is not None:
            parent_id = verifier.parent_of(row)
        else:
            parent_id = str(claimed) if claimed else None
        if parent_id:
            children.setdefault(parent_id, []).append(row)
            if parent_id not in order:
                order.append(parent_id)
        else:
            key = str(extra.get(REQUEST_ID_KEY) or row["call_id"])
            if claimed:  # an unverified link: the row is a client call, and its link metadata is not its own
                row = {**row, "spend_logs_metadata": {k: v for k, v in extra.items()
                                                      if k not in (PARENT_KEY, PARENT_REQUEST_KEY, TIER_KEY,
                                                                   PREVIOUS_U_KEY)}}
                key = str(row["call_id"]) if key in parents else key
            parents[key] = row
            if key not in order:
                order.append(key)
    out = []
    for request_id in order:
        parent = parents.get(request_id)
        hops = sorted(children.get(request_id, []), key=lambda r: (_tier_number(r["spend_logs_metadata"].get(TIER_KEY)),
                                                                   r["start"] or ""))
        members = ([parent] if parent is not None else []) + hops
        calls = []
        for position, row in enumerate(members):
            following = members[position + 1] if position + 1 < len(members) else None
            tier = row["spend_logs_metadata"].get(TIER_KEY) or tier_by_model_id.get(str(row["model_id"] or ""))
            calls.append(TierCall(
                tier=tier, cost_usd=row["spend"], escalated=following is not None, model_id=row["model_id"] or None,
                call_id=row["call_id"], output=row["output"], error=row["error"],
                uncertainty=number_or_none(following["spend_logs_metadata"].get(PREVIOUS_U_KEY)) if following else None))
        anchor = parent or members[0]
        task = next((r["task"] for r in members if r["task"]), None)
        prompt = next((r["prompt"] for r in members if r["prompt"]), None)
        out.append(RequestRecord(request_id=request_id, task=task, prompt=prompt, calls=tuple(calls), source=source,
                                 ts=anchor["start"], client_call_id=parent["call_id"] if parent else None))
    return out


def merge_sources(primary: Sequence[RequestRecord], *others: Sequence[RequestRecord]) -> list[RequestRecord]:
    """One record per request id across sources: ``primary`` wins, the others fill its gaps.

    A field missing from the primary record (prompt, task, a call's answer text or uncertainty) is
    taken from the first other source that has it; requests found only in another source are appended.
    """
    by_id: dict[str, RequestRecord] = {}
    for record in primary:
        by_id[record.request_id] = record
    for source in others:
        for record in source:
            known = by_id.get(record.request_id)
            if known is None:
                by_id[record.request_id] = record
                continue
            calls = list(known.calls)
            for index, call in enumerate(calls):
                match = next((c for c in record.calls if c.tier == call.tier), None)
                if match is not None:
                    calls[index] = replace(call, output=call.output if call.output is not None else match.output,
                                           uncertainty=call.uncertainty if call.uncertainty is not None
                                           else match.uncertainty,
                                           call_id=call.call_id or match.call_id)
            by_id[record.request_id] = replace(known, task=known.task or record.task,
                                               prompt=known.prompt or record.prompt, calls=tuple(calls),
                                               source="merged" if known.source != record.source else known.source)
    return list(by_id.values())


def escalations(records: Iterable[RequestRecord], tasks: Optional[Iterable[str]] = None) -> list[RequestRecord]:
    """The escalated requests (optionally of some tasks) that carry a task and the query text."""
    wanted = None if tasks is None else set(tasks)
    return [r for r in records if r.escalated and r.task and r.prompt and (wanted is None or r.task in wanted)]


def summarise(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Counts per task: requests, escalations, escalations by failed tier, and what lacks a prompt."""
    out: dict[str, Any] = {}
    for record in records:
        entry = out.setdefault(record.task or "-", {"requests": 0, "escalated": 0, "failed_tier": {},
                                                   "without_prompt": 0, "cost_usd": 0.0})
        entry["requests"] += 1
        entry["cost_usd"] += record.total_cost_usd
        entry["without_prompt"] += int(not record.prompt)
        if record.escalated:
            entry["escalated"] += 1
            tier = record.failed_tier or "?"
            entry["failed_tier"][tier] = entry["failed_tier"].get(tier, 0) + 1
    return out


def write_requests(records: Iterable[RequestRecord], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_requests(path: str | os.PathLike[str]) -> list[RequestRecord]:
    with open(path, encoding="utf-8") as handle:
        return [RequestRecord.from_dict(json.loads(line)) for line in handle if line.strip()]


# --------------------------------------------------------------------------------------------------
# helpers


def _tier_number(name: Any) -> int:
    try:
        return int(str(name).lstrip("T"))
    except ValueError:
        return 1 << 30


def _json(value: Any) -> Any:
    """JSONB columns arrive decoded from psycopg, as strings from some serialisers: decode those."""
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _redact(dsn: str) -> str:
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return " ".join(part for part in dsn.split() if not part.startswith("password="))


def _answer_text(response: Any) -> Optional[str]:
    response = _json(response)
    if not isinstance(response, Mapping):
        return None
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        message = choices[0].get("message") or {}
        content = message.get("content") if isinstance(message, Mapping) else None
        return content if isinstance(content, str) else None
    return None


def _request_body(row: Mapping[str, Any]) -> Mapping[str, Any]:
    body = _json(row.get("proxy_server_request"))
    if isinstance(body, Mapping) and isinstance(body.get("body"), Mapping):  # {"url":..., "body": {...}}
        body = body["body"]
    return body if isinstance(body, Mapping) else {}


def _normalise_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the join needs, whatever the serialisation (DB row or /spend/logs JSON)."""
    metadata = _json(raw.get("metadata"))
    metadata = metadata if isinstance(metadata, Mapping) else {}
    extra = _json(metadata.get("spend_logs_metadata"))
    extra = extra if isinstance(extra, Mapping) else {}
    body = _request_body(raw)
    body_metadata = body.get("metadata") if isinstance(body.get("metadata"), Mapping) else {}
    messages = _json(raw.get("messages"))
    prompt = query_text(messages) if isinstance(messages, list) else ""
    prompt = prompt or query_text(body.get("messages"))
    requester = body_metadata.get("requester_metadata")
    task = extra.get("task") or body_metadata.get("task") or \
        (requester.get("task") if isinstance(requester, Mapping) else None)
    call_id = raw.get("litellm_call_id") or metadata.get("litellm_call_id") or raw.get("request_id")
    start = raw.get("startTime")
    status = raw.get("status") or metadata.get("status")
    return {
        "request_id": str(raw.get("request_id")), "call_id": str(call_id), "spend_logs_metadata": extra,
        "model_id": raw.get("model_id"), "model_group": raw.get("model_group"),
        "spend": number_or_none(raw.get("spend")) or 0.0, "start": start.isoformat() if hasattr(start, "isoformat") else start,
        "output": _answer_text(raw.get("response")), "prompt": prompt or None, "task": task or None,
        "error": f"status {status}" if status not in (None, "", "success") else None,
    }
