"""Layer: runtime/exchange.py's factored exchange with aggregation.wire (fp32 | bf16), on ranks played by threads
in one process (a FIFO channel per pair of ranks that hands tensors over as they are, dtype and all), plus the
config check; then two short in-process runs of the quickstart job per method. About 5 s on 2 cores.

Run: .venv/bin/python -m pytest tests/test_wire_bf16.py -q
"""

import queue
import threading

import pytest
import torch

from fedpipe_dist.adapters.sites import Site
from fedpipe_dist.algorithm.aggregation import ClientUpdate, get_aggregator
from fedpipe_dist.algorithm.planner import ClientPlan
from fedpipe_dist.algorithm.sanitize import update_norm
from fedpipe_dist.comm.base import Traffic, nbytes
from fedpipe_dist.comm.local import LocalComm
from fedpipe_dist.comm.payload import factor_layout, layout_numel, stacked_layout, to_wire
from fedpipe_dist.config import ConfigError
from fedpipe_dist.job import load_job
from fedpipe_dist.runtime.exchange import factored_exchange

from ._util import SMALL_RUN, run_small

BF16 = torch.bfloat16


class ThreadComm:
    """One rank of an in-process world: send/recv/broadcast through one FIFO queue per (src, dst)."""

    def __init__(self, rank: int, world_size: int, channels: dict):
        self.rank, self.world_size, self.channels = rank, world_size, channels
        self.device, self.traffic = torch.device("cpu"), Traffic()

    def _put(self, dst, x):
        self.channels[self.rank, dst].put(x)

    def _get(self, src):
        return self.channels[src, self.rank].get(timeout=10)  # a failed peer: fail, not hang

    def _fill(self, tensor, got):
        # a real transport moves bytes: the receiver's buffer must have the sender's dtype and size
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, (got.dtype, tensor.dtype)
        tensor.copy_(got)
        self.traffic.received += nbytes(tensor)

    def send(self, tensor, dst):
        self._put(dst, tensor.clone())
        self.traffic.sent += nbytes(tensor)

    def recv(self, tensor, src):
        self._fill(tensor, self._get(src))

    def broadcast(self, tensor, src=0):
        if self.rank == src:
            for d in range(self.world_size):
                if d != src:
                    self.send(tensor, d)
        else:
            self._fill(tensor, self._get(src))

    def broadcast_object(self, obj, src=0):
        if self.rank == src:
            for d in range(self.world_size):
                if d != src:
                    self._put(d, obj)
            return obj
        return self._get(src)


def run_world(world_size: int, fn):
    """fn(comm) on every rank, each in its own thread; returns the ranks' results in rank order."""
    channels = {(s, d): queue.Queue() for s in range(world_size) for d in range(world_size)}
    out, errors = [None] * world_size, []

    def body(r):
        try:
            out[r] = fn(ThreadComm(r, world_size, channels))
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return out


# Two weights large enough that the stack (rank sum_i r_i) is smaller than the dense product: a factored downlink.
SITES = [Site(0, "q", "m.q", 0, 64, 48, "linear"), Site(0, "v", "m.v", 0, 32, 48, "linear")]
HETERO = [{"0.q": 4, "0.v": 2}, {"0.q": 2, "0.v": 4}, {"0.q": 3}]
EQUAL = [{"0.q": 4, "0.v": 4}] * 3
SHARDS = [100, 300, 50]


def _setup(rank_list, seed=0):
    g = torch.Generator().manual_seed(seed)
    plans = [ClientPlan(c, b, dict(r)) for c, (b, r) in enumerate(zip([4, 8, 1], rank_list))]
    factors = [{s.key: (torch.randn(s.out_features, r[s.key], generator=g) * 0.01,
                        torch.randn(r[s.key], s.in_features, generator=g)) for s in SITES if r.get(s.key)}
               for r in rank_list]
    return plans, factors


def exchange(comm, plans, factors, method="fedpipe", wire="fp32", owner=None, claims=None):
    """The factored exchange on `comm`, each rank holding copies of its own servers' updates."""
    owner = owner or (lambda c: c % comm.world_size)
    contributors = list(range(len(plans)))
    updates = {c: ClientUpdate(c, SHARDS[c], plans[c].batch_size, {k: (b.clone(), a.clone()) for k, (b, a)
                                                                  in factors[c].items()})
               for c in contributors if owner(c) == comm.rank}
    return factored_exchange(comm, SITES, plans, contributors, updates, owner, get_aggregator(method), SHARDS,
                             claims, wire=wire)


def _stack_reference(plans, factors, dtype):
    """The merged stack as the exchange must form it, by hand: uploads rounded to `dtype`, B_i x raw weight
    |D_i|/b_i stacked in client order, x 1/sum of raw weights, and the stack rounded to `dtype` again."""
    raw = [SHARDS[c] / plans[c].batch_size for c in range(len(plans))]
    s = 1.0 / sum(raw)
    out = {}
    for site in SITES:
        parts = [(to_wire(f, dtype)[site.key], w) for f, w in zip(factors, raw) if site.key in f]
        b = torch.cat([bi * w for (bi, _), w in parts], dim=1) * s
        a = torch.cat([ai for (_, ai), _ in parts], dim=0)
        out[site.key] = to_wire({"x": (b, a)}, dtype)["x"]
    return out


def _assert_identical(x, y):
    assert x.keys() == y.keys()
    for k in x:
        for p, q in zip(x[k], y[k]):
            assert p.dtype == q.dtype == torch.float32 and torch.equal(p, q), k


def test_fp32_wire_is_the_exact_stack_as_before():
    """wire=fp32 (the default) sends fp32 and delivers the exact stack, bitwise, on every rank."""
    plans, factors = _setup(HETERO)
    ref = _stack_reference(plans, factors, torch.float32)
    default = run_world(2, lambda comm: factored_exchange(
        comm, SITES, plans, [0, 1, 2],
        {c: ClientUpdate(c, SHARDS[c], plans[c].batch_size, factors[c]) for c in range(3) if c % 2 == comm.rank},
        lambda c: c % 2, get_aggregator("fedpipe"), SHARDS))  # no wire argument: today's call
    for deltas, traffic in default:
        _assert_identical(deltas, ref)
        assert traffic["client_bytes_up"] == {c: 4 * layout_numel(factor_layout(SITES, plans[c].ranks))
                                              for c in range(3)}
        assert traffic["bytes_down_payload"] == 4 * layout_numel(stacked_layout(SITES, [p.ranks for p in plans]))
    # and bf16 is not a no-op: its merged update differs from the exact one
    bf = run_world(2, lambda comm: exchange(comm, plans, factors, wire="bf16"))
    assert not torch.equal(bf[0][0]["0.q"][0], ref["0.q"][0])


@pytest.mark.parametrize("method", ["fedpipe", "lora", "flexlora"])
def test_bf16_halves_the_factor_bytes_up_and_a_factored_downlink(method):
    plans, factors = _setup(EQUAL if method == "lora" else HETERO)
    res = {w: run_world(2, lambda comm, w=w: (*exchange(comm, plans, factors, method, w), comm.traffic))
           for w in ("fp32", "bf16")}
    (_, f32, _), (_, b16, _) = res["fp32"][0], res["bf16"][0]
    assert {c: 2 * n for c, n in b16["client_bytes_up"].items()} == f32["client_bytes_up"]
    if method == "flexlora":  # its global adapter is a dense dW_g: it stays fp32
        assert b16["bytes_down_payload"] == f32["bytes_down_payload"]
    else:
        assert 2 * b16["bytes_down_payload"] == f32["bytes_down_payload"] > 0
    # the counts are the bytes really sent: rank 1 (server 1) sent its upload, rank 0 the downlink to rank 1
    assert res["bf16"][1][2].sent == b16["client_bytes_up"][1]
    assert res["bf16"][0][2].sent == b16["bytes_down_payload"]


def test_every_rank_merges_the_bf16_rounded_stack():
    plans, factors = _setup(HETERO)
    ref = _stack_reference(plans, factors, BF16)
    got = run_world(3, lambda comm: exchange(comm, plans, factors, wire="bf16"))
    for deltas, _ in got:  # rank 0 (which formed it) and the others: the same rounded values, in fp32
        _assert_identical(deltas, ref)
        for b, a in deltas.values():
            assert torch.equal(b, b.to(BF16).float()) and torch.equal(a, a.to(BF16).float())
    exact = _stack_reference(plans, factors, torch.float32)
    rel = max(float((ref[k][0] @ ref[k][1] - exact[k][0] @ exact[k][1]).norm() / (exact[k][0] @ exact[k][1]).norm())
              for k in ref)
    assert 1e-5 < rel < 1e-2  # rounded (not exact), by about bf16's precision, not more


def test_rank0_hosted_and_remote_servers_are_rounded_alike():
    """One process hosting every server, two ranks either way round, three ranks: the same merged update."""
    plans, factors = _setup(HETERO, seed=1)
    runs = [exchange(LocalComm(), plans, factors, wire="bf16")[0],
            run_world(2, lambda comm: exchange(comm, plans, factors, wire="bf16"))[0][0],
            run_world(2, lambda comm: exchange(comm, plans, factors, wire="bf16", owner=lambda c: 1 - c % 2))[1][0],
            run_world(3, lambda comm: exchange(comm, plans, factors, wire="bf16"))[2][0]]
    for other in runs[1:]:
        _assert_identical(other, runs[0])


def test_claims_of_the_rounded_update_pass_and_a_lie_is_caught():
    """Rank 0 re-checks each server's claimed norm on the bf16 factors it received (or rounded)."""
    plans, factors = _setup(HETERO)
    claims = {c: update_norm(to_wire(f, BF16)) for c, f in enumerate(factors)}
    ok = run_world(2, lambda comm: exchange(comm, plans, factors, wire="bf16", claims=claims))
    assert all(t["rejected_late"] == [] for _, t in ok)
    lied = {**claims, 1: claims[1] / 10, 2: claims[2] / 10}  # server 1 remote, server 2 on rank 0
    bad = run_world(2, lambda comm: exchange(comm, plans, factors, wire="bf16", claims=lied))
    assert all(t["rejected_late"] == [1, 2] for _, t in bad)


def test_bf16_wire_needs_the_factored_transport_and_lora_factors():
    assert load_job("jobs/quickstart.yaml", ["aggregation.wire=bf16"]).aggregation.wire == "bf16"
    assert load_job("jobs/quickstart.yaml", []).aggregation.wire == "fp32"
    with pytest.raises(ConfigError, match=r"^aggregation\.wire: bf16 .*aggregation\.transport=factored"):
        load_job("jobs/quickstart.yaml", ["aggregation.transport=dense", "aggregation.wire=bf16", "lora.carry=none"])
    with pytest.raises(ConfigError, match=r"^aggregation\.wire: bf16 .*method ft"):
        load_job("jobs/quickstart.yaml", ["method=ft", "aggregation.wire=bf16"])
    with pytest.raises(ConfigError, match="aggregation.wire"):
        load_job("jobs/quickstart.yaml", ["aggregation.wire=fp16"])


@pytest.mark.parametrize("method", ["fedpipe", "lora"])
def test_a_run_with_the_bf16_wire_halves_its_bytes_and_rejects_nothing(tmp_path, method):
    """A whole run (one process, 4 servers, sanitization on): every upload and the factored downlink at half
    the bytes; each server claims the norm of its rounded update, which rank 0's re-check accepts."""
    extra = ["rounds=2", f"method={method}", "lora.rank=4", "aggregation.sanitize=true"]
    _, f32 = run_small(tmp_path, "fp32", *extra)
    _, b16 = run_small(tmp_path, "bf16", *extra, "aggregation.wire=bf16")
    assert (2 * b16.clients["bytes_up"] == f32.clients["bytes_up"]).all() and f32.rounds["bytes_up"][1:].all()
    assert (2 * b16.rounds["bytes_down"] == f32.rounds["bytes_down"]).all() and f32.rounds["bytes_down"][1:].all()
    assert b16.rounds["n_rejected"].sum() == 0
    loss32, loss16 = f32.rounds["eval_loss"][1:], b16.rounds["eval_loss"][1:]
    assert (loss16 != loss32).any() and abs(loss16 - loss32).max() < 0.05  # rounded, and only a little


def test_the_benchmark_measures_half_the_bytes_and_a_small_rounding_error(tmp_path):
    """benchmarks/wire_bf16.py on a one-round run: its bookkeeping and the fidelity figure it reports."""
    from benchmarks.wire_bf16 import main

    doc = main(["--seeds", "0", "--rounds", "1", "--workdir", str(tmp_path), "--out", str(tmp_path / "w.json"),
                *SMALL_RUN[1:]])
    f, b = doc["summary"]["fp32"], doc["summary"]["bf16"]
    assert 2 * b["bytes_up_per_round"] == f["bytes_up_per_round"] > 0
    assert 2 * b["bytes_down_per_round"] == f["bytes_down_per_round"] > 0
    assert 1e-4 < f["server_rel_err_median"] < 1e-2 and 1e-4 < f["merged_rel_err_mean"] < 1e-2
