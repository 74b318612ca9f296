"""The base's merged state in checkpoints: a full snapshot every few rounds, the merged updates in between.

    chain = BaseChain(cfg.checkpoint.full_every, resumed=point is not None)
    chain.record(t, ex.deltas)                   # every round, after the merge
    state["base"] = chain.entry(t, bases)        # at a checkpoint (rank_state)
    ...
    base = resolve_base(ckpt, t0, w0, ranks)     # resuming: the newest full snapshot and the updates since
    replay(bases, base)                          # load it, merge the updates again: bitwise the same state

Why: a rank's merged state is every adapted weight (fp32 view) or the merged residuals, 8.6 GB per fp32 rank
at LLaMA-2-7B, while a round changes it by the merged update, which arrives as factors (B, A) of rank
sum_i r_i, about 1/17 of that in the alpaca_llama2_7b.yaml plan (benchmarks/README.md, scale_7b). So a
checkpoint holds either the full state ("full") or the updates merged since the previous checkpoint
("deltas": [(round, {site key: (B, A) or dense dW})], exactly as they were merged), and names the checkpoint it
continues ("prev"; None: the pretrained base, which set-up rebuilds exactly). A resume loads the newest full
snapshot and merges the updates after it in order with the same code on the same device, so the state is
bitwise the one the run had (tests/test_resume.py).

When a checkpoint is full (the same decision on every rank: it depends on rounds and updates, which every
rank shares): every checkpoint.full_every rounds after the chain's start; the first checkpoint after a
resume (a chain never spans two attempts, so never two world sizes); and whenever the updates to store
are no smaller than the dense fp32 adapted weights (a dense downlink, as on tiny models).
"""

from __future__ import annotations

from ..errors import UserInputError
from ..io.checkpoint import CheckpointDir, verify
from ..io.space import tensor_bytes
from .trees import tree_to


class BaseChain:
    """One rank's record of the updates merged since its last checkpoint, and of the chain they extend."""

    def __init__(self, full_every: int, *, resumed: bool):
        self.full_every = full_every
        self.start = 0  # the round of the chain's full snapshot (0: the pretrained base)
        self.prev: int | None = None  # the chain's newest checkpoint
        self.pending: list[tuple[int, dict]] = []
        self.must_be_full = resumed

    def record(self, t: int, deltas: dict) -> None:
        """Round t's merged update (site key -> dense dW or (B, A)), copied to the CPU until the next checkpoint."""
        if deltas:

            self.pending.append((t, tree_to(deltas, "cpu", copy=True)))

    def entry(self, t: int, bases) -> dict:
        """The base part of round t's checkpoint: the full state or the updates since the previous one."""
        dense_bytes = sum(s.out_features * s.in_features * 4 for s in bases.sites)
        full = (self.must_be_full or self.full_every == 1 or t - self.start >= self.full_every
                or tensor_bytes([d for _, d in self.pending]) >= dense_bytes)
        if full:
            out = {"full": bases.state_dict(), "start": t, "prev": None, "deltas": []}
            self.start, self.must_be_full = t, False
        else:
            out = {"full": None, "start": self.start, "prev": self.prev, "deltas": self.pending}
        self.prev, self.pending = t, []
        return out


def chain_rounds(ckpt: CheckpointDir, t: int, w: int, rank: int, run_ids: dict | None = None
                 ) -> tuple[list[tuple[int, dict | None]], list[str]]:
    """The checkpoints round t's base state is built from, oldest first, as (round, the base part of rank
    `rank` of `w`'s file), and what is damaged or missing among them (t's own file is verified by the caller).
    `run_ids`, when given, gets {(round, rank): (the run id, the settings fingerprint) inside that file} for each
    file read."""
    chain, cur = [], t
    while True:
        state = ckpt.load(cur, rank, w)
        base = state["base"]
        if run_ids is not None:
            run_ids[(cur, rank)] = (state.get("run_id"), state.get("settings"))
        chain.append((cur, base))
        if base is None or base["full"] is not None or base["prev"] is None:
            return chain[::-1], []
        cur = base["prev"]
        path = ckpt.path(cur, rank, w)
        why = verify(path) if path.is_file() else "is missing (removed by hand?)"
        if why is not None:
            return chain[::-1], [f"{str(path)!r}, which round {t}'s checkpoint continues: {why}"]


def resolve_base(ckpt: CheckpointDir, t: int, w: int, ranks: list[int]) -> dict | None:
    """Round t's base state from its chain: {"full": the newest full snapshot's state (None: the pretrained
    base), "deltas": [(round, update)] merged after it}. `ranks` of `w`: the files the full snapshot is
    composed from (a resume on another number of ranks takes the fp32 weights and the residuals from the
    ranks that kept them; every rank merged the same updates, so the first one's chain gives them)."""
    chain, _ = chain_rounds(ckpt, t, w, ranks[0])
    first_round, first = chain[0]
    if first is None:
        return None
    full = None
    if first["full"] is not None:
        snaps = [ckpt.load(first_round, r, w)["base"]["full"] for r in ranks]
        full = {"fp32": next((s["fp32"] for s in snaps if s["fp32"]), {}),
                "residuals": next((s["residuals"] for s in snaps if s["residuals"]), {})}
    return {"full": full, "deltas": [d for _, base in chain for d in base["deltas"]]}


def replay(bases, base: dict) -> None:
    """Put a resolved base state back: its full snapshot (if any), then each update merged again in order."""

    if base["full"] is not None:
        bases.load_state_dict(base["full"])
    site_by_key = {s.key: s for s in bases.sites}
    for t, deltas in base["deltas"]:
        if not set(deltas) <= set(site_by_key):
            raise UserInputError(f"resume: round {t}'s merged update in the checkpoint names weights this model does "
                                 "not adapt; resume with the job that wrote it")
        bases.merge(tree_to(deltas, bases.device), site_by_key, measure=False)
