"""The paper's figures and tables, rebuilt from results.h5 files alone (shared by analysis/*.ipynb and
`fedpipe report`).

    from fedpipe_dist.analysis import load_runs, figures
    runs = load_runs("runs")
    fig, missing = figures.fig15_convergence(runs)

Every function takes the runs it is given, uses those that fit, and returns (figure or table, a list of
plain sentences naming what is missing); nothing fails because a run is absent. Figures (paper numbering):
13 converged quality per method, heterogeneous vs ideal; 14 trainable parameters per method; 15
convergence per round and per wall-clock second; 16 ablations (weight selection, adaptive vs fixed ranks,
base precision). Tables II-V: methods; weight selection; ranks; precision (Markdown text).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .runs import Run, Seeds, by_cohort, conditions_note, group_repeats, provenance_rows

METHOD_ORDER = ("fedpipe", "ft", "lora", "fedadapter", "flora", "flexlora", "hetlora")
EXTRA_ORDER = ("fedpipe-paper", "lora_hb", "central")  # drawn after the paper's methods when present
PAPER_METHODS = ("fedpipe", "ft", "lora", "fedadapter")  # the paper's Fig. 13 compares these
E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
PRECISION_ORDER = ("fp32", "fp16", "bf16", "nf8", "nf4")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless unless a notebook already chose a backend
    import matplotlib.pyplot as plt

    return plt


class _Drawn:
    """What one figure or table used: its runs (named in its caption and the report's <name>.runs.txt), and
    notes on runs it did not use (other setups, other cohorts), which are not missing runs."""

    def __init__(self, runs: list[Run]):
        runs, self.notes = _finished(runs)
        cohorts = by_cohort(runs)
        self.cohort = next(iter(cohorts), None)
        self.runs = cohorts[self.cohort] if self.cohort else []
        self.notes += [f"{len(rs)} run(s) of {c} not drawn here (another model, dataset or length; fedpipe "
                       "report draws each cohort on its own)" for c, rs in list(cohorts.items())[1:]]
        self.used: list[Run] = []

    def pick(self, runs: list[Run], what: str) -> Seeds | None:
        """The setup among `runs` with the most repeats (seeds); any other setup is named in the notes."""
        groups = sorted(group_repeats(runs), key=lambda g: -g.n)
        if not groups:
            return None
        if len(groups) > 1:
            others = [n for g in groups[1:] for n in g.names]
            self.notes.append(f"{what}: {len(groups) - 1} other setup(s) not drawn ({len(others)} run(s), e.g. "
                              f"{others[0]})")
        self.used += groups[0].runs
        return groups[0]

    def caption(self) -> list[str]:
        """The lines a figure prints about the runs it drew (their folders go to the report's <name>.runs.txt)."""
        seeds = sorted(set(self._seed_counts()))
        head = (f"runs: {self.cohort}; seeds per point: {', '.join(map(str, seeds)) or '-'} (points: mean over "
                "seeds; whiskers and bands, where drawn: the min-max over seeds)" if self.cohort else "runs: none")
        return [head, *self.notes]

    def _seed_counts(self):
        counts: dict[str, int] = defaultdict(int)
        for r in {r.name: r for r in self.used}.values():  # a run drawn in two panels counts once
            counts[r.repeat_key] += 1
        return counts.values()


def _finished(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """The runs that finished (results.h5 marked finished), and a note naming the ones still going or cut short."""
    done = [r for r in runs if r.n_rounds > 0 and r.results.attrs.get("finished")]
    left = [r for r in runs if r not in done]
    return done, ([f"{len(left)} unfinished run(s) left out: " + ", ".join(
        f"{r.name} ({r.n_rounds} rounds)" for r in left)] if left else [])


def _plain(r: Run) -> bool:
    """Not an ablation of FedPipe's planner (importance, fixed ranks) or of its base precision."""
    return r.method != "fedpipe" or (r.plan_mode == "fedpipe" and r.importance == "platon"
                                     and r.precision_setting == "auto")


def _by_method(d: _Drawn, setting: str | None = "hetero") -> dict[str, Seeds]:
    """Per method (FedPipe's paper variant apart: fedpipe-paper), the repeats of its plain setup."""
    out: dict[str, Seeds] = {}
    labels = {r.label for r in d.runs}
    for label in sorted(labels, key=lambda m: (METHOD_ORDER + EXTRA_ORDER).index(m)
                        if m in METHOD_ORDER + EXTRA_ORDER else 99):
        rs = [r for r in d.runs if r.label == label and _plain(r) and (setting is None or r.setting == setting)]
        g = d.pick(rs, f"{label} ({setting or 'any'})")
        if g is not None:
            out[label] = g
    return out


def _missing_methods(have, setting: str, wanted=METHOD_ORDER) -> list[str]:
    gone = [m for m in wanted if m not in have and not (m == "fedpipe" and "fedpipe-paper" in have)]
    what = f"{setting} run" if setting else "run"
    return [f"no {what} for: {', '.join(gone)}"] if gone else []


def _note(fig, lines: list[str], drawn: _Drawn | None = None) -> None:
    """Below the axes, in small grey text: the missing runs, then the runs drawn (cohort, seeds) and what was
    not drawn; the figure keeps room for them. The drawn runs' folders are kept on the figure (fedpipe_runs)."""
    import textwrap

    text = ([f"missing: {'; '.join(lines)}"] if lines else []) + (drawn.caption() if drawn is not None else [])
    width = max(40, int(fig.get_figwidth() * 15))
    wrapped = [w for line in text for w in textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False)]
    if wrapped:
        fig.text(0.005, 0.005, "\n".join(wrapped), fontsize=6.5, color="0.35", ha="left", va="bottom")
    bottom = min(0.45, (len(wrapped) * 0.115 + 0.05) / fig.get_figheight()) if wrapped else 0
    fig.tight_layout(rect=(0, bottom, 1, 1))
    if drawn is not None:
        fig.fedpipe_runs = sorted({r.name for r in drawn.used})
        fig.fedpipe_notes = list(drawn.notes)


def _errorbar(ax, x, groups: list[Seeds], value, **kw):
    """Means of value over each group's repeats at x, with min-max intervals."""
    stats = np.array([g.stat(value) for g in groups], dtype=float).reshape(-1, 3)
    mean, lo, hi = stats[:, 0], stats[:, 1], stats[:, 2]
    one = np.array([g.n <= 1 for g in groups], dtype=bool)
    # no interval where there is one repeat: NaN whiskers are not drawn (no zero-length caps)
    yerr = np.where(one, np.nan, np.vstack([mean - lo, hi - mean]))
    return ax.errorbar(x, mean, yerr=yerr, fmt="o", capsize=3, **kw), mean


# ---- figures ----------------------------------------------------------------------------------------------


def fig13_quality(runs: list[Run]):
    """Converged eval perplexity per method, heterogeneous vs ideal servers (and BLEU where scored); bars from
    zero at the mean over seeds, whiskers min-max."""
    plt = _plt()
    d = _Drawn(runs)
    het, ideal = _by_method(d, "hetero"), _by_method(d, "ideal")
    known = (*METHOD_ORDER, "fedpipe-paper")
    # every method drawn: the paper's order first, then any other (a plugin method) by name, never dropped
    methods = [m for m in known if m in het or m in ideal] + sorted((set(het) | set(ideal)) - set(known))
    missing = _missing_methods(het, "heterogeneous") + _missing_methods(ideal, "ideal", PAPER_METHODS)
    has_bleu = any("BLEU" in r.results.generation for g in [*het.values(), *ideal.values()] for r in g.runs)
    fig, axes = plt.subplots(1, 2 if has_bleu else 1, figsize=(12 if has_bleu else 8, 4.8), squeeze=False)
    x = np.arange(len(methods))
    panels = [("final eval perplexity (lower is better)", lambda r: r.final_ppl())]
    if has_bleu:
        panels.append(("BLEU (x100, higher is better)", lambda r: 100 * r.results.generation.get("BLEU", math.nan)))
    settings = [(name, group, color) for name, group, color in
                (("heterogeneous", het, "tab:red"), ("ideal", ideal, "tab:blue")) if group]
    width = 0.8 / max(1, len(settings))
    for ax, (ylabel, value) in zip(axes[0], panels):
        tops = [0.0]
        # a method drawn in one setting only has its bar centred on its tick, not beside an empty slot
        present = {m: [k for k, (_, g, _) in enumerate(settings) if m in g] for m in methods}
        for k, (name, group, color) in enumerate(settings):
            stats = np.array([group[m].stat(value) if m in group else (math.nan,) * 3 for m in methods]).reshape(-1, 3)
            slot = [present[m].index(k) - (len(present[m]) - 1) / 2 if k in present[m] else 0.0 for m in methods]
            xs = x + np.asarray(slot) * width
            ax.bar(xs, stats[:, 0], width, label=name, color=color, alpha=0.85)
            n = np.array([group[m].n if m in group else 0 for m in methods])
            spread = n > 1  # whiskers (min-max) only where there are several seeds: no zero-length caps
            if spread.any():
                ax.errorbar(xs[spread], stats[spread, 0], fmt="none", ecolor="black", capsize=3, elinewidth=1,
                            yerr=np.vstack([stats[spread, 0] - stats[spread, 1], stats[spread, 2] - stats[spread, 0]]))
            tops += [hi for hi in stats[:, 2] if np.isfinite(hi)]
            for xi, m, (mean, _, hi) in zip(xs, methods, stats):
                if np.isfinite(mean):  # the mean and its number of seeds, above the whisker; upright, so that
                    # the labels of neighbouring bars never run into each other
                    ax.annotate(f"{mean:.2f} (n={group[m].n})", (xi, hi), textcoords="offset points", xytext=(0, 3),
                                ha="center", va="bottom", rotation=90, fontsize=8)
        top = max(tops)
        ax.set_ylim(0, 1.35 * top if top > 0 else 1)  # from zero, room for the value labels
        ax.set_xticks(x, methods, rotation=20)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("method")
        ax.grid(axis="y", alpha=0.3)
    if settings:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, title="servers", fontsize=8, title_fontsize=8, loc="upper right",
                   ncol=len(settings))
    fig.suptitle("Fig. 13: converged quality per method", x=0.3)
    if len(settings) > 1:  # say which bars stand alone, so that a lone bar is not read as both settings
        alone = [f"{m} ({settings[present[m][0]][0]})" for m in methods if len(present[m]) == 1]
        if alone:
            d.notes.append(f"in one setting only (no run in the other): {', '.join(alone)}")
    _note(fig, missing, d)
    return fig, missing


def fig14_trainable(runs: list[Run]):
    """Trainable parameters per participating server and round, per method (log scale; dots with the
    min-max over seeds)."""
    plt = _plt()
    d = _Drawn(runs)
    have = _by_method(d, "hetero")
    missing = _missing_methods(have, "heterogeneous")
    fig, ax = plt.subplots(figsize=(7, 4.4))
    methods = list(have)
    _, mean = _errorbar(ax, np.arange(len(methods)), [have[m] for m in methods], Run.trainable_params,
                        color="tab:green")
    for xi, v in enumerate(mean):
        if np.isfinite(v):
            ax.annotate(f"{v:,.0f}", (xi, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
    ax.set_yscale("log")
    finite = [v for v in mean if np.isfinite(v) and v > 0]
    if finite:
        ax.set_ylim(min(finite) / 2, max(finite) * 3)  # room for the labels above the dots
    ax.set_ylabel("trainable parameters per server")
    ax.set_xlabel("method")
    ax.set_title("Fig. 14: trainable parameters, heterogeneous servers (log scale)")
    ax.grid(axis="y", alpha=0.3, which="both")
    _note(fig, missing, d)
    return fig, missing


def _mean_curve(g: Seeds, x_of) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grid, mean, min, max) of the eval loss over g's repeats, on a common grid of x_of(run) values up to the
    longest repeat (a repeat that has ended keeps its final loss)."""
    curves = [x_of(r) for r in g.runs]
    grid = np.linspace(0, max(x[-1] for x, _ in curves), 200)
    vals = np.stack([_loss_on_grid(x, loss, grid) for x, loss in curves])
    return grid, vals.mean(axis=0), vals.min(axis=0), vals.max(axis=0)


def _mean_by_round(g: Seeds) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rounds, mean, min, max) of the eval loss at the rounds every repeat evaluated."""
    curves = [r.curve() for r in g.runs]
    common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
    vals = np.stack([[loss[list(rounds).index(t)] for t in common] for rounds, _, loss in curves])
    return np.array(common), vals.mean(axis=0), vals.min(axis=0), vals.max(axis=0)


def fig15_convergence(runs: list[Run]):
    """Eval loss per round and per wall-clock second, one line per method (heterogeneous servers): the mean
    over seeds with a min-max band."""
    plt = _plt()
    d = _Drawn(runs)
    have = _by_method(d, "hetero")
    missing = _missing_methods(have, "heterogeneous")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    for m, g in have.items():
        rounds, mean, lo, hi = _mean_by_round(g)
        line, = a.plot(rounds, mean, marker="o", ms=3, label=f"{m} (n={g.n})")
        grid, wmean, wlo, whi = _mean_curve(g, lambda r: r.curve()[1:])
        b.plot(grid, wmean, color=line.get_color())  # a step: the loss of the last round evaluated by then
        if g.n > 1:
            a.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.15)
            b.fill_between(grid, wlo, whi, color=line.get_color(), alpha=0.15)
    a.set_xlabel("round")
    b.set_xlabel("wall-clock (s, rank 0, cumulative)")
    a.set_title("(a) per round", fontsize=10)
    b.set_title("(b) per wall-clock second", fontsize=10)
    a.set_ylabel("eval loss (nats per target token)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    if have:  # one legend for both panels (the same colour per method)
        a.legend(title="method", fontsize=8)
        b.legend(*a.get_legend_handles_labels(), title="method", fontsize=8)
    fig.suptitle("Fig. 15: convergence, heterogeneous servers")
    _note(fig, missing, d)
    return fig, missing


def _ablation_groups(d: _Drawn) -> dict[str, dict[str, Seeds]]:
    """FedPipe's ablations (variant name -> its repeats): weights (plan.importance), ranks (adaptive vs
    plan.mode=uniform), precision (one clients.precision for every server)."""
    pools: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    fedpipe = [r for r in d.runs if r.method == "fedpipe" and r.setting == "hetero"]
    # One FedPipe variant for every ablation: the paper's when any ablation of it was run (the paper's tables).
    label = "fedpipe-paper" if any(r.label == "fedpipe-paper" and not _plain(r) for r in fedpipe) else "fedpipe"
    if any(r.label != label for r in fedpipe):
        d.notes.append(f"ablations drawn for {label} only")
    for r in fedpipe:
        if r.label != label:
            continue
        if r.plan_mode == "fedpipe" and r.precision_setting == "auto":
            pools["weights"][r.importance].append(r)
        if r.importance == "platon" and r.precision_setting == "auto":
            rank = r.config.get("lora", {}).get("rank")
            pools["ranks"]["adaptive" if r.plan_mode == "fedpipe" else f"fixed r{rank}"].append(r)
        if r.precision is not None and r.plan_mode == "fedpipe" and r.importance == "platon" \
                and r.precision_setting != "auto":
            pools["precision"][r.precision].append(r)
    out: dict[str, dict[str, Seeds]] = {}
    for key, variants in pools.items():
        out[key] = {}
        for name, rs in variants.items():
            g = d.pick(rs, f"{key} {name}")
            if g is not None:
                out[key][name] = g
    return out


def _variant_order(name: str):
    """The reference first (platon, adaptive), then precisions by bits, then the rest by name."""
    first = ("platon", "adaptive")
    return (first.index(name) if name in first else 2, PRECISION_ORDER.index(name) if name in PRECISION_ORDER else 0,
            name)


def fig16_ablations(runs: list[Run]):
    """(a) importance-selected vs fixed/random weights, (b) adaptive vs fixed ranks, (c) base precision: the
    final eval loss of each variant, mean over seeds with min-max intervals (dots: the differences are small
    against the loss itself, and a bar would have to start at zero)."""
    plt = _plt()
    d = _Drawn(runs)
    groups = _ablation_groups(d)
    titles = {"weights": "which weights get adapters", "ranks": "adaptive vs fixed ranks",
              "precision": "base precision"}
    xlabels = {"weights": "importance score (plan.importance)", "ranks": "ranks (plan.mode)",
               "precision": "base precision (clients.precision)"}
    wanted = {"weights": {"platon", "fixed", "random"}, "ranks": {"adaptive"}, "precision": {"fp32", "nf4"}}
    seen, missing = {}, []
    for key in ("weights", "ranks", "precision"):
        seen[key] = dict(sorted(groups.get(key, {}).items(), key=lambda kv: _variant_order(kv[0])))
        gone = sorted(wanted[key] - set(seen[key])) + (
            [] if key != "ranks" or any(k.startswith("fixed") for k in seen[key]) else ["fixed rN (plan.mode=uniform)"])
        if gone:
            missing.append(f"{titles[key]}: no run for {', '.join(gone)}")
    # a panel per ablation that has runs (a partial report draws no empty panel; the note says what is missing)
    keys = [k for k in seen if seen[k]] or ["weights"]
    fig, axes = plt.subplots(1, len(keys), figsize=(1.2 + 3.95 * len(keys), 4.4), sharey=True, squeeze=False)
    axes = axes[0]  # one loss scale: panels compare
    for i, (ax, key) in enumerate(zip(axes, keys)):
        names = list(seen[key])
        _, mean = _errorbar(ax, np.arange(len(names)), [seen[key][n] for n in names], Run.final_loss,
                            color="tab:purple")
        for xi, (n, v) in enumerate(zip(names, mean)):
            ax.annotate(f"{v:.3f} (n={seen[key][n].n})", (xi, v), textcoords="offset points", xytext=(6, 0),
                        fontsize=7, va="center")
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_xlim(-0.5, max(len(names), 2) - 0.2)
        ax.set_title(f"({'abc'[i]}) {titles[key]}", fontsize=10)
        ax.set_xlabel(xlabels[key])
        ax.grid(axis="y", alpha=0.3)
        if not names:
            ax.text(0.5, 0.5, "no run", transform=ax.transAxes, ha="center", va="center", color="gray")
    axes[0].set_ylabel("final eval loss (nats per target token)")  # shared: said once
    # the axis is zoomed (dots, not bars): at least 2 % of the mean loss tall, so that differences in the
    # fourth decimal do not fill it, and said on the figure
    drawn = [v for ax in axes for line in ax.get_lines() for v in np.atleast_1d(line.get_ydata()) if np.isfinite(v)]
    if drawn:
        lo, hi = min(drawn), max(drawn)
        half = max(hi - lo, 0.02 * abs(np.mean(drawn))) * 0.6
        axes[0].set_ylim((lo + hi) / 2 - half, (lo + hi) / 2 + half)
        axes[0].annotate("y axis zoomed (does not start at 0)", (0.01, 0.01), xycoords="axes fraction", fontsize=7,
                         color="gray")
    fig.suptitle("Fig. 16: ablations (FedPipe, heterogeneous servers)")
    _note(fig, missing, d)
    return fig, missing


# ---- tables (Markdown) -----------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:  # no header over nothing: the missing runs are named under "Missing runs"
        return "(no runs for this table)"
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def table2_methods(runs: list[Run], setting: str = "hetero") -> tuple[str, list[str]]:
    """Table II, one row per method: mean over its seeds, [min, max] when there are several."""
    d = _Drawn(runs)
    have = _by_method(d, setting)
    e2e = any(r.results.generation for g in have.values() for r in g.runs)
    head = ["method", "seeds", "trainable params / server", "MiB up / round", "MiB down / round", "eval loss", "PPL"]
    head += list(E2E_METRICS) if e2e else []
    head += ["wall-clock s", "under-training"]
    rows = []
    for m, g in have.items():
        row = [m, str(g.n), g.cell(Run.trainable_params, "{:,.0f}"),
               g.cell(lambda r: r.bytes_per_round()[0] / 2**20, "{:.3f}"),
               g.cell(lambda r: r.bytes_per_round()[1] / 2**20, "{:.3f}"),
               g.cell(Run.final_loss), g.cell(Run.final_ppl, "{:.2f}")]
        if e2e:
            row += [g.cell(lambda r, k=k: r.results.generation.get(k, math.nan)) for k in E2E_METRICS]
        row += [g.cell(Run.wall_s, "{:.1f}"), g.cell(Run.under_training, "{:.2f}")]
        rows.append(row)
    return _table(head, rows), _missing_methods(have, {"hetero": "heterogeneous"}.get(setting, setting))


def tables_ablations(runs: list[Run]) -> tuple[dict[str, str], list[str]]:
    """Tables III (weights), IV (ranks), V (precision: base MiB and its ratio to fp32)."""
    groups = _ablation_groups(_Drawn(runs))
    fp32 = groups.get("precision", {}).get("fp32")
    fp32_mib = fp32.stat(Run.base_mib)[0] if fp32 else math.nan

    def table(key: str, first: str, extra: bool = False) -> str:
        head = [first, "seeds", "runs", "final eval loss", "PPL", "trainable params / server"]
        head += ["base MiB (x fp32)"] if extra else []
        rows = []
        for name, g in sorted(groups.get(key, {}).items(), key=lambda kv: _variant_order(kv[0])):
            row = [name, str(g.n), ", ".join(g.names), g.cell(Run.final_loss), g.cell(Run.final_ppl, "{:.2f}"),
                   g.cell(Run.trainable_params, "{:,.0f}")]
            if extra:
                mib = g.stat(Run.base_mib)[0]
                row.append(f"{mib:.2f} ({mib / fp32_mib:.3f}x)" if np.isfinite(fp32_mib) else f"{mib:.2f}")
            rows.append(row)
        return _table(head, rows)

    out = {"III": table("weights", "weight selection"), "IV": table("ranks", "ranks"),
           "V": table("precision", "precision", extra=True)}
    missing = [f"Table {k}: no runs" for k, v in out.items() if v.count("\n") < 2]
    return out, missing


# ---- everything at once ----------------------------------------------------------------------------------

def _loss_on_grid(times: np.ndarray, losses: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The eval loss a run had at each grid time: that of its last evaluated round finished by then."""
    idx = np.searchsorted(times, grid, side="right") - 1
    return losses[np.clip(idx, 0, len(losses) - 1)]


def fig_time_to_quality(runs: list[Run]):
    """Eval loss vs training time (evaluation left out: runs.round_train_s), one panel per heterogeneity profile
    with a LoRA run: every method's mean over its runs (seeds) with the min-max band, and the compute bound's
    ideal curve, LoRA's mean curve with its time divided by the bound (benchmarks/time_to_quality.py makes
    such a folder of runs)."""
    from .runs import compute_bound

    plt = _plt()
    d = _Drawn(runs)
    setups: dict[tuple, dict[str, dict[str, list[Run]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in d.runs:
        if r.n_rounds > 0 and r.setting == "hetero":
            setups[r.slowdowns][r.label][r.setup].append(r)
    missing, skipped = [], []
    profiles: dict[tuple, dict[str, list[Run]]] = {}
    def plain(r: Run) -> bool:  # not an ablation of FedPipe's planner or a pinned precision
        return r.plan_mode == "fedpipe" and r.importance == "platon" and r.precision_setting == "auto"

    for slow, by_label in setups.items():  # per method, the setup with the most repeats (seeds), plain first
        profiles[slow] = {}
        for label, by_setup in by_label.items():
            ranked = sorted(by_setup.values(), key=lambda rs: (len(rs), plain(rs[0])), reverse=True)
            profiles[slow][label] = ranked[0]
            if len(ranked) > 1:
                skipped.append(f"{len(ranked) - 1} other {label} setup(s) on slowdowns {list(slow)} not drawn")
    shown = {k: v for k, v in profiles.items() if "lora" in v}
    if not shown:
        missing.append("no heterogeneous lora run (the reference for the compute bound)")
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(6.5 * max(1, len(shown)), 4.5), squeeze=False)
    order = [*METHOD_ORDER, *EXTRA_ORDER]
    for ax, (slow, by_label) in zip(axes[0], sorted(shown.items(), key=lambda kv: len(kv[0]))):
        bound = compute_bound(slow)
        for label in sorted(by_label, key=lambda m: order.index(m) if m in order else 99):
            d.used += by_label[label]
            curves = [r.train_curve()[1:] for r in by_label[label]]
            grid = np.linspace(0, max(t[-1] for t, _ in curves), 200)  # a repeat that ended keeps its final loss
            vals = np.stack([_loss_on_grid(t, loss, grid) for t, loss in curves])
            style = {"color": "0.45", "ls": ":", "lw": 1.6} if label == "central" else \
                {"lw": 2.2 if label == "fedpipe" else 1.3}
            name = "centralized limit (one machine, LoRA's samples)" if label == "central" else label
            line, = ax.plot(grid, vals.mean(axis=0), label=f"{name} (n={len(curves)})", **style)
            if len(curves) > 1:
                ax.fill_between(grid, vals.min(axis=0), vals.max(axis=0), color=line.get_color(), alpha=0.15)
            if label == "lora":
                ax.plot(grid / bound, vals.mean(axis=0), ls="--", color="k", lw=1.2,
                        label=f"compute bound: lora's time / {bound:.2f} (no server idle)")
        ax.set_title(f"{len(slow)} servers, slowdowns {list(slow)}", fontsize=9)
        ax.set_xlabel("training time (s; slowest server per round, evaluation left out)")
        ax.set_ylabel("eval loss (nats per target token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Time to quality under heterogeneity (mean over seeds, band: min-max)")
    d.notes += skipped  # other setups of a method (ablations) are not missing runs: said on the figure only
    _note(fig, missing, d)
    return fig, missing


FIGURES = {"fig13_quality": fig13_quality, "fig14_trainable": fig14_trainable,
           "fig15_convergence": fig15_convergence, "fig16_ablations": fig16_ablations,
           "fig_time_to_quality": fig_time_to_quality}


def write_report(runs: list[Run], out: str | Path, log=print) -> dict[str, Path]:
    """Every figure as PNG (with <name>.runs.txt naming the run folders it drew) and tables.md into `out`, one
    cohort (model, dataset, rounds) at a time: a second cohort goes to its own subfolder, and tables.md has a
    section per cohort. Logs what is missing. Returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    notes: list[str] = []
    finished, unfinished = _finished(runs)
    for k, (cohort, members) in enumerate(by_cohort(finished).items()):
        folder = out if k == 0 else out / _slug(cohort)
        written.update(_write_figures(members, folder, notes, suffix="" if k == 0 else f" ({cohort})"))
    text, missing = tables_markdown(runs)
    (out / "tables.md").write_text(text, encoding="utf-8")
    written["tables"] = out / "tables.md"
    for n in unfinished + notes + [m for m in missing if m not in notes]:
        log(f"report: {n}")
    return written


def tables_markdown(runs: list[Run]) -> tuple[str, list[str]]:
    """tables.md: Tables II-V of every cohort (model, dataset, rounds), each table headed by its cohort, and the
    missing runs. Returns (the Markdown, the missing-run sentences)."""
    text = ["# Tables rebuilt from results.h5", "",
            "Each row: the mean over the row's runs (seeds), [min, max] when there are several; `seeds` counts them.",
            ""]
    finished, notes = _finished(runs)
    for k, (cohort, members) in enumerate(by_cohort(finished).items()):
        text += _cohort_tables(members, cohort, notes, figures_in=None if k == 0 else _slug(cohort))
    if notes:
        text += ["## Missing runs", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(text), notes


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:80]


def _write_figures(runs: list[Run], folder: Path, notes: list[str], suffix: str) -> dict[str, Path]:
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, fn in FIGURES.items():
        fig, missing = fn(runs)
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=200)
        fig.savefig(path.with_suffix(".pdf"))  # vector, for papers
        listing = [f"# {name}: the run folders it drew", *getattr(fig, "fedpipe_runs", []),
                   *(f"# note: {n}" for n in getattr(fig, "fedpipe_notes", []))]
        (folder / f"{name}.runs.txt").write_text("\n".join(listing) + "\n", encoding="utf-8")
        plt.close(fig)
        written[f"{name}{suffix}"] = path
        notes += [f"{name}{suffix}: {m}" for m in missing]
    return written


def _cohort_tables(runs: list[Run], cohort: str, notes: list[str], figures_in) -> list[str]:
    """tables.md's section of one cohort: every table headed by its model, dataset and rounds."""
    t2, miss2 = table2_methods(runs)
    t2i, _ = table2_methods(runs, "ideal")
    abl, miss_abl = tables_ablations(runs)
    notes += [f"{cohort}: {m}" for m in miss2 + miss_abl]
    where = f" (figures in {figures_in}/)" if figures_in else ""
    text = [f"## {cohort}{where}", ""]
    note = conditions_note(runs)
    if note:
        text += [f"Note: {note}.", ""]
    for title, table in (("Table II: methods, heterogeneous servers", t2), ("Table II: methods, ideal servers", t2i),
                         ("Table III: weight selection (FedPipe)", abl["III"]),
                         ("Table IV: adaptive vs fixed ranks (FedPipe)", abl["IV"]),
                         ("Table V: base precision (FedPipe)", abl["V"])):
        text += [f"### {title}; {cohort}", "", table, ""]
    text += [f"### Provenance; {cohort}", "", provenance_rows(runs), ""]
    return text
