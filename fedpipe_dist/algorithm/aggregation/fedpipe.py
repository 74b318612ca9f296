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
        weight = 1.0 if self.raw_stack else weight  # (the weights are applied by every rank afterwards)
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
        if self.raw_stack:
            return Aggregate(merge=acc or {})
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

    def __init__(self, weighting: str = "paper", raw_stack: bool = False):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"unknown fedpipe weighting {weighting!r}; choose one of {self.WEIGHTINGS}")
        self.weighting = weighting
        self.raw_stack = raw_stack

    @classmethod
    def from_settings(cls, weights: str | None, carry: str) -> "FedPipeAggregator":
        return cls(weights or "paper", raw_stack=carry == "adapter")

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


# ---- lora.carry=shared_a: one frozen A for every server, so the average of the B's is the exact average ------
#
# Every server's adapter is (B~_i, A) with the same A (drawn once from the job's seed, never trained: FFA-LoRA,
# Sun et al., ICLR 2024, freezes A for this reason), so sum_i w_i B~_i A = (sum_i w_i B~_i) A: the weighted
# average of the servers' models is the global adapter (B_g + sum_i w_i (B~_i - B_g), A). Nothing is left to
# merge into the base, only B's change travels (out x R per weight, against (out + in) x sum_i r_i for the
# stack), and the sum is linear, so it is a reduce of per-rank partial sums.


def shared_a_delta(b_global: torch.Tensor, b_server: torch.Tensor) -> torch.Tensor:
    """What a server of rank r contributes under lora.carry=shared_a: B~_i - B_g at the global's top rank R, where
    B~_i is its trained B (alpha/r folded in) on the first r columns and the global's own tail beyond them, which
    it trained beside but not on (so those columns of the difference are zero)."""
    r = b_server.shape[1]
    out = torch.zeros_like(b_global)
    out[:, :r] = b_server.to(b_global) - b_global[:, :r]
    return out


# ---- lora.carry=adapter: the exact average of the servers' models, with the adapter kept across rounds -------
#
# The paper merges sum_i w_i B_i A_i into the base and every server starts the next round from fresh adapters
# (B = 0, a new A) and a fresh optimizer, so whatever direction the adapters had learned is dropped each round.
# With carry=adapter every server starts round t+1 from the same global adapter (B_g, A_g) on the same base W,
# as FedAvg-LoRA does, and the aggregate stays exact: server i trains the head of (B_g, A_g) at its rank r_i
# (the tail beyond r_i rides along frozen, so every server starts from the global model itself) and ends
# with the model W + B~_i A~_i, where B~_i = [B_i | B_g[:, r_i:]] and A~_i = [A_i; A_g[r_i:]]. The new global
# model is the exact weighted average of the servers' changes,
#     W + B_g A_g + sum_i w_i (B~_i A~_i - B_g A_g),
# held as the new adapter B'_g = B_g + sum_i w_i (B~_i - B_g), A'_g likewise (FedAvg of the factors), plus the
# residual that averaging factors leaves out (the cross terms), which goes into the base:
#     R = B_g A_g + sum_i w_i (B~_i A~_i - B_g A_g) - B'_g A'_g.
# Every rank forms this from the stacked factors the exchange broadcasts anyway (unweighted, so each (B_i, A_i)
# can be read back), so it costs no byte beyond the paper's stack. Servers without an adapter on a weight leave
# it as it was (their change there is 0, as in Eqn 12).


def split_stack(stack: Factors, ranks: list[dict[str, int]]) -> list[Factors]:
    """The unweighted stack [B_1 | ... | B_n], [A_1; ...; A_n] back into each contributor's factors, given the
    contributors' ranks in stacking order (a weight a contributor did not adapt is absent from its factors)."""
    out: list[Factors] = [{} for _ in ranks]
    for key, (b, a) in stack.items():
        at = 0
        for i, rk in enumerate(ranks):
            r = rk.get(key, 0)
            if r > 0:
                out[i][key] = (b[:, at:at + r], a[at:at + r])
                at += r
    return out


def kept_adapter_step(global_adapter: Factors, updates: list[Factors], weights: list[float]
                      ) -> tuple[Factors, dict]:
    """(new global adapter, residual to merge into the base) from the global adapter every server started from
    (key -> (B_g [out, R], A_g [R, in]) at the top rank R), the servers' trained factors (key -> (B_i, A_i) at
    their rank r_i <= R) and their weights. The residual is factored (B, A), or dense [out, in] where that is
    smaller."""
    new, residual = dict(global_adapter), {}
    for key, (bg_full, ag_full) in global_adapter.items():
        mine = [(w, u[key]) for w, u in zip(weights, updates) if key in u and w != 0.0]
        if not mine:
            continue
        h = max(b.shape[1] for _, (b, _) in mine)  # the head: rows some server trained
        bg, ag = bg_full[:, :h], ag_full[:h]
        bt = [torch.cat([b, bg[:, b.shape[1]:]], dim=1) for _, (b, _) in mine]  # B~_i
        at = [torch.cat([a, ag[a.shape[0]:]], dim=0) for _, (_, a) in mine]  # A~_i
        ws = [w for w, _ in mine]
        b_new = bg + sum(w * (b - bg) for w, b in zip(ws, bt))
        a_new = ag + sum(w * (a - ag) for w, a in zip(ws, at))
        new[key] = (torch.cat([b_new, bg_full[:, h:]], dim=1), torch.cat([a_new, ag_full[h:]], dim=0))
        rest = 1.0 - sum(ws)  # B_g A_g's share left (0 when the weights sum to one)
        bs = ([rest * bg] if rest != 0.0 else []) + [w * b for w, b in zip(ws, bt)] + [-b_new]
        as_ = ([ag] if rest != 0.0 else []) + at + [a_new]
        b_res, a_res = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        out_f, in_f = b_res.shape[0], a_res.shape[1]
        residual[key] = b_res @ a_res if b_res.shape[1] * (out_f + in_f) > out_f * in_f else (b_res, a_res)
    return new, residual


FRESH_A_ROW_NORM = 3 ** -0.5  # a kaiming-uniform(a = sqrt(5)) row of A (peft's draw): E|row|^2 = in x 1/(3 in)


def svd_rebalance(adapter: Factors, a_row_norm: float | None = None) -> Factors:
    """The same adapter products split by their SVD: B A = U S V^T -> B = U sqrt(S), A = sqrt(S) V^T
    (lora.rebalance=svd), as FlexLoRA splits its global update, so both factors carry each direction alike and
    the strongest direction comes first (a server of lower rank trains the head); or, with `a_row_norm` = c,
    B = U S / c, A = c V^T (lora.rebalance=orth: orthogonal rows of A at a fresh draw's norm, the scale in B).
    Only the head, up to B's last non-zero column, is refactored: a tail no server has trained yet (B = 0) keeps
    its A, which its first gradient needs. Through QR of both factors: O((out + in) r^2), never the dense
    [out, in] product. A weight whose factors are not finite (a NaN update let in with aggregation.sanitize=false)
    is left as it is: there is no SVD to take, and the run goes on to record the NaN losses."""
    out = {}
    for key, (b, a) in adapter.items():
        live = torch.nonzero(b.abs().sum(dim=0)).flatten()
        h = int(live[-1]) + 1 if live.numel() else 0
        if h == 0 or not (torch.isfinite(b[:, :h]).all() and torch.isfinite(a[:h]).all()):
            out[key] = (b, a)
            continue
        qb, rb = torch.linalg.qr(b[:, :h].double())
        qa, ra = torch.linalg.qr(a[:h].double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        left, right = qb @ u, vh @ qa.T  # U [out, h], V^T [h, in]
        # Each direction's sign fixed by the data, not by the LAPACK at hand (a singular pair is defined up to
        # a sign): its entry of V^T largest in magnitude is positive. Every rank refactors the same global
        # adapter on its own, and servers on other hardware (cuSOLVER, another BLAS) must start from the same
        # factors, since the next exchange averages them. Flipping a pair keeps the product and, exactly, the
        # training that follows.
        flip = torch.sign(right.gather(1, right.abs().argmax(dim=1, keepdim=True))).squeeze(1)
        left, right = left * flip, right * flip[:, None]
        to_b, to_a = (s.sqrt(), s.sqrt()) if a_row_norm is None else (s / a_row_norm, torch.full_like(s, a_row_norm))
        bh, ah = (left * to_b).to(b.dtype), (to_a[:, None] * right).to(a.dtype)
        out[key] = (torch.cat([bh, b[:, h:]], dim=1), torch.cat([ah, a[h:]], dim=0))
    return out
