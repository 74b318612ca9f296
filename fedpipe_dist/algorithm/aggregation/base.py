"""The aggregator interface and registry: one file per algorithm, registered by name (Flower's strategies,
PEFT's register_peft_method).

Every aggregator takes the round's client updates (factors B_i [out, r_i] with LoRA's alpha/r folded in,
A_i [r_i, in]) and their weights, and returns an `Aggregate`:
- `merge`: what every server folds into its base now (FedPipe, FLoRA: the exact sum of products,
  factored), so next round's adapters start fresh;
- `state`: the global adapter the method keeps instead (LoRA/HetLoRA: factors; FlexLoRA: a dense ΔW), from
  which `client_start` gives each server its starting factors at its own rank next round.
`global_delta` is the change of the global model either way, [out, in] per weight: the quantity the parity
tests compare across methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # site key -> (B [out, r] incl. alpha/r, A [r, in])


@dataclass
class ClientUpdate:
    client: int
    n_samples: int  # |D_i|: the client's training-set size
    batch_size: int  # b_i
    factors: Factors
    local_steps: int = 1  # K_i: the local steps its plan gave it (the same on every rank)


@dataclass
class Aggregate:
    merge: dict = field(default_factory=dict)  # key -> (B, A) or dense [out, in]: folded into the base now
    state: dict = field(default_factory=dict)  # key -> the method's global adapter (factors or dense)


class Aggregator:
    name = ""
    keeps_global_adapter = False  # True: clients start from `client_start` instead of fresh adapters
    pad_ranks = False  # True: summing factors of different ranks zero-pads them (HetLoRA); False: ranks must match
    averages_factors = False  # True: the result is an average of B and of A (not of products): never dense
    dense_global = False  # True: the global adapter is a dense dW_g (FlexLoRA), so it travels dense
    raw_stack = False  # True: rank 0 stacks the factors unweighted and the stack always travels factored, so every
    # rank reads each server's (B_i, A_i) back and applies the weights itself (fedpipe with lora.carry=adapter)

    @classmethod
    def from_settings(cls, weights: str | None, carry: str) -> "Aggregator":
        """The aggregator a job asks for: `weights` is aggregation.weights (None: the aggregator's default),
        `carry` lora.carry; the values, never the job (algorithm/ does not see the job). An aggregator with
        settings overrides this."""
        return cls()

    def raw_weight(self, update: ClientUpdate) -> float:
        """A client's unnormalized weight; the default is FedAvg's |D_i|."""
        return float(update.n_samples)

    def round_scale(self, updates: list[ClientUpdate]) -> float:
        """A factor on the whole normalized sum (FedNova's tau_eff); 1 for a plain weighted average. Every
        input is known from the plans, so every rank computes the same factor."""
        return 1.0

    def weights(self, updates: list[ClientUpdate]) -> list[float]:
        """The raw weights normalized to sum to one."""
        raw = [self.raw_weight(u) for u in updates]
        total = sum(raw)
        if total <= 0:
            raise ValueError("aggregation weights sum to zero: every client reported |D_i| = 0")
        return [r / total for r in raw]

    def scaled_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """The weights times `round_scale`: what a plain weighted sum of the updates needs to equal
        `finish`'s result (the dense transport and lora.carry=shared_a's B sum)."""
        scale = self.round_scale(updates)
        return [w * scale for w in self.weights(updates)]

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], state: dict | None = None) -> Aggregate:
        raise NotImplementedError

    # ---- streaming: rank 0 folds updates in one at a time and never holds all of them ------------------------
    # aggregate(updates, weights) == finish(accumulate(... accumulate(None, u_1, raw_1) ..., u_N, raw_N),
    # sum raw_i): every method here is a weighted sum, so the weights can be normalized at the end.

    def accumulate(self, acc: dict | None, update: ClientUpdate, weight: float, *, dense: bool = False) -> dict:
        """Fold one update with its raw weight into the running sum `acc` (None to start). `dense`: keep the
        sum as dense [out, in] matrices (what the downlink will carry anyway)."""
        if dense and self.averages_factors:
            raise ValueError(f"{self.name} averages B and A separately; a dense sum of products is another method")
        part = self.aggregate([update], [weight])
        tree = part.merge or part.state
        if dense:
            tree = {k: to_dense(v) for k, v in tree.items()}
        acc = {} if acc is None else acc
        for key, v in tree.items():
            acc[key] = v if key not in acc else _add(acc[key], v, self.pad_ranks, key)
        return acc

    def finish(self, acc: dict | None, total_weight: float) -> Aggregate:
        """The aggregate of the folded updates: the running sum divided by the sum of raw weights."""
        s = 1.0 / total_weight if total_weight > 0 else 1.0  # all-zero weights: the sum is zero anyway
        out = {k: v * s if torch.is_tensor(v) else (v[0] * s, v[1] * s) for k, v in (acc or {}).items()}
        return Aggregate(state=out) if self.keeps_global_adapter else Aggregate(merge=out)

    def client_start(self, state: dict, key: str, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Factors (B incl. alpha/r, A) a client of `rank` starts from next round; None = fresh adapters."""
        return None

    def global_delta(self, agg: Aggregate) -> dict[str, torch.Tensor]:
        """The global model's change this aggregate stands for, dense [out, in] per weight."""
        return {key: to_dense(d) for key, d in (agg.merge or agg.state).items()}


def _add(x, y, pad: bool, key: str):
    """x + y for dense matrices or factor pairs (B, A); factors of different ranks are zero-padded when
    `pad` (HetLoRA), else refused (FedAvg of factors needs one rank per weight)."""
    if torch.is_tensor(x) or torch.is_tensor(y):
        return to_dense(x) + to_dense(y)
    (bx, ax), (by, ay) = x, y
    if bx.shape != by.shape or ax.shape != ay.shape:
        if not pad:
            raise ValueError(f"{key}: FedAvg of factors needs one rank per weight (got {bx.shape[1]} and "
                             f"{by.shape[1]}); use a heterogeneous-rank method (flora, flexlora, hetlora)")
        r = max(bx.shape[1], by.shape[1])
        bx, ax = pad_rank(bx, ax, r)
        by, ay = pad_rank(by, ay, r)
    return bx + by, ax + ay


def pad_rank(b: torch.Tensor, a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B [out, k], A [k, in]) zero-padded to rank r >= k (the one zero-pad helper: HetLoRA's average,
    FlexLoRA's start at a rank above the matrix's, summing factors of different ranks)."""
    k = b.shape[1]
    if k > r:
        raise ValueError(f"cannot pad rank {k} down to {r}")
    return (torch.cat([b, b.new_zeros(b.shape[0], r - k)], dim=1),
            torch.cat([a, a.new_zeros(r - k, a.shape[1])], dim=0))


def to_dense(d) -> torch.Tensor:
    """An update given dense [out, in] or as factors (B [out, r], A [r, in]), as the dense matrix."""
    return d if torch.is_tensor(d) else d[0] @ d[1]


REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"aggregator name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    return cls


def get_aggregator(name: str, weights: str | None = None, carry: str = "none") -> Aggregator:
    """The aggregator registered as `name`, set up as a job with aggregation.weights = `weights` (None: the
    aggregator's default) and lora.carry = `carry` asks."""
    if name not in REGISTRY:
        raise KeyError(f"unknown aggregator {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name].from_settings(weights, carry)

