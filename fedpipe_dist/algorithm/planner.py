"""Per-round, per-server plans: batch size, base precision, and a LoRA rank per attention weight.

A plan is data, shared by every rank: each rank computes the same plans from the same inputs
(deterministically), so no plan ever has to be sent. The uniform planner gives every server the same
configuration (fixed-rank LoRA); FedPipe's Algorithm 1 plugs in beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..adapters.sites import KIND_INDEX, Site, n_layers


@dataclass
class ClientPlan:
    client: int
    batch_size: int
    ranks: dict[str, int] = field(default_factory=dict)  # site.key ("3.q") -> rank; absent or 0 = no adapter
    precision: str = "fp32"

    def rank_matrix(self, sites: list[Site]) -> np.ndarray:
        """[layer, 4] ranks in q, k, v, o order (0 = no adapter), the HDF5 clients/ranks layout."""
        m = np.zeros((n_layers(sites), 4), dtype=np.int32)
        for s in sites:
            m[s.layer, KIND_INDEX[s.kind]] = self.ranks.get(s.key, 0)
        return m


def uniform_plan(sites: list[Site], n_clients: int, *, targets: list[str], rank: int, batch_size: int,
                 precision: str = "fp32") -> list[ClientPlan]:
    """Every server: batch `batch_size`, rank `rank` on every targeted weight of every layer."""
    ranks = {s.key: rank for s in sites if s.kind in targets}
    return [ClientPlan(c, batch_size, dict(ranks), precision) for c in range(n_clients)]


def sample_clients(n_clients: int, fraction: float, *, seed: int, round_idx: int) -> list[int]:
    """Sorted ids of the servers taking part in a round: a seeded draw, the same on every rank."""
    k = max(1, int(round(fraction * n_clients)))
    if k >= n_clients:
        return list(range(n_clients))
    rng = np.random.default_rng([seed, round_idx, 0x5A])
    return sorted(int(c) for c in rng.choice(n_clients, size=k, replace=False))
