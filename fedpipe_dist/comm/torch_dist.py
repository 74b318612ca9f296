"""torch.distributed communicator: gloo on CPU, nccl on GPU, rendezvous from the launcher's env (env://)."""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from .base import Traffic, nbytes


class TorchDistComm:
    def __init__(self, *, backend: str | None = None, timeout_s: float = 600.0,
                 device: torch.device | str | None = None):
        if not dist.is_initialized():
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.backend = dist.get_backend()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"
        self.device = torch.device(device)
        self.traffic = Traffic()

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst=dst)
        self.traffic.sent += nbytes(tensor)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        dist.recv(tensor, src=src)
        self.traffic.received += nbytes(tensor)

    def reduce_sum(self, tensor: torch.Tensor, dst: int = 0) -> None:
        dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM)
        if self.rank == dst:
            self.traffic.received += nbytes(tensor) * (self.world_size - 1)
        else:
            self.traffic.sent += nbytes(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(tensor, src=src)
        if self.rank == src:
            self.traffic.sent += nbytes(tensor) * (self.world_size - 1)
        else:
            self.traffic.received += nbytes(tensor)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
