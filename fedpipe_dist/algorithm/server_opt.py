"""Server-side optimizers on a kept global adapter (`aggregation.server_opt`): FedAvgM, FedAdagrad, FedYogi,
FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), as OpenFedLLM applies them to the LoRA
factors (rui-ye/OpenFedLLM, federated_learning/fed_global.py and fed_utils.get_proxy_dict).

Each round the clients' aggregate (the plain weighted average of the factors) gives a pseudo-gradient per
tensor, Delta = average - global; the optimizer turns it into the step the global adapter takes:

    fedavgm:    m = b1 m + (1 - b1) Delta  (m = Delta in the first round)          step = m
    fedadagrad: v = v + Delta^2                                                    step = eta Delta / (sqrt(v) + tau)
    fedyogi:    m as fedavgm; v = v - (1 - b2) Delta^2 sign(v - Delta^2)           step = eta m / (sqrt(v) + tau)
    fedadam:    m as fedavgm; v = b2 v + (1 - b2) Delta^2                          step = eta m / (sqrt(v) + tau)

with v starting at tau^2 and no bias correction, as in both references. Where the two differ, this follows the
paper: OpenFedLLM squares its momentum m in place of Delta in v (fedyogi, fedadam) and averages Delta
unweighted for the adaptive three; here Delta is the method's own weighted average (equal on equal shards).
Its defaults are OpenFedLLM's: eta = tau = 1e-3, b1 = 0.9, b2 = 0.99. OpenFedLLM's fedavgm is this exponential
average (Hsu et al.'s FedAvgM sums m = b1 m + Delta instead); it takes no eta.

Written here because no library in the stack has one (Flower's strategies hold the same arithmetic over NumPy
arrays of a whole model); it is elementwise arithmetic on the factors every rank already holds, so every rank
runs it alike and nothing more travels.
"""

from __future__ import annotations

import torch

SERVER_OPTS = ("none", "fedavgm", "fedadagrad", "fedyogi", "fedadam")


class ServerOptimizer:
    """The state (m, v per tensor) and the step of one of SERVER_OPTS but none."""

    def __init__(self, name: str, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3):
        if name not in SERVER_OPTS or name == "none":
            raise ValueError(f"unknown server optimizer {name!r}; one of {SERVER_OPTS[1:]}")
        self.name, self.lr, self.betas, self.tau = name, lr, tuple(betas), tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, start: dict, average: dict) -> dict:
        """The new global adapter from the one every client started from and the clients' plain average, both
        key -> (B, A) of equal shapes; tensors are stepped one by one, B as key/B and A as key/A."""
        out = {}
        for key, (b0, a0) in start.items():
            if key not in average:
                out[key] = (b0, a0)
                continue
            b1, a1 = average[key]
            out[key] = (b0 + self._step(f"{key}/B", b1 - b0), a0 + self._step(f"{key}/A", a1 - a0))
        return out

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        first = name not in self.m
        if first:
            self.m[name] = delta.clone()
            self.v[name] = torch.full_like(delta, self.tau**2)
        elif self.name != "fedadagrad":  # FedAdagrad keeps no momentum (m = Delta)
            self.m[name].mul_(b1).add_(delta, alpha=1 - b1)
        m = delta if self.name == "fedadagrad" else self.m[name]
        if self.name == "fedavgm":
            return m.clone()
        d2, v = delta * delta, self.v[name]
        if self.name == "fedadagrad":
            v.add_(d2)
        elif self.name == "fedyogi":
            v.sub_((1 - b2) * d2 * torch.sign(v - d2))
        else:  # fedadam
            v.mul_(b2).add_(d2, alpha=1 - b2)
        return self.lr * m / (v.sqrt() + self.tau)

    def state_dict(self) -> dict:
        return {"m": {k: t.cpu() for k, t in self.m.items()}, "v": {k: t.cpu() for k, t in self.v.items()}}

    def load_state_dict(self, state: dict, device) -> None:
        self.m = {k: t.to(device).clone() for k, t in state["m"].items()}
        self.v = {k: t.to(device).clone() for k, t in state["v"].items()}
