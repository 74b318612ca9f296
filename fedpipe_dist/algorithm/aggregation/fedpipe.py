"""FedPipe's aggregation (Sec. III-F, Eqn 9-12): a weighted sum of each server's product B_i A_i.

    dW^m = sum_i w_i * dW_i^m,   dW_i^m = (alpha / r_i) B_i^m A_i^m,   w_i = (|D_i|/b_i) / sum_j (|D_j|/b_j)

Servers may use different ranks for the same weight; the sum of products is still exact in factored form
by stacking (FLoRA's identity):  sum_i w_i B_i A_i = [w_1 B_1 | ... | w_N B_N] @ [A_1; ...; A_N].
Factors here already carry LoRA's alpha/r (see LoRAAdapters.factors).
"""

from __future__ import annotations

import torch

from .base import Aggregate, Aggregator, ClientUpdate, Factors, register


def aggregation_weights(n_samples: list[int], batch_sizes: list[int]) -> list[float]:
    """w_i proportional to |D_i| / b_i (Eqn 10), normalized to sum to one over the contributing clients.

    Both inputs are known from the plan on every rank, so every rank computes the same weights.
    """
    raw = [n / b for n, b in zip(n_samples, batch_sizes)]
    total = sum(raw)
    if total <= 0:
        raise ValueError("aggregation weights sum to zero: every client reported |D_i| = 0")
    return [r / total for r in raw]


def aggregate_factored(updates: list[ClientUpdate], weights: list[float]) -> Factors:
    """Stacked factors (B_stack [out, sum r], A_stack [sum r, in]) whose product is the merged update."""
    stacks: dict[str, tuple[list, list]] = {}
    for u, w in zip(updates, weights):
        for key, (b, a) in u.factors.items():
            bs, as_ = stacks.setdefault(key, ([], []))
            bs.append(b * w)
            as_.append(a)
    return {k: (torch.cat(bs, dim=1), torch.cat(as_, dim=0)) for k, (bs, as_) in stacks.items()}


def factored_to_dense(factored: Factors) -> dict[str, torch.Tensor]:
    return {k: b @ a for k, (b, a) in factored.items()}


def dense_sum(updates: list[ClientUpdate], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i B_i A_i formed densely, one [out, in] matrix per weight (the dense transport's payload)."""
    out: dict[str, torch.Tensor] = {}
    for u, w in zip(updates, weights):
        for key, (b, a) in u.factors.items():
            d = (b @ a) * w
            out[key] = out[key] + d if key in out else d
    return out


@register
class FedPipeAggregator(Aggregator):
    """Eqn 9-12: weights |D_i| / b_i, the exact weighted sum of products, merged into every base."""

    name = "fedpipe"

    def weights(self, updates: list[ClientUpdate]) -> list[float]:
        return aggregation_weights([u.n_samples for u in updates], [u.batch_size for u in updates])

    def aggregate(self, updates, weights, state=None) -> Aggregate:
        return Aggregate(merge=aggregate_factored(updates, weights))
