"""FedAvg of LoRA factors (the common practice, `method: lora`): B and A averaged separately.

    B_g = sum_i p_i B_i,   A_g = sum_i p_i A_i,   p_i = |D_i| / sum_j |D_j|

Every client starts the next round from (B_g, A_g), and round 1 from one initial adapter shared by every client
(methods/lora.py). `lora_hb` is the same average with the weights aggregation.weights names. Needs one rank per
weight across clients. Note that B_g A_g != sum_i p_i B_i A_i in general (the cross terms B_i A_j): the
inexactness FLoRA and FedPipe avoid.
"""

from __future__ import annotations

import torch

from .base import Aggregate, Aggregator, register
from .fedpipe import plan_weight


def average_factors(updates, weights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weighted averages of B and of A per weight; all clients must share a rank per weight."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for u, w in zip(updates, weights):
        for key, (b, a) in u.factors.items():
            if key in out:
                b0, a0 = out[key]
                if b0.shape != b.shape or a0.shape != a.shape:
                    raise ValueError(f"{key}: FedAvg of factors needs one rank per weight (got {b0.shape[1]} and "
                                     f"{b.shape[1]}); use a heterogeneous-rank method (flora, flexlora, hetlora)")
                out[key] = (b0 + w * b, a0 + w * a)
            else:
                out[key] = (w * b, w * a)
    return out


@register
class LoRAFedAvg(Aggregator):
    name = "lora"
    keeps_global_adapter = True
    averages_factors = True

    def aggregate(self, updates, weights, state=None) -> Aggregate:
        return Aggregate(state=average_factors(updates, weights))

    def client_start(self, state, key, rank):
        if key not in state:
            return None
        b, a = state[key]
        if b.shape[1] != rank:
            raise ValueError(f"{key}: the global adapter has rank {b.shape[1]}, the client asks for {rank}")
        return b, a


@register
class WeightedLoRAFedAvg(LoRAFedAvg):
    """FedAvg of factors with the weights aggregation.weights names (method lora_hb, the heterogeneity-aware
    LoRA): data |D_i| (FedAvg), samples b_i K_i (the examples a server trained on this round; plan.variant=tuned),
    paper |D_i| / b_i (Eqn 10). Like FedPipe's (fedpipe.py), every input is known from the plans."""

    name = "lora_hb"
    WEIGHTINGS = ("paper", "data", "samples")

    def __init__(self, weighting: str = "samples"):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"method lora_hb averages factors with weights {self.WEIGHTINGS}, not {weighting!r}")
        self.weighting = weighting

    @classmethod
    def from_settings(cls, weights: str | None, carry: str) -> "WeightedLoRAFedAvg":
        return cls(weights or "samples")

    def raw_weight(self, update):
        return plan_weight(update, self.weighting)
