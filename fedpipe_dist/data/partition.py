"""Splitting a training set over edge servers: iid, or Dirichlet non-iid over a label per example."""

from __future__ import annotations

import numpy as np

from ..config import UserInputError


def partition(keys: list[str], n_clients: int, *, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Index arrays, one per client, covering every example exactly once.

    iid: a seeded shuffle cut into near-equal parts. dirichlet: for each label, proportions drawn from
    Dir(alpha * 1_n) decide how that label's examples are dealt to clients (Hsu et al. 2019).
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
    labels = np.asarray(keys)
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    for label in sorted(set(keys)):
        idx = rng.permutation(np.flatnonzero(labels == label))
        props = rng.dirichlet(alpha * np.ones(n_clients))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            shards[c].extend(part.tolist())
    empty = [c for c, s in enumerate(shards) if not s]
    if empty:
        raise UserInputError(f"data.partition=dirichlet left clients {empty} with no data; raise "
                             "data.dirichlet_alpha (e.g. 1.0) or use fewer clients")
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
