"""HetLoRA (Cho et al. 2024), `method: hetlora`: heterogeneous ranks, zero-padded FedAvg of the factors with
norm-based weights, a rank regularizer in every local step and rank self-pruning after each round
(algorithm/aggregation/hetlora.py)."""

from __future__ import annotations

from ..algorithm.aggregation.hetlora import pruned_rank
from .base import register_method
from .lora import LoRAMethod


@register_method
class HetLoRA(LoRAMethod):
    name = "hetlora"
    hetero_ranks = True

    def setup(self, run) -> None:
        super().setup(run)
        self.prune_norms: dict[int, float] = {}  # each server's pruned-part norm in its last round

    def prune(self) -> tuple[float, float]:
        return self.cfg.hetlora.gamma, self.cfg.hetlora.reg

    def end_round(self, t, contributors, reports) -> None:
        """Rank self-pruning: every rank updates every server's rank alike, from the reported norms."""
        planner = self.run.planner
        for c in contributors:
            norm = reports[c].prune_norm
            planner.set_rank(c, pruned_rank(planner.client_ranks[c], self.cfg.hetlora.gamma, norm,
                                            self.prune_norms.get(c)))
            self.prune_norms[c] = norm

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prune_norms": dict(self.prune_norms)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prune_norms = dict(state["prune_norms"])
