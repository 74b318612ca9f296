"""In-process communicator for world size 1 (one process plays every edge server) and unit tests."""

from __future__ import annotations

from typing import Any

import torch

from .base import Traffic


class LocalComm:
    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.traffic = Traffic()

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise RuntimeError("LocalComm has no peers to send to (world size 1)")

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        raise RuntimeError("LocalComm has no peers to receive from (world size 1)")

    def reduce_sum(self, tensor: torch.Tensor, dst: int = 0) -> None:
        pass  # the sum over one rank is the tensor itself

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
