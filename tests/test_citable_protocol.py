"""The citable study's protocol on digits: tuning seeds apart from evaluation seeds and averaged,
knobs carried from one training budget to another, an A/A row, no pruning before a method's
deployed form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST

from qexp.errors import QexpError
from qexp.study.pipeline import Study
from qexp.study.pipeline import main as study_main
from qexp.study.runs import compose_run, hydra_configs
from qexp.study.spec import parse_spec

BASE = [*FAST, "model=mlp", "model.hidden=[32]", "trainer.log_every=1000", "quantizer=binary"]


def protocol(**changes) -> dict:
    spec = {
        "name": "protocol",
        "base": BASE,
        "reference": ["trainer.epochs=3"],
        "seeds": [0, 1],
        "aa_seeds": [20, 21],
        "tuning": {"trials": 3, "seeds": [7, 8], "overrides": [], "startup_trials": 1,
                   "prune_startup_trials": 0, "prune_warmup_epochs": 0,
                   "prune_before_deployed": True},
        "final": [],
        "settings": [
            {"key": "e5", "title": "W1/A1, 5 epochs", "bits": 1, "baseline": "clipped_ste",
             "budget": 5, "optimizer": "adam", "tuning": ["trainer.epochs=5"],
             "final": ["trainer.epochs=5"], "aa": True, "group": "w1a1"},
            {"key": "e2", "title": "W1/A1, 2 epochs", "bits": 1, "baseline": "clipped_ste",
             "budget": 2, "optimizer": "adam", "final": ["trainer.epochs=2"],
             "knobs_from": "e5", "group": "w1a1"},
        ],
        "methods": {"clipped_ste": {"overrides": ["estimator=clipped_ste"]},
                    "alpha_blend": {"overrides": ["estimator=alpha_blend"]}},
    }  # fmt: skip
    spec.update(changes)
    return spec


def test_tuning_seeds_must_not_be_evaluation_seeds():
    with pytest.raises(QexpError, match="disjoint"):
        parse_spec(protocol(seeds=[0, 7]))
    with pytest.raises(QexpError, match="aa_seeds"):
        parse_spec(protocol(aa_seeds=[1, 20]))


def test_no_pruning_before_the_deployed_form(tmp_path):
    """Where a trial's method trains its deployed form comes from the trial's own knobs; the
    worker's hook never prunes an epoch whose last step came before it, however low its
    validation accuracy."""
    import optuna

    from qexp.study.journal import make_pruner, storage_at
    from qexp.study.workers import TrialRef, _pruning_hook

    study = Study(parse_spec(protocol()), tmp_path / "s")
    e5 = study.spec.setting("e5")

    def deployed_from(method: str, *knobs: str) -> float:
        overrides = study.cell_overrides(e5, study.spec.method(method))
        return study.deployed_from(compose_run([*overrides, "trainer.epochs=5", *knobs]))

    with hydra_configs():
        # alpha = 1 from p1 on (the cubic ramp is flat there: its float32 alpha is exactly 1
        # a few thousandths of progress before p1, and so the deployed form begins there)
        assert 0.79 < deployed_from("alpha_blend") <= 0.8
        assert 0.29 < deployed_from("alpha_blend", "schedule.alpha.p1=0.3") <= 0.3
        assert deployed_from("clipped_ste") == 0.0  # deployed from the start
        # each trial the tuner asks carries its own point to its worker
        tuners = study.tuners(study.cells(), study.reference_configs(study.cells()))
        tuner = tuners[("e5", "alpha_blend")][1]
        for _ in range(3):
            trial, tasks = tuner.ask(0)
            p1 = trial.params["schedule.alpha.p1"]
            assert p1 - 0.01 < tasks[0].trial.deployed_from <= p1 + 1e-3  # (a 1/1000 grid)
            assert [t.trial for t in tasks[1:]] == [None]  # the second seed reports nothing

    # the hook: two finished trials at 0.9 make a trial at 0.1 prunable from epoch 1 on,
    # except where its epoch's last step (progress (e*S - 1) / (E*S)) is before 0.8
    journal = tmp_path / "optuna.journal"
    cell = optuna.create_study(study_name="cell", storage=storage_at(journal),
                               direction="maximize", pruner=make_pruner(0, 0))  # fmt: skip
    for _ in range(2):
        done = cell.ask()
        for epoch in range(1, 6):
            done.report(0.9, step=epoch)
        cell.tell(done, 0.9)

    def judged(epoch: int, deployed: float | None) -> bool:
        ref = TrialRef(str(journal), "cell", cell.ask()._trial_id, 0, 0, None, deployed)
        history = [{"val_acc": 0.1, "progress": (e * 10 - 1) / 50} for e in range(1, epoch + 1)]
        try:
            _pruning_hook(ref)(history)
        except optuna.TrialPruned:
            return True
        return False

    assert [judged(e, 0.8) for e in range(1, 6)] == [False, False, False, False, True]
    assert [judged(e, 0.3) for e in (1, 2)] == [False, True]  # 0.18 < 0.3 <= 0.38
    assert judged(1, None) and judged(1, 0.0)


def test_paired_aa_seeds_start_from_their_partners_reference():
    """A/A seed i fine-tunes evaluation seed i's reference (the paired design's noise floor);
    ``aa_reference: own`` gives it a reference of its own."""
    setting = "e5"
    with hydra_configs():
        paired = Study(parse_spec(protocol()), Path("/nonexistent"))
        refs = paired.reference_configs(paired.cells())
        own = Study(parse_spec(protocol(aa_reference="own")), Path("/nonexistent"))
        own_refs = own.reference_configs(own.cells())
    for aa, seed in ((20, 0), (21, 1)):
        assert refs[(setting, aa)] == refs[(setting, seed)]
        assert own_refs[(setting, aa)] != own_refs[(setting, seed)]
        assert own_refs[(setting, aa)]["seed"] == aa
    assert refs[(setting, 0)] != refs[(setting, 1)]
    with pytest.raises(QexpError, match="aa_reference"):
        parse_spec(protocol(aa_reference="shared"))


@pytest.mark.slow
def test_protocol_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    spec_file = tmp_path / "protocol.json"
    check = {"methods": ["alpha_blend"], "lr_scales": [0.5, 1, 2], "adopt": True}
    spec_file.write_text(json.dumps(protocol(carry_check=check)))
    # JSON is YAML: the spec file is read as a preset path
    assert study_main([str(spec_file), "--dir", str(tmp_path / "s"), "workers=1"]) == 0
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    key = {5: "e5", 2: "e2"}  # the settings' budgets
    cells = {(key[c["budget"]], c["method"]): c for c in results["cells"]}
    assert {c["setting"] for c in results["cells"]} == {"w1a1"}  # one row, two budgets
    # knobs tuned at 5 epochs carry to the 2-epoch setting, which tunes nothing itself
    for method in ("clipped_ste", "alpha_blend"):
        borrowed = {k: v for k, v in cells[("e2", method)]["best_params"].items()
                    if method == "clipped_ste" or k != "trainer.lr"}  # (alpha_blend: below)
        assert borrowed.items() <= cells[("e5", method)]["best_params"].items()
        assert cells[("e5", method)]["budget"] == 5 and cells[("e2", method)]["budget"] == 2
    assert not (tmp_path / "s" / "tuning" / "e2").exists()
    # every trial trained on both tuning seeds, none of them an evaluation seed
    for method in ("clipped_ste", "alpha_blend"):
        for trial in cells[("e5", method)]["trials"]:
            seeds = {json.loads(p.read_text())["seed"]
                     for p in (tmp_path / "s" / trial["run_dir"]).glob("seed*/metrics.json")}
            assert seeds == {7, 8}, trial  # fmt: skip
            if trial["state"] == "pruned" and method == "alpha_blend":
                # judged only once alpha = 1 (at the trial's own end of the ramp)
                run = tmp_path / "s" / trial["run_dir"] / "seed7" / "metrics.json"
                last = json.loads(run.read_text())["history"][-1]
                assert last["progress"] >= trial["params"]["schedule.alpha.p1"] - 0.01
            if trial["state"] == "complete" and trial.get("per_seed"):
                assert trial["val_acc"] == pytest.approx(sum(trial["per_seed"]) / 2)
    finals = {(key[r["budget"]], r["method"], r["seed"]) for r in results["runs"]}
    assert {s for (_, _, s) in finals} == {0, 1, 20, 21}
    assert {(s, m) for (s, m, seed) in finals if seed >= 20} == {("e5", "clipped_ste")}
    assert results["aa_seeds"] == [20, 21]
    starts = {seed: json.loads((tmp_path / "s" / "final" / "e5" / "clipped_ste" / f"seed{seed}"
                                / "metrics.json").read_text())["config"]["init_from"]
              for seed in (0, 1, 20, 21)}  # fmt: skip
    assert starts[20] == starts[0] and starts[21] == starts[1] != starts[0]  # paired A/A
    report = (tmp_path / "s" / "report.md").read_text()
    assert "A/A" in report
    assert (tmp_path / "s" / "accuracy_vs_budget.png").stat().st_size > 0
    assert (tmp_path / "s" / "lr_sensitivity.png").stat().st_size > 0
    # the carry check: alpha-blending's 5-epoch knobs at 2 epochs, LR x0.5 / x1 / x2, on
    # the tuning seeds with the test sealed
    tuned_lr = cells[("e5", "alpha_blend")]["best_params"]["trainer.lr"]
    carry = results["carry"]
    assert {(r["lr_scale"], r["seed"]) for r in carry} == {(x, s) for x in (0.5, 1, 2)
                                                           for s in (7, 8)}  # fmt: skip
    for r in carry:
        record = json.loads((tmp_path / "s" / r["run_dir"] / "metrics.json").read_text())
        assert record["config"]["trainer"]["lr"] == pytest.approx(tuned_lr * r["lr_scale"])
        assert record["config"]["trainer"]["epochs"] == 2 and "test_acc" not in record
        assert r["best_val_acc"] == record["best_val_acc"]
        assert r["train_time_s"] == record["train_time_s"]
    assert "## Do the tuned knobs carry to other budgets?" in report
    assert "| w1a1, budget 2, adam | alpha_blend | w1a1, budget 5, adam |" in report
    assert "| knob carry check | 6 |" in report
    # adopted: alpha-blending's 2-epoch final runs train at the check's best scale
    means = {x: sum(r["best_val_acc"] for r in carry if r["lr_scale"] == x) / 2
             for x in (0.5, 1, 2)}  # fmt: skip
    best = max(means, key=lambda x: (means[x], x == 1))
    adopted = cells[("e2", "alpha_blend")]
    assert adopted["best_params"]["trainer.lr"] == pytest.approx(tuned_lr * best)
    assert adopted.get("lr_scale") == (None if best == 1 else best)
    for seed in (0, 1):
        run = tmp_path / "s" / "final" / "e2" / "alpha_blend" / f"seed{seed}" / "metrics.json"
        lr = json.loads(run.read_text())["config"]["trainer"]["lr"]
        assert lr == pytest.approx(tuned_lr * best)
    budgets = {(c["budget"], c["method"]) for c in results["comparisons"]}
    assert budgets == {(5, "alpha_blend"), (2, "alpha_blend")}  # compared within a budget


def test_carry_check_spec_and_table():
    with pytest.raises(QexpError, match="include 1"):
        parse_spec(protocol(carry_check={"methods": ["alpha_blend"], "lr_scales": [0.5, 2]}))
    with pytest.raises(QexpError, match="first 3 digits"):
        parse_spec(protocol(carry_check={"methods": ["alpha_blend"],
                                         "lr_scales": [0.3333, 0.33333, 1]}))
    with pytest.raises(QexpError, match="not methods"):
        parse_spec(protocol(carry_check={"methods": ["nope"]}))
    spec = parse_spec(protocol(carry_check={"methods": ["alpha_blend"]}))
    assert spec.carry_check.lr_scales == pytest.approx((1 / 3, 1, 3))

    from qexp.study.report import carry_table
    from qexp.study.results import StudyResults

    def row(scale: float, seed: int, val: float) -> dict:
        return {"setting": "w1a1", "method": "alpha_blend", "lr_scale": scale, "seed": seed,
                "budget": 2, "optimizer": "adam", "tuned_at": "e5", "lr": 0.01 * scale,
                "best_val_acc": val}  # fmt: skip

    vals = {0.5: (0.80, 0.82), 1.0: (0.84, 0.83), 2.0: (0.86, 0.85)}
    results = StudyResults.from_json({"name": "p", "seeds": [0, 1], "alpha": 0.05,
                                      "carry": [row(x, s, v[i]) for x, v in vals.items()
                                                for i, s in enumerate((7, 8))]})  # fmt: skip
    (table,) = carry_table(results)
    assert table["means"] == pytest.approx({0.5: 0.81, 1.0: 0.835, 2.0: 0.855})
    assert table["best"] == 2.0 and table["gap"] == pytest.approx(0.02)
    assert table["lr"] == pytest.approx(0.01) and table["seeds"] == 2


def test_method_overrides_by_setting_key_or_row():
    """``at`` keyed by a row reaches every setting of the row; a key of its own wins."""
    methods = {"clipped_ste": {"overrides": ["estimator=clipped_ste"]},
               "alpha_blend": {"overrides": ["estimator=alpha_blend"],
                               "at": {"w1a1": ["quantizer=sign"], "e2": ["quantizer=binary"]}}}
    spec = parse_spec(protocol(methods=methods))
    blend = spec.method("alpha_blend")
    assert blend.overrides_at(spec.setting("e5")) == ("quantizer=sign",)  # by its row
    assert blend.overrides_at(spec.setting("e2")) == ("quantizer=binary",)  # by its key
    assert spec.method("clipped_ste").overrides_at(spec.setting("e5")) == ()
    with pytest.raises(QexpError, match="no such setting or row"):
        parse_spec(protocol(methods={**methods, "clipped_ste": {"at": {"w9": ["x=1"]}}}))


@pytest.mark.parametrize("prune_last_epoch", [True, False])
def test_pruning_at_the_last_epoch_is_the_specs_choice(tmp_path, prune_last_epoch):
    """Two finished trials at 0.9 make a trial at 0.1 prunable; at its last epoch (2 of 2)
    the worker's hook prunes it only where ``tuning.prune_last_epoch`` allows."""
    import optuna

    from qexp.study.journal import make_pruner, storage_at
    from qexp.study.workers import TrialRef, _pruning_hook

    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="cell", storage=storage_at(journal),
                                direction="maximize", pruner=make_pruner(0, 0))  # fmt: skip
    for _ in range(2):
        done = study.ask()
        done.report(0.9, step=1)
        done.report(0.9, step=2)
        study.tell(done, 0.9)
    last = None if prune_last_epoch else 2

    def hook():
        return _pruning_hook(TrialRef(str(journal), "cell", study.ask()._trial_id, 0, 0, last))

    low = [{"val_acc": 0.1}, {"val_acc": 0.1}]
    with pytest.raises(optuna.TrialPruned, match="epoch 1"):
        hook()(low[:1])  # before the last epoch the median rule holds either way
    if prune_last_epoch:
        with pytest.raises(optuna.TrialPruned, match="epoch 2"):
            hook()(low)
    else:
        assert hook()(low) is False
    assert parse_spec(protocol()).tuning.prune_last_epoch is True  # Optuna's behaviour
    off = protocol()
    off["tuning"] = {**off["tuning"], "prune_last_epoch": False}
    assert parse_spec(off).tuning.prune_last_epoch is False


def test_adopted_carry_check_lr_for_borrowing_cells(tmp_path):
    """With carry_check.adopt a checked cell that borrows its knobs trains its final runs at
    the scale whose carry-check runs reached the best mean validation accuracy (the borrowed
    LR on a tie); until those runs are all done its final runs wait (and their references are
    needed); cells the check does not cover keep the tuned LR."""
    check = {"methods": ["alpha_blend"], "lr_scales": [0.5, 1, 2], "adopt": True}
    study = Study(parse_spec(protocol(carry_check=check)), tmp_path / "s")
    e2, e5 = study.spec.setting("e2"), study.spec.setting("e5")
    blend, clipped = study.spec.method("alpha_blend"), study.spec.method("clipped_ste")
    tuned = {"trainer.lr": 0.003, "schedule.alpha.p1": 0.7}

    def record(scale: float, seed: int, val: float) -> None:
        run = study.carry_dir("e2", "alpha_blend", scale, seed)
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"status": "completed",
                                                      "best_val_acc": val}))  # fmt: skip

    assert study.adopted_lr_scale(e2, blend) is None  # nothing checked yet
    assert study.final_params(e2, blend, tuned) is None
    for scale, vals in ((0.5, (0.70, 0.72)), (1.0, (0.74, 0.75)), (2.0, (0.76, 0.74))):
        for seed, val in zip((7, 8), vals, strict=True):
            record(scale, seed, val)
    assert study.adopted_lr_scale(e2, blend) == 2.0  # mean 0.75 beats 0.745
    assert study.final_params(e2, blend, tuned) == {"trainer.lr": 0.006,
                                                    "schedule.alpha.p1": 0.7}  # fmt: skip
    assert study.final_params(e2, clipped, tuned) == tuned  # not checked: the tuned LR
    assert study.final_params(e5, blend, tuned) == tuned  # tuned here: nothing borrowed
    # a tie keeps the borrowed LR
    (study.carry_dir("e2", "alpha_blend", 2.0, 7) / "metrics.json").write_text(
        json.dumps({"status": "completed", "best_val_acc": 0.75}))  # fmt: skip
    assert study.adopted_lr_scale(e2, blend) == 1.0
    # without adopt the check only reports
    plain = Study(parse_spec(protocol(carry_check={**check, "adopt": False})), study.dir)
    assert plain.adopted_lr_scale(e2, blend) == 1.0
    with pytest.raises(QexpError, match="carry_check.adopt"):
        parse_spec(protocol(carry_check={**check, "adopt": "yes"}))
