"""Wire audit (`comm.audit=true`): every payload that leaves this rank is logged and checked against what
may leave an edge server: adapter factors / updates and aggregates (flat floating-point tensors), scalars,
small numeric arrays (importance scores, profiles), and short identifiers; never token ids (integer
tensors), text (long strings) or activations (tensors with more than one dimension).

    comm = AuditedComm(make_comm(cfg.comm), Path(cfg.output.dir) / "wire_audit")
    ...                                   # wire_audit/rank<r>.jsonl: one line per payload that left

Each record: op, peer (destination, or "all"), kind (tensor | object), for tensors shape/dtype/bytes, for
objects a type summary, and `violations` (empty when allowed). A payload is logged where it leaves: the
sender of a send, the root of a broadcast, every non-root rank of a reduce or gather, every rank of an
all-gather. `public(label)` marks a block whose object payloads are public by construction (generated text
for the public eval split); they are logged with that label and not flagged as text.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAX_IDENTIFIER = 32  # longer strings count as text
MAX_SMALL_ARRAY = 4096  # numeric arrays above this many entries are not "scalars and profiles"


def check_object(obj: Any, path: str = "obj") -> tuple[Any, list[str]]:
    """(a JSON-able type summary, violations) of an object payload."""
    violations: list[str] = []

    def walk(x, where):
        if x is None or isinstance(x, (bool, int, float, np.integer, np.floating)):
            return type(x).__name__
        if isinstance(x, str):
            if len(x) > MAX_IDENTIFIER:
                violations.append(f"{where}: text ({len(x)} characters)")
            return f"str[{len(x)}]"
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating) or x.size > MAX_SMALL_ARRAY:
                violations.append(f"{where}: array {x.dtype} {x.shape}")
            return f"ndarray{list(x.shape)}:{x.dtype}"
        if torch.is_tensor(x):
            violations.append(f"{where}: tensor {x.dtype} {tuple(x.shape)} inside an object payload")
            return f"tensor{list(x.shape)}"
        if dataclasses.is_dataclass(x):
            return {f.name: walk(getattr(x, f.name), f"{where}.{f.name}") for f in dataclasses.fields(x)}
        if isinstance(x, dict):
            return {str(k): walk(v, f"{where}[{k!r}]") for k, v in x.items()} | (
                {"_bad_keys": [walk(k, f"{where}.key") for k in x if not isinstance(k, (str, int, float))]}
                if any(not isinstance(k, (str, int, float)) for k in x) else {})
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        violations.append(f"{where}: {type(x).__name__}")
        return type(x).__name__

    return walk(obj, path), violations


def check_tensor(t: torch.Tensor) -> list[str]:
    problems = []
    if not t.dtype.is_floating_point:
        problems.append(f"tensor of {t.dtype} (token ids?)")
    if t.dim() != 1:
        problems.append(f"tensor of shape {tuple(t.shape)} (payloads are flat packs; activations?)")
    return problems


class AuditedComm:
    """Wraps a Communicator; same protocol, plus the log."""

    def __init__(self, inner, folder: str | Path):
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.device, self.traffic = inner.device, inner.traffic
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rank{self.rank}.jsonl"  # appended to: an earlier run's log is never lost
        self._label: str | None = None
        import os
        import time

        self._write({"rank": self.rank, "op": "start", "pid": os.getpid(), "time": time.time(), "violations": []})

    @contextmanager
    def public(self, label: str):
        """Object payloads sent inside this block are public by construction (logged with the label)."""
        self._label = label
        try:
            yield
        finally:
            self._label = None

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _tensor(self, op: str, peer, t: torch.Tensor) -> None:
        self._write({"rank": self.rank, "op": op, "peer": peer, "kind": "tensor", "shape": list(t.shape),
                     "dtype": str(t.dtype), "bytes": t.numel() * t.element_size(), "violations": check_tensor(t)})

    def _object(self, op: str, peer, obj: Any) -> None:
        summary, violations = check_object(obj)
        if self._label is not None:
            violations = [v for v in violations if ": text (" not in v]
        self._write({"rank": self.rank, "op": op, "peer": peer, "kind": "object", "label": self._label,
                     "summary": summary, "violations": violations})

    # ---- the protocol --------------------------------------------------------------------------------------
    def barrier(self) -> None:
        self.inner.barrier()

    def all_gather_object(self, obj):
        if self.world_size > 1:
            self._object("all_gather_object", "all", obj)
        return self.inner.all_gather_object(obj)

    def gather_object(self, obj, dst: int = 0):
        if self.rank != dst:
            self._object("gather_object", dst, obj)
        return self.inner.gather_object(obj, dst=dst)

    def broadcast_object(self, obj, src: int = 0):
        if self.rank == src and self.world_size > 1:
            self._object("broadcast_object", "all", obj)
        return self.inner.broadcast_object(obj, src=src)

    def send(self, tensor, dst: int) -> None:
        self._tensor("send", dst, tensor)
        self.inner.send(tensor, dst)

    def recv(self, tensor, src: int) -> None:
        self.inner.recv(tensor, src)

    def reduce_sum(self, tensor, dst: int = 0) -> None:
        if self.rank != dst:
            self._tensor("reduce_sum", dst, tensor)
        self.inner.reduce_sum(tensor, dst=dst)

    def broadcast(self, tensor, src: int = 0) -> None:
        if self.rank == src and self.world_size > 1:
            self._tensor("broadcast", "all", tensor)
        self.inner.broadcast(tensor, src=src)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


def public_payload(comm, label: str):
    """`with public_payload(comm, label):` marks the block's object payloads public on an audited
    communicator; on any other it does nothing."""
    from contextlib import nullcontext

    return comm.public(label) if isinstance(comm, AuditedComm) else nullcontext()


def read_audit(folder: str | Path) -> list[dict]:
    """Every record of every rank's log in `folder`."""
    out = []
    for p in sorted(Path(folder).glob("rank*.jsonl")):
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out
