"""Where a run came from, kept in results.h5 (root attribute `provenance_json`, one JSON object per attempt:
a resumed run appends one): the package version and commit, the command line, the hosts and devices of every
rank, start time, library versions and the machine's load when it started. `fedpipe report` lists them and
marks wall-clock numbers that come from runs made under different conditions (analysis/runs.conditions).

    prov = provenance(comm)          # every rank calls it (one all_gather); the same dict on every rank
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "h5py", "numpy", "mpi4py")


def provenance(comm) -> dict:
    """This attempt's provenance, gathered from every rank."""
    here = {"host": socket.gethostname(), "device": device_name(comm.device)}
    ranks = comm.all_gather_object(here)
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["fedpipe", *sys.argv[1:]]) if _run_as_fedpipe() else shlex.join(sys.argv),
        "fedpipe_dist": _version("fedpipe_dist"),
        "commit": git_commit(Path(__file__).resolve().parents[2]),
        "python": platform.python_version(),
        "packages": {p: v for p in PACKAGES if (v := _version(p)) is not None},
        "world_size": len(ranks),
        "hosts": sorted({r["host"] for r in ranks}),
        "rank_hosts": [r["host"] for r in ranks],  # rank r ran on rank_hosts[r]
        "devices": [r["device"] for r in ranks],
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
        "launcher": _launcher(),
    }


def placement(prov: dict) -> str | None:
    """'rank 0 on HOST; HOST-a: ranks 0-1, HOST-b: ranks 2-3' for a run on several hosts (None on one)."""
    hosts = prov.get("rank_hosts") or []
    if len(set(hosts)) < 2:
        return None
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)

    def span(rs: list[int]) -> str:
        return f"ranks {rs[0]}-{rs[-1]}" if rs == list(range(rs[0], rs[-1] + 1)) and len(rs) > 1 else \
            "rank" + ("s " if len(rs) > 1 else " ") + ", ".join(map(str, rs))
    return f"rank 0 (results.h5, the aggregation) on {hosts[0]}; " + ", ".join(
        f"{h}: {span(rs)}" for h, rs in by_host.items())


def device_name(device) -> str:
    """`cuda:0 NVIDIA H200` on a GPU, `cpu <processor model>` on the CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu {model}".strip()


def git_commit(folder: Path) -> str | None:
    """The checkout's commit, with `+dirty` when tracked files differ from it; None outside a git checkout
    (an installed wheel) or without git."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _run_as_fedpipe() -> bool:
    """argv[0] is the package's __main__ (python -m fedpipe_dist, torchrun -m) or the `fedpipe` script."""
    first = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return first in ("fedpipe", "__main__.py")


def _launcher() -> str:
    from .launch import detect_launch

    return detect_launch().launcher
