"""Co-optimisation step 1: reading what happened from the decision log, LiteLLM's SpendLogs table and /spend/logs.

The spend-log rows are produced by LiteLLM itself: real ``litellm.Router`` calls (mock deployments, one
per tier, the escalation made the way the plugin makes it: pinned tier + ``spend_logs_metadata``) are
turned into rows by LiteLLM's own ``get_logging_payload``, the function the proxy's database writer
calls.  The PostgreSQL test starts a throwaway server (initdb/pg_ctl, 127.0.0.1, a free port, a temp
dir), creates the schema with every migration shipped in ``litellm-proxy-extras``, inserts the rows
and reads them back with :func:`coopt.logs.read_spend_logs_postgres`.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

import pytest

from coopt.logs import (join_spend_logs, merge_sources, read_decision_log, read_spend_logs_json,
                        read_spend_logs_postgres, tier_names_by_model_id)
from litellm_routenlp.decision_log import DecisionLog

TIER_OF = {"routenlp-t1": "T1", "routenlp-t3": "T3", "routenlp-t4": "T4"}


# --------------------------------------------------------------------------------------------------
# (a) decision log


def _attempt(tier: int, u, escalated: bool, cost: float) -> dict:
    return {"tier": tier, "tier_name": f"T{tier}", "model_id": f"routenlp-t{tier}", "uncertainty": u,
            "threshold": 0.5, "cost_usd": cost, "latency_ms": 3.0, "escalated": escalated, "error": None}


def test_decision_log_reader_returns_one_record_per_request_with_its_path(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "decisions.jsonl")
    log.append({"request_id": "a", "task": "banking77", "router": {"routed_tier": "T1"}, "prompt": "lost my card",
                "attempts": [_attempt(1, 0.8, True, 1e-4), _attempt(3, 0.7, True, 6e-3), _attempt(4, 0.0, False, 6e-2)],
                "final_tier": "T4", "total_cost_usd": 0.0661})
    log.append({"request_id": "b", "task": "clinc150", "router": {"routed_tier": "T1"}, "prompt": "hi",
                "attempts": [_attempt(1, 0.1, False, 1e-4)], "final_tier": "T1"})
    log.append({"request_id": "c", "task": "banking77", "router": {}, "attempts": [], "final_tier": None,
                "error": "BadRequestError: ..."})  # a failed request: nothing was answered
    log.close()
    with open(tmp_path / "decisions.jsonl", "a") as handle:
        handle.write('{"request_id": "torn", "attempts": [')  # a crash mid-write

    records = read_decision_log(tmp_path / "decisions.jsonl")

    assert [r.request_id for r in records] == ["a", "b"]
    a, b = records
    assert a.path == ["T1", "T3", "T4"] and a.escalated and a.failed_tier == "T1" and a.final_tier == "T4"
    assert [c.uncertainty for c in a.calls] == [0.8, 0.7, 0.0]
    assert a.total_cost_usd == pytest.approx(0.0661)
    assert a.prompt == "lost my card" and a.routed_tier == "T1"
    assert not b.escalated and b.failed_tier is None


# --------------------------------------------------------------------------------------------------
# Spend-log rows written by LiteLLM's own code


QUERIES = {  # request -> (query, task, tiers in the order the cascade asked them, uncertainties)
    "req-escalated-once": ("I lost my card yesterday", "banking77", [1, 4], [0.81]),
    "req-escalated-twice": ("what is the meaning of life", "clinc150", [1, 3, 4], [0.9, 0.7]),
    "req-plain": ("top up failed", "banking77", [1], []),
}
ANSWERS = {1: "card_lost", 3: "oos", 4: "lost_or_stolen_card"}


@pytest.fixture(scope="module")
def spend_rows() -> list[dict]:
    """Rows exactly as the proxy's database writer builds them (``get_logging_payload``)."""
    import litellm
    from litellm.integrations.custom_logger import CustomLogger
    from litellm.proxy.proxy_server import general_settings
    from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload

    from litellm_routenlp.plugin import ESCALATION_KEY

    captured: list[tuple] = []

    class TierPin(CustomLogger):
        """The plugin's routing in miniature: the client's call goes to T1, an escalation to its pinned tier."""

        async def async_filter_deployments(self, model, healthy_deployments, messages, request_kwargs=None,
                                           parent_otel_span=None):
            wanted = ((request_kwargs or {}).get("metadata") or {}).get(ESCALATION_KEY, 1)
            return [d for d in healthy_deployments if d["model_info"]["routenlp_tier"] == wanted]

        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            captured.append((kwargs, response_obj, start_time, end_time))

    def deployment(tier: int, price: float) -> dict:
        return {"model_name": "routenlp",
                "litellm_params": {"model": f"openai/tier{tier}", "api_key": "unused", "mock_response": ANSWERS[tier],
                                   "input_cost_per_token": price, "output_cost_per_token": price},
                "model_info": {"id": f"routenlp-t{tier}", "routenlp_tier": tier}}

    saved_callbacks, saved_store = list(litellm.callbacks), general_settings.get("store_prompts_in_spend_logs")
    litellm.callbacks = [TierPin()]
    general_settings["store_prompts_in_spend_logs"] = True  # the proxy setting that keeps prompts and answers
    router = litellm.Router(model_list=[deployment(1, 1e-5), deployment(3, 8e-4), deployment(4, 8e-3)])

    async def traffic() -> None:
        for request_id, (query, task, tiers, uncertainties) in QUERIES.items():
            messages = [{"role": "user", "content": query}]
            body = {"model": "routenlp", "messages": messages, "metadata": {"task": task}}
            await router.acompletion(model="routenlp", messages=messages, metadata={"task": task},
                                     litellm_call_id=request_id, proxy_server_request={"url": "/chat/completions",
                                                                                      "method": "POST", "body": body})
            for tier, previous_u in zip(tiers[1:], uncertainties):  # plugin._escalate, field for field
                await router.acompletion(model="routenlp", messages=messages, metadata={
                    "task": task, ESCALATION_KEY: tier,
                    "spend_logs_metadata": {"routenlp_parent_call_id": request_id, "routenlp_tier": f"T{tier}",
                                            "routenlp_previous_uncertainty": previous_u}})
        for _ in range(50):  # success callbacks run as tasks
            if len(captured) == sum(len(v[2]) for v in QUERIES.values()):
                break
            await asyncio.sleep(0.1)

    try:
        asyncio.run(traffic())
        rows = [dict(get_logging_payload(kwargs=k, response_obj=r, start_time=s, end_time=e))
                for k, r, s, e in captured]
    finally:
        litellm.callbacks = saved_callbacks
        general_settings["store_prompts_in_spend_logs"] = saved_store
    assert len(rows) == 6
    return rows


def _check_joined(records) -> None:
    by_id = {r.request_id: r for r in records}
    assert set(by_id) == set(QUERIES)
    for request_id, (query, task, tiers, uncertainties) in QUERIES.items():
        record = by_id[request_id]
        assert record.path == [f"T{t}" for t in tiers], request_id
        assert record.task == task and record.prompt == query
        assert [c.output for c in record.calls] == [ANSWERS[t] for t in tiers]
        assert [c.uncertainty for c in record.calls] == uncertainties + [None]
        assert [c.escalated for c in record.calls] == [True] * (len(tiers) - 1) + [False]
        assert all(c.cost_usd > 0 for c in record.calls)
    assert by_id["req-escalated-twice"].failed_tier == "T1"
    assert not by_id["req-plain"].escalated


def _as_spend_logs_json(rows: list[dict], metadata_as_string: bool) -> list[dict]:
    """What GET /spend/logs returns: Json columns as objects (or strings), times as ISO strings."""
    out = []
    for row in rows:
        item = {}
        for key, value in row.items():
            if isinstance(value, datetime):
                value = value.isoformat()
            elif key in ("metadata", "messages", "response", "proxy_server_request", "request_tags") and \
                    isinstance(value, str) and not (key == "metadata" and metadata_as_string):
                value = json.loads(value)
            item[key] = value
        out.append(item)
    return out


# --------------------------------------------------------------------------------------------------
# (c) GET /spend/logs JSON


def test_spend_logs_json_rows_are_joined_into_one_record_per_request(spend_rows, tmp_path: Path) -> None:
    path = tmp_path / "spend_logs.json"
    path.write_text(json.dumps(_as_spend_logs_json(spend_rows, metadata_as_string=False)))
    _check_joined(join_spend_logs(read_spend_logs_json(path), TIER_OF, model_group="routenlp"))

    # /spend/logs/v2 wraps the rows in {"data": [...]}; some serialisers keep metadata as a JSON string
    wrapped = {"data": _as_spend_logs_json(spend_rows, metadata_as_string=True), "total": 6, "page": 1}
    _check_joined(join_spend_logs(read_spend_logs_json(wrapped), TIER_OF))


def test_spend_log_tiers_come_from_the_proxy_config(repo_root: Path) -> None:
    assert tier_names_by_model_id(repo_root / "proxy_config.yaml") == {
        "routenlp-t1": "T1", "routenlp-t2": "T2", "routenlp-t3": "T3", "routenlp-t4": "T4"}


def test_spend_logs_without_prompts_are_completed_from_the_decision_log(spend_rows, tmp_path: Path) -> None:
    bare = []
    for row in _as_spend_logs_json(spend_rows, metadata_as_string=False):
        bare.append({**row, "proxy_server_request": {}, "response": {}})  # store_prompts_in_spend_logs off
    joined = join_spend_logs(bare, TIER_OF)
    assert all(r.prompt is None and r.task is None for r in joined)
    log = DecisionLog(tmp_path / "d.jsonl", fsync=False)
    log.append({"request_id": "req-escalated-once", "task": "banking77", "prompt": "I lost my card yesterday",
                "router": {"routed_tier": "T1"},
                "attempts": [_attempt(1, 0.81, True, 1e-4), _attempt(4, 0.0, False, 0.1)]})
    log.close()
    merged = {r.request_id: r for r in merge_sources(joined, read_decision_log(tmp_path / "d.jsonl"))}
    once = merged["req-escalated-once"]
    assert once.prompt == "I lost my card yesterday" and once.task == "banking77"
    assert [c.uncertainty for c in once.calls] == [0.81, 0.0]   # the last answer's u only the decision log knows
    assert merged["req-plain"].prompt is None                     # nothing to fill it from


# --------------------------------------------------------------------------------------------------
# (b) LiteLLM_SpendLogs in a real PostgreSQL server


def _pg_binary(name: str):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    from litellm_routenlp.proxy_process import free_port

    return free_port()


@pytest.fixture(scope="module")
def postgres_dsn():
    """A throwaway PostgreSQL server on 127.0.0.1 (stopped and deleted afterwards)."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; install the `postgresql` package "
                    "(.ci/run does) to run the SpendLogs table test")
    base = Path(tempfile.mkdtemp(prefix="routenlp-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as an unprivileged user
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
        os.chown(base, account.pw_uid, account.pw_gid)
    data, sockets = base / "data", base / "sockets"
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run(prefix + list(args), check=True, capture_output=True, text=True, timeout=120)

    try:
        run("mkdir", "-p", str(sockets))
        run(initdb, "-D", str(data), "-A", "trust", "-U", "routenlp", "-E", "UTF8", "--no-locale", "--no-sync")
        run(pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o",
            f"-h 127.0.0.1 -p {port} -k {sockets} -F", "start")
    except subprocess.CalledProcessError as error:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {error.stderr}\n{log}")
    try:
        yield f"host=127.0.0.1 port={port} user=routenlp dbname=postgres"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _apply_litellm_migrations(dsn: str) -> int:
    """LiteLLM's own schema: every migration.sql of litellm-proxy-extras, in order (what `prisma migrate` applies)."""
    import litellm_proxy_extras
    import psycopg

    directory = Path(litellm_proxy_extras.__file__).parent / "migrations"
    migrations = sorted(p / "migration.sql" for p in directory.iterdir() if (p / "migration.sql").is_file())
    with psycopg.connect(dsn, autocommit=True) as connection:
        for migration in migrations:
            connection.execute(migration.read_text(encoding="utf-8"))
    return len(migrations)


def _insert_rows(dsn: str, rows: list[dict]) -> None:
    """Insert payloads as the proxy's writer stores them (JSON strings into the Json columns)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        types = dict(connection.execute("SELECT column_name, data_type FROM information_schema.columns "
                                        "WHERE table_name = 'LiteLLM_SpendLogs'").fetchall())
        for row in rows:
            columns = [c for c in row if c in types and row[c] is not None]
            placeholders = [sql.SQL("%s::jsonb") if types[c] == "jsonb" else sql.SQL("%s") for c in columns]
            values = [json.dumps(row[c]) if types[c] == "jsonb" and not isinstance(row[c], str) else row[c]
                      for c in columns]
            connection.execute(sql.SQL('INSERT INTO "LiteLLM_SpendLogs" ({}) VALUES ({})').format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns), sql.SQL(", ").join(placeholders)), values)


def test_spend_logs_table_in_postgres_is_read_and_joined(spend_rows, postgres_dsn) -> None:
    applied = _apply_litellm_migrations(postgres_dsn)
    assert applied > 100  # the whole migration history, not a hand-written table
    _insert_rows(postgres_dsn, spend_rows)

    rows = read_spend_logs_postgres(postgres_dsn, model_group="routenlp")

    assert len(rows) == 6
    assert all(isinstance(row["metadata"], dict) for row in rows)  # jsonb comes back decoded
    _check_joined(join_spend_logs(rows, TIER_OF, model_group="routenlp"))


def test_postgres_reader_names_a_database_without_the_table(postgres_dsn) -> None:
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute("CREATE DATABASE empty_db")
    with pytest.raises(ValueError, match="LiteLLM_SpendLogs not found"):
        read_spend_logs_postgres(postgres_dsn.replace("dbname=postgres", "dbname=empty_db"))
