"""Shared helpers for the tests (not a test module)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Real components some tests start (each of those tests skips, saying so, where its component is missing).
HAVE_SLURM = all(shutil.which(t) for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"))
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False


def shared_data() -> Path | None:
    """../shared/data beside the checkout, or FEDPIPE_SHARED_DATA; None when absent."""
    p = Path(os.environ.get("FEDPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
    return p if (p / "models" / "stories260K-hf" / "config.json").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    # The multi-rank tests check gloo's CPU semantics with more ranks than a test machine has GPUs (NCCL
    # needs one GPU per rank), so the jobs they launch run on the CPU even where a GPU is present.
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "fedpipe_dist", *args]


# A few-second in-process run of the quickstart job (tiny GPT-2, synthetic E2E): what the method tests run.
SMALL_RUN = ["rounds=3", "train.local_steps=3", "train.batch_max=4", "data.synthetic_train_size=96",
             "data.synthetic_eval_size=24", "model.max_length=96", "eval.max_samples=24", "clients.slowdown=1"]


def run_small(tmp_path, name: str, *extra: str):
    """Run jobs/quickstart.yaml with SMALL_RUN and `extra` into tmp_path/name; returns (cfg, Results)."""
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.io.hdf5 import Results
    from fedpipe_dist.job import load_job
    from fedpipe_dist.runtime.engine import run_job

    cfg = load_job("jobs/quickstart.yaml", [*SMALL_RUN, f"output.dir={tmp_path / name}", *extra])
    run_job(cfg, LocalComm(), show_progress=False)
    return cfg, Results(tmp_path / name / "results.h5")


def kill_job(proc) -> None:
    """Kill a launched job (its process group when it has one of its own, e.g. start_new_session) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # not a group leader: the launcher alone
            proc.kill()
    proc.communicate()


def stop_and_wait(proc, pid: int, limit_s: float) -> tuple[str, float]:
    """SIGSTOP process `pid` (one rank of the job `proc`) and wait up to limit_s for the job to end on its own.
    Returns (the job's stderr, seconds from the stop to the end); afterwards the stopped process and whatever
    is left of the job are killed, whatever happened."""
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=limit_s)
        return err, time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_job(proc)


def worker_pids(root_pid: int) -> dict[int, int]:
    """{RANK: pid} of the workers below the launcher process root_pid (torchrun), from /proc (Linux)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != root_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (with benchmarks/ on sys.path while it loads, as when run as a script)."""
    import importlib.util

    script = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


def run_without_data(script: Path, empty_dir: Path):
    """Run a benchmark script pointed at a folder without the shared data (and no FEDPIPE_SHARED_DATA)."""
    import subprocess

    env = subprocess_env()
    env.pop("FEDPIPE_SHARED_DATA", None)
    return subprocess.run([sys.executable, str(script), "--stories-path", str(empty_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
