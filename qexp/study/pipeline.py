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
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna

from qexp.errors import QexpError
from qexp.record import read_json, read_record, write_json
from qexp.spec import RunSpec
from qexp.study import report as study_report
from qexp.study.ledger import PieceLog, read_pieces, run_train_seconds
from qexp.study.lock import hold_study
from qexp.study.results import from_summary
from qexp.study.runs import compose_run, hydra_configs, load_spec
from qexp.study.space import Knob, knob_overrides, search_space
from qexp.study.spec import UNBOUND_KEYS, Method, Setting, StudySpec
from qexp.study.stats import mean_interval
from qexp.study.tune import CellTuner, TuneResult
from qexp.study.workers import (
    InProcess,
    LocalPool,
    NoTraining,
    SubmititPool,
    Task,
    default_workers,
    worker_runtimes,
)
from qexp.train.build import build_estimator
from qexp.train.gpu_assign import visible_gpu_count as visible_gpus
from qexp.train.partner import cache_root, cache_uri, cached_dir, partner_config
from qexp.train.run import needs_partner

log = logging.getLogger("qexp")

STAGES = ("references", "tuning", "final", "report")
SPEC_FILE = "study.json"
#: in tuning/: the next round's number (round numbers go on counting across calls)
ROUNDS_FILE = "rounds.json"
#: the study's record of its references (their rows travel with the study dir; their
#: checkpoints stay in the cache)
REFERENCES_FILE = "references.json"
#: the spec changes a study dir accepted after it began (qexp.study.spec.UNBOUND_KEYS,
#: appended settings), each with the number of runs finished by then
SPEC_CHANGES_FILE = "spec_changes.json"
#: where ``qexp study --preview`` writes its report (outside the study's records)
PREVIEW_DIR = "preview"


def progress(stage: int, text: str) -> None:
    """One progress line per stage on stdout."""
    print(f"[study] stage {stage}/{len(STAGES)} {STAGES[stage - 1]}: {text}", flush=True)


@dataclass(frozen=True)
class Execution:
    """How a study runs (never part of its spec: the same study may be run with 1 worker
    here, 8 on a GPU box, as a Slurm job array there, or in shards on several machines).

    ``workers``: runs side by side (1: in this process); ``threads``: torch CPU threads per
    run, fixed so that a run's numbers do not depend on the number of workers (default 1:
    every core a worker; the default ``workers`` is CPUs / threads, or 2 per GPU on a GPU
    box); ``launcher``: ``local`` (processes on this machine), ``slurm`` or ``submitit_local``
    (a job array per stage through submitit, with ``slurm`` options); ``parallel``: trials of
    one cell asked per round (None: 1 when there are at least as many cells as workers, so
    tuning does not depend on the number of workers); ``shard``: (i, k) runs the i-th of k
    fixed shares of the cells.
    """

    workers: int | None = None
    threads: int | None = 1
    launcher: str = "local"
    parallel: int | None = None
    shard: tuple[int, int] | None = None
    slurm: dict[str, Any] = field(default_factory=dict)

    def words(self) -> dict[str, Any]:
        """What the study's piece record keeps of this execution."""
        gpus = visible_gpus()
        return {
            "workers": self.workers or (2 * gpus if gpus else default_workers(self.threads)),
            "threads": self.threads,
            "launcher": self.launcher,
            "shard": "/".join(map(str, self.shard)) if self.shard else None,
        }

    def pool(self, study_dir: Path):
        """The workers of this execution."""
        gpus = visible_gpus()
        workers = self.workers or (2 * gpus if gpus else default_workers(self.threads))
        runtimes = worker_runtimes(workers, None if gpus else self.threads, gpus)
        if self.launcher in ("slurm", "submitit_local"):
            cluster = "slurm" if self.launcher == "slurm" else "local"
            return SubmititPool(
                study_dir / "submitit", workers, runtimes[0], cluster, dict(self.slurm)
            )
        if workers == 1:
            return InProcess(runtimes[0])
        return LocalPool(runtimes)


@dataclass
class Study:
    """A study spec bound to its dir."""

    spec: StudySpec
    dir: Path
    execution: Execution = field(default_factory=Execution)
    #: the user's config dirs (``--config-dir``): their estimators, quantizers, models...
    config_dirs: tuple[Path, ...] = ()
    #: train nothing and write nothing in the study's records: report what earlier (or
    #: running) calls stored, into ``<dir>/preview/`` (``qexp study --preview``)
    preview: bool = False
    #: a preview's spec changes against study.json, not logged yet (the next call logs them)
    pending_changes: list[str] = field(default_factory=list)

    # -- configs ------------------------------------------------------------------------------
    def cell_overrides(self, setting: Setting, method: Method) -> list[str]:
        """Overrides shared by every run of a (setting, method) cell."""
        return [
            *self.spec.base,
            *setting.overrides,
            f"bits={setting.bits}",
            *method.overrides,
            *method.overrides_at(setting),
        ]

    def reference_config(self, setting: Setting, seed: int) -> dict[str, Any]:
        """The (plain) config of the full-precision reference run of ``setting``'s network
        form at ``seed``."""
        spec = compose_run(
            [*self.spec.base, *setting.overrides, f"bits={setting.bits}", *self.spec.reference,
             f"seed={seed}"]
        )
        return partner_config(spec.config)

    def run_config(
        self,
        setting: Setting,
        method: Method,
        seed: int,
        stage: tuple[str, ...],
        knobs: list[str],
        reference: str,
    ) -> RunSpec:
        """A quantized run of the study, starting from ``reference`` (its partner too), a
        ``cache:`` reference, so the run's fingerprint holds no machine path."""
        start = [f"init_from={reference}"] if setting.init == "reference" else []
        overrides = [*self.cell_overrides(setting, method), *stage, *knobs, f"seed={seed}",
                     *start]  # fmt: skip
        spec = compose_run(overrides)
        if needs_partner(spec) and spec.partner.source is None:
            spec = compose_run([*overrides, f"partner.source={reference}"])
        return spec

    def knobs(self, setting: Setting, method: Method) -> list[Knob]:
        """The search space of a cell (from its estimator's and quantizer's files)."""
        spec = compose_run(self.cell_overrides(setting, method))
        return search_space(
            spec.identity["estimator"], spec.identity["quantizer"],
            {**method.space, **setting.space}, self.config_dirs,
        )

    def cells(self) -> list[tuple[Setting, Method]]:
        """Every (setting, method) cell, in spec order."""
        return [(s, m) for s in self.spec.settings for m in self.spec.methods_of(s)]

    def my_cells(self) -> list[tuple[Setting, Method]]:
        """The cells this call works on: all of them, or this shard's fixed share (a cell
        whose knobs come from another setting's cell goes with that cell)."""
        shard = self.execution.shard
        cells = self.cells()
        if shard is None:
            return cells
        i, k = shard
        tuned = [(s.key, m.name) for s, m in cells if s.knobs_from is None]
        return [(s, m) for s, m in cells
                if tuned.index((s.knobs_from or s.key, m.name)) % k == i - 1]  # fmt: skip

    def tuned_from(self, setting: Setting) -> Setting:
        """The setting whose tuning gives ``setting`` its knobs (itself, or ``knobs_from``)."""
        return self.spec.setting(setting.knobs_from) if setting.knobs_from else setting

    # -- stages -------------------------------------------------------------------------------
    def check_dir(self) -> None:
        """Bind the dir to this spec: a rerun with another spec would mix two studies."""
        path = self.dir / SPEC_FILE
        old, new = read_json(path), json.loads(json.dumps(self.spec.raw))
        if self.preview and old is None:
            raise QexpError(f"{self.dir} holds no study yet: run it first, then preview it")

        def runs_part(raw: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in raw.items() if k not in (*UNBOUND_KEYS, "settings")}

        def keeps_settings(before: list, after: list) -> bool:
            """Every earlier setting unchanged, in its place (new ones may follow)."""
            return after[: len(before)] == before

        if old is not None and (
            runs_part(old) != runs_part(new)
            or not keeps_settings(old.get("settings") or [], new.get("settings") or [])
        ):
            raise QexpError(
                f"{self.dir} holds a study with another spec ({path}); give another --dir"
            )
        if self.preview:  # the next real call logs and binds any accepted change
            self.pending_changes = changed_keys(old, new) if old != new else []
            return
        if old is not None and old != new:
            self.log_spec_change(old, new)
        if old != new:  # new, or only keys that change no run (qexp.study.spec.UNBOUND_KEYS)
            write_json(self.spec.raw, path)

    def log_spec_change(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Append to spec_changes.json which keys changed and how many runs had finished:
        claims, controls or alpha edited after results were seen are visible in the report."""
        keys = changed_keys(old, new)

        def completed(folder: str) -> int:
            return sum(1 for p in (self.dir / folder).rglob("metrics.json")
                       if (read_json(p) or {}).get("status") == "completed")  # fmt: skip

        log_path = self.dir / SPEC_CHANGES_FILE
        changes = (read_json(log_path) or {}).get("changes", [])
        changes.append({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "keys": keys, "tuning_runs_completed": completed("tuning"),
                        "final_runs_completed": completed("final")})  # fmt: skip
        write_json({"changes": changes}, log_path)

    def reference_configs(self, cells: list[tuple[Setting, Method]]) -> dict:
        """(setting key, seed) -> the reference run config, for the settings of ``cells``."""
        spec = self.spec
        seeds = sorted({*spec.seeds, *spec.tuning.all_seeds, *spec.aa_seeds})
        settings = [s for s in spec.settings if any(c[0] == s for c in cells)]
        return {(s.key, seed): self.reference_config(s, spec.reference_seed(seed))
                for s in settings for seed in seeds}  # fmt: skip

    def tuners(self, cells: list[tuple[Setting, Method]], ref_configs: dict) -> dict:
        """(setting key, method name) -> (knobs, :class:`CellTuner`) of every cell that tunes
        its own knobs (a setting with ``knobs_from`` takes another's)."""
        spec = self.spec
        tuners: dict[tuple[str, str], tuple[list[Knob], CellTuner]] = {}
        for setting, method in cells:
            if setting.knobs_from is not None:
                continue
            knobs = self.knobs(setting, method)
            stage = (*spec.tuning.overrides, *setting.tuning)
            epochs = compose_run([*self.cell_overrides(setting, method), *stage]).trainer.epochs

            def make_specs(values, s=setting, m=method, k=knobs, stage=stage):
                return [
                    (seed, self.run_config(s, m, seed, stage, knob_overrides(k, values),
                                           cache_uri(cached_dir(ref_configs[(s.key, seed)]))))
                    for seed in spec.tuning.all_seeds
                ]  # fmt: skip

            tuners[(setting.key, method.name)] = (knobs, CellTuner(
                self.dir / "tuning" / setting.key / method.name,
                self.dir,
                f"{setting.key}/{method.name}",
                spec.tuning.trials,
                knobs,
                make_specs,
                optuna.samplers.TPESampler(
                    seed=spec.tuning.sampler_seed,
                    n_startup_trials=spec.tuning.startup_trials or 10,
                ),
                spec.tuning.prune_startup_trials,
                spec.tuning.prune_warmup_epochs,
                read_only=self.preview,
                prune_last_epoch=spec.tuning.prune_last_epoch,
                epochs=epochs,
                deployed_from=self.deployed_from if spec.tuning.prune_before_deployed else None,
            ))  # fmt: skip
        return tuners

    @staticmethod
    def deployed_from(spec: RunSpec) -> float:
        """The training progress from which a tuning trial (``spec``: its run, with its knobs)
        trains its method's deployed form: its estimator's final_form_progress (e.g. where
        its alpha ramp ends). With ``prune_before_deployed`` no epoch whose last step came
        before it is pruned (the worker's pruning hook reads each epoch's progress)."""
        return build_estimator(spec.estimator).final_form_progress()

    def final_specs(self, cells: list, tuners: dict, ref_configs: dict) -> dict:
        """(setting, method, seed) -> the final run's spec, for cells whose tuning is done
        and found knobs (the baseline also over ``aa_seeds``, the A/A row)."""
        out = {}
        for setting, method in cells:
            source = self.tuned_from(setting)
            knobs, tuner = tuners[(source.key, method.name)]
            if tuner.remaining():
                continue
            result = tuner.result()
            if result.failed:
                continue
            params = self.final_params(setting, method, result.best_params or {})
            if params is None:
                continue  # its LR comes from a carry check still to run
            extra = knob_overrides(knobs, params)
            stage = (*self.spec.final, *setting.final)
            seeds = list(self.spec.seeds)
            if method.name == setting.baseline and setting.aa:
                seeds += list(self.spec.aa_seeds)
            for seed in seeds:
                reference = cache_uri(cached_dir(ref_configs[(setting.key, seed)]))
                out[(setting.key, method.name, seed)] = self.run_config(
                    setting, method, seed, stage, extra, reference
                )
        return out

    def final_params(
        self, setting: Setting, method: Method, tuned: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The knob values of a cell's final runs: the tuned ones, with the LR times the
        carry check's best scale where ``carry_check.adopt`` covers the cell (None while
        that check's runs are not all done)."""
        scale = self.adopted_lr_scale(setting, method)
        return None if scale is None else scaled_lr(tuned, scale)

    def adopted_lr_scale(self, setting: Setting, method: Method) -> float | None:
        """The LR scale a cell's final runs train at: 1, or with ``carry_check.adopt`` for a
        checked cell that borrows its knobs, the scale whose carry-check runs reached the best
        mean validation accuracy over the tuning seeds (the borrowed LR on a tie); None until
        those runs are all done."""
        check = self.spec.carry_check
        if check is None or not check.adopt or (setting, method) not in self.carry_cells(
            [(setting, method)]
        ):
            return 1.0
        means = {}
        for scale in check.lr_scales:
            vals = []
            for seed in self.spec.tuning.all_seeds:
                record = read_record(self.carry_dir(setting.key, method.name, scale, seed))
                if record is None or not record.completed or record.get("best_val_acc") is None:
                    return None
                vals.append(float(record.get("best_val_acc")))
            means[scale] = sum(vals) / len(vals)
        return max(means, key=lambda x: (means[x], x == 1.0))

    def final_dir(self, setting: str, method: str, seed: int) -> Path:
        """The run dir of a final run."""
        return self.dir / "final" / setting / method / f"seed{seed}"

    def needed_references(self, cells: list, tuners: dict, finals: dict) -> set:
        """The (setting, seed) references that unfinished runs start from: a cell still
        tuning needs them all; a finished cell only those of its unfinished final runs."""
        need = set()
        spec = self.spec
        for setting, method in cells:
            source = self.tuned_from(setting)
            if tuners[(source.key, method.name)][1].remaining():
                seeds = {*spec.seeds, *(spec.aa_seeds if setting.aa else ())}
                if source is setting:
                    seeds |= set(spec.tuning.all_seeds)
                need |= {(setting.key, seed) for seed in seeds}
        for setting, method in self.carry_cells(cells):
            check = spec.carry_check
            for seed in spec.tuning.all_seeds:
                dirs = [self.carry_dir(setting.key, method.name, x, seed) for x in check.lr_scales]
                if not all(_completed(d) for d in dirs):
                    need.add((setting.key, seed))
        for setting, method in cells:
            if self.adopted_lr_scale(setting, method) is None:  # its finals come later
                need |= {(setting.key, seed)
                         for seed in {*spec.seeds, *(spec.aa_seeds if setting.aa else ())}}
        for (setting, method, seed), spec in finals.items():
            record = read_record(self.final_dir(setting, method, seed))
            if record is None or not record.completed or record.config_hash != spec.fingerprint:
                need.add((setting, seed))
        return need

    def references(self, pool: Any, ref_configs: dict, need: set) -> dict:
        """Stage 1: the references unfinished runs need, trained once into the cache (a
        reference already there is reused); every reference's row from the cache or, for a
        study dir moved to a machine whose cache lacks it, from the study's own record."""
        stored = read_json(self.dir / REFERENCES_FILE) or {}
        unique: dict[str, tuple[str, int]] = {}
        for key in sorted(need):
            unique.setdefault(str(cached_dir(ref_configs[key])), key)
        missing = [k for d, k in unique.items() if not _completed(Path(d))]
        tasks = [Task(f"reference/{s}/seed{seed}", ref_configs[(s, seed)], kind="cached")
                 for s, seed in missing]  # fmt: skip
        for result in pool.run_all(tasks):
            if result.error:
                raise QexpError(f"{result.key}: {result.error}")
        out = {}
        for (setting_key, seed), config in ref_configs.items():
            if self.spec.reference_seed(seed) != seed:
                continue  # a paired A/A seed: it starts from another seed's reference
            run_dir = cached_dir(config)
            record = read_record(run_dir)
            setting = next(s for s in self.spec.settings if s.key == setting_key)
            if record is not None and record.completed:
                row = _reference_row(self.spec, setting, seed, run_dir, record, config)
                old = stored.get(f"{setting_key}/{seed}") or {}
                first = old.get("recorded_test_acc", old.get("test_acc"))
                if first is not None and first != row["test_acc"]:
                    # retrained (a fresh cache, another machine) to other numbers than those
                    # the study's earlier runs started from: kept, and said in the report
                    row["recorded_test_acc"] = first
                stored[f"{setting_key}/{seed}"] = portable_paths(row, self.dir)
            elif f"{setting_key}/{seed}" in stored:
                row = stored[f"{setting_key}/{seed}"]
            else:
                continue  # not trained, not needed: nothing to report of it
            out[(setting_key, seed)] = row
        if not self.preview:
            write_json(stored, self.dir / REFERENCES_FILE)
        ready = len({str(cached_dir(c)) for c in ref_configs.values()})
        moved = [k for k, r in out.items() if r.get("recorded_test_acc") is not None]
        note = (f"; {len(moved)} retrained to other numbers than recorded (see the report)"
                if moved else "")  # fmt: skip
        trained = "none trained: a preview" if self.preview else f"{len(tasks)} trained now"
        progress(1, f"{ready} full-precision networks ({trained}, the rest cached or not "
                    f"needed){note}")  # fmt: skip
        return out

    def tuning(self, pool: Any, tuners: dict) -> dict:
        """Stage 2: the same number of trials for every method at every setting, asked and
        told in rounds (qexp.study.tune), the trials of a round trained side by side."""
        per_cell = self.execution.parallel or max(1, -(-pool.workers // max(1, len(tuners))))
        round_ = self._rounds_done()
        while not self.preview:
            batch = []
            for _, tuner in tuners.values():
                for _ in range(min(per_cell, tuner.remaining())):
                    batch.append((tuner, *tuner.ask(round_)))
            if not batch:
                break
            results = pool.run_all([task for _, _, tasks in batch for task in tasks])
            for tuner, trial, tasks in batch:  # in the order asked: the journal keeps it
                tuner.tell(trial, results[: len(tasks)])
                results = results[len(tasks):]
            round_ += 1
            write_json({"next": round_}, self.dir / "tuning" / ROUNDS_FILE)
        out = {key: (knobs, tuner.result()) for key, (knobs, tuner) in tuners.items()}
        ran = sum(r.ran for _, r in out.values())
        failed = [f"{s}/{m}" for (s, m), (_, r) in out.items() if r.failed]
        note = f"; every trial failed for {', '.join(failed)}" if failed else ""
        progress(
            2,
            f"{len(out)} cells x {self.spec.tuning.trials} trials ({ran} run now, rest stored, "
            f"{per_cell} per cell and round){note}",
        )
        return out

    def carry_cells(self, cells: list) -> list[tuple[Setting, Method]]:
        """The cells of ``cells`` the spec's carry check covers (borrowed knobs)."""
        check = self.spec.carry_check
        if check is None:
            return []
        return [(s, m) for s, m in cells if s.knobs_from is not None and m.name in check.methods]

    def carry_dir(self, setting: str, method: str, scale: float, seed: int) -> Path:
        """The run dir of one carry-check run."""
        return self.dir / "carry" / setting / method / f"lr_x{scale:.3g}" / f"seed{seed}"

    def carry_check(self, pool: Any, cells: list, tuners: dict, ref_configs: dict) -> list:
        """Stage 2, end: do the knobs tuned at one budget carry to the settings that borrow
        them? Each covered cell's borrowed knobs, the LR times each of the check's scales,
        trained at the borrowing setting's budget (its final overrides) on the tuning seeds,
        test sealed. Returns one row per run."""
        check = self.spec.carry_check
        todo = self.carry_cells(cells)
        if check is None or not todo:
            return []
        tasks, rows, configs = [], [], {}
        for setting, method in todo:
            knobs, tuner = tuners[(self.tuned_from(setting).key, method.name)]
            if tuner.remaining():
                continue
            result = tuner.result()
            lr = (result.best_params or {}).get("trainer.lr")
            if result.failed or lr is None:
                continue  # nothing borrowed, or the LR is not among the knobs
            stage = (*self.spec.tuning.overrides, *setting.final)
            for scale in check.lr_scales:
                values = scaled_lr(result.best_params or {}, scale)
                for seed in self.spec.tuning.all_seeds:
                    reference = cache_uri(cached_dir(ref_configs[(setting.key, seed)]))
                    spec = self.run_config(setting, method, seed, stage,
                                           knob_overrides(knobs, values), reference)
                    run_dir = self.carry_dir(setting.key, method.name, scale, seed)
                    key = f"carry/{setting.key}/{method.name}/x{scale:.3g}/seed{seed}"
                    tasks.append(Task(key, spec.config, str(run_dir), seal_test=True))
                    configs[key] = spec.fingerprint
                    rows.append({"setting": setting.row, "setting_key": setting.key,
                                 "budget": setting.budget, "optimizer": setting.optimizer,
                                 "method": method.name, "tuned_at": self.tuned_from(setting).key,
                                 "lr_scale": scale, "lr": lr * scale, "seed": seed,
                                 "run_dir": str(run_dir)})  # fmt: skip
        results = {r.key: r for r in pool.run_all(tasks)}
        ran = sum(r.outcome not in (None, "skipped") for r in results.values())
        for task, row in zip(tasks, rows, strict=True):
            record = read_record(Path(row["run_dir"]))
            # a preview may see runs going on, or records of another config
            done = (record is not None and record.completed
                    and record.config_hash == configs[task.key])  # fmt: skip
            row["best_val_acc"] = record.get("best_val_acc") if done else None
            row["train_time_s"] = record.get("train_time_s") if done else None
            row["error"] = results[task.key].error
        progress(2, f"knob carry check: {len(rows)} runs at the borrowing budgets ({ran} run "
                    "now, rest stored)")  # fmt: skip
        return rows

    def _rounds_done(self) -> int:
        """Rounds of earlier calls (so round numbers keep counting up across calls)."""
        rounds = read_json(self.dir / "tuning" / ROUNDS_FILE) or {}
        return int(rounds.get("next", 0))

    def final(self, pool: Any, finals: dict, cells: list) -> list[dict[str, Any]]:
        """Stage 3: each method's best knobs at each setting, over every seed."""
        rows, tasks = [], []
        for (setting, method, seed), spec in finals.items():
            run_dir = self.final_dir(setting, method, seed)
            rows.append({"setting": setting, "method": method, "seed": seed,
                         "run_dir": str(run_dir)})  # fmt: skip
            tasks.append(Task(f"final/{setting}/{method}/seed{seed}", spec.config, str(run_dir)))
        results = {r.key: r for r in pool.run_all(tasks)}
        ran = sum(r.outcome not in (None, "skipped") for r in results.values())
        out = []
        for row in rows:
            key = f"final/{row['setting']}/{row['method']}/seed{row['seed']}"
            if results[key].error:
                row["error"] = results[key].error
            setting = self.spec.setting(row["setting"])
            found = _run_row(Path(row["run_dir"]), finals[(row["setting"], row["method"],
                                                           row["seed"])].fingerprint)
            out.append({**row, "budget": setting.budget, "optimizer": setting.optimizer,
                        **found})  # fmt: skip
        done = sum(r["status"] == "completed" for r in out)
        progress(3, f"{done}/{len(out)} final runs completed ({ran} run now, rest stored)")
        return out

    def run(self) -> dict[str, Any] | None:
        """All stages of this call's cells; the results written to results.json (None for a
        shard, whose runs the last unsharded call merges and reports). A preview takes no
        lock: it may read a study while another call runs it."""
        if self.preview:
            return self._run()
        self.dir.mkdir(parents=True, exist_ok=True)
        with hold_study(self.dir, self.execution.shard):
            return self._run()

    def _run(self) -> dict[str, Any] | None:
        self.check_dir()
        t0 = time.perf_counter()
        cells = self.my_cells()
        pool = NoTraining() if self.preview else self.execution.pool(self.dir)
        ledger = (contextlib.nullcontext() if self.preview
                  else PieceLog(self.dir, self.execution.words()))  # fmt: skip
        try:
            with ledger as piece, hydra_configs(self.config_dirs):
                ref_configs = self.reference_configs(cells)
                tuners = self.tuners(cells, ref_configs)
                finals = self.final_specs(cells, tuners, ref_configs)
                need = self.needed_references(cells, tuners, finals)
                refs = self.references(pool, ref_configs, need)
                tuned = self.tuning(pool, tuners)
                carry = self.carry_check(pool, cells, tuners, ref_configs)
                finals = self.final_specs(cells, tuners, ref_configs)
                rows = self.final(pool, finals, cells)
        finally:
            pool.close()
        if self.execution.shard is not None:
            i, k = self.execution.shard
            print(
                f"[study] shard {i}/{k} done ({len(cells)} of {len(self.cells())} cells, "
                f"{time.perf_counter() - t0:.0f}s): run `qexp study` without --shard to merge "
                "and report",
                flush=True,
            )
            return None
        tuned = {(s.key, m.name): tuned[(self.tuned_from(s).key, m.name)] for s, m in cells}
        scales = {(s.key, m.name): self.adopted_lr_scale(s, m) for s, m in cells}
        summary = summarize(self.spec, refs, tuned, rows, scales)
        tuning_runs, tuning_s = run_train_seconds(self.dir / "tuning")
        changes = (read_json(self.dir / SPEC_CHANGES_FILE) or {}).get("changes", [])
        summary.update(pieces=read_pieces(self.dir, piece), tuning_runs=tuning_runs, carry=carry,
                       tuning_train_s=round(tuning_s, 1), spec_changes=changes)  # fmt: skip
        results = portable_paths(summary, self.dir)
        folder, banner = self.dir, None
        if self.preview:
            folder = self.dir / PREVIEW_DIR
            banner = preview_banner(tuners, carry, rows, self.pending_changes)
            folder.mkdir(exist_ok=True)
        paths = study_report.write_all(
            self.spec, folder, from_summary(self.spec, results), banner=banner
        )
        progress(4, f"report in {paths['report']} ({time.perf_counter() - t0:.0f}s this call)")
        return results


def scaled_lr(params: dict[str, Any], scale: float) -> dict[str, Any]:
    """``params`` with ``trainer.lr`` times ``scale`` (computed as the carry check ran it, so
    an adopted final run trains at exactly the checked LR)."""
    if scale == 1.0 or "trainer.lr" not in params:
        return dict(params)
    return {**params, "trainer.lr": params["trainer.lr"] * scale}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The top-level spec keys that differ between two study.json objects (appended settings
    as one entry)."""
    keys = sorted(k for k in {*old, *new} if k != "settings" and old.get(k) != new.get(k))
    added = len(new.get("settings") or []) - len(old.get("settings") or [])
    if added:
        keys.append(f"settings ({added} appended)")
    return keys


def preview_banner(
    tuners: dict, carry: list[dict[str, Any]], rows: list[dict[str, Any]], pending: list[str]
) -> str:
    """The warning a preview report opens with: how much of the study its numbers rest on,
    and the spec changes the next real call will log (``pending``)."""
    told = sum(t.trials - t.remaining() for _, t in tuners.values())
    asked = sum(t.trials for _, t in tuners.values())
    carried = sum(r["best_val_acc"] is not None for r in carry)
    finals = sum(r["status"] == "completed" for r in rows)
    planned = "" if told == asked else " (cells still tuning plan theirs later)"
    return (
        "**Preview of an unfinished study: not its result.** Written by `qexp study --preview` "
        f"from the runs stored so far: {told} of {asked} tuning trials told, {carried} of "
        f"{len(carry)} carry-check runs and {finals} of {len(rows)} planned final runs "
        f"done{planned}. Every number below can still change."
        + (f" The spec differs from the study's study.json in {', '.join(pending)}: the next "
           "`qexp study` call logs that change." if pending else "")
    )


def _completed(run_dir: Path) -> bool:
    record = read_record(run_dir)
    return record is not None and record.completed


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
        "setting": setting.row,
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


def _run_row(run_dir: Path, fingerprint: str | None = None) -> dict[str, Any]:
    """A final run's row from its record; ``stale`` where the record is of another config
    than ``fingerprint`` (a preview's view of a run the next real call retrains)."""
    record = read_record(run_dir)
    if record is None:
        return {"status": "missing"}
    if fingerprint is not None and record.config_hash != fingerprint:
        return {"status": "stale"}
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
    scales: dict[tuple[str, str], float | None] | None = None,
) -> dict[str, Any]:
    """Stage 4's numbers: per-cell intervals, paired comparisons, cost, tuning outcomes;
    ``scales``: the LR scale each cell's final runs took from the carry check (1: none)."""
    rows = [{**r, "setting": spec.setting(r["setting"]).row, "setting_key": r["setting"]}
            for r in rows]  # fmt: skip
    ok = [r for r in rows if r["status"] == "completed" and r.get("test_acc") is not None
          and r["seed"] in spec.seeds]  # fmt: skip
    by_cell: dict[tuple[str, str], dict[int, float]] = {}
    for r in ok:
        by_cell.setdefault((r["setting_key"], r["method"]), {})[r["seed"]] = float(r["test_acc"])
    cells = []
    for setting in spec.settings:
        for method in spec.methods_of(setting):
            key = (setting.key, method.name)
            knobs, result = tuned[key]
            scale = (scales or {}).get(key) or 1.0
            best = None if result.best_params is None else scaled_lr(result.best_params, scale)
            accs = by_cell.get(key, {})
            ci = mean_interval(list(accs.values()))
            runs = [r for r in ok if (r["setting_key"], r["method"]) == key]
            cells.append(
                {
                    "setting": setting.row,
                    "setting_key": setting.key,
                    "title": setting.title,
                    "bits": setting.bits,
                    "budget": setting.budget,
                    "optimizer": setting.optimizer,
                    "knobs_from": setting.knobs_from,
                    "tuning_seeds": list(spec.tuning.all_seeds),
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
                    "best_params": best,
                    "lr_scale": scale if scale != 1.0 else None,
                    "best_val": result.best_val,
                    "space": {k.key: study_report.range_text(k) for k in knobs},
                    "trials": result.trials,
                }
            )
    return {
        "name": spec.name,
        "seeds": list(spec.seeds),
        "aa_seeds": list(spec.aa_seeds),
        "alpha": spec.alpha,
        "references": list(refs.values()),
        "cells": cells,  # comparisons, claim tests and A/A rows: qexp.study.results.analyze
        "runs": rows,
        "claims": [c.__dict__ for c in spec.claims],
    }


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None


#: keys of `qexp study PRESET key=value` that say how to run it, not what (Execution)
EXECUTION_KEYS = ("workers", "threads", "launcher", "parallel")
LAUNCHERS = ("local", "slurm", "submitit_local")


def split_overrides(overrides: list[str]) -> tuple[list[str], Execution]:
    """(spec overrides, execution) from the command line's ``key=value`` words."""
    spec_overrides: list[str] = []
    options: dict[str, Any] = {}
    slurm: dict[str, Any] = {}
    for word in overrides:
        key, sep, value = word.partition("=")
        if not sep:
            raise QexpError(f"{word!r} is not key=value: give spec or run options as key=value")
        if key.startswith("slurm."):
            slurm[key[len("slurm."):]] = _scalar(value)
        elif key in EXECUTION_KEYS:
            options[key] = value
        else:
            spec_overrides.append(word)
    execution = Execution(slurm=slurm)
    for key in ("workers", "threads", "parallel"):
        if key in options:
            value = options[key]
            if key == "threads" and value == "null":
                execution = replace(execution, threads=None)
                continue
            if not value.isdigit() or int(value) < 1:
                raise QexpError(f"{key}={value}: use an integer >= 1")
            execution = replace(execution, **{key: int(value)})
    if "launcher" in options:
        if options["launcher"] not in LAUNCHERS:
            raise QexpError(f"launcher={options['launcher']}: use one of {' | '.join(LAUNCHERS)}")
        execution = replace(execution, launcher=options["launcher"])
    return spec_overrides, execution


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``i/k`` -> (i, k) with 1 <= i <= k."""
    if text is None:
        return None
    i, sep, k = text.partition("/")
    if not (sep and i.isdigit() and k.isdigit() and 1 <= int(i) <= int(k)):
        raise QexpError(f"--shard {text}: use i/k with 1 <= i <= k, e.g. --shard 1/3")
    return int(i), int(k)


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str]) -> int:
    """`qexp study PRESET [--dir DIR] [--shard i/k] [key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="qexp study",
        description="A fair comparison of estimators: FP references, equal tuning, paired "
        "final runs over seeds, statistics and a report. Rerun to resume.",
        epilog="run options: workers=N (runs side by side; default CPUs / threads, or 2 per "
        "GPU), threads=N (torch threads per run, default 1), launcher=local|slurm|"
        "submitit_local, slurm.KEY=VALUE (submitit options: partition, timeout_min, "
        "cpus_per_task, gpus_per_node, mem_gb...), parallel=N (trials of one cell per round)",
    )
    parser.add_argument("preset", help="a preset name (conf/study/<name>.yaml) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="spec overrides (e.g. tuning.trials=4) "
                        "and run options (workers=2)")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=None, help="study dir (default studies/NAME)")
    parser.add_argument("--config-dir", type=Path, action="append", default=[],
                        help="a config dir of your own (estimators, models...), as for `qexp "
                        "train --config-dir`; may be given more than once")  # fmt: skip
    parser.add_argument(
        "--preview",
        action="store_true",
        help="train nothing: write the report of the runs stored so far into DIR/preview/ "
        "(safe beside a call that is running the study)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="i/k: run the i-th of k fixed shares of the cells (then a last call without "
        "--shard merges and reports)",
    )
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides too
    try:
        spec_overrides, execution = split_overrides(args.overrides)
        execution = replace(execution, shard=parse_shard(args.shard))
        spec = load_spec(args.preset, spec_overrides)
        study_dir = args.dir or Path("studies") / spec.name
        if study_dir.exists() and not study_dir.is_dir():
            raise QexpError(f"--dir {study_dir} is a file: give a folder (new or a study's)")
        if args.preview and execution.shard is not None:
            raise QexpError("--preview reads the whole study: drop --shard")
        Study(spec, study_dir, execution, tuple(args.config_dir), args.preview).run()
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    return 0
