"""Shared pytest fixtures (kept minimal)."""

import os
import signal
from pathlib import Path

# One torch thread per process, as each rank runs (`fedpipe run` sets the same default, and the jobs the tests
# launch get it from _util.subprocess_env). Set before any test module imports torch, so the in-process runs get
# it too: two pytest-xdist workers each with a 2-thread pool on a 2-core machine made them 1.8x slower (two copies
# of tests/test_analysis.py side by side: 144 s with 2 threads each, 81 s with 1). An explicit setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ctrl-C at its default in the jobs the tests start (and stop with SIGINT): a pytest started in the background of
# a non-interactive shell (`pytest ... &`) inherits SIGINT ignored (POSIX), every child would too, Python there
# installs no KeyboardInterrupt handler, and a Ctrl-C'd run goes on to its last round: a test would check how pytest
# was started, not the job (seen 2026-12-04, every time). A handler, unlike an ignore, is reset to the default at
# exec, so one here in each pytest process is what its children start with.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest


@pytest.fixture
def REPO_ROOT() -> Path:
    """The checkout's root: where jobs/ lives and where `python -m fedpipe_dist` must run."""
    return Path(__file__).resolve().parents[1]


# Short real runs (tiny GPT-2, synthetic E2E, in-process) that the analysis tests and notebooks read: every
# method on heterogeneous servers, the paper's four on ideal ones, and FedPipe's ablations.
ANALYSIS_SMALL = ["rounds=3", "train.local_steps=3", "train.batch_max=4", "data.synthetic_train_size=96",
                  "data.synthetic_eval_size=24", "model.max_length=96", "eval.max_samples=24"]
IDEAL = ["clients.slowdown=1", "clients.memory_gb=24"]
ANALYSIS_RUNS = {
    **{f"hetero/{m}": [f"method={m}"] for m in ("fedpipe", "ft", "lora", "fedadapter", "flora", "flexlora",
                                                   "hetlora")},
    **{f"ideal/{m}": [f"method={m}", *IDEAL] for m in ("fedpipe", "ft", "lora", "fedadapter")},
    "ablation/importance_fixed": ["plan.importance=fixed"],
    "ablation/importance_random": ["plan.importance=random"],
    "ablation/fixed_rank4": ["plan.mode=uniform", "lora.rank=4"],
    "ablation/precision_fp32": ["clients.precision=fp32"],
    "ablation/precision_nf4": ["clients.precision=nf4"],
}


@pytest.fixture(scope="session")
def analysis_runs(tmp_path_factory) -> Path:
    """A folder of results.h5 files from 16 short real runs (about a minute on 2 cores)."""
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.job import load_job
    from fedpipe_dist.runtime.engine import run_job

    root = tmp_path_factory.mktemp("analysis_runs")
    for name, extra in ANALYSIS_RUNS.items():
        cfg = load_job("jobs/quickstart.yaml", [*ANALYSIS_SMALL, *extra, f"output.dir={root / name}",
                                                "output.save_final=false"])
        run_job(cfg, LocalComm(), show_progress=False)
    return root
