"""Full-parameter FedAvg (`method: ft`), the paper's FT baseline: every parameter trains on every server,
and the global model moves by the |D_i|-weighted mean of the servers' weight changes.

    W <- W + sum_i p_i (W_i - W),   p_i = |D_i| / sum_j |D_j|

Updates are dense, keyed by parameter name (runtime/client.train_full). The sum is linear, so the engine
forms it as a reduce of per-rank partial sums (the same `aggregate` on each rank's own servers).
"""

from __future__ import annotations

import torch

from .base import Aggregate, Aggregator, register


def weighted_sum(updates, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i u_i over same-named tensors; every update must carry the same names and shapes."""
    out: dict[str, torch.Tensor] = {}
    for u, w in zip(updates, weights):
        for key, d in u.factors.items():
            if key in out and out[key].shape != d.shape:
                raise ValueError(f"{key}: client {u.client} sent shape {tuple(d.shape)}, others "
                                 f"{tuple(out[key].shape)}")
            out[key] = out[key] + w * d if key in out else w * d
    return out


@register
class FullFedAvg(Aggregator):
    name = "ft"

    def aggregate(self, updates, weights, state=None) -> Aggregate:
        return Aggregate(merge=weighted_sum(updates, weights))
