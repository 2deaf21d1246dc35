"""The stages of a study and the `qexp study` command.

1. references: one full-precision network per (network form, data set, seed), trained to a
   validation plateau through the full-precision cache (qexp.train.partner), shared with block
   replacement's partner: a second study on the same settings trains none.
2. tuning: every method, at every setting, gets the same number of Optuna trials on the tuning
   seed, starting from that seed's reference, judged on validation accuracy (test split sealed).
3. final: each method's best knobs at each setting over every seed, each run starting from its
   seed's reference, so methods are paired by seed (same start, data order and validation split).
4. statistics and 5. report (qexp/study/report.py).

Each stage prints one progress line. Every run is skipped when already completed with the same
config and resumed from its last checkpoint when cut off, so a rerun does nothing new and a
killed study continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexp.errors import QexpError
from qexp.record import read_json, read_record, write_json
from qexp.spec import RunSpec
from qexp.study import report as study_report
from qexp.study.runs import compose_run, hydra_configs, load_spec, train_study_run
from qexp.study.space import Knob, knob_overrides, search_space
from qexp.study.spec import Method, Setting, StudySpec
from qexp.study.stats import compare_all, mean_interval
from qexp.study.tune import TuneResult, tune
from qexp.train.partner import cache_root, cached_dir, cached_fp_run, partner_config
from qexp.train.run import needs_partner, train_cached_run

log = logging.getLogger("qexp")

STAGES = ("references", "tuning", "final", "report")
SPEC_FILE = "study.json"


def progress(stage: int, text: str) -> None:
    """One progress line per stage on stdout."""
    print(f"[study] stage {stage}/{len(STAGES)} {STAGES[stage - 1]}: {text}", flush=True)


@dataclass
class Study:
    """A study spec bound to its dir."""

    spec: StudySpec
    dir: Path

    # -- configs ------------------------------------------------------------------------------
    def cell_overrides(self, setting: Setting, method: Method) -> list[str]:
        """Overrides shared by every run of a (setting, method) cell."""
        return [
            *self.spec.base,
            *setting.overrides,
            f"bits={setting.bits}",
            *method.overrides,
            *method.at.get(setting.key, ()),
        ]

    def reference_config(self, setting: Setting, seed: int) -> dict[str, Any]:
        """The (plain) config of the full-precision reference run of ``setting``'s network
        form at ``seed``."""
        spec = compose_run(
            [*self.spec.base, *setting.overrides, f"bits={setting.bits}", *self.spec.reference,
             f"seed={seed}"]
        )
        return partner_config(spec.config)

    def reference_dir(self, setting: Setting, seed: int) -> Path:
        """The cached reference of (setting, seed), trained first if missing."""
        config = self.reference_config(setting, seed)
        return cached_fp_run(config, train_cached_run, what="reference")

    def run_config(
        self,
        setting: Setting,
        method: Method,
        seed: int,
        stage: tuple[str, ...],
        knobs: list[str],
        reference: Path,
    ) -> RunSpec:
        """A quantized run of the study, starting from ``reference`` (its partner too)."""
        overrides = [
            *self.cell_overrides(setting, method),
            *stage,
            *knobs,
            f"seed={seed}",
            f"init_from={reference}",
        ]
        spec = compose_run(overrides)
        if needs_partner(spec) and spec.partner.source is None:
            spec = compose_run([*overrides, f"partner.source={reference}"])
        return spec

    def knobs(self, setting: Setting, method: Method) -> list[Knob]:
        """The search space of a cell (from its estimator's and quantizer's files)."""
        spec = compose_run(self.cell_overrides(setting, method))
        return search_space(
            spec.identity["estimator"], spec.identity["quantizer"], method.space
        )

    # -- stages -------------------------------------------------------------------------------
    def check_dir(self) -> None:
        """Bind the dir to this spec: a rerun with another spec would mix two studies."""
        path = self.dir / SPEC_FILE
        old = read_json(path)
        if old is not None and old != json.loads(json.dumps(self.spec.raw)):
            raise QexpError(
                f"{self.dir} holds a study with another spec ({path}); give another --dir"
            )
        if old is None:
            write_json(self.spec.raw, path)

    def references(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Stage 1: every (setting, seed)'s reference, trained once into the cache."""
        seeds = sorted({*self.spec.seeds, self.spec.tuning.seed})
        out: dict[tuple[str, int], dict[str, Any]] = {}
        trained = 0
        for setting in self.spec.settings:
            for seed in seeds:
                fp_cfg = self.reference_config(setting, seed)
                before = read_record(cached_dir(fp_cfg))
                fresh = before is None or not before.completed
                run_dir = self.reference_dir(setting, seed)
                trained += fresh
                record = read_record(run_dir)
                assert record is not None
                out[(setting.key, seed)] = _reference_row(
                    self.spec, setting, seed, run_dir, record, fp_cfg
                )
        n = len({r["run_dir"] for r in out.values()})
        progress(1, f"{n} full-precision networks ready ({trained} trained now, rest cached)")
        return out

    def tuning(self, refs: dict[tuple[str, int], dict[str, Any]]) -> dict[tuple[str, str], Any]:
        """Stage 2: the same number of trials for every method at every setting."""
        spec, out, ran = self.spec, {}, 0
        seed = spec.tuning.seed
        for setting in spec.settings:
            reference = Path(refs[(setting.key, seed)]["run_dir"])
            for method in spec.methods:
                knobs = self.knobs(setting, method)
                cell_dir = self.dir / "tuning" / setting.key / method.name

                def make_spec(values, s=setting, m=method, k=knobs, ref=reference):
                    return self.run_config(
                        s, m, seed, spec.tuning.overrides, knob_overrides(k, values), ref
                    )

                result = tune(
                    self.dir,
                    f"{setting.key}/{method.name}",
                    spec.tuning.trials,
                    knobs,
                    make_spec,
                    lambda n, d=cell_dir: d / f"trial{n:03d}",
                    spec.tuning.sampler_seed,
                    spec.tuning.prune_startup_trials,
                    spec.tuning.prune_warmup_epochs,
                )
                ran += result.ran
                out[(setting.key, method.name)] = (knobs, result)
        failed = [f"{s}/{m}" for (s, m), (_, r) in out.items() if r.failed]
        cells = len(out)
        note = f"; every trial failed for {', '.join(failed)}" if failed else ""
        progress(
            2,
            f"{cells} cells x {spec.tuning.trials} trials ({ran} run now, rest stored){note}",
        )
        return out

    def final(
        self,
        refs: dict[tuple[str, int], dict[str, Any]],
        tuned: dict[tuple[str, str], tuple[list[Knob], TuneResult]],
    ) -> list[dict[str, Any]]:
        """Stage 3: each method's best knobs at each setting, over every seed."""
        rows, ran = [], 0
        for setting in self.spec.settings:
            for method in self.spec.methods:
                knobs, result = tuned[(setting.key, method.name)]
                if result.failed:
                    continue
                extra = knob_overrides(knobs, result.best_params or {})
                for seed in self.spec.seeds:
                    reference = Path(refs[(setting.key, seed)]["run_dir"])
                    run_dir = self.dir / "final" / setting.key / method.name / f"seed{seed}"
                    row = {"setting": setting.key, "method": method.name, "seed": seed,
                           "run_dir": str(run_dir)}
                    try:
                        spec = self.run_config(
                            setting, method, seed, self.spec.final, extra, reference
                        )
                        result = train_study_run(spec, run_dir)
                        ran += result.outcome.value != "skipped"
                    except Exception as exc:  # one run's failure is reported, not fatal
                        row["error"] = (str(exc).splitlines() or [type(exc).__name__])[0]
                    rows.append({**row, **_run_row(run_dir)})
        done = sum(r["status"] == "completed" for r in rows)
        progress(3, f"{done}/{len(rows)} final runs completed ({ran} run now, rest stored)")
        return rows

    def run(self) -> dict[str, Any]:
        """All stages; returns the results written to results.json."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.check_dir()
        t0 = time.perf_counter()
        with hydra_configs():
            refs = self.references()
            tuned = self.tuning(refs)
            rows = self.final(refs, tuned)
        results = portable_paths(summarize(self.spec, refs, tuned, rows), self.dir)
        paths = study_report.write_all(self.spec, self.dir, results)
        progress(4, f"report in {paths['report']} ({time.perf_counter() - t0:.0f}s this call)")
        return results


def portable_paths(results: dict[str, Any], study_dir: Path) -> dict[str, Any]:
    """Run dirs in the outputs relative to the study dir, or to ``$QEXP_CACHE`` for the
    cached references, so a study dir can be moved or committed without machine paths."""
    bases = [(study_dir.resolve(), ""), (cache_root().resolve(), "$QEXP_CACHE/")]

    def portable(path: str) -> str:
        resolved = Path(path).resolve()
        for base, prefix in bases:
            if resolved.is_relative_to(base):
                return prefix + str(resolved.relative_to(base))
        return path

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {
                k: portable(v) if k == "run_dir" and isinstance(v, str) else walk(v)
                for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(results)


def plateau_gain(history: list[dict[str, Any]], window: int) -> float | None:
    """Best val accuracy of the last ``window`` epochs minus the best before them (None when
    the run is too short to tell: fewer than ``window`` epochs before the last ``window``)."""
    vals = [float(h["val_acc"]) for h in history if h.get("val_acc") is not None]
    if len(vals) < 2 * window:
        return None
    return max(vals[-window:]) - max(vals[:-window])


def _reference_row(
    spec: StudySpec,
    setting: Setting,
    seed: int,
    run_dir: Path,
    record: Any,
    fp_cfg: dict[str, Any],
) -> dict[str, Any]:
    history = record.get("history") or []
    gain = plateau_gain(history, spec.plateau.window)
    return {
        "setting": setting.key,
        "seed": seed,
        "run_dir": str(run_dir),
        "model": fp_cfg["model"],
        "test_acc": record.get("test_acc"),
        "best_val_acc": record.get("best_val_acc"),
        "epochs_done": int(record.get("epochs_done") or 0),
        "best_epoch": record.get("best_epoch"),
        "max_epochs": int(fp_cfg["trainer"]["epochs"]),
        "plateau_gain": gain,
        "converged": gain is not None and gain < spec.plateau.tolerance,
        "train_time_s": record.get("train_time_s"),
    }


def _run_row(run_dir: Path) -> dict[str, Any]:
    record = read_record(run_dir)
    if record is None:
        return {"status": "missing"}
    return {
        "status": record.status.value,
        "reason": record.reason,
        "test_acc": record.get("test_acc"),
        "best_val_acc": record.get("best_val_acc"),
        "epochs_done": record.get("epochs_done"),
        "train_time_s": record.get("train_time_s"),
        "forward_per_step": (record.get("passes_per_step") or {}).get("forward"),
        "backward_per_step": (record.get("passes_per_step") or {}).get("backward"),
    }


def summarize(
    spec: StudySpec,
    refs: dict[tuple[str, int], dict[str, Any]],
    tuned: dict[tuple[str, str], tuple[list[Knob], TuneResult]],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Stage 4's numbers: per-cell intervals, paired comparisons, cost, tuning outcomes."""
    ok = [r for r in rows if r["status"] == "completed" and r.get("test_acc") is not None]
    by_cell: dict[tuple[str, str], dict[int, float]] = {}
    for r in ok:
        by_cell.setdefault((r["setting"], r["method"]), {})[r["seed"]] = float(r["test_acc"])
    cells = []
    for setting in spec.settings:
        for method in spec.methods:
            key = (setting.key, method.name)
            knobs, result = tuned[key]
            accs = by_cell.get(key, {})
            ci = mean_interval(list(accs.values()))
            runs = [r for r in ok if (r["setting"], r["method"]) == key]
            cells.append(
                {
                    "setting": setting.key,
                    "title": setting.title,
                    "bits": setting.bits,
                    "method": method.name,
                    "status": "failed" if result.failed else "completed" if accs else "no runs",
                    "error": result.first_error if result.failed else None,
                    "n": ci.n,
                    "mean": ci.mean,
                    "low": ci.low,
                    "high": ci.high,
                    "train_time_s": _mean([r["train_time_s"] for r in runs]),
                    "forward_per_step": runs[0]["forward_per_step"] if runs else None,
                    "backward_per_step": runs[0]["backward_per_step"] if runs else None,
                    "best_params": result.best_params,
                    "best_val": result.best_val,
                    "space": {k.key: study_report.range_text(k) for k in knobs},
                    "trials": result.trials,
                }
            )
    baselines = {s.key: s.baseline for s in spec.settings}
    comparisons = []
    result = compare_all(by_cell, baselines, spec.alpha)
    for (setting_key, method_name), paired in result.items():
        comparisons.append(
            {
                "setting": setting_key,
                "method": method_name,
                "baseline": baselines[setting_key],
                "n": paired.diff.n,
                "diff": paired.diff.mean,
                "low": paired.diff.low,
                "high": paired.diff.high,
                "p": paired.p,
                "p_holm": paired.p_holm,
                "verdict": paired.verdict,
            }
        )
    return {
        "name": spec.name,
        "seeds": list(spec.seeds),
        "alpha": spec.alpha,
        "references": list(refs.values()),
        "cells": cells,
        "comparisons": comparisons,
        "runs": rows,
        "claims": [c.__dict__ for c in spec.claims],
    }


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None


def main(argv: list[str]) -> int:
    """`qexp study PRESET [--dir DIR] [key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="qexp study",
        description="A fair comparison of estimators: FP references, equal tuning, paired "
        "final runs over seeds, statistics and a report. Rerun to resume.",
    )
    parser.add_argument("preset", help="a preset name (conf/study/<name>.yaml) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="spec overrides, e.g. tuning.trials=4")
    parser.add_argument("--dir", type=Path, default=None, help="study dir (default studies/NAME)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.preset, args.overrides)
        study = Study(spec, args.dir or Path("studies") / spec.name)
        study.run()
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    return 0
