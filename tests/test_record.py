"""The run record (metrics.json): one reader, one writer, a status enum plus a reason."""

from __future__ import annotations

import json

import pytest

from qexp.record import (
    RunRecord,
    RunStatus,
    config_fingerprint,
    mark_failed,
    read_record,
    write_record,
)


def test_record_round_trips_through_metrics_json(tmp_path):
    record = RunRecord(
        RunStatus.COMPLETED,
        "budget not met (weights 20.10 > 18.00 KB)",
        "abc123",
        {"test_acc": 0.875, "layers": [{"name": "fc", "w_bits": 4}], "estimator": "ste"},
    )
    write_record(tmp_path, record)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["config_hash"] == "abc123"
    back = read_record(tmp_path)
    assert back == record
    assert back.completed and back.get("status") == "completed" and back.get("test_acc") == 0.875


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        ("completed", RunStatus.COMPLETED, None),
        ("completed: budget not met (x)", RunStatus.COMPLETED, "budget not met (x)"),
        ("failed: levels exceed bit width", RunStatus.FAILED, "levels exceed bit width"),
        ("running", RunStatus.RUNNING, None),
        ("exploded", RunStatus.FAILED, "unreadable status 'exploded'"),
        (None, RunStatus.FAILED, "no status"),
    ],
)
def test_older_and_odd_status_strings_parse(raw, status, reason):
    record = RunRecord.from_json({"status": raw})
    assert (record.status, record.reason) == (status, reason)


def test_mark_failed_never_overrides_a_final_word_or_another_config(tmp_path):
    assert read_record(tmp_path) is None
    mark_failed(tmp_path, "data set missing", "h1")
    assert read_record(tmp_path) == RunRecord(RunStatus.FAILED, "data set missing", "h1")
    done = RunRecord(RunStatus.COMPLETED, None, "h1", {"test_acc": 0.5})
    write_record(tmp_path, done)
    mark_failed(tmp_path, "later error", "h1")
    assert read_record(tmp_path) == done
    running_other = RunRecord(RunStatus.RUNNING, None, "h2", {"epochs_done": 1})
    write_record(tmp_path, running_other)
    mark_failed(tmp_path, "refused: another config", "h1")
    assert read_record(tmp_path) == running_other
    mark_failed(tmp_path, "crashed", "h2")
    crashed = read_record(tmp_path)
    assert crashed.status is RunStatus.FAILED and crashed.reason == "crashed"
    assert crashed.get("epochs_done") == 1  # what it held is kept


def test_fingerprint_ignores_only_result_free_keys():
    base = {"seed": 0, "resume": False, "trainer": {"lr": 0.1, "device": "cpu", "threads": 2}}
    same = {"seed": 0, "resume": True, "trainer": {"lr": 0.1, "device": "cuda", "threads": None}}
    other = {"seed": 0, "resume": False, "trainer": {"lr": 0.2, "device": "cpu", "threads": 2}}
    assert config_fingerprint(base) == config_fingerprint(same)
    assert config_fingerprint(base) != config_fingerprint(other)
    assert base["trainer"]["device"] == "cpu"  # the caller's dict is not edited


def test_a_new_option_at_its_neutral_value_keeps_old_fingerprints():
    """A config recorded before an option existed and one holding the option's neutral value
    hash alike (a study resumed on newer code keeps its runs); any other value differs."""
    from qexp.record import FINGERPRINT_NEUTRAL

    old = {"seed": 0, "layers": {"first_bits": 8, "last_bits": 8}}
    for key, neutral in FINGERPRINT_NEUTRAL.items():
        node, _, leaf = key.partition(".")
        new = {"seed": 0, "layers": {"first_bits": 8, "last_bits": 8}}
        (new.setdefault(node, {}) if leaf else new)[leaf or node] = neutral
        assert config_fingerprint(new) == config_fingerprint(old), key
        (new[node] if leaf else new)[leaf or node] = 3
        assert config_fingerprint(new) != config_fingerprint(old), key
    assert "matmul_bits" not in old["layers"]
