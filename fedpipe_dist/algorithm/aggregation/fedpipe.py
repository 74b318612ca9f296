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


def plan_weight(update: ClientUpdate, weighting: str) -> float:
    """A server's raw weight from what its plan says (the same on every rank): paper |D_i| / b_i (Eqn 10), data
    |D_i|, samples b_i K_i, fednova |D_i| / K_i."""
    if weighting == "paper":
        return update.n_samples / update.batch_size
    if weighting == "data":
        return float(update.n_samples)
    if weighting == "samples":
        return float(update.batch_size * update.local_steps)
    return update.n_samples / update.local_steps  # fednova


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


class StackingAggregator(Aggregator):
    """The exact weighted sum of products, merged into every base (FedPipe, FLoRA). Streamed at rank 0 as a
    growing stack [w_1 B_1 | ...], [A_1; ...], or, when the downlink goes dense, as one dense sum: memory is
    bounded by the larger of the two, not by the number of clients."""

    def aggregate(self, updates, weights, state=None) -> Aggregate:
        return Aggregate(merge=aggregate_factored(updates, weights))

    def accumulate(self, acc, update, weight, *, dense=False):
        acc = {} if acc is None else acc
        for key, (b, a) in update.factors.items():
            if dense:
                d = (b @ a) * weight
                acc[key] = acc[key] + d if key in acc else d
            elif key in acc:
                acc[key] = (torch.cat([acc[key][0], b * weight], dim=1), torch.cat([acc[key][1], a], dim=0))
            else:
                acc[key] = (b * weight, a)
        return acc

    def finish(self, acc, total_weight) -> Aggregate:
        s = 1.0 / total_weight if total_weight > 0 else 1.0
        # the weights ride on B only: scaling the product means scaling B
        return Aggregate(merge={k: v * s if torch.is_tensor(v) else (v[0] * s, v[1]) for k, v in (acc or {}).items()})


@register
class FedPipeAggregator(StackingAggregator):
    """Eqn 9-12: the exact weighted sum of products, merged into every base. Weights (aggregation.weights):
    paper |D_i| / b_i (Eqn 10); data |D_i|; samples b_i K_i (the examples a server trained on this round);
    fednova |D_i| / K_i, the normalized sum scaled by tau_eff = sum_i p_i K_i (p_i = |D_i| / sum |D_j|):
    FedNova's average of per-step updates, which does not let a server's step count skew the direction."""

    name = "fedpipe"
    WEIGHTINGS = ("paper", "data", "samples", "fednova")

    def __init__(self, weighting: str = "paper"):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"unknown fedpipe weighting {weighting!r}; choose one of {self.WEIGHTINGS}")
        self.weighting = weighting

    @classmethod
    def from_config(cls, cfg) -> "FedPipeAggregator":
        return cls(cfg.aggregation.weights)

    def raw_weight(self, update: ClientUpdate) -> float:
        return plan_weight(update, self.weighting)

    def round_scale(self, updates: list[ClientUpdate]) -> float:
        if self.weighting != "fednova" or not updates:
            return 1.0
        # sum_i w_i dW_i with w_i ∝ |D_i|/K_i equals (sum_j p_j/K_j)^-1 sum_i p_i dW_i/K_i; FedNova wants
        # tau_eff * sum_i p_i dW_i/K_i
        n = sum(u.n_samples for u in updates)
        p = [u.n_samples / n for u in updates]
        tau_eff = sum(pi * u.local_steps for pi, u in zip(p, updates))
        return tau_eff * sum(pi / u.local_steps for pi, u in zip(p, updates))
