"""Splitting a training set over edge servers: iid, or Dirichlet non-iid over a label per example."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..errors import UserInputError

REDRAWS = 100  # Dirichlet draws tried before a split that leaves a server empty is refused


def partition(keys: list[str], n_clients: int, *, scheme: str, alpha: float, seed: int,
              speeds: list[float] | None = None) -> list[np.ndarray]:
    """Index arrays, one per client, covering every example exactly once.

    iid: a seeded shuffle cut into near-equal parts. dirichlet: for each label, proportions drawn from
    Dir(alpha * 1_n) decide how that label's examples are dealt to clients (Hsu et al. 2019); a draw that
    leaves a client empty is drawn again, as NIID-Bench's partitioner does (Li et al. 2022, its `min_size`
    loop), so small alphas give a split instead of an error. `speeds` (one per client, dirichlet only): the
    shards are dealt so that the slower a client, the rarer its keys (rare_to_slow below).
    """
    n = len(keys)
    if n < n_clients:
        raise UserInputError(f"data: {n} training examples cannot be split over clients.n={n_clients} "
                             "servers; use more data or fewer clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_clients)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r}")
    for _ in range(REDRAWS):
        shards = _dirichlet(keys, n_clients, alpha, rng)
        if all(len(s) for s in shards):
            return shards if speeds is None else rare_to_slow(shards, keys, speeds)
    raise UserInputError(f"data.partition=dirichlet left a server with no data in {REDRAWS} draws "
                         f"(alpha {alpha}, {len(set(keys))} distinct keys, {n_clients} servers); raise "
                         "data.dirichlet_alpha (e.g. 1.0) or use fewer clients")


def _dirichlet(keys: list[str], n_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    labels = np.asarray(keys)
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    for label in sorted(set(keys)):
        idx = rng.permutation(np.flatnonzero(labels == label))
        props = rng.dirichlet(alpha * np.ones(n_clients))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            shards[c].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def rarity(shard: np.ndarray, keys: list[str], freq: Counter) -> float:
    """How common a shard's keys are: the mean, over its examples, of the share of the whole training set
    that holds the example's key (lower = rarer)."""
    return float(np.mean([freq[keys[i]] for i in shard])) / len(keys)


def rare_to_slow(shards: list[np.ndarray], keys: list[str], speeds: list[float]) -> list[np.ndarray]:
    """The same shards dealt again: the slowest client gets the shard of the rarest keys, the fastest the
    most common (ties in speed or rarity keep the clients' order). A non-iid split whose skew is aligned
    with speed, the hard case for a federation that weights updates by samples processed (issue 27)."""
    freq = Counter(keys)
    by_rarity = sorted(range(len(shards)), key=lambda s: rarity(shards[s], keys, freq))  # rarest first
    by_slowness = sorted(range(len(speeds)), key=lambda c: speeds[c])  # slowest first
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(shards)
    for c, s in zip(by_slowness, by_rarity):
        out[c] = shards[s]
    return out
