"""FedPipe (the paper, arXiv 2404.06448): LoRA adapters whose ranks, batch sizes and base precision the
planner sets for every server every round (Algorithm 1, algorithm/planner.py; `plan.variant` picks the
paper's exact form or the tuned one), combined with the paper's weighted reduce (Eqn 10-12,
algorithm/aggregation/fedpipe.py) and merged into every base. `lora.carry` says what the next round starts
from: none (the paper), fresh adapters; adapter, one global adapter kept across rounds, the exact average
still reached through the base (kept_adapter_step). `plan.mode=uniform` is its ablation without the
adaptive plan."""

from __future__ import annotations

import torch

from ..adapters.lora import shared_initial_adapter
from ..algorithm.aggregation.fedpipe import kept_adapter_step, split_stack
from ..errors import UserInputError
from ..runtime.exchange import factored_exchange, update_meta
from .base import Exchanged, register_method, require
from .lora import LoRAMethod


@register_method
class FedPipe(LoRAMethod):
    name = "fedpipe"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.lora.carry == "adapter":
            require(cfg.aggregation.transport == "factored", "aggregation.transport",
                    "lora.carry=adapter (plan.variant=tuned's choice) reads every server's factors back from the "
                    "factored stack, so it needs aggregation.transport=factored; for the dense reduce set "
                    "lora.carry=none (fresh adapters each round, as the paper)")

    def adaptive(self) -> bool:
        return self.cfg.plan.mode != "uniform"

    def carries(self) -> bool:
        return self.cfg.lora.carry == "adapter"

    def setup(self, run) -> None:
        super().setup(run)
        if self.carries():  # the global adapter at the top rank on every site, B = 0 until a server trains it
            cfg = self.cfg
            # a rank past a weight's full rank min(out, in) adds nothing, and would only cost memory here
            self.full_rank = max(min(x.out_features, x.in_features) for x in run.sites)
            self.top = min(max([*cfg.lora.ranks, cfg.lora.rank]), self.full_rank)
            self.initial = shared_initial_adapter(run.sites, self.top, cfg.seed)

    def global_adapter(self) -> dict:
        return self.global_state or self.initial

    def client_start(self, plan) -> dict | None:
        """carry=adapter: the head of the global adapter at this server's ranks; None (fresh) otherwise."""
        if not self.carries():
            return None
        g = self.global_adapter()
        if max(plan.ranks.values(), default=0) > self.top:
            raise UserInputError(f"lora.carry=adapter keeps one global adapter of rank at most {self.top} (the "
                                 f"largest weight's full rank is {self.full_rank}); server {plan.client}'s plan asks "
                                 f"for rank {max(plan.ranks.values())}: lower lora.rank / lora.ranks")
        return {k: (g[k][0][:, :r], g[k][1][:r]) for k, r in plan.ranks.items() if r > 0}

    def frozen(self, plan) -> dict | None:
        """carry=adapter: the global adapter beyond this server's ranks, which it trains beside but not on (so
        it starts from the global model itself); only where that part is not zero."""
        if not self.carries() or not self.global_state:
            return None
        out = {}
        for k, (b, a) in self.global_state.items():
            r = plan.ranks.get(k, 0)
            if r < b.shape[1] and torch.count_nonzero(b[:, r:]):
                out[k] = (b[:, r:], a[r:])
        return out or None

    def exchange(self, t, plans, contributors, updates, claims) -> Exchanged:
        if not self.carries():
            return super().exchange(t, plans, contributors, updates, claims)
        run = self.run
        stack, traffic = factored_exchange(run.comm, run.sites, plans, contributors, updates, run.owner,
                                           self.aggregator, run.shard_sizes, claims, wire=self.cfg.aggregation.wire)
        late = traffic.pop("rejected_late")
        # the weights exactly as rank 0's fold forms them (a late-rejected server weighs 0), on every rank
        meta = [update_meta(c, run.shard_sizes, plans) for c in contributors]
        raw = [0.0 if c in late else self.aggregator.raw_weight(m) for c, m in zip(contributors, meta)]
        scale = self.aggregator.round_scale(meta) / sum(raw) if sum(raw) > 0 else 0.0
        factors = split_stack(stack, [plans[c].ranks for c in contributors])
        self.global_state, residual = kept_adapter_step(self.global_adapter(), factors, [w * scale for w in raw])
        return Exchanged(residual, traffic, late)
