"""Importance of each attention weight on one server (Sec. III-C, Eqn 3-7), as pure array math.

    s^{m,t} = (1/d1) sum_j lambda_j(B A)  +  phi(W^{m,t})                                  (Eqn 3)
    I(W)    = (1/d2) sum_j |w_j * dL/dw_j|                                                (Eqn 4)
    Ibar^t  = lam1 Ibar^{t-1} + (1 - lam1) I^t                                           (Eqn 5)
    Ubar^t  = lam2 Ubar^{t-1} + (1 - lam2) |I^t - Ibar^t|                                (Eqn 6)
    phi^t   = Ibar^t * Ubar^t                                                            (Eqn 7)

Decisions where the paper is silent (docs/planner.md):
- W in I(W) is the adapter's own parameters (A and B entries): they are what the server trains, and the
  merged weight's gradient is not computed when the base is frozen. I^t is the mean over the round's
  local steps of the per-step sensitivity (PLATON applies its EMA per step; the paper indexes by round).
- lambda_j are the singular values of the scaled product (alpha/r) B A after the round's training.
- The two terms differ by orders of magnitude, so each is normalized to sum to 1 over the server's sites
  before they are added; a term with no information yet contributes 0.
- Round 1 (B = 0, nothing measured): every site scores equally; the planner breaks ties in the order
  q, v, k, o (LoRA's finding that W_q and W_v matter most), then by layer.
- A site never trained on this server has no score of its own; it takes the mean score of the measured
  sites, so an unexplored weight is neither starved nor preferred.
All arrays are [layer, 4] in q, k, v, o order; NaN marks "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def mean_singular_value(b: torch.Tensor, a: torch.Tensor) -> float:
    """(1/d1) sum_j lambda_j(B A), for B [out, r], A [r, in], without forming the [out, in] product.

    With B = Q_b R_b and A^T = Q_a R_a (thin QR), B A = Q_b (R_b R_a^T) Q_a^T, whose singular values are
    those of the r x r core. d1 = r, the number of (possibly zero) singular values of a rank-r product.
    """
    b, a = b.double(), a.double()
    if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
        return float("nan")  # a diverged server: no SVD of NaN (its update is left out by sanitization)
    rb = torch.linalg.qr(b, mode="r")[1]
    ra = torch.linalg.qr(a.t(), mode="r")[1]
    return float(torch.linalg.svdvals(rb @ ra.t()).mean())


@dataclass
class ImportanceState:
    """One server's importance memory across rounds (PLATON's smoothed sensitivity and uncertainty)."""

    n_layers: int
    lam1: float = 0.85
    lam2: float = 0.95
    ibar: np.ndarray = field(default=None)  # type: ignore[assignment]
    ubar: np.ndarray = field(default=None)  # type: ignore[assignment]
    sv: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        shape = (self.n_layers, 4)
        self.ibar = np.full(shape, np.nan) if self.ibar is None else self.ibar
        self.ubar = np.full(shape, np.nan) if self.ubar is None else self.ubar
        self.sv = np.full(shape, np.nan) if self.sv is None else self.sv

    def update(self, sensitivity: np.ndarray, singular: np.ndarray) -> None:
        """Fold in one round's measurements ([layer, 4], NaN where the site had no adapter)."""
        seen = np.isfinite(sensitivity)
        first = seen & ~np.isfinite(self.ibar)
        # First measurement: Ibar starts at I (Ubar at 0), as PLATON's zero-initialized EMA would after
        # bias correction; later rounds follow Eqn 5-6.
        self.ibar = np.where(first, sensitivity, self.ibar)
        self.ubar = np.where(first, 0.0, self.ubar)
        again = seen & ~first
        ibar_new = self.lam1 * self.ibar + (1 - self.lam1) * np.nan_to_num(sensitivity)
        ubar_new = self.lam2 * self.ubar + (1 - self.lam2) * np.abs(np.nan_to_num(sensitivity) - ibar_new)
        self.ibar = np.where(again, ibar_new, self.ibar)
        self.ubar = np.where(again, ubar_new, self.ubar)
        self.sv = np.where(np.isfinite(singular), singular, self.sv)

    @property
    def phi(self) -> np.ndarray:
        return self.ibar * self.ubar  # Eqn 7

    def scores(self) -> np.ndarray:
        return combine_scores(self.sv, self.phi)


def _share(x: np.ndarray) -> np.ndarray:
    """x / sum(x) over measured entries; zeros where unmeasured or when nothing is measured."""
    measured = np.isfinite(x)
    total = x[measured].sum() if measured.any() else 0.0
    if total <= 0:
        return np.zeros_like(x, dtype=float)
    return np.where(measured, x / total, 0.0)


def combine_scores(sv: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """s = sv/sum(sv) + phi/sum(phi) (Eqn 3 with each term normalized); unmeasured sites get the mean."""
    s = _share(sv) + _share(phi)
    measured = np.isfinite(sv) | np.isfinite(phi)
    if not measured.any():
        return np.zeros_like(s)
    return np.where(measured, s, s[measured].mean())


class SensitivitySum:
    """Eqn 4 for many adapters at once, summed over a round's steps: `total[i]` is the sum over the steps `add()`
    saw of adapter i's mean |w * grad| over the entries of its parameters (A and B; a tensor with no gradient
    counts its entries with zero sensitivity). It stays on the parameters' device until read, so the training
    loop does not wait on the device.

    Written as a few multi-tensor ops per step (torch._foreach_*, which torch's own gradient clipping uses)
    rather than a handful of ops per tensor: on a GPU a small model's step is launch-bound, and the per-tensor
    form was ~540 of the engine's ~3,480 ops per step on an 8-layer Llama (32 adapters), where peft's whole
    step is ~2,900 (benchmarks/step_vs_peft.py --ops). The sums are the same up to float rounding of the order
    of each reduction."""

    def __init__(self, groups: list[list[torch.Tensor]], device: torch.device | str = "cpu"):
        self.params = [p for g in groups for p in g]
        self._group = [i for i, g in enumerate(groups) for _ in g]
        self._count = torch.tensor([max(1, sum(p.numel() for p in g)) for g in groups], dtype=torch.float32,
                                   device=device)
        self.total = torch.zeros(len(groups), device=device)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # which tensors have gradients -> their groups

    def add(self) -> None:
        live = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        if not live:
            return
        if live not in self._index:
            self._index[live] = torch.tensor([self._group[i] for i in live], device=self.total.device)
        with torch.no_grad():
            prods = torch._foreach_mul([self.params[i] for i in live], [self.params[i].grad for i in live])
            l1 = torch.stack(torch._foreach_norm(prods, 1)).float()  # sum |w * grad| per tensor
            per_group = torch.zeros_like(self.total).index_add_(0, self._index[live], l1)
            self.total += per_group / self._count


def sensitivity_of(params: list[torch.Tensor]) -> torch.Tensor:
    """Eqn 4 for one adapter: mean |w * grad| over all entries of its parameters (A and B), a 0-d tensor."""
    meter = SensitivitySum([params], device=params[0].device)
    meter.add()
    return meter.total[0]
