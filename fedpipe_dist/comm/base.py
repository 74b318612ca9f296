"""The Communicator protocol: what the round engine needs from a transport, and nothing more.

Tensor operations move model payloads (adapter factors, dense updates) and are metered in `traffic`:
bytes counted from the tensors handed to each operation. Object operations move small metadata
(profiles, per-client statistics) and are not metered as payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within comm.timeout_s; the message names the ranks it waited for."""


@dataclass
class Traffic:
    """Payload bytes this rank sent and received through tensor operations."""

    sent: int = 0
    received: int = 0

    def reset(self) -> None:
        self.sent = self.received = 0


class Communicator(Protocol):
    rank: int
    world_size: int
    device: torch.device  # where payload tensors must live for this transport
    traffic: Traffic

    def barrier(self) -> None: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        """Fill `tensor` (preallocated, known shape) from rank `src`."""

    def reduce_sum(self, tensor: torch.Tensor, dst: int = 0) -> None:
        """Sum `tensor` over all ranks into rank dst's tensor (others' tensors are left undefined)."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...  # after a CollectiveTimeout: end the whole job where the launcher will not


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
