"""FedAdapter (Cai et al., MobiCom 2023), `method: fedadapter`: Houlsby adapters in the top `depth` layers,
FedAvg of their tensors, and a configuration (depth, width) that grows at trial rounds: the sampled servers
split into groups training the current configuration and upgraded ones side by side, each group is averaged
on its own, and the one with the best loss reduction per training FLOP becomes the global adapter
(algorithm/aggregation/fedadapter.py has the math and what is simplified). The adapters never merge into
the weights: they are evaluated through hooks and saved beside the model in final/."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..adapters.houlsby import HoulsbyAdapters, find_adapter_points, init_state, save_adapter_state
from ..algorithm.aggregation.fedadapter import AdapterConfig, pick_config, trial_configs, trial_groups
from ..algorithm.cost import houlsby_flops_per_sample, houlsby_memory_bytes
from ..algorithm.sanitize import update_norm
from ..runtime.client import train_houlsby
from ..runtime.exchange import fedavg_exchange, tensor_layout
from ..runtime.trees import tree_device, tree_to
from .base import Exchanged, Method, register_method


def _generator(seed: int, round_idx: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, round_idx, salt]).generate_state(1)[0]))


@register_method
class FedAdapter(Method):
    name = "fedadapter"

    def __init__(self, cfg):
        super().__init__(cfg)
        fa = cfg.fedadapter
        self.config = AdapterConfig(fa.depth, fa.width)  # the global adapter's configuration
        self.client_configs = [self.config] * cfg.clients.n  # what each server trains this round (planning)

    def step_cost(self, c, plan, shape, seq_len, act_bytes):
        d, w, b = self.client_configs[c].depth, self.client_configs[c].width, plan.batch_size
        return (b * houlsby_flops_per_sample(shape, d, w, seq_len),
                houlsby_memory_bytes(shape, precision=plan.precision, depth=d, width=w, batch=b, seq_len=seq_len,
                                     act_bytes=act_bytes))

    def setup(self, run) -> None:
        """One common starting adapter, drawn alike on every rank; the eval examples trials are scored on."""
        super().setup(run)
        fa = self.cfg.fedadapter
        self.points = find_adapter_points(run.model)
        self.config = AdapterConfig(min(fa.depth, run.L), fa.width)
        self.client_configs = [self.config] * self.cfg.clients.n
        self.global_state = init_state(self.points, run.L, self.config.depth, self.config.width,
                                       _generator(self.cfg.seed, 0, 0xFADA))
        self.trial_slice = run.eval_subset(fa.trial_eval_samples) if fa.period > 0 else None
        self.configs, self.group_of, self.starts = [], {}, []

    def begin_round(self, t, selected) -> None:
        """The configurations trained this round (a trial round: current, deeper, wider), each sampled
        server's group, and each group's starting adapters (the global adapter grown to the configuration)."""
        fa, L = self.cfg.fedadapter, self.run.L
        trial = fa.period > 0 and t % fa.period == 0
        configs = trial_configs(self.config, L, fa.depth_step, fa.width_mult, fa.max_width) if trial else [self.config]
        groups = trial_groups(selected, len(configs))
        self.configs = [cf for cf, members in zip(configs, groups) if members]  # fewer servers than configurations
        self.groups = [members for members in groups if members]
        self.group_of = {c: g for g, members in enumerate(self.groups) for c in members}
        self.starts = [init_state(self.points, L, cf.depth, cf.width, _generator(self.cfg.seed, t, 0xFADA + g),
                                  base=self.global_state) for g, cf in enumerate(self.configs)]
        self.client_configs = [self.configs[self.group_of[c]] if c in self.group_of else self.config
                               for c in range(self.cfg.clients.n)]

    def train(self, c, plan, shard, **common):
        return train_houlsby(self.run.model, self.points, self.starts[self.group_of[c]], plan, shard,
                             self.training, **common)

    def update_norm(self, c, update) -> float:
        return update_norm(update.factors, self.starts[self.group_of[c]])  # the change from its start

    def exchange(self, t, plans, contributors, updates, claims) -> Exchanged:
        """One FedAvg per group (a normal round: one group); a trial round then keeps the best group's."""
        run = self.run
        groups = [[c for c in contributors if self.group_of[c] == g] for g in range(len(self.configs))]
        results, traffic = fedavg_exchange(run.comm, groups, [tensor_layout(s) for s in self.starts], updates,
                                           run.owner, self.aggregator, plans, run.shard_sizes)
        self._choose(t, results)
        return Exchanged({}, traffic)

    def _choose(self, t: int, results: list) -> None:
        """A normal round keeps its average; a trial round scores every group's average on the trial
        examples and keeps the configuration with the best loss reduction per training FLOP."""
        if len(self.configs) == 1:
            self.global_state = results[0] if results[0] is not None else self.global_state
            return
        run = self.run
        before = run.evaluate(self.global_state, self.trial_slice)["loss"]
        losses = [run.evaluate(r, self.trial_slice)["loss"] if r is not None else math.nan for r in results]
        cost = [houlsby_flops_per_sample(run.planner.shape, cf.depth, cf.width, self.cfg.model.max_length)
                for cf in self.configs]
        g = pick_config(before, losses, cost)
        run.log(f"round {t}: fedadapter trial from loss {before:.4f}: " + ", ".join(
            f"depth {cf.depth} width {cf.width} -> {loss:.4f}" for cf, loss in zip(self.configs, losses))
            + f"; keeping depth {self.configs[g].depth} width {self.configs[g].width}")
        if results[g] is not None:
            self.global_state, self.config = results[g], self.configs[g]

    def attach(self, state=None):
        return HoulsbyAdapters(self.points, self.global_state if state is None else state, device=self.run.comm.device,
                               trainable=False).attach(self.run.model)

    def record(self, arrays: dict) -> None:
        for c, g in self.group_of.items():  # the configuration each sampled server trained
            arrays["adapter_depth"][c], arrays["adapter_width"][c] = self.configs[g].depth, self.configs[g].width

    def state_dict(self) -> dict:
        return {"global_state": tree_to(self.global_state, "cpu"),
                "global_state_device": tree_device(self.global_state),
                "adapter_config": [self.config.depth, self.config.width]}

    def load_state_dict(self, state: dict) -> None:
        target = self.run.comm.device if state["global_state_device"] == "cuda" else "cpu"
        self.global_state = tree_to(state["global_state"], target, copy=True)
        self.config = AdapterConfig(*state["adapter_config"])

    def export(self, folder) -> None:
        save_adapter_state(folder, self.global_state, self.config.depth, self.config.width)
