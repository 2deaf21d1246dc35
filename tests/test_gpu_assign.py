"""GPU assignment of local sweep jobs (the assignment itself; no GPU needed)."""

from qexp.train.gpu_assign import round_robin_gpu, sweep_job_device

JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
SLURM = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}


def test_jobs_go_round_robin_over_the_visible_gpus():
    assert [round_robin_gpu(n, 4) for n in range(10)] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert [round_robin_gpu(n, 1) for n in range(3)] == [0, 0, 0]
    assert round_robin_gpu(5, 0) is None


def test_concurrent_joblib_jobs_get_distinct_gpus():
    devices = [sweep_job_device("auto", JOBLIB, n, gpu_count=3) for n in range(6)]
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2"]
    assert len(set(devices[:3])) == 3  # n_jobs=3 side by side: one GPU each
    assert sweep_job_device("cuda", JOBLIB, 4, gpu_count=3) == "cuda:1"


def test_explicit_devices_other_launchers_and_no_gpu_are_left_alone():
    assert sweep_job_device("cpu", JOBLIB, 1, gpu_count=4) == "cpu"
    assert sweep_job_device("cuda:3", JOBLIB, 1, gpu_count=4) == "cuda:3"
    assert sweep_job_device("auto", SLURM, 1, gpu_count=4) == "auto"
    assert sweep_job_device("auto", None, 1, gpu_count=4) == "auto"
    assert sweep_job_device("auto", JOBLIB, 1, gpu_count=0) == "auto"
    assert sweep_job_device("auto", JOBLIB, None, gpu_count=2) == "auto"
