import json
import os

import pytest

from litellm_routenlp.decision_log import DecisionLog, read_decisions


def test_records_round_trip_and_are_on_disk_immediately(tmp_path):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    log.append({"request_id": "a", "task": "bitext"})
    # readable by another reader before close: written and fsync'd on append
    assert [r["request_id"] for r in read_decisions(path)] == ["a"]
    log.append({"request_id": "b"})
    log.close()
    assert [r["request_id"] for r in read_decisions(path)] == ["a", "b"]


def test_torn_last_line_is_skipped_and_next_record_starts_clean(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"request_id": "a"}) + "\n" + '{"request_id": "b", "ta')
    assert [r["request_id"] for r in read_decisions(path)] == ["a"]
    with pytest.raises(ValueError, match=":2:"):
        list(read_decisions(path, strict=True))
    log = DecisionLog(path)
    log.append({"request_id": "c"})
    log.close()
    assert [r["request_id"] for r in read_decisions(path)] == ["a", "c"]


def test_append_only_across_reopen(tmp_path):
    path = tmp_path / "d.jsonl"
    for name in ("a", "b"):
        log = DecisionLog(path)
        log.append({"request_id": name})
        log.close()
    assert [r["request_id"] for r in read_decisions(path)] == ["a", "b"]
    assert os.stat(path).st_size == len(path.read_bytes())
