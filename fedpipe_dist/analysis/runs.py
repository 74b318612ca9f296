"""Finding runs under a folder and saying what each one is, from its results.h5 alone.

    runs = load_runs("runs")            # every results.h5 below the folder
    runs[0].method, runs[0].setting     # "fedpipe", "hetero" | "ideal"

A run's role in the paper's figures comes from its recorded job (root attr config_json):
- setting: "ideal" when every server has the same compute (HDF5 profile slowdown 1) and memory, else "hetero";
- ablation family: importance (fedpipe with plan.importance fixed/random vs platon), ranks (fedpipe with
  plan.mode uniform vs fedpipe), precision (one clients.precision for every server).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.hdf5 import Results


@dataclass
class Run:
    path: Path  # the results.h5
    name: str  # folder relative to the searched root
    results: Results
    config: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.results.attrs.get("method", "?"))

    @property
    def setting(self) -> str:
        prof = self.results.profile
        slow, mem = prof.get("slowdown", np.ones(1)), prof.get("mem_budget_bytes", np.zeros(1))
        return "ideal" if np.all(slow == 1.0) and len(set(np.asarray(mem).tolist())) == 1 else "hetero"

    @property
    def importance(self) -> str:
        return self.config.get("plan", {}).get("importance", "platon")

    @property
    def plan_mode(self) -> str:
        return self.config.get("plan", {}).get("mode", "fedpipe")

    @property
    def precision(self) -> str | None:
        """The one base precision every server used (from HDF5 quant_bits and the job), or None if mixed."""
        p = self.config.get("clients", {}).get("precision", "auto")
        if isinstance(p, list):
            return p[0] if len(set(p)) == 1 else None
        if p != "auto":
            return p
        bits = set(self.results.clients["quant_bits"][1:].ravel().tolist()) if self.n_rounds else set()
        return {32: "fp32", 16: "fp16", 8: "nf8", 4: "nf4"}.get(bits.pop()) if len(bits) == 1 else None

    @property
    def label(self) -> str:
        """The method, with FedPipe's paper variant told apart: "fedpipe-paper" (runs from before
        plan.variant existed ran the paper's algorithm too)."""
        if self.method == "fedpipe" and self.config.get("plan", {}).get("variant", "paper") == "paper":
            return "fedpipe-paper"
        return self.method

    @property
    def precision_setting(self):
        return self.config.get("clients", {}).get("precision", "auto")

    @property
    def setup(self) -> str:
        """The recorded job without what differs between repeats of one setup (seed, length, output, resume)."""
        cfg = {k: v for k, v in self.config.items() if k not in ("seed", "rounds", "output", "resume")}
        return json.dumps(cfg, sort_keys=True)

    @property
    def model(self) -> str:
        return str(self.results.attrs.get("model", "?"))

    @property
    def dataset(self) -> str:
        return str(self.results.attrs.get("dataset", "?"))

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def cohort(self) -> str:
        """What may share a table or a figure: the same model, dataset and number of rounds."""
        model = Path(self.model).name if "/" in self.model and Path(self.model).name else self.model  # a local folder
        return f"{model} on {self.dataset}, {self.n_rounds} rounds"

    @property
    def repeat_key(self) -> str:
        """Runs with equal keys are repeats of one setup (they differ in the seed only)."""
        return f"{self.cohort}|{self.setup}"

    @property
    def slowdowns(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.results.profile.get("slowdown", []))

    @property
    def n_rounds(self) -> int:
        return self.results.n_rounds

    @property
    def provenance(self) -> list[dict]:
        """One dict per attempt (runtime/provenance.py); empty for a file written before provenance was kept."""
        out = []
        for text in self.results.attrs.get("provenance_json", []):
            try:
                entry = json.loads(str(text))
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    # ---- numbers the figures and tables use ------------------------------------------------------------
    def final_loss(self) -> float:
        return self.results.last_eval_loss()

    def final_ppl(self) -> float:
        loss = self.final_loss()
        return math.exp(min(loss, 50.0)) if np.isfinite(loss) else math.nan

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(round, cumulative wall-clock s, eval loss) at the evaluated rows, row 0 included."""
        r = self.results.rounds
        ok = np.isfinite(r["eval_loss"])
        return r["round"][ok], np.cumsum(r["wall_s"])[ok], r["eval_loss"][ok]

    def train_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(round, cumulative training time s, eval loss) at the evaluated rows: round_train_s summed, so
        evaluation is left out (time to quality counts training rounds only)."""
        r = self.results.rounds
        ok = np.isfinite(r["eval_loss"])
        return r["round"][ok], np.cumsum(round_train_s(self.results))[ok], r["eval_loss"][ok]

    def trainable_params(self) -> float:
        """Mean trainable parameters per server that completed a round (NaN if none did)."""
        c = self.results.clients
        done = c["completed"][1:].astype(bool)
        vals = c["trainable_params"][1:][done]
        return float(vals.mean()) if vals.size else math.nan

    def bytes_per_round(self) -> tuple[float, float]:
        r = self.results.rounds
        return float(r["bytes_up"][1:].mean()), float(r["bytes_down"][1:].mean())

    def wall_s(self) -> float:
        return float(self.results.rounds["wall_s"][1:].sum())

    def under_training(self) -> float:
        c = self.results.clients
        sel, done = c["selected"][1:].astype(bool), c["completed"][1:].astype(bool)
        return float(1 - done.sum() / max(1, sel.sum()))

    def base_mib(self) -> float:
        b = self.results.profile.get("base_weight_bytes")
        return float(np.mean(b)) / 2**20 if b is not None and len(b) else math.nan


@dataclass
class Seeds:
    """Repeats of one setup (runs that differ in their seed only): what a figure's point or a table's row is."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def stat(self, value) -> tuple[float, float, float]:
        """(mean, min, max) of value(run) over the repeats that have a finite value (NaN when none has)."""
        vals = np.array([value(r) for r in self.runs], dtype=float)
        vals = vals[np.isfinite(vals)]
        if not vals.size:
            return math.nan, math.nan, math.nan
        return float(vals.mean()), float(vals.min()), float(vals.max())

    def cell(self, value, fmt: str = "{:.4f}") -> str:
        """A table cell: the mean, and its range over the repeats when there are several."""
        mean, lo, hi = self.stat(value)
        if not np.isfinite(mean):
            return "-"
        if self.n == 1 or lo == hi:
            return fmt.format(mean)
        return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def group_repeats(runs: list[Run]) -> list[Seeds]:
    """The runs grouped by setup (Run.repeat_key), in the order their first run appears."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.repeat_key, []).append(r)
    return [Seeds(rs) for rs in groups.values()]


def by_cohort(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs of one model, dataset and length together (Run.cohort), the cohort with most runs first."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.cohort, []).append(r)
    return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def compute_bound(slowdown) -> float:
    """sum_i (1/s_i) / (N / max_i s_i): the most samples per second a synchronous method that leaves no server
    idle can process, relative to one whose servers all do the same work and wait for the slowest."""
    s = [float(x) for x in slowdown]
    return sum(1.0 / x for x in s) / (len(s) / max(s))


def round_train_s(results: Results) -> np.ndarray:
    """Per round row: how long the synchronous round took without its evaluation.

    Several ranks: rank 0's wall-clock less its evaluation (it waited for the slowest server). One process
    hosting every server (trained one after another, as with clients.throttle=clock on a small machine):
    the round as if every server had its own machine, i.e. the slowest server's local time plus the
    process's time outside local training and evaluation (planning, aggregation, merge)."""
    r, c = results.rounds, results.clients
    eval_s = r["eval_s"] if "eval_s" in r else np.zeros_like(r["wall_s"])
    out = r["wall_s"] - eval_s
    if int(results.attrs.get("world_size", 1)) == 1 and len(out) > 1:
        local = np.where(np.isfinite(c["local_s"]), c["local_s"], 0.0)
        overhead = np.maximum(out - local.sum(axis=1), 0.0)
        out = local.max(axis=1) + overhead
    out = np.asarray(out, dtype=float).copy()
    out[0] = 0.0  # row 0 is the untrained base: no training round
    return out


def load_runs(root: str | Path, skipped: list[tuple[Path, str]] | None = None) -> list[Run]:
    """Every finished or partial run (a results.h5) below `root` (a folder, or one results.h5 file) that can
    be read, sorted by folder name. One that cannot (damaged bytes, a missing dataset, an unreadable
    config_json, no finite eval loss, a file still being created) is left out, said on stdout, and appended
    to `skipped` as (path, reason)."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.rglob("results.h5"))
    root = root.parent.parent if root.is_file() else root  # one file: the run is named by its folder
    runs = []
    for path in paths:
        why = None
        try:
            res = Results(path)
            cfg = json.loads(res.attrs.get("config_json", "{}") or "{}")
            if not isinstance(cfg, dict):
                raise ValueError("config_json is not a mapping")
            run = Run(path, str(path.parent.relative_to(root)) or ".", res, cfg)
            why = _unusable(run)
        # a damaged HDF5 file raises what h5py and numpy happen to raise (OSError, KeyError, ValueError, ...):
        # every one of them means this run cannot be reported, and the others still can
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        if why is not None:
            print(f"analysis: skipping {path} ({why})")
            if skipped is not None:
                skipped.append((path, why))
            continue
        runs.append(run)
    return runs


def _unusable(run: Run) -> str | None:
    """Why a readable file still cannot be reported (None: it can): every number the report reads, read once."""
    r = run.results
    missing = [f"rounds/{k}" for k in ("round", "eval_loss", "wall_s", "bytes_up", "bytes_down") if k not in r.rounds]
    missing += [f"clients/{k}" for k in ("completed", "selected", "trainable_params") if k not in r.clients]
    if missing:
        return f"missing dataset(s) {', '.join(missing)}"
    if not np.isfinite(r.rounds["eval_loss"]).any():
        return "no finite eval loss in any round"
    _ = (run.label, run.setting, run.curve(), run.train_curve(), run.bytes_per_round(), run.under_training(),
         run.trainable_params())  # raises what a damaged dataset raises
    return None


LOAD_SPREAD = 1.0  # load averages at start further apart than this make wall-clock numbers not comparable


def conditions_note(runs: list[Run]) -> str | None:
    """A sentence when `runs` were made under different conditions (host, device, world size, or load average
    at start more than LOAD_SPREAD apart, over every attempt), so their wall-clock numbers do not compare;
    None when they agree or say nothing (files written before provenance was kept)."""
    attempts = [p for r in runs for p in r.provenance]
    if len(attempts) < 2:
        return None
    what = []
    hosts = {tuple(p.get("hosts", ())) for p in attempts}
    devices = {tuple(sorted(set(p.get("devices", ())))) for p in attempts}
    sizes = {p.get("world_size") for p in attempts}
    loads = [p["load_avg_1m"] for p in attempts if isinstance(p.get("load_avg_1m"), (int, float))]
    if len(hosts) > 1:
        what.append(f"{len(hosts)} different host sets")
    if len(devices) > 1:
        what.append("devices " + " / ".join(", ".join(d) for d in sorted(devices)))
    if len(sizes) > 1:
        what.append("world sizes " + ", ".join(str(x) for x in sorted(sizes, key=str)))
    if loads and max(loads) - min(loads) > LOAD_SPREAD:
        what.append(f"load average at start {min(loads):.1f} to {max(loads):.1f}")
    if not what:
        return None
    return ("wall-clock numbers below come from runs made under different conditions (" + "; ".join(what)
            + "): compare them with care (each run's conditions: the provenance table)")


def provenance_rows(runs: list[Run]) -> str:
    """A Markdown table: per run, its first attempt's start, hosts, device, load at start, version and commit."""
    lines = ["| run | started (UTC) | attempts | hosts | devices | load at start | fedpipe_dist | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r.provenance
        if not p:
            lines.append(f"| {r.name} | - | - | - | - | - | - | (not recorded) |")
            continue
        first = p[0]
        load = first.get("load_avg_1m")
        lines.append(f"| {r.name} | {first.get('started_at', '-')} | {len(p)} | {', '.join(first.get('hosts', []))} | "
                     f"{', '.join(sorted(set(first.get('devices', []))))} | "
                     f"{'-' if load is None else f'{load:.1f}'} | {first.get('fedpipe_dist', '-')} | "
                     f"{(first.get('commit') or '-')[:12]} |")
    return "\n".join(lines)
