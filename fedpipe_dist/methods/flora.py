"""FLoRA (Wang et al. 2024), `method: flora`: heterogeneous ranks (one per server), the products summed
exactly by stacking the factors (algorithm/aggregation/flora.py) and merged into every base each round."""

from __future__ import annotations

from .base import register_method
from .lora import LoRAMethod


@register_method
class FLoRA(LoRAMethod):
    name = "flora"
    hetero_ranks = True
