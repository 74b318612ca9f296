"""HetLoRA (Cho et al., EMNLP 2024): zero-padding to the largest rank, a weighted average of B and of A,
truncation to each client's rank, and rank self-pruning on the clients.

    B_i -> [B_i | 0] [out, r_max],  A_i -> [A_i; 0] [r_max, in]
    B_g = sum_i p_i pad(B_i),  A_g = sum_i p_i pad(A_i)          client i starts from B_g[:, :r_i], A_g[:r_i]
    p_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F                   (sparsity-weighted aggregation)

Rank self-pruning (client side): training adds lambda * ||B[:, k:]|| * ||A[k:]|| with k = floor(gamma r),
and a client whose pruned part shrank below its value of the previous round drops to rank k
(`prune_regularizer`, `pruned_rank`). With equal ranks and equal weights HetLoRA is FedAvg of factors.
"""

from __future__ import annotations

import math

import torch

from ..sanitize import update_norm
from .base import Aggregate, Aggregator, pad_rank, register


def prune_regularizer(b: torch.Tensor, a: torch.Tensor, gamma: float) -> torch.Tensor:
    """||B[:, k:]||_F * ||A[k:]||_F for the trailing ranks k = floor(gamma * r) .. r (differentiable)."""
    k = math.floor(gamma * b.shape[1])
    return b[:, k:].norm() * a[k:].norm()


def pruned_rank(rank: int, gamma: float, norm_now: float, norm_before: float | None, min_rank: int = 1) -> int:
    """The client's rank for the next round: floor(gamma * rank) when the trailing part shrank this round."""
    if norm_before is not None and norm_now < norm_before:
        return max(min_rank, math.floor(gamma * rank))
    return rank


@register
class HetLoRA(Aggregator):
    name = "hetlora"
    keeps_global_adapter = True
    pad_ranks = True
    averages_factors = True

    def raw_weight(self, update):
        return update_norm(update.factors)  # ||B_i A_i||_F over all adapted weights

    def weights(self, updates):
        norms = [self.raw_weight(u) for u in updates]
        total = sum(norms)
        if total <= 0:
            # every update is zero: fall back to |D_i| (documented choice)
            return [u.n_samples / sum(v.n_samples for v in updates) for u in updates]
        return [n / total for n in norms]

    def aggregate(self, updates, weights, state=None) -> Aggregate:
        r_max: dict[str, int] = {}
        for u in updates:
            for key, (b, _) in u.factors.items():
                r_max[key] = max(r_max.get(key, 0), b.shape[1])
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for u, w in zip(updates, weights):
            for key, (b, a) in u.factors.items():
                pb, pa = pad_rank(b, a, r_max[key])
                if key in out:
                    out[key] = (out[key][0] + w * pb, out[key][1] + w * pa)
                else:
                    out[key] = (w * pb, w * pa)
        return Aggregate(state=out)

    def client_start(self, state, key, rank):
        if key not in state:
            return None
        b, a = state[key]
        if rank > b.shape[1]:
            return pad_rank(b, a, rank)
        return b[:, :rank], a[:rank]
