"""FlexLoRA (Bai et al. 2024), `method: flexlora`: heterogeneous ranks; the global adapter is the dense
weighted sum of the products, and each server starts from its truncated SVD at its own rank
(algorithm/aggregation/flexlora.py). It travels dense (the aggregator's `dense_global`)."""

from __future__ import annotations

from .base import register_method
from .lora import LoRAMethod


@register_method
class FlexLoRA(LoRAMethod):
    name = "flexlora"
    hetero_ranks = True
