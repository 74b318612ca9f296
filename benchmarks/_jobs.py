"""Running a real `fedpipe run` job under torchrun from a benchmark script (one place for the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The rows the benchmarks compare, as job overrides: every method (fedpipe at its default variant), the paper's
# exact FedPipe, and lora_hb, the heterogeneity-aware LoRA (batch in proportion to compute).
METHODS = {
    "lora": ["method=lora"],
    "lora_hb": ["method=lora_hb"],
    "fedpipe": ["method=fedpipe"],
    "fedpipe-paper": ["method=fedpipe", "plan.variant=paper"],
    "ft": ["method=ft"],
    "fedadapter": ["method=fedadapter"],
    "flora": ["method=flora"],
    "flexlora": ["method=flexlora"],
    "hetlora": ["method=hetlora"],
}
CENTRAL = ["method=lora", "central=true"]  # the centralized limit of LoRA's job (runtime/central.py)


def torchrun_job(nproc: int, job_args: list[str], label: str) -> float:
    """`torchrun --standalone --nproc_per_node=nproc -m fedpipe_dist run *job_args` (gloo on CPU, one thread per
    rank); returns its wall-clock seconds, or stops the benchmark with the job's stderr."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 "-m", "fedpipe_dist", "run", *job_args, "--no-progress"], label)


def job_command(job_args: list[str]) -> list[str]:
    """`python -m fedpipe_dist run *job_args`: one process, world size 1."""
    return [sys.executable, "-m", "fedpipe_dist", "run", *job_args, "--no-progress"]


def job_env() -> dict:
    """The environment every benchmark job runs in: one thread per process."""
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def process_job(job_args: list[str], label: str) -> float:
    """`python -m fedpipe_dist run *job_args` in one fresh process (world size 1, one thread)."""
    return _run(job_command(job_args), label)


def _run(cmd: list[str], label: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{label} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def write_json(path, doc, **dumps) -> Path:
    """`doc` as JSON at `path` (its folder made first); `dumps`: json.dumps options (default indent=1)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, **{"indent": 1, **dumps}) + "\n")
    return out
