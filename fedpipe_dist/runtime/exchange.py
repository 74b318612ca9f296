"""How updates travel to rank 0 and back (the transports a method picks from; methods/ decides which).

    factored_exchange   clients send (B, A); rank 0 streams them through the method's aggregator and
                        broadcasts its result (the stack, its dense product, or a global adapter)
    dense_exchange      each rank pre-sums w_i B_i A_i of its own servers; a SUM reduce, then a broadcast
    fedavg_exchange     whole tensors (every parameter, or every Houlsby adapter), one average per group

Payloads carry no headers: both ends derive each buffer's layout from the plans, so the bytes counted are
exactly the tensor bytes sent. The factored exchange's factors travel in `wire` (aggregation.wire): fp32, or
bf16 at half the bytes; a dense payload is always fp32. Every function returns what it delivered on every rank
and a `traffic` dict: client_bytes_up {server: bytes}, bytes_down_payload, wait_s (rank 0 waiting on
receives), agg_s.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..algorithm.aggregation import ClientUpdate, dense_sum
from ..algorithm.aggregation.base import to_dense
from ..algorithm.planner import ClientPlan
from ..algorithm.sanitize import update_norm
from ..comm.base import nbytes
from ..comm.payload import (
    WIRE_DTYPES,
    dense_layout,
    downlink_is_dense,
    factor_layout,
    layout_numel,
    pack,
    pack_dense,
    stacked_layout,
    to_wire,
    unpack,
    unpack_dense,
)


def factored_exchange(comm, sites, plans: list[ClientPlan], contributors, updates, owner, aggregator, shard_sizes,
                      claims: dict[int, float] | None = None, *, wire: str = "fp32"):
    """Clients send (B, A); rank 0 runs the method's aggregator and broadcasts its result.

    Merging methods (fedpipe, flora): the stack [w_i B_i], [A_i] (exact, Eqn 12), or its dense product when
    that is smaller; returns the update to merge. Global-adapter methods: lora / hetlora broadcast factors
    at the largest contributing rank per weight, flexlora the dense dW_g; returns that global adapter.
    Weights are formed at rank 0 from each received update (raw_weight: |D_i|, |D_i|/b_i, or HetLoRA's
    norm) and normalized at the end. `claims`: the norms the servers reported; an update whose norm at rank 0
    differs (or is not finite) is folded in with weight 0, so the downlink's layout stays as planned, and is
    reported back in traffic["rejected_late"].

    `wire` (aggregation.wire): the factors' format both ways. bf16 rounds every server's (B, A) as it goes up
    (rank 0's own servers too, so no result depends on which rank hosts a server; a claim must then be the
    norm of the rounded factors) and a factored downlink as it goes down; every rank, rank 0 included, merges
    the same rounded values back in fp32. A dense downlink stays fp32, like every dense payload here: bf16 is a
    format for factors. (Rounding the dense dW would not lose more: about 1.7e-3 relative against 2.3e-3 for
    its rounded factors on random rank-32 stacks; it is left out to keep one meaning for the switch.)"""
    dtype = WIRE_DTYPES[wire]
    layouts = {c: factor_layout(sites, plans[c].ranks) for c in contributors}
    itemsize = torch.empty(0, dtype=dtype).element_size()
    client_bytes = {c: layout_numel(layouts[c]) * itemsize for c in contributors}  # the factors' payload
    down_layout, dense_down = _downlink(sites, plans, contributors, aggregator)
    down_dtype = torch.float32 if dense_down else dtype
    fold = {"wait_s": 0.0, "agg_s": 0.0, "agg_held_bytes": 0, "rejected_late": []}
    if comm.rank == 0:
        result, fold = _fold_at_rank0(comm, plans, contributors, updates, owner, aggregator, shard_sizes, claims,
                                      layouts, dense=dense_down is not None, dtype=dtype)
        t0 = time.perf_counter()
        if dense_down:
            down = pack_dense({k: to_dense(v) for k, v in result.items()}, dense_down, device=comm.device)
        else:
            down = pack(result, down_layout, device=comm.device, dtype=down_dtype)
        fold["agg_s"] += time.perf_counter() - t0
    else:
        for c in contributors:
            if owner(c) == comm.rank:
                comm.send(pack(updates[c].factors, layouts[c], device=comm.device, dtype=dtype), dst=0)
        numel = sum(o * i for _, (o, i) in dense_down) if dense_down else layout_numel(down_layout)
        down = torch.empty(numel, device=comm.device, dtype=down_dtype)
    comm.broadcast(down, src=0)
    if dense_down:
        deltas = unpack_dense(down, dense_down)
    else:  # factors (B, A): a low-rank residual keeps them as they are; bf16 comes back as fp32 (same values)
        deltas = unpack(down.float(), down_layout)
    fold["rejected_late"] = comm.broadcast_object(fold["rejected_late"] if comm.rank == 0 else None)
    return deltas, {"client_bytes_up": client_bytes, "bytes_down_payload": nbytes(down), **fold}


def _downlink(sites, plans: list[ClientPlan], contributors, aggregator):
    """The downlink's layout: (factor layout, None), or ([], dense layout) when it travels dense."""
    if aggregator.keeps_global_adapter:
        keys = {k for c in contributors for k, r in plans[c].ranks.items() if r > 0}
        if aggregator.dense_global:  # FlexLoRA: the global adapter is a dense dW_g
            return [], dense_layout(sites, keys)
        r_max = {k: max(plans[c].ranks.get(k, 0) for c in contributors) for k in keys}  # the largest rank
        return factor_layout(sites, r_max), None
    down_layout = stacked_layout(sites, [plans[c].ranks for c in contributors])
    if aggregator.raw_stack:  # every rank reads each server's factors back from it (lora.carry=adapter)
        return down_layout, None
    # The merged update goes down in whichever exact form is smaller (see downlink_is_dense).
    return down_layout, (dense_layout(sites, {k for k, _, _ in down_layout}) if downlink_is_dense(down_layout)
                         else None)


def _fold_at_rank0(comm, plans, contributors, updates, owner, aggregator, shard_sizes, claims, layouts, *,
                   dense: bool, dtype: torch.dtype = torch.float32):
    """Rank 0 receives the updates one at a time and folds each into the running sum as it arrives, so it
    holds one update and the sum (bounded by the downlink's size), never all N. Returns the aggregate's
    result (the update to merge, or the global adapter) and the fold's timings and verdicts. Uploads arrive
    in `dtype` and are folded in fp32; rank 0's own servers' factors are rounded to `dtype` alike."""
    acc, total, held, late, wait_s, agg_s = None, 0.0, 0, [], 0.0, 0.0
    for c in contributors:  # per-source order matches each sender's ascending client order
        if owner(c) == 0:
            u = updates.pop(c)
            if dtype != torch.float32:  # as if it had travelled: every server's update is treated alike
                u = dataclasses.replace(u, factors=to_wire(u.factors, dtype))
        else:
            buf = torch.empty(layout_numel(layouts[c]), device=comm.device, dtype=dtype)
            t0 = time.perf_counter()
            comm.recv(buf, src=owner(c))
            wait_s += time.perf_counter() - t0
            u = update_meta(c, shard_sizes, plans, unpack(buf.float(), layouts[c]))  # fp32: buf itself
            del buf
        t0 = time.perf_counter()
        w = aggregator.raw_weight(u)
        if claims is not None:
            n = update_norm(u.factors)
            if not (math.isfinite(n) and abs(n - claims[c]) <= 1e-4 * max(claims[c], 1e-12)):
                late.append(c)
                w = 0.0
        acc = aggregator.accumulate(acc, u, w, dense=dense)
        total += w
        agg_s += time.perf_counter() - t0
        held = max(held, _tree_bytes(acc) + _tree_bytes(u.factors))  # the running sum + this update
        del u
    t0 = time.perf_counter()
    agg = aggregator.finish(acc, total / aggregator.round_scale(
        [update_meta(c, shard_sizes, plans) for c in contributors]))
    result = agg.state if aggregator.keeps_global_adapter else agg.merge
    agg_s += time.perf_counter() - t0
    return result, {"wait_s": wait_s, "agg_s": agg_s, "agg_held_bytes": held, "rejected_late": late}


def update_meta(c: int, shard_sizes, plans: list[ClientPlan], factors=None) -> ClientUpdate:
    """Server c's update as the plans describe it (|D_i|, b_i, K_i: what weights are formed from), with
    `factors` when they have arrived."""
    return ClientUpdate(c, shard_sizes[c], plans[c].batch_size, factors or {}, plans[c].local_steps or 1)


def _tree_bytes(tree) -> int:
    """Bytes of the tensors in a dict of tensors or (B, A) pairs."""
    return sum(nbytes(t) for v in tree.values() for t in ((v,) if torch.is_tensor(v) else v))


def dense_exchange(comm, sites, plans: list[ClientPlan], contributors, weights, updates, owner):
    """Each rank forms sum_i w_i B_i A_i for its own clients; a SUM reduce to rank 0, then a broadcast."""
    keys = {k for c in contributors for k, r in plans[c].ranks.items() if r > 0}
    layout = dense_layout(sites, keys)
    numel_of = {s.key: s.numel for s in sites}
    client_bytes = {c: 4 * sum(numel_of[k] for k, r in plans[c].ranks.items() if r > 0 and k in numel_of)
                    for c in contributors}
    w = dict(zip(contributors, weights))
    mine = [c for c in contributors if owner(c) == comm.rank]
    t0 = time.perf_counter()
    buf = pack_dense(dense_sum([updates[c] for c in mine], [w[c] for c in mine]), layout, device=comm.device)
    agg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    comm.reduce_sum(buf, dst=0)
    wait_s = time.perf_counter() - t0 if comm.rank == 0 else 0.0
    comm.broadcast(buf, src=0)
    deltas = unpack_dense(buf, layout)
    traffic = {"client_bytes_up": client_bytes, "bytes_down_payload": nbytes(buf), "wait_s": wait_s,
               "agg_s": agg_s}
    return deltas, traffic


def flat_items(d: dict, prefix: tuple = ()):
    """(path, tensor) for every tensor in a nested dict, in the dict's order."""
    for k, v in d.items():
        if torch.is_tensor(v):
            yield prefix + (k,), v
        else:
            yield from flat_items(v, prefix + (k,))


def tensor_layout(d: dict) -> list[tuple[tuple, torch.Size]]:
    return [(path, t.shape) for path, t in flat_items(d)]


def fedavg_exchange(comm, groups: list[list[int]], layouts, updates, owner, aggregator, plans, shard_sizes):
    """FedAvg of whole tensors (ft: every parameter; fedadapter: every adapter), one average per group.

    The method's weighted sum is linear, so each rank forms it over its own servers of each group, the
    partial sums travel in one buffer (the groups side by side) through a SUM reduce to rank 0, and the
    result is broadcast. Returns one nested dict per group (None for a group nobody finished in)."""
    weight_of: dict[int, float] = {}
    for members in groups:
        if members:
            ws = aggregator.weights([update_meta(c, shard_sizes, plans) for c in members])
            weight_of.update(zip(members, ws))
    t0 = time.perf_counter()
    chunks = []
    for members, layout in zip(groups, layouts):
        mine = [c for c in members if owner(c) == comm.rank]
        partial = {}
        if mine:
            agg = aggregator.aggregate([updates[c] for c in mine], [weight_of[c] for c in mine])
            partial = dict(flat_items(agg.merge or agg.state))
        for path, shape in layout:
            t = partial.get(path)
            chunks.append(t.reshape(-1).float().to(comm.device) if t is not None
                          else torch.zeros(shape.numel(), device=comm.device))
    buf = torch.cat(chunks)
    agg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    comm.reduce_sum(buf, dst=0)
    wait_s = time.perf_counter() - t0 if comm.rank == 0 else 0.0
    comm.broadcast(buf, src=0)
    buf = buf.cpu()
    results, offset = [], 0
    for members, layout in zip(groups, layouts):
        out: dict = {}
        for path, shape in layout:
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = buf[offset:offset + shape.numel()].reshape(shape).clone()
            offset += shape.numel()
        results.append(out if members else None)
    numel_of = [sum(shape.numel() for _, shape in layout) for layout in layouts]
    client_bytes = {c: 4 * numel_of[g] for g, members in enumerate(groups) for c in members}
    traffic = {"client_bytes_up": client_bytes, "bytes_down_payload": nbytes(buf), "wait_s": wait_s,
               "agg_s": agg_s}
    return results, traffic


