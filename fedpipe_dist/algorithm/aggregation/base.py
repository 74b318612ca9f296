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


@dataclass
class Aggregate:
    merge: dict = field(default_factory=dict)  # key -> (B, A) or dense [out, in]: folded into the base now
    state: dict = field(default_factory=dict)  # key -> the method's global adapter (factors or dense)


class Aggregator:
    name = ""
    keeps_global_adapter = False  # True: clients start from `client_start` instead of fresh adapters
    weights_from_updates = False  # True: weights depend on the factors themselves, so only rank 0 forms them

    def weights(self, updates: list[ClientUpdate]) -> list[float]:
        """Default FedAvg weighting: |D_i| / sum_j |D_j|."""
        total = sum(u.n_samples for u in updates)
        if total <= 0:
            raise ValueError("aggregation weights sum to zero: every client reported |D_i| = 0")
        return [u.n_samples / total for u in updates]

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], state: dict | None = None) -> Aggregate:
        raise NotImplementedError

    def client_start(self, state: dict, key: str, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Factors (B incl. alpha/r, A) a client of `rank` starts from next round; None = fresh adapters."""
        return None

    def global_delta(self, agg: Aggregate) -> dict[str, torch.Tensor]:
        """The global model's change this aggregate stands for, dense [out, in] per weight."""
        return {key: to_dense(d) for key, d in (agg.merge or agg.state).items()}


def to_dense(d) -> torch.Tensor:
    """An update given dense [out, in] or as factors (B [out, r], A [r, in]), as the dense matrix."""
    return d if torch.is_tensor(d) else d[0] @ d[1]


REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"aggregator name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    return cls


def get_aggregator(name: str) -> Aggregator:
    if name not in REGISTRY:
        raise KeyError(f"unknown aggregator {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]()

