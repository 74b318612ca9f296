"""torch.distributed communicator: gloo on CPU, nccl on GPU, rendezvous from the launcher's env (env://).

Every collective runs under the process group's timeout (comm.timeout_s). So that a timeout can say which
rank stopped (killed, SIGSTOPped, wedged), each rank beats a heartbeat into the rendezvous store from a
daemon thread every few seconds; when a collective fails, the ranks whose heartbeat is stale are named in
the error (CollectiveTimeout).
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from .base import CollectiveTimeout, Traffic, nbytes

HEARTBEAT_S = 2.0
__all__ = ["CollectiveTimeout", "TorchDistComm"]


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun, a rendezvous store of this restart attempt's own (None elsewhere: env:// as usual).

    torchrun's agent store outlives a restart (--max-restarts) and keeps the previous attempt's keys, gloo's
    peer addresses among them; with env:// a restarted worker reads a dead peer's address and fails with
    'connectFullMesh ... Connection refused' (measured with torch 2.13; pytorch issue 167288 reports the
    NCCL form). Prefixing every key with the attempt number keeps attempts apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent_hosts_it and rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"fedpipe/attempt{attempt}", store)


class TorchDistComm:
    def __init__(self, *, backend: str | None = None, timeout_s: float = 600.0,
                 device: torch.device | str | None = None):
        if not dist.is_initialized():
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            timeout = datetime.timedelta(seconds=timeout_s)
            store = _attempt_store(timeout)
            if store is None:
                dist.init_process_group(backend=backend, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=int(os.environ["RANK"]),
                                        world_size=int(os.environ["WORLD_SIZE"]))
        self.backend = dist.get_backend()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"
        self.device = torch.device(device)
        self.traffic = Traffic()
        self.timeout_s = timeout_s
        self._store = None
        try:  # the rendezvous store (TCPStore under torchrun); no heartbeat where there is none
            self._store = dist.distributed_c10d._get_default_store()
        except Exception:  # pragma: no cover - depends on the launcher
            self._store = None
        self._stop = threading.Event()
        self._host = socket.gethostname()
        self._beater: threading.Thread | None = None
        if self._store is not None and self.world_size > 1:
            self._beat()
            self._beater = threading.Thread(target=self._beat_loop, name="fedpipe-heartbeat", daemon=True)
            self._beater.start()
            # Stopped and joined before the interpreter finalizes, on every way out: a daemon thread still inside
            # the store's C++ call then is ended by a forced unwind through noexcept code, which aborts the
            # process ("terminate called without an active exception", SIGABRT; seen once in CI on a 4-rank run)
            atexit.register(self.stop_heartbeat)

    # ---- heartbeats, to name a dead or stopped peer ------------------------------------------------------
    def _beat(self) -> None:
        self._store.set(f"fedpipe/heartbeat/{self.rank}", f"{time.time()!r} {self._host}")

    def stop_heartbeat(self, timeout_s: float = 10.0) -> None:
        """Stop the heartbeat thread and wait for it to leave the store (at most `timeout_s`: a store that went
        away fails its call, which ends the loop)."""
        self._stop.set()
        if self._beater is not None and self._beater is not threading.current_thread():
            self._beater.join(timeout_s)

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the store went away (shutdown): stop beating
                return

    def stale_ranks(self) -> list[tuple[int, float, str]] | None:
        """(rank, seconds since its last heartbeat, its host) for every peer silent for over 3 heartbeats; None
        when the store itself cannot be reached (it lives in rank 0's process, or torchrun's, so that one is
        gone)."""
        if self._store is None:
            return []
        out, now, reached = [], time.time(), False
        for r in range(self.world_size):
            try:
                beat, _, host = self._store.get(f"fedpipe/heartbeat/{r}").decode().partition(" ")
                age = now - float(beat)
                reached = True
            except Exception:
                continue
            if age > 3 * HEARTBEAT_S:
                out.append((r, age, host or "?"))
        return out if reached else None

    def _guard(self, what: str, fn, /, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            if isinstance(e, CollectiveTimeout):
                raise
            stale = self.stale_ranks()
            deadline = time.time() + 3.5 * HEARTBEAT_S
            while stale == [] and time.time() < deadline:  # a peer that just died still looks fresh: wait for it
                time.sleep(0.5)
                stale = self.stale_ranks()
            if stale is None:
                who = ("the rendezvous store cannot be reached either, so the process that hosts it (rank 0, or "
                       "the launcher) has most likely stopped")
            elif stale:
                who = ", ".join(f"rank {r} on {host} (no heartbeat for {age:.0f} s)" for r, age, host in stale)
            else:
                who = "no peer's heartbeat is stale (a network problem, or a peer stuck inside a collective)"
            raise CollectiveTimeout(f"rank {self.rank}: {what} failed or timed out (comm.timeout_s="
                                    f"{self.timeout_s:g}); stopped: {who}. Underlying error: "
                                    f"{str(e).splitlines()[0][:200]}") from None

    def barrier(self) -> None:
        self._guard("barrier", dist.barrier)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._guard("all_gather_object", dist.all_gather_object, out, obj)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        self._guard("gather_object", dist.gather_object, obj, out, dst=dst)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        self._guard("broadcast_object", dist.broadcast_object_list, box, src=src)
        return box[0]

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._guard(f"send to rank {dst}", dist.send, tensor.contiguous(), dst=dst)
        self.traffic.sent += nbytes(tensor)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self._guard(f"recv from rank {src}", dist.recv, tensor, src=src)
        self.traffic.received += nbytes(tensor)

    def reduce_sum(self, tensor: torch.Tensor, dst: int = 0) -> None:
        self._guard("reduce_sum", dist.reduce, tensor, dst=dst, op=dist.ReduceOp.SUM)
        if self.rank == dst:
            self.traffic.received += nbytes(tensor) * (self.world_size - 1)
        else:
            self.traffic.sent += nbytes(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._guard("broadcast", dist.broadcast, tensor, src=src)
        if self.rank == src:
            self.traffic.sent += nbytes(tensor) * (self.world_size - 1)
        else:
            self.traffic.received += nbytes(tensor)

    def abort(self) -> None:
        """Nothing to do: this rank exits, and torchrun (or srun) stops the others."""

    def close(self) -> None:
        self.stop_heartbeat()
        if dist.is_initialized():
            dist.destroy_process_group()
