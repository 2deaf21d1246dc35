"""Studies at scale on digits: workers side by side, a killed worker replaced, a study dir moved
to another machine, shards merged, a Slurm stage (submitit's local executor), front-door
errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_qexp

from qexp.study.pipeline import main as study_main
from qexp.train.faults import FAULT_ENV

#: digits_tiny, two methods at one setting: every stage, few runs
SMALL = ["settings=[w2a2]"]


def study(tmp_path: Path, folder: str, *args: str, cache: str = "cache", env=None, check=True):
    """`qexp study digits_tiny --dir tmp/FOLDER ARGS` in a subprocess with its own cache."""
    env = {"QEXP_CACHE": str(tmp_path / cache), "OMP_NUM_THREADS": "1", **(env or {})}
    return run_qexp("study", "digits_tiny", "--dir", str(tmp_path / folder), *args,
                    cwd=tmp_path, env=env, check=check, timeout=600)  # fmt: skip


def final_accs(study_dir: Path) -> dict:
    runs = json.loads((study_dir / "results.json").read_text())["runs"]
    return {(r["setting"], r["method"], r["seed"]): r["test_acc"] for r in runs}


def stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("metrics.json")}


@pytest.mark.slow
def test_two_workers_give_the_results_of_one(tmp_path):
    study(tmp_path, "one", *SMALL, "workers=1")
    two = study(tmp_path, "two", *SMALL, "workers=2", cache="cache2")
    assert "0 trained now" not in two.stdout  # its own cache: it trained its references too
    one_accs, two_accs = final_accs(tmp_path / "one"), final_accs(tmp_path / "two")
    assert len(one_accs) == 6 and one_accs == two_accs
    tuned = [json.loads((tmp_path / d / "results.json").read_text())["cells"] for d in ("one",
             "two")]  # fmt: skip
    assert [c["best_params"] for c in tuned[0]] == [c["best_params"] for c in tuned[1]]


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_its_run_resumes(tmp_path):
    # the worker training this final run dies like a SIGKILLed process after epoch 1
    victim = "final/w2a2/ste/seed1"
    proc = study(tmp_path, "s", *SMALL, "workers=2", env={FAULT_ENV: f"kill@epoch:1/{victim}"})
    assert "worker" in proc.stdout and "replaced" in proc.stdout
    run_dir = tmp_path / "s" / victim
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["epochs_done"] == 2
    assert "resumed" in (run_dir / "train.log").read_text()
    assert len(final_accs(tmp_path / "s")) == 6


@pytest.mark.slow
def test_a_moved_study_dir_with_an_empty_cache_retrains_nothing(tmp_path):
    study(tmp_path, "here", *SMALL)
    moved = tmp_path / "elsewhere" / "study"
    shutil.copytree(tmp_path / "here", moved, ignore=shutil.ignore_patterns(
        "checkpoints", "events.out.tfevents.*"))  # only the small records travel  # fmt: skip
    before = stamps(moved)
    proc = run_qexp("study", "digits_tiny", "--dir", str(moved), *SMALL, cwd=tmp_path,
                    env={"QEXP_CACHE": str(tmp_path / "fresh_cache"), "OMP_NUM_THREADS": "1"})
    assert "(0 trained now" in proc.stdout and "(0 run now" in proc.stdout
    assert stamps(moved) == before  # no completed run retrained
    assert not (tmp_path / "fresh_cache").exists()  # nor any reference
    assert final_accs(moved) == final_accs(tmp_path / "here")
    # a final run deleted there is rebuilt, its reference first
    shutil.rmtree(moved / "final" / "w2a2" / "ste" / "seed2")
    again = run_qexp("study", "digits_tiny", "--dir", str(moved), *SMALL, cwd=tmp_path,
                     env={"QEXP_CACHE": str(tmp_path / "fresh_cache"), "OMP_NUM_THREADS": "1"})
    assert "(1 trained now" in again.stdout and "(1 run now" in again.stdout


@pytest.mark.slow
def test_two_shards_and_a_merge_give_the_unsharded_report(tmp_path):
    whole = study(tmp_path, "whole", *SMALL)
    assert "report in" in whole.stdout
    for shard in ("1/2", "2/2"):
        out = study(tmp_path, "sharded", *SMALL, "--shard", shard).stdout
        assert f"shard {shard} done (1 of 2 cells" in out
        assert not (tmp_path / "sharded" / "results.json").exists()
    merged = study(tmp_path, "sharded", *SMALL)
    assert "(0 run now" in merged.stdout
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "sharded"))
    assert final_accs(tmp_path / "whole") == final_accs(tmp_path / "sharded")
    for key in ("cells", "comparisons"):
        strip = [{k: v for k, v in c.items() if "time" not in k} for c in a[key]]
        assert strip == [{k: v for k, v in c.items() if "time" not in k} for c in b[key]]


@pytest.mark.slow
def test_a_stage_as_a_submitit_job_array(tmp_path):
    study(tmp_path, "local", *SMALL)
    array = study(tmp_path, "array", *SMALL, "launcher=submitit_local", "workers=2")
    assert "report in" in array.stdout
    assert any((tmp_path / "array" / "submitit").iterdir())  # the job arrays' logs
    assert final_accs(tmp_path / "array") == final_accs(tmp_path / "local")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--dir", "{tmp}/file"], ["is a file"]),
        (["methods=[ste,nope]"], ["unknown nope", "clipped_ste, ste"]),
        (["workers=0"], ["workers=0", ">= 1"]),
        (["launcher=lsf"], ["launcher=lsf", "slurm"]),
        (["--shard", "3/2"], ["--shard 3/2", "1 <= i <= k"]),
    ],
)
def test_front_door_errors_are_one_line(tmp_path, capsys, args, words):
    (tmp_path / "file").write_text("not a folder")
    argv = ["digits_tiny", *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    assert study_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qexp: error:"), err
    for word in words:
        assert word in err, err


def test_overrides_after_dir_are_spec_overrides(tmp_path, monkeypatch):
    """`qexp study PRESET --dir D key=value`: the override reaches the spec (it was refused
    as 'unrecognized arguments')."""
    seen = {}
    import qexp.study.pipeline as pipeline

    monkeypatch.setattr(pipeline.Study, "run", lambda self: seen.update(spec=self.spec,
                        execution=self.execution))  # fmt: skip
    argv = ["digits_tiny", "--dir", str(tmp_path / "d"), "tuning.trials=3", "workers=2"]
    assert study_main(argv) == 0
    assert seen["spec"].tuning.trials == 3 and seen["execution"].workers == 2


def test_workers_share_gpus_round_robin():
    from qexp.study.workers import worker_runtimes

    on_gpus = worker_runtimes(5, None, gpus=2)
    assert [r.device for r in on_gpus] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    on_cpu = worker_runtimes(2, 1, gpus=0)
    assert [(r.threads, r.device) for r in on_cpu] == [(1, "cpu"), (1, "cpu")]


def test_gpu_check_says_so_without_a_gpu():
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: scripts/gpu_check.sh would run the whole check")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stdout
