"""FedPipe (the paper, arXiv 2404.06448): LoRA adapters whose ranks, batch sizes and base precision the
planner sets for every server every round (Algorithm 1, algorithm/planner.py; `plan.variant` picks the
paper's exact form or the tuned one), combined with the paper's weighted reduce (Eqn 10-12,
algorithm/aggregation/fedpipe.py) and merged into every base. `lora.carry` says what the next round starts
from: none (the paper), fresh adapters; adapter, one global adapter kept across rounds, the exact average
still reached through the base (kept_adapter_step); shared_a, one frozen A shared by every server, so only the
B's train and travel and their average is exact (shared_a_delta). `plan.mode=uniform` is its ablation without
the adaptive plan."""

from __future__ import annotations

import dataclasses

import torch

from ..adapters.lora import shared_initial_adapter
from ..algorithm.aggregation.base import Aggregate
from ..algorithm.aggregation.fedpipe import kept_adapter_step, shared_a_delta, split_stack
from ..algorithm.aggregation.ft import weighted_sum
from ..errors import UserInputError
from ..runtime.exchange import factored_exchange, fedavg_exchange, update_meta
from .base import Exchanged, register_method, require
from .lora import LoRAMethod


@register_method
class FedPipe(LoRAMethod):
    name = "fedpipe"
    takes_carry = True
    takes_rebalance = True  # with lora.carry=adapter (job.rebalance_conflict)

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.lora.carry == "adapter":
            require(cfg.aggregation.transport == "factored", "aggregation.transport",
                    "lora.carry=adapter (plan.variant=tuned's choice) reads every server's factors back from the "
                    "factored stack, so it needs aggregation.transport=factored; for the dense reduce set "
                    "lora.carry=none (fresh adapters each round, as the paper)")
        if cfg.lora.carry == "shared_a":
            require(cfg.aggregation.wire == "fp32" and cfg.aggregation.transport == "factored", "lora.carry",
                    "lora.carry=shared_a sends each server's change of B through a reduce in fp32, its own "
                    "transport: leave aggregation.wire=fp32 and aggregation.transport=factored (the defaults)")

    @classmethod
    def takes_server_opt(cls, carry: str) -> bool:
        """lora.carry=adapter: the server optimizer steps the kept adapter's factors from their plain average;
        the base still takes the exact average's cross terms (kept_adapter_step's residual)."""
        return carry == "adapter"

    def adaptive(self) -> bool:
        return self.cfg.plan.mode != "uniform"

    def carries(self) -> bool:
        """A global adapter kept across rounds (lora.carry=adapter or shared_a)."""
        return self.cfg.lora.carry in ("adapter", "shared_a")

    def shares_a(self) -> bool:
        return self.cfg.lora.carry == "shared_a"

    def trainable(self, adapters) -> list:
        """lora.carry=shared_a: B only (A stays the shared draw); otherwise every A and B."""
        if not self.shares_a():
            return super().trainable(adapters)
        for a in adapters.A.values():
            a.requires_grad_(False)  # frozen: no gradient, no optimizer state
        return list(adapters.B.values())

    def setup(self, run) -> None:
        super().setup(run)
        if self.carries():  # the global adapter at the top rank on every site, B = 0 until a server trains it
            cfg = self.cfg
            # a rank past a weight's full rank min(out, in) adds nothing, and would only cost memory here
            self.full_rank = max(min(x.out_features, x.in_features) for x in run.sites)
            self.top = min(max([*cfg.lora.ranks, cfg.lora.rank]), self.full_rank)
            self.initial = shared_initial_adapter(run.sites, self.top, cfg.seed, device=run.comm.device)

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
        if self.shares_a():
            return self._exchange_b(plans, contributors, updates)
        run = self.run
        stack, traffic = factored_exchange(run.comm, run.sites, plans, contributors, updates, run.owner,
                                           self.aggregator, run.shard_sizes, claims, wire=self.cfg.aggregation.wire)
        late = traffic.pop("rejected_late")
        # the weights exactly as rank 0's fold forms them (a late-rejected server weighs 0), on every rank
        meta = [update_meta(c, run.shard_sizes, plans) for c in contributors]
        raw = [0.0 if c in late else self.aggregator.raw_weight(m) for c, m in zip(contributors, meta)]
        scale = self.aggregator.round_scale(meta) / sum(raw) if sum(raw) > 0 else 0.0
        factors = split_stack(stack, [plans[c].ranks for c in contributors])
        start = self.global_adapter()
        self.global_state, residual = kept_adapter_step(start, factors, [w * scale for w in raw])
        if self.server_opt is not None:
            self.global_state = self.server_opt.step(start, self.global_state)
        self.global_state = self.rebalanced(self.global_state)
        return Exchanged(residual, traffic, late)

    def _exchange_b(self, plans, contributors, updates) -> Exchanged:
        """lora.carry=shared_a: the weighted sum of the servers' B~_i - B_g, reduced like FedAvg's tensors
        (each rank pre-sums its own servers), added to the global B; A and the base stay as they are."""
        run, g = self.run, self.global_adapter()
        keys = sorted({k for c in contributors for k, r in plans[c].ranks.items() if r > 0})  # alike on every rank
        sent = {c: dataclasses.replace(u, factors={k: shared_a_delta(g[k][0], b) for k, (b, _) in u.factors.items()})
                for c, u in updates.items() if c in contributors}
        (delta,), traffic = fedavg_exchange(run.comm, [contributors], [[((k,), g[k][0].shape) for k in keys]], sent,
                                            run.owner, _ScaledSum(self.aggregator), plans, run.shard_sizes)
        new = dict(g)
        for k, d in delta.items():
            b, a = g[k]
            new[k] = (b + d.to(b), a)
        self.global_state = new
        return Exchanged({}, traffic, [])


class _ScaledSum:
    """fedavg_exchange's aggregator for lora.carry=shared_a: FedPipe's weights (with FedNova's round scale) and a
    plain weighted sum of the B changes."""

    def __init__(self, aggregator):
        self.aggregator = aggregator

    def weights(self, metas) -> list[float]:
        return self.aggregator.scaled_weights(metas)

    def aggregate(self, updates, weights) -> Aggregate:
        return Aggregate(merge=weighted_sum(updates, weights))
