"""FedAdapter (Cai et al., "FedAdapter: Efficient Federated Learning for Modern NLP", MobiCom 2023), `method:
fedadapter`: Houlsby adapters (adapters/houlsby.py) averaged with FedAvg, in a configuration (depth: how
many top layers carry adapters; width: the bottleneck) that grows while training.

What is implemented from the paper:
- adapters only in the top `depth` layers, so backward (and its memory) stops below them;
- progressive configuration: start shallow and narrow; at trial rounds the sampled servers are split into
  groups that train the current configuration and upgraded ones side by side (one deeper, one wider), each
  group's adapters are averaged on their own, and the configuration with the best loss reduction per unit
  of training time is kept, with its group's adapters becoming the global adapter;
- upgrades keep the model's function: new layers and new bottleneck units start with a zero up-projection.
Simplified (docs/methods.md): the paper runs its trial groups continuously beside the main group and
decides from accuracy-vs-time curves over a window; here a trial is every `fedadapter.period`-th round,
one round long, decided by eval loss on `fedadapter.trial_eval_samples` examples of the eval split, and the
time of a configuration is the cost model's (houlsby_flops_per_sample) on the same server, so that which
server happens to land in which group does not decide the comparison. Groups are assigned round-robin
over the sampled servers in id order. The paper's per-device profiling of configurations is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Aggregate, Aggregator, register


def average_states(updates, weights) -> dict:
    """sum_i w_i state_i per adapter tensor; all states must share one configuration."""
    out: dict = {}
    for u, w in zip(updates, weights):
        for key, parts in u.factors.items():
            if key not in out:
                out[key] = {name: w * t for name, t in parts.items()}
                continue
            for name, t in parts.items():
                if out[key][name].shape != t.shape:
                    raise ValueError(f"{key}.{name}: client {u.client} trained another adapter configuration "
                                     f"({tuple(t.shape)} vs {tuple(out[key][name].shape)}); FedAvg needs one")
                out[key][name] = out[key][name] + w * t
    return out


@register
class FedAdapterAvg(Aggregator):
    name = "fedadapter"
    keeps_global_adapter = True

    def aggregate(self, updates, weights, state=None) -> Aggregate:
        return Aggregate(state=average_states(updates, weights))

    def global_delta(self, agg: Aggregate) -> dict[str, torch.Tensor]:
        raise TypeError("a bottleneck adapter is not a weight update: FedAdapter has no dense dW")


@dataclass(frozen=True)
class AdapterConfig:
    depth: int
    width: int


def trial_configs(current: AdapterConfig, n_layers: int, depth_step: int, width_mult: int, max_width: int
                  ) -> list[AdapterConfig]:
    """The configurations a trial round compares: the current one first, then deeper, then wider (an
    upgrade past the model's depth or max_width is left out)."""
    out = [current]
    deeper = AdapterConfig(min(n_layers, current.depth + depth_step), current.width)
    wider = AdapterConfig(current.depth, min(max_width, current.width * width_mult))
    for c in (deeper, wider):
        if c not in out:
            out.append(c)
    return out


def trial_groups(servers: list[int], n_configs: int) -> list[list[int]]:
    """Round-robin over the servers in id order: group g trains configuration g."""
    return [servers[g::n_configs] for g in range(n_configs)]


def pick_config(loss_before: float, losses: list[float], times: list[float]) -> int:
    """FedAdapter's criterion: the configuration with the largest loss reduction per unit of training time
    (NaN losses, from a group with no finished server, never win; ties keep the earlier, i.e. current)."""
    best, best_rate = 0, float("-inf")
    for g, (loss, t) in enumerate(zip(losses, times)):
        if loss != loss:  # NaN
            continue
        rate = (loss_before - loss) / t
        if rate > best_rate + 1e-12:
            best, best_rate = g, rate
    return best
