"""FLoRA (Wang et al., NeurIPS 2024): stacking heterogeneous-rank LoRA factors.

    dW = sum_i p_i B_i A_i = [p_1 B_1 | ... | p_N B_N] @ [A_1; ...; A_N],   p_i = |D_i| / sum_j |D_j|

The stack is the exact sum of products whatever the ranks (no cross terms, unlike averaging B and A
separately); it is merged into the base every round and clients start fresh adapters, as in FLoRA. The
same identity carries FedPipe's factored transport; the two differ in the weights (FedPipe: |D_i| / b_i)
and in how ranks are chosen (FedPipe's planner vs a fixed rank per server).
"""

from __future__ import annotations

from .base import register
from .fedpipe import StackingAggregator


@register
class FLoRAAggregator(StackingAggregator):
    name = "flora"
