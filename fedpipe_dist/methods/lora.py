"""LoRA methods: `LoRAMethod`, what the five LoRA methods share, and `lora`, FedAvg of LoRA factors.

A LoRA method trains LoRA adapters at the ranks its plan gives each attention weight, reads out the factors
(B incl. alpha/r, A) and importance measurements, and sends them factored (or, where the job and the
aggregator allow, as a pre-summed dense dW); factored, in the wire format aggregation.wire names (fp32, or bf16
at half the bytes, runtime/exchange.py). What it does with the combined update depends on its aggregator:
- merging (fedpipe, flora): every base folds the update in now; next round's adapters start fresh;
- a kept global adapter (lora, flexlora, hetlora): the base stays W0 during the run; clients start from the
  global adapter at their own rank (`Aggregator.client_start`); it is evaluated through hooks (W0 + dW_g)
  and merged into the base once, at the end.

`lora` (FedAvg of factors, McMahan et al. with LoRA; one rank for every server): B and A are averaged
separately, with |D_i| weights.
"""

from __future__ import annotations

from ..adapters.lora import FixedUpdates, shared_initial_adapter
from ..algorithm.aggregation.base import REGISTRY as AGGREGATORS
from ..algorithm.aggregation.fedpipe import FRESH_A_ROW_NORM, svd_rebalance
from ..algorithm.aggregation.lora import WeightedLoRAFedAvg
from ..algorithm.cost import flops_per_sample, memory_bytes
from ..algorithm.sanitize import update_norm
from ..algorithm.server_opt import ServerOptimizer
from ..comm.payload import WIRE_DTYPES, to_wire
from ..errors import UserInputError
from ..runtime.client import train_client
from ..runtime.exchange import dense_exchange, factored_exchange, update_meta
from ..runtime.trees import tree_device, tree_to
from .base import Exchanged, Method, register_method, require


class LoRAMethod(Method):
    trains_lora = True
    takes_kept_moments = True
    hetero_ranks = False  # True: one rank per server (lora.client_ranks, or by compute), as FLoRA & co. assume

    @classmethod
    def validate(cls, cfg) -> None:
        if AGGREGATORS[cls.aggregator_name or cls.name].keeps_global_adapter:
            require(cfg.aggregation.transport == "factored", "aggregation.transport",
                    f"method {cfg.method} keeps a global adapter built from every client's factors, so it needs "
                    "aggregation.transport=factored")

    @classmethod
    def takes_server_opt(cls, carry: str) -> bool:
        """A global adapter averaged factor by factor at one rank (lora, lora_hb): its pseudo-gradient is the
        average's change of each factor, as OpenFedLLM steps peft's state dict."""
        agg = AGGREGATORS[cls.aggregator_name or cls.name]
        return agg.keeps_global_adapter and agg.averages_factors and not agg.pad_ranks

    def initial_ranks(self, flops: list[float]) -> list[int]:
        """lora.rank everywhere; with `hetero_ranks`: lora.client_ranks, or by compute: the largest of lora.ranks
        not above max(lora.ranks) x C_i / max_j C_j, at least the smallest (a tiering like those papers' setups)."""
        cfg = self.cfg
        if not self.hetero_ranks:
            return super().initial_ranks(flops)
        if cfg.lora.client_ranks is not None:
            return list(cfg.lora.client_ranks)
        cands, top = sorted(set(cfg.lora.ranks)), max(flops)
        return [max([r for r in cands if r <= cands[-1] * f / top + 1e-9], default=cands[0]) for f in flops]

    def step_cost(self, c, plan, shape, seq_len, act_bytes):
        b = plan.batch_size
        return (b * flops_per_sample(shape, plan.ranks, seq_len),
                memory_bytes(shape, precision=plan.precision, ranks=plan.ranks, batch=b, seq_len=seq_len,
                             act_bytes=act_bytes))

    def setup(self, run) -> None:
        super().setup(run)
        self.global_state: dict = {}  # the kept global adapter (LoRA factors or dense dW), the same on every rank
        self.initial: dict = {}  # what every server starts from while there is no global adapter yet (round 1)
        ag = self.cfg.aggregation  # aggregation.server_opt: the same state on every rank, stepped alike
        self.server_opt = None if ag.server_opt == "none" else ServerOptimizer(
            ag.server_opt, ag.server_lr, (ag.server_beta1, ag.server_beta2), ag.server_tau)
        if self.aggregator.keeps_global_adapter:
            cfg = self.cfg
            top = max([*cfg.lora.ranks, cfg.lora.rank, *(cfg.lora.client_ranks or [])])
            self.initial = shared_initial_adapter(run.sites, top, cfg.seed, device=run.comm.device)

    # ---- local training ----------------------------------------------------------------------------------
    def trainable(self, adapters) -> list:
        """The adapter tensors the optimizer updates (every A and B)."""
        return list(adapters.parameters())

    def prune(self) -> tuple[float, float] | None:
        """HetLoRA's (gamma, reg) rank regularizer; None: none."""
        return None

    def client_start(self, plan) -> dict | None:
        """The factors server `plan.client` starts from: the global adapter at its ranks, before there is one
        the job's shared initial adapter (every server alike, as FedAvg-LoRA code in the field starts), or, for
        a method that merges every round, None: fresh adapters of its own."""
        if not self.aggregator.keeps_global_adapter:
            return None
        start = {}
        for k, r in plan.ranks.items():
            if r <= 0:
                continue
            start[k] = self.client_start_factors(k, r)
        return start

    def client_start_factors(self, key: str, rank: int) -> tuple:
        """The (B, A) at `rank` every server of that rank starts weight `key` from this round."""
        if key in self.global_state:
            return self.aggregator.client_start(self.global_state, key, rank)
        b0, a0 = self.initial[key]
        return b0[:, :rank], a0[:rank]

    def frozen(self, plan) -> dict | None:
        """Updates on the model while server `plan.client` trains that are not its to train; None: none."""
        return None

    def train(self, c, plan, shard, **common):
        run = self.run
        update, stats = train_client(run.model, run.sites, plan, shard, self.training,
                                     start=self.client_start(plan), prune=self.prune(), trainable=self.trainable,
                                     frozen=self.frozen(plan),
                                     opt_memory=self.kept_moments(c),
                                     **common)
        run.planner.observe(c, stats.sensitivity, stats.singular, stats.step_times)
        return update, stats

    # ---- exchange and fold ---------------------------------------------------------------------------------
    def update_norm(self, c, update) -> float:
        """||B A|| of what server c sends: with aggregation.wire=bf16 its factors as rounded on the wire, which
        is what rank 0 re-checks the claim against (config.validate keeps bf16 to the factored transport)."""
        return update_norm(to_wire(update.factors, WIRE_DTYPES[self.cfg.aggregation.wire]))

    def exchange(self, t, plans, contributors, updates, claims) -> Exchanged:
        run, late = self.run, []
        if self.cfg.aggregation.transport == "factored":
            result, traffic = factored_exchange(run.comm, run.sites, plans, contributors, updates, run.owner,
                                                self.aggregator, run.shard_sizes, claims,
                                                wire=self.cfg.aggregation.wire)
            late = traffic.pop("rejected_late")
        else:  # weights from the plan (|D_i|, b_i, K_i), the same on every rank, which pre-sums its own servers
            weights = self.aggregator.scaled_weights([update_meta(c, run.shard_sizes, plans) for c in contributors])
            result, traffic = dense_exchange(run.comm, run.sites, plans, contributors, weights, updates, run.owner)
        if self.aggregator.keeps_global_adapter:
            if self.server_opt is not None:  # the step from the adapter every client started from
                start = {k: self.client_start_factors(k, b.shape[1]) for k, (b, _) in result.items()}
                result = self.server_opt.step(start, result)
            self.global_state = self.rebalanced(result)  # clients start from it next round; the base stays W0
            return Exchanged({}, traffic, late)
        return Exchanged(result, traffic, late)

    def rebalanced(self, adapter: dict) -> dict:
        """lora.rebalance: the kept global adapter refactored for the next round (the same products, so the same
        model); as it is with none."""
        rebalance = self.cfg.lora.rebalance
        if rebalance not in ("svd", "orth"):  # none (or a config not loaded through job.load_job: unset)
            return adapter
        return svd_rebalance(adapter, FRESH_A_ROW_NORM if rebalance == "orth" else None)

    def attach(self, state=None):
        return FixedUpdates(self.run.sites, self.global_state if state is None else state).attach(self.run.model)

    # ---- checkpoint and end -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"global_state": tree_to(self.global_state, "cpu"),
                 "global_state_device": tree_device(self.global_state)}
        if self.server_opt is not None:
            state["server_opt"] = self.server_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        target = self.run.comm.device if state["global_state_device"] == "cuda" else "cpu"
        self.global_state = tree_to(state["global_state"], target, copy=True)
        if self.server_opt is not None:
            if "server_opt" not in state:
                raise UserInputError("this checkpoint was written without aggregation.server_opt; resume with "
                                     "aggregation.server_opt=none, or start a fresh run (output.dir elsewhere)")
            self.server_opt.load_state_dict(state["server_opt"], target)

    def finish(self) -> None:
        if self.global_state:  # a kept global adapter joins the base once
            self.run.bases.merge(self.global_state, self.run.site_by_key, measure=False)
            self.global_state = {}


@register_method
class LoRA(LoRAMethod):
    name = "lora"
    takes_rebalance = True  # one global adapter of factors at one rank (lora_hb too)


@register_method
class LoRAHB(LoRA):
    """The heterogeneity-aware LoRA baseline (`method: lora_hb`): fixed-rank LoRA FedAvg (lora.rank on every
    target, one global adapter) given FedPipe's batch sizing, a batch in proportion to each server's compute at
    the same local steps (algorithm/planner.stage1_batch, with plan.step_overhead_s), and FedAvg weights from
    aggregation.weights (plan.variant's choice: tuned weights by samples trained). What FedPipe adds beyond it
    is its own: rank placement, precision and its aggregation."""

    name = "lora_hb"
    aggregator_name = "lora_hb"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        require(cfg.aggregation.weights in WeightedLoRAFedAvg.WEIGHTINGS, "aggregation.weights",
                f"method lora_hb averages factors with weights {list(WeightedLoRAFedAvg.WEIGHTINGS)} (got "
                f"{cfg.aggregation.weights}); fednova's rescaled sum has no FedAvg-of-factors form")

    def batch_sizes(self, flops_per_s, shape, seq_len):
        from ..algorithm.cost import flops_per_sample
        from ..algorithm.planner import stage1_batch

        cfg = self.cfg
        ref = flops_per_sample(shape, {s.key: cfg.lora.rank for s in shape.sites if s.kind in cfg.lora.targets},
                               seq_len)  # one sample's FLOPs at lora.rank: the fixed cost in samples' worth
        overhead = (cfg.plan.step_overhead_s or 0.0) * max(flops_per_s) / ref
        return stage1_batch(flops_per_s, cfg.train.batch_min, cfg.train.batch_max, overhead)
