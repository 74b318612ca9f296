"""Server profiles: measured compute, memory budget, and the job's heterogeneity settings."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ClientsConfig, per_client_values


@dataclass
class ServerProfile:
    client: int
    tflops: float  # measured matmul throughput on this rank, divided by the server's slowdown
    mem_budget_bytes: int
    slowdown: float


def measure_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 512, reps: int = 7) -> float:
    """Median throughput of an n x n matmul at the training dtype (TFLOP/s)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # the first call warms up
    return 2 * n**3 / times[len(times) // 2] / 1e12


def device_memory_bytes(device: torch.device) -> int | None:
    """The accelerator's total memory (None on CPU, where the job's clients.memory_gb is the budget)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def client_profiles(clients: ClientsConfig, seed: int, measured_tflops: list[float], owner,
                    device_mem: list[int | None] | None = None) -> list[ServerProfile]:
    """One profile per edge server of the job's `clients` section: its host rank's measured speed (or the
    median, see clients.speed) / its slowdown, and its memory budget (`seed`: the job's, for drawn values)."""
    n = clients.n
    if clients.speed == "median":  # identical hardware: measurement noise must not change the plans
        measured_tflops = [float(np.median(measured_tflops))] * len(measured_tflops)
    if clients.tflops is not None:
        base = per_client_values(clients.tflops, n, "clients.tflops", seed=seed)
    else:
        base = [measured_tflops[owner(c)] for c in range(n)]
    mem = per_client_values(clients.memory_gb, n, "clients.memory_gb", seed=seed)
    slow = per_client_values(clients.slowdown, n, "clients.slowdown", seed=seed)
    budgets = [int(mem[c] * 2**30) for c in range(n)]
    if device_mem is not None:  # CUDA: the job's budget, capped by what the host GPU really has
        budgets = [min(b, device_mem[owner(c)]) if device_mem[owner(c)] else b for c, b in enumerate(budgets)]
    return [ServerProfile(c, base[c] / slow[c], budgets[c], slow[c]) for c in range(n)]
