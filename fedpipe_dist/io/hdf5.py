"""results.h5: a writer used by rank 0 only, and a small reader for analysis.

Crash safety: the file is opened, appended to and closed once per round, so between rounds it is a
complete, consistent HDF5 file; a `kill -9` during a round leaves every earlier round readable.
HDF5's file locking is off on both sides: with it on, a notebook holding the file open for reading would
make the running job's next append fail. Only rank 0 of one run ever writes (the run refuses an output.dir
that already holds results.h5), so the lock guards nothing here.
A SIGTERM (torchrun stopping the other workers after one died, Slurm's scancel or time limit) that arrives
while the file is open is held back until it is closed again, so a stop never cuts an append in half;
a SIGKILL can, and a resume then puts back the snapshot taken with the last checkpoint (io/checkpoint.py).
"""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .schema import CLIENT_FIELDS, CLIENT_LAYER_FIELDS, PROFILE_FIELDS, ROUND_FIELDS, SCHEMA_VERSION


@contextmanager
def _sigterm_held():
    """Hold a SIGTERM back until the block is done, then die of it as if it had come then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if got:
            os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def _open(path: Path, mode: str):
    """h5py.File with SIGTERM held back while it is open."""
    with _sigterm_held(), h5py.File(path, mode, locking=False) as f:
        yield f


def _fill(dtype: str):
    return np.nan if dtype.startswith("f") else 0


class ResultsWriter:
    def __init__(self, path: str | Path, *, n_clients: int, n_layers: int, attrs: dict[str, Any]):
        self.path = Path(path)
        self.n_clients = n_clients
        self.n_layers = n_layers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".h5.tmp")
        with _open(tmp, "w") as f:
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

    @classmethod
    def reopen(cls, path: str | Path, *, n_clients: int, n_layers: int, resumed_from: int) -> ResultsWriter:
        """Append to an existing results.h5 (a resumed run): the end-of-run marks are cleared, since the run is
        going on, and `resumed_from` joins the file's list of rounds it was resumed from."""
        self = cls.__new__(cls)
        self.path, self.n_clients, self.n_layers = Path(path), n_clients, n_layers
        with _open(self.path, "a") as f:
            version = int(f.attrs.get("schema_version", -1))
            if version != SCHEMA_VERSION:
                from ..errors import UserInputError

                raise UserInputError(f"resume: {str(path)!r} has schema version {version}, this code writes "
                                     f"{SCHEMA_VERSION}; finish it with the version that started it, or start over")
            f.attrs["finished"] = False
            rows = f["rounds"]["round"].shape[0]
            for name, dt in CLIENT_FIELDS.items():  # a column added within this schema version after the file
                if name not in f["clients"]:
                    f["clients"].create_dataset(name, shape=(rows, n_clients), maxshape=(None, n_clients), dtype=dt,
                                                chunks=(16, n_clients), fillvalue=_fill(dt))
            for k in list(f["eval"].attrs):
                del f["eval"].attrs[k]
            if "generation" in f["eval"]:
                del f["eval"]["generation"]
            f.attrs["resumed_from"] = np.append(f.attrs.get("resumed_from", np.zeros(0, np.int64)), resumed_from)
        return self

    def write_profile(self, values: dict[str, list]) -> None:
        with _open(self.path, "a") as f:
            for name, dt in PROFILE_FIELDS.items():
                if name in f["profile"]:
                    del f["profile"][name]
                f["profile"].create_dataset(name, data=np.asarray(values[name], dtype=dt))

    def attach(self, sink) -> None:
        """A live view (io/sinks.py): given the rows the file holds now, then every row appended."""
        self.sinks = [*getattr(self, "sinks", []), sink]
        with _open(self.path, "r") as f:
            sink.start({k: f["rounds"][k][()] for k in f["rounds"]})

    def append_round(self, row: dict[str, Any], clients: dict[str, np.ndarray]) -> None:
        """Append one round: `row` has ROUND_FIELDS scalars, `clients` has [n_clients] (or [n, L, 4]) arrays."""
        missing = set(ROUND_FIELDS) - set(row)
        if missing:
            raise KeyError(f"round row lacks {sorted(missing)}")
        with _open(self.path, "a") as f:
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
        for sink in getattr(self, "sinks", []):
            sink.add(row)

    def add_setup(self, seconds: float, phases: dict[str, float], provenance: dict | None = None) -> None:
        """This attempt's set-up time (one entry per attempt: a resumed run appends), rank 0's phases, and the
        attempt's provenance (runtime/provenance.py)."""
        import json

        if provenance is not None:
            self.add_provenance(provenance)
        with _open(self.path, "a") as f:
            f.attrs["setup_s"] = np.append(f.attrs.get("setup_s", np.zeros(0)), seconds)
            kept = [str(x) for x in f.attrs.get("setup_phases_json", [])]
            f.attrs["setup_phases_json"] = np.array([*kept, json.dumps(phases)], dtype=h5py.string_dtype())

    def add_provenance(self, prov: dict) -> None:
        """This attempt's provenance (runtime/provenance.py), appended to the root attribute provenance_json."""
        import json

        with _open(self.path, "a") as f:
            kept = [str(x) for x in f.attrs.get("provenance_json", [])]
            f.attrs["provenance_json"] = np.array([*kept, json.dumps(prov)], dtype=h5py.string_dtype())

    def warn(self, message: str) -> None:
        """Keep a warning the log showed (a round no server could run, ...) in the root attribute `warnings`."""
        with _open(self.path, "a") as f:
            kept = [str(w) for w in f.attrs.get("warnings", [])]
            f.attrs["warnings"] = np.array([*kept, message], dtype=h5py.string_dtype())

    def finish(self, eval_metrics: dict[str, float], timing: dict[str, float] | None = None,
               attrs: dict[str, Any] | None = None) -> None:
        """Mark the run finished: the final eval metrics, the finishing attempt's timing and other root `attrs`."""
        with _open(self.path, "a") as f:
            for k, v in eval_metrics.items():
                f["eval"].attrs[k] = v
            for k, v in {**(timing or {}), **(attrs or {})}.items():  # timing: checkpoint_s, finish_s
                f.attrs[k] = v
            f.attrs["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["finished"] = True


def write_generation(path: str | Path, scores: dict[str, float], attrs: dict[str, Any]) -> None:
    """E2E scores of a generation pass into eval/generation/ (attrs: the five metrics, source, n_mrs,
    decoding settings); a later pass (e.g. `fedpipe eval` on the test set) replaces it."""
    with _open(Path(path), "a") as f:
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
