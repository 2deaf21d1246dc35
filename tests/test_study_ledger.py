"""The study's record of its pieces (calls of `qexp study`): what each writes, the heartbeat
that bounds a killed piece's wall time, and the report section that sums them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qexp.record import write_json
from qexp.study import ledger
from qexp.study.report import _compute_section
from qexp.study.results import PieceRow, ReferenceRow, RunRow, StudyResults


def test_piece_log_records_start_heartbeat_and_end(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ledger, "HEARTBEAT_S", 0.05)
    with ledger.PieceLog(tmp_path, {"workers": 2, "threads": 1}) as piece:
        first = json.loads(piece.path.read_text())
        assert first["finished"] is False and first["execution"]["workers"] == 2
        assert first["machine"]["cpus"] >= 1
        time.sleep(0.3)
        beat = json.loads(piece.path.read_text())
        assert beat["wall_s"] > first["wall_s"]  # refreshed while the call runs
    (record,) = ledger.read_pieces(tmp_path)
    assert record["finished"] is True and record["wall_s"] >= 0.3


def test_piece_log_marks_a_failed_call_unfinished(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ledger.PieceLog(tmp_path, {}):
        raise RuntimeError("boom")
    (record,) = ledger.read_pieces(tmp_path)
    assert record["finished"] is False


def test_pieces_are_one_file_each_and_read_oldest_first(tmp_path: Path) -> None:
    folder = tmp_path / ledger.PIECES_DIR
    write_json({"started": "2026-12-05T18:00:00+00:00", "wall_s": 10}, folder / "b.json")
    write_json({"started": "2026-12-04T09:00:00+00:00", "wall_s": 20}, folder / "a2.json")
    (folder / "torn.json").write_text("{")  # unreadable: skipped
    assert [p["wall_s"] for p in ledger.read_pieces(tmp_path)] == [20, 10]


def test_run_train_seconds_sums_records(tmp_path: Path) -> None:
    write_json({"train_time_s": 1.5}, tmp_path / "a" / "seed1" / "metrics.json")
    write_json({"train_time_s": 2.0}, tmp_path / "b" / "metrics.json")
    write_json({"status": "failed"}, tmp_path / "c" / "metrics.json")  # no clock: not counted
    assert ledger.run_train_seconds(tmp_path) == (2, 3.5)


def test_machine_words() -> None:
    cpu = {"cpus": 2, "cpu": "Xeon", "gpus": []}
    assert ledger.machine_words(cpu) == "2 CPUs (Xeon), no GPU"
    gpu = {"cpus": 16, "cpu": "EPYC", "gpus": ["H100", "H100"]}
    assert ledger.machine_words(gpu) == "16 CPUs (EPYC), 2x H100"


def test_report_sums_pieces_and_stage_times() -> None:
    machine = {"cpus": 2, "cpu": "Xeon", "gpus": []}
    results = StudyResults(
        name="s", seeds=(0,), alpha=0.05,
        # two settings of one network form share the reference run: counted once
        references=(ReferenceRow(setting="w1", seed=0, run_dir="r", train_time_s=3600.0),
                    ReferenceRow(setting="w1b", seed=0, run_dir="r", train_time_s=3600.0)),
        runs=(RunRow.from_json({"setting": "w1", "method": "ste", "seed": 0,
                                "status": "completed", "train_time_s": 1800.0}),),
        pieces=(PieceRow(started="2026-12-04T09:00:00+00:00", wall_s=7200.0, finished=False,
                         machine=machine, execution={"workers": 2, "threads": 1}),
                PieceRow(started="2026-12-05T17:23:00+00:00", wall_s=3600.0, finished=True,
                         machine=machine, execution={"workers": 2, "threads": 1, "shard": "1/2"})),
        tuning_runs=4, tuning_train_s=5400.0,
    )  # fmt: skip
    text = "\n".join(_compute_section(results))
    assert "| 1 | 2026-12-04 09:00 | 2.00 h | 2 CPUs (Xeon), no GPU | 2 x 1 | - | stopped |" in text
    assert "| 2 | 2026-12-05 17:23 | 1.00 h |" in text and "| 1/2 | finished |" in text
    assert "Wall time over all pieces: **3.00 h**" in text
    assert "| tuning trials (one run per tuning seed) | 4 | 1.50 h |" in text
    assert "| all | 6 | 3.00 h |" in text  # 1 h + 1.5 h + 0.5 h over 1 + 4 + 1 runs
    round_trip = StudyResults.from_json(json.loads(json.dumps(results.to_json())))
    assert round_trip.pieces == results.pieces and round_trip.tuning_train_s == 5400.0


def test_old_results_without_tuning_times_say_so() -> None:
    text = "\n".join(_compute_section(StudyResults(name="s", seeds=(0,), alpha=0.05)))
    assert "| tuning trials (one run per tuning seed) | 0 | not recorded |" in text
