"""Launcher detection: map torchrun / srun / mpirun environment variables to rank, world size, device."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import CommConfig
from ..errors import UserInputError


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | mpi | single
    local_world_size: int = 0  # ranks on this node (0: the launcher did not say)


def detect_launch(env: dict[str, str] | None = None) -> LaunchInfo:
    env = dict(os.environ if env is None else env)
    local = next((int(env[k]) for k in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                          "MPI_LOCALNRANKS") if env.get(k, "").isdigit()), 0)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (and anything that sets the torch env vars)
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun",
                          local)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          "slurm", local)
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), "mpi", local)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return LaunchInfo(int(env["PMI_RANK"]), int(env["PMI_SIZE"]), int(env.get("MPI_LOCALRANKID", 0)), "mpi", local)
    return LaunchInfo(0, 1, 0, "single")


def die_with_launcher() -> None:
    """A worker that torchrun started ends when torchrun dies, however it dies.

    torchrun puts each worker in its own session, so `kill -9` on torchrun's process group leaves the workers
    running on their own (and writing into output.dir). Linux's parent-death signal sends this process SIGTERM
    when its parent exits; SIGTERM is held while results.h5 is open (io/hdf5.py), so an append completes.
    Elsewhere (no prctl, not under torchrun) this does nothing.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def idle_ranks_warning(world_size: int, n_clients: int) -> str | None:
    """A warning when some ranks would host no edge server (server c runs on rank c mod world size)."""
    if world_size <= n_clients:
        return None
    return (f"warning: {world_size} ranks but clients.n={n_clients}: ranks {n_clients}..{world_size - 1} host no "
            f"edge server and only share the evaluation; launch {n_clients} ranks (torchrun --nproc_per_node="
            f"{n_clients}), or raise clients.n to {world_size}")


def device_for(info: LaunchInfo) -> torch.device:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        torch.cuda.set_device(info.local_rank % n)
        return torch.device("cuda", info.local_rank % n)
    return torch.device("cpu")


def make_comm(cfg: CommConfig, info: LaunchInfo | None = None):
    """The communicator for this process, per comm.backend and the launcher."""
    from ..comm.local import LocalComm

    info = info or detect_launch()
    device = device_for(info)
    backend = cfg.backend
    if backend == "local" or (backend == "auto" and info.world_size == 1):
        if info.world_size > 1:
            raise UserInputError(f"comm.backend=local runs one process, but the launcher started "
                                 f"{info.world_size}; use comm.backend=auto or torch")
        return LocalComm(device)
    if backend == "mpi" or (backend == "auto" and info.launcher == "mpi" and "MASTER_ADDR" not in os.environ):
        # mpirun gives no torch rendezvous address; MPI itself is the transport then (comm/mpi.py)
        from ..comm.mpi import MPIComm

        return MPIComm(device if device.type == "cuda" else None, timeout_s=cfg.timeout_s)
    if info.launcher != "torchrun":
        # srun/mpirun give rank and size but no rendezvous address; export the torch variables.
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            if k not in os.environ:
                raise UserInputError(f"launched by {info.launcher} without {k}; export MASTER_ADDR (first "
                                     "node's host name) and MASTER_PORT, or launch with torchrun")
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if device.type == "cuda" and info.local_world_size > torch.cuda.device_count():
        # NCCL refuses two ranks on one GPU ("invalid usage") at the first collective; say why up front.
        raise UserInputError(
            f"{info.local_world_size} ranks on this node share {torch.cuda.device_count()} GPU(s), and NCCL needs "
            "one GPU per rank; launch at most one rank per GPU (servers beyond the ranks are hosted as virtual "
            "servers: clients.n may exceed the world size), use comm.backend=mpi, or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run on the CPU")
    from ..comm.torch_dist import TorchDistComm

    return TorchDistComm(timeout_s=cfg.timeout_s, device=device if device.type == "cuda" else None)


class Stopped(BaseException):
    """SIGTERM (Slurm's scancel or time limit, torchrun stopping its workers) inside stop_on_sigterm: raised in
    the main thread so that a run ends as after Ctrl-C, with one line saying where it stopped (cli.py). A
    BaseException, so that no `except Exception` on the way swallows it."""


STOP_GRACE_S = 20.0  # under torchrun's and Slurm's 30 s between SIGTERM and SIGKILL
_stop_signal: list[int] = []  # the stop signals received inside stop_on_sigterm (read by raise_if_stopped)


def raise_if_stopped() -> None:
    """Raise Stopped (SIGTERM) or KeyboardInterrupt (SIGINT) if one came inside stop_on_sigterm: the engine calls
    it at every round's start. The handler raises at once too, but Python drops an exception raised while it
    runs a __del__ or a callback from C (it prints "Exception ignored" and goes on), so a Ctrl-C could be lost
    and the run finish as if nothing had happened; the flag stops it at the next round."""
    import signal

    if _stop_signal:
        raise Stopped() if _stop_signal[0] == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def stop_on_sigterm(grace_s: float = STOP_GRACE_S):
    """Within the block a SIGTERM raises Stopped in the main thread (a SIGINT KeyboardInterrupt, as always), and
    both are remembered for raise_if_stopped. Python runs that handler only between
    bytecodes, so a main thread blocked in a collective on a peer that is gone would not run it: a watcher
    thread, woken by the signal (signal.set_wakeup_fd), ends the process with 143 after `grace_s` if it is
    still alive, which also bounds the wait for a checkpoint still being written (each file is written to a
    temporary name and renamed: a cut leaves no half file). Elsewhere than the main thread this does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _stop_signal.append(signum)
        raise Stopped() if signum == signal.SIGTERM else KeyboardInterrupt()

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signalled = threading.Event()

    def watch():
        while (got := os.read(read_fd, 1)) and got[0] != signal.SIGTERM:
            pass  # another signal with a Python handler (SIGINT): not ours to bound
        if got:
            signalled.set()
            time.sleep(grace_s)
            os._exit(128 + signal.SIGTERM)
        os.close(read_fd)

    _stop_signal.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    # Ctrl-C as Python's own handler does, and remembered; left alone where it is ignored (a job started in the
    # background of a script)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, handler)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, name="fedpipe-stop-watch", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
        _stop_signal.clear()
        if not signalled.is_set():
            os.close(write_fd)  # the watcher reads the end of the pipe and returns
