"""FlexLoRA (Bai et al., NeurIPS 2024): a dense weighted sum of products, cut back to each client's rank.

    dW_g = sum_i p_i B_i A_i   (full size, p_i = |D_i| / sum_j |D_j|)
    client i starts the next round from the truncated SVD of dW_g at its rank r_i:
    U S V^T = svd(dW_g),  B_i = U[:, :r] S[:r]^(1/2),  A_i = S[:r]^(1/2) V^T[:r]

The global model is W0 + dW_g; clients of low rank train from its best rank-r_i approximation
(Eckart-Young), which is what lets servers of any rank share one global update.
"""

from __future__ import annotations

import torch

from .base import Aggregate, Aggregator, pad_rank, register
from .fedpipe import dense_sum


@register
class FlexLoRA(Aggregator):
    name = "flexlora"
    keeps_global_adapter = True
    dense_global = True

    def aggregate(self, updates, weights, state=None) -> Aggregate:
        return Aggregate(state=dense_sum(updates, weights))

    def client_start(self, state, key, rank):
        if key not in state:
            return None
        u, s, vh = torch.linalg.svd(state[key].double(), full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        if r < rank:  # a client asking for more rank than the matrix has: zero-pad (B = 0 there)
            b, a = pad_rank(b, a, rank)
        return b.float(), a.float()
