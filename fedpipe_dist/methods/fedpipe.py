"""FedPipe (the paper, arXiv 2404.06448): LoRA adapters whose ranks, batch sizes and base precision the
planner sets for every server every round (Algorithm 1, algorithm/planner.py; `plan.variant` picks the
paper's exact form or the tuned one), combined with the paper's weighted reduce (Eqn 10-12,
algorithm/aggregation/fedpipe.py) and merged into every base; adapters start fresh each round.
`plan.mode=uniform` is its ablation without the adaptive plan."""

from __future__ import annotations

from .base import register_method
from .lora import LoRAMethod


@register_method
class FedPipe(LoRAMethod):
    name = "fedpipe"

    def adaptive(self) -> bool:
        return self.cfg.plan.mode != "uniform"
