"""results.h5: a writer used by rank 0 only, and a small reader for analysis.

Crash safety: the file is opened, appended to and closed once per round, so between rounds it is a
complete, consistent HDF5 file; a `kill -9` during a round leaves every earlier round readable.
HDF5's file locking is off on both sides: with it on, a notebook holding the file open for reading would
make the running job's next append fail. Only rank 0 of one run ever writes (the run refuses an output.dir
that already holds results.h5), so the lock guards nothing here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .schema import CLIENT_FIELDS, CLIENT_LAYER_FIELDS, PROFILE_FIELDS, ROUND_FIELDS, SCHEMA_VERSION


def _fill(dtype: str):
    return np.nan if dtype.startswith("f") else 0


class ResultsWriter:
    def __init__(self, path: str | Path, *, n_clients: int, n_layers: int, attrs: dict[str, Any]):
        self.path = Path(path)
        self.n_clients = n_clients
        self.n_layers = n_layers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["finished"] = False
            for k, v in attrs.items():
                f.attrs[k] = v
            g = f.create_group("rounds")
            for name, dt in ROUND_FIELDS.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))
            g = f.create_group("clients")
            for name, dt in CLIENT_FIELDS.items():
                g.create_dataset(name, shape=(0, n_clients), maxshape=(None, n_clients), dtype=dt,
                                 chunks=(16, n_clients), fillvalue=_fill(dt))
            for name, dt in CLIENT_LAYER_FIELDS.items():
                shape = (n_clients, n_layers, 4)
                g.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt,
                                 chunks=(1, *shape), fillvalue=_fill(dt))
            f.create_group("profile")
            f.create_group("eval")
        tmp.replace(self.path)  # the file appears complete or not at all

    def write_profile(self, values: dict[str, list]) -> None:
        with h5py.File(self.path, "a", locking=False) as f:
            for name, dt in PROFILE_FIELDS.items():
                if name in f["profile"]:
                    del f["profile"][name]
                f["profile"].create_dataset(name, data=np.asarray(values[name], dtype=dt))

    def append_round(self, row: dict[str, Any], clients: dict[str, np.ndarray]) -> None:
        """Append one round: `row` has ROUND_FIELDS scalars, `clients` has [n_clients] (or [n, L, 4]) arrays."""
        missing = set(ROUND_FIELDS) - set(row)
        if missing:
            raise KeyError(f"round row lacks {sorted(missing)}")
        with h5py.File(self.path, "a", locking=False) as f:
            g = f["rounds"]
            i = g["round"].shape[0]
            for name in ROUND_FIELDS:
                g[name].resize((i + 1,))
                g[name][i] = row[name]
            c = f["clients"]
            for name in list(CLIENT_FIELDS) + list(CLIENT_LAYER_FIELDS):
                ds = c[name]
                ds.resize((i + 1, *ds.shape[1:]))
                if name in clients:
                    ds[i] = clients[name]
            f.flush()

    def finish(self, eval_metrics: dict[str, float]) -> None:
        with h5py.File(self.path, "a", locking=False) as f:
            for k, v in eval_metrics.items():
                f["eval"].attrs[k] = v
            f.attrs["finished"] = True


def write_generation(path: str | Path, scores: dict[str, float], attrs: dict[str, Any]) -> None:
    """E2E scores of a generation pass into eval/generation/ (attrs: the five metrics, source, n_mrs,
    decoding settings); a later pass (e.g. `fedpipe eval` on the test set) replaces it."""
    with h5py.File(path, "a", locking=False) as f:
        ev = f.require_group("eval")
        if "generation" in ev:
            del ev["generation"]
        g = ev.create_group("generation")
        for k, v in {**scores, **attrs}.items():
            g.attrs[k] = v


class Results:
    """Read-only view of results.h5: `Results(path).rounds["eval_loss"]`, `.clients["ranks"]`, `.attrs`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with h5py.File(self.path, "r", locking=False) as f:
            self.attrs = {k: _py(v) for k, v in f.attrs.items()}
            self.rounds = {k: f["rounds"][k][()] for k in f["rounds"]}
            self.clients = {k: f["clients"][k][()] for k in f["clients"]}
            self.profile = {k: f["profile"][k][()] for k in f["profile"]}
            self.eval = {k: _py(v) for k, v in f["eval"].attrs.items()}
            gen = f["eval"].get("generation")
            self.generation = {k: _py(v) for k, v in gen.attrs.items()} if gen is not None else {}

    @property
    def n_rounds(self) -> int:
        """Completed training rounds (row 0, the untrained base, is not counted)."""
        r = self.rounds["round"]
        return int((r > 0).sum())

    def last_eval_loss(self) -> float:
        losses = self.rounds["eval_loss"]
        done = [x for x in losses if not math.isnan(x)]
        return float(done[-1]) if done else math.nan


def _py(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v
