"""Typed study results: results.json round trips, old files load, the pipeline's dicts adapt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qexp.study.results import CellRow, ComparisonRow, RunRow, StudyResults, from_summary
from qexp.study.spec import parse_spec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "study_2epoch" / "results.json"


def test_committed_results_json_loads_and_round_trips():
    data = json.loads(DOCS.read_text())
    results = StudyResults.from_json(data)
    assert len(results.cells) == len(data["cells"]) and len(results.runs) == len(data["runs"])
    cell = results.cells[0]
    assert isinstance(cell, CellRow) and cell.mean == data["cells"][0]["mean"]
    assert cell.trial_counts == tuple(
        [t["state"] for t in data["cells"][0]["trials"]].count(s)
        for s in ("complete", "pruned", "fail")
    )
    comp = results.comparison("w1a1", "ste")
    assert isinstance(comp, ComparisonRow) and comp.baseline == "clipped_ste"
    assert results.comparison("w1a1", "clipped_ste") is None  # the baseline itself
    # what the typed rows write back holds every value the file had (new fields beside them)
    back = results.to_json()
    for key in ("name", "seeds", "alpha"):
        assert back[key] == data[key], key
    for key in ("references", "cells", "comparisons", "runs", "claims"):
        for old, new in zip(data[key], back[key], strict=True):
            assert {k: new[k] for k in old} == old, key


def test_from_summary_turns_nan_into_null_and_keeps_run_errors():
    summary = {
        "name": "s", "seeds": [0, 1], "alpha": 0.05, "references": [],
        "cells": [{"setting": "w2", "title": "W2", "bits": 2, "method": "ste",
                   "status": "completed", "n": 1, "mean": 0.5, "low": math.nan,
                   "high": math.nan, "space": {"trainer.lr": "[0.1, 1]"},
                   "trials": [{"number": 0, "state": "complete", "val_acc": 0.4}]}],
        "comparisons": [],
        "runs": [{"setting": "w2", "method": "ste", "seed": 0, "run_dir": "final/x",
                  "error": "boom", "status": "missing"},
                 {"setting": "w2", "method": "ste", "seed": 1, "status": "completed",
                  "test_acc": 0.5}],
        "claims": [],
    }  # fmt: skip
    spec = parse_spec({"name": "s", "seeds": [0, 1], "tuning": {"trials": 1},
                       "settings": [{"key": "w2", "bits": 2, "baseline": "ste"}],
                       "methods": {"ste": {}}})  # fmt: skip
    results = from_summary(spec, summary)
    assert results.cells[0].low is None and results.cells[0].trials[0].val_acc == 0.4
    text = json.dumps(results.to_json(), allow_nan=False)  # strict JSON: no NaN anywhere
    again = StudyResults.from_json(json.loads(text))
    assert again == results
    assert again.runs[0] == RunRow("w2", "ste", 0, "final/x", "missing", error="boom")
    assert "error" not in results.runs[1].to_json()  # only failed runs carry it


def test_a_row_without_its_required_keys_is_an_error():
    with pytest.raises(ValueError, match="setting"):
        RunRow.from_json({"method": "ste", "seed": 0})
