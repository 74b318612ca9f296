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

from .runs import Run

METHOD_ORDER = ("fedpipe", "ft", "lora", "fedadapter", "flora", "flexlora", "hetlora")
PAPER_METHODS = ("fedpipe", "ft", "lora", "fedadapter")  # the paper's Fig. 13 compares these
E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
PRECISION_ORDER = ("fp32", "fp16", "bf16", "nf8", "nf4")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless unless a notebook already chose a backend
    import matplotlib.pyplot as plt

    return plt


def _by_method(runs: list[Run], setting: str | None = "hetero", plain: bool = True) -> dict[str, Run]:
    """One run per method (the last by folder name), `plain`: not an ablation variant of fedpipe."""
    out: dict[str, Run] = {}
    for r in runs:
        if setting is not None and r.setting != setting:
            continue
        if plain and r.method == "fedpipe" and (r.plan_mode != "fedpipe" or r.importance != "platon"):
            continue
        if r.n_rounds == 0:
            continue
        out[r.method] = r
    return {m: out[m] for m in sorted(out, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)}


def _missing_methods(have, setting: str, wanted=METHOD_ORDER) -> list[str]:
    gone = [m for m in wanted if m not in have]
    what = f"{setting} run" if setting else "run"
    return [f"no {what} for: {', '.join(gone)}"] if gone else []


def _note(fig, lines: list[str]) -> None:
    """Missing runs, in small grey text along the bottom of the figure (outside every axes)."""
    if lines:
        fig.text(0.005, 0.005, "missing: " + "; ".join(lines), fontsize=7, color="0.35", ha="left", va="bottom",
                 wrap=True)
    fig.tight_layout(rect=(0, 0.05 if lines else 0, 1, 1))


# ---- figures ----------------------------------------------------------------------------------------------


def fig13_quality(runs: list[Run]):
    """Converged eval perplexity per method, heterogeneous vs ideal servers (and BLEU where scored)."""
    plt = _plt()
    het, ideal = _by_method(runs, "hetero"), _by_method(runs, "ideal")
    methods = [m for m in METHOD_ORDER if m in het or m in ideal]
    missing = _missing_methods(het, "heterogeneous") + _missing_methods(ideal, "ideal", PAPER_METHODS)
    has_bleu = any("BLEU" in r.results.generation for r in [*het.values(), *ideal.values()])
    fig, axes = plt.subplots(1, 2 if has_bleu else 1, figsize=(10 if has_bleu else 6.5, 4), squeeze=False)
    x = np.arange(len(methods))
    panels = [("final eval perplexity (lower is better)", lambda r: r.final_ppl())]
    if has_bleu:
        panels.append(("BLEU (x100, higher is better)", lambda r: 100 * r.results.generation.get("BLEU", math.nan)))
    for ax, (ylabel, value) in zip(axes[0], panels):
        for k, (name, group, color) in enumerate((("heterogeneous", het, "tab:red"), ("ideal", ideal, "tab:blue"))):
            vals = [value(group[m]) if m in group else math.nan for m in methods]
            bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=name, color=color, alpha=0.85)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        top = np.nanmax([b.get_height() for b in ax.patches] + [0.0])
        ax.set_ylim(0, 1.15 * top if top > 0 else 1)  # room for the value labels
        ax.set_xticks(x, methods, rotation=20)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("method")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="servers", fontsize=8, title_fontsize=8, loc="upper right", ncol=2)
    fig.suptitle("Fig. 13: converged quality per method", x=0.3)
    _note(fig, missing)
    return fig, missing


def fig14_trainable(runs: list[Run]):
    """Trainable parameters per participating server and round, per method (log scale)."""
    plt = _plt()
    have = _by_method(runs, None)
    missing = _missing_methods(have, "")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    methods = list(have)
    vals = [have[m].trainable_params() for m in methods]
    bars = ax.bar(methods, vals, color="tab:green", alpha=0.85)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=7, padding=1)
    ax.set_yscale("log")
    ax.set_ylabel("trainable parameters per server (count, log scale)")
    ax.set_xlabel("method")
    ax.tick_params(axis="x", rotation=20)
    ax.set_title("Fig. 14: trainable parameters")
    ax.grid(axis="y", alpha=0.3, which="both")
    _note(fig, missing)
    return fig, missing


def fig15_convergence(runs: list[Run]):
    """Eval loss per round and per wall-clock second, one line per method (heterogeneous servers)."""
    plt = _plt()
    have = _by_method(runs, "hetero")
    missing = _missing_methods(have, "heterogeneous")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in have.items():
        rounds, wall, loss = r.curve()
        a.plot(rounds, loss, marker="o", ms=3, label=m)
        b.plot(wall, loss, marker="o", ms=3, label=m)
    a.set_xlabel("round")
    b.set_xlabel("wall-clock (s, rank 0, cumulative)")
    for ax in (a, b):
        ax.set_ylabel("eval loss (nats per target token)")
        ax.grid(alpha=0.3)
    if have:
        a.legend(title="method", fontsize=8)
    fig.suptitle("Fig. 15: convergence, heterogeneous servers")
    _note(fig, missing)
    return fig, missing


def _ablation_groups(runs: list[Run]) -> dict[str, list[tuple[str, Run]]]:
    groups: dict[str, list[tuple[str, Run]]] = defaultdict(list)
    for r in runs:
        if r.method != "fedpipe" or r.n_rounds == 0:
            continue
        if r.plan_mode == "fedpipe":
            groups["weights"].append((f"{r.importance}", r))
        if r.importance == "platon":
            rank = r.config.get("lora", {}).get("rank")
            groups["ranks"].append(("adaptive" if r.plan_mode == "fedpipe" else f"fixed r{rank}", r))
        if r.precision is not None and r.plan_mode == "fedpipe" and r.importance == "platon":
            groups["precision"].append((r.precision, r))
    return groups


def fig16_ablations(runs: list[Run]):
    """(a) importance-selected vs fixed/random weights, (b) adaptive vs fixed ranks, (c) base precision."""
    plt = _plt()
    groups = _ablation_groups(runs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    titles = {"weights": "(a) which weights get adapters", "ranks": "(b) adaptive vs fixed ranks",
              "precision": "(c) base precision"}
    wanted = {"weights": {"platon", "fixed", "random"}, "ranks": {"adaptive"}, "precision": {"fp32", "nf4"}}
    missing = []
    for ax, key in zip(axes, ("weights", "ranks", "precision")):
        items = sorted(groups.get(key, []), key=lambda kv: (PRECISION_ORDER.index(kv[0])
                                                            if kv[0] in PRECISION_ORDER else 0, kv[0]))
        seen = {}
        for name, r in items:
            seen[name] = r  # one bar per variant (the last run by folder name)
        gone = sorted(wanted[key] - set(seen)) + ([] if key != "ranks" or any(k.startswith("fixed") for k in seen)
                                                  else ["fixed rN (plan.mode=uniform)"])
        if gone:
            missing.append(f"{titles[key]}: no run for {', '.join(gone)}")
        names = list(seen)
        vals = [seen[n].final_loss() for n in names]
        bars = ax.bar(names, vals, color="tab:purple", alpha=0.8)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
        if vals and np.isfinite(vals).any():
            lo, hi = np.nanmin(vals), np.nanmax(vals)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3) - 0.02, hi + 0.15 * (hi - lo + 1e-3) + 0.02)
        ax.set_title(titles[key], fontsize=10)
        ax.set_ylabel("final eval loss (nats per target token)")
        ax.set_xlabel({"weights": "importance", "ranks": "ranks", "precision": "precision"}[key])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Fig. 16: ablations (FedPipe)")
    _note(fig, missing)
    return fig, missing


# ---- tables (Markdown) -----------------------------------------------------------------------------------


def table2_methods(runs: list[Run], setting: str = "hetero") -> tuple[str, list[str]]:
    have = _by_method(runs, setting)
    e2e = any(r.results.generation for r in have.values())
    head = ["method", "trainable params / server", "MiB up / round", "MiB down / round", "eval loss", "PPL"]
    head += list(E2E_METRICS) if e2e else []
    head += ["wall-clock s", "under-training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in have.items():
        up, down = r.bytes_per_round()
        row = [m, f"{r.trainable_params():,.0f}", f"{up / 2**20:.3f}", f"{down / 2**20:.3f}",
               f"{r.final_loss():.4f}", f"{r.final_ppl():.2f}"]
        if e2e:
            row += [f"{r.results.generation.get(k, math.nan):.4f}" for k in E2E_METRICS]
        row += [f"{r.wall_s():.1f}", f"{r.under_training():.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), _missing_methods(have, {"hetero": "heterogeneous"}.get(setting, setting))


def _ablation_table(pairs: list[tuple[str, Run]], first: str, extra=None) -> str:
    head = [first, "run", "final eval loss", "PPL", "trainable params / server"] + ([extra[0]] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in pairs:
        row = [name, r.name, f"{r.final_loss():.4f}", f"{r.final_ppl():.3f}", f"{r.trainable_params():,.0f}"]
        if extra:
            row.append(extra[1](r))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def tables_ablations(runs: list[Run]) -> tuple[dict[str, str], list[str]]:
    """Tables III (weights), IV (ranks), V (precision: base MiB and its ratio to fp32)."""
    groups = _ablation_groups(runs)
    fp32 = next((r.base_mib() for n, r in groups.get("precision", []) if n == "fp32"), math.nan)

    def base(r: Run) -> str:
        return f"{r.base_mib():.2f} ({r.base_mib() / fp32:.3f}x)" if np.isfinite(fp32) else f"{r.base_mib():.2f}"

    out = {
        "III": _ablation_table(groups.get("weights", []), "weight selection"),
        "IV": _ablation_table(groups.get("ranks", []), "ranks"),
        "V": _ablation_table(sorted(groups.get("precision", []), key=lambda kv: PRECISION_ORDER.index(kv[0])),
                             "precision", ("base MiB (x fp32)", base)),
    }
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
    setups: dict[tuple, dict[str, dict[str, list[Run]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
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
    order = [*METHOD_ORDER, "fedpipe-paper"]
    for ax, (slow, by_label) in zip(axes[0], sorted(shown.items(), key=lambda kv: len(kv[0]))):
        bound = compute_bound(slow)
        for label in sorted(by_label, key=lambda m: order.index(m) if m in order else 99):
            curves = [r.train_curve()[1:] for r in by_label[label]]
            grid = np.linspace(0, min(t[-1] for t, _ in curves), 200)
            vals = np.stack([_loss_on_grid(t, loss, grid) for t, loss in curves])
            line, = ax.plot(grid, vals.mean(axis=0), label=f"{label} (n={len(curves)})",
                            lw=2.2 if label == "fedpipe" else 1.3)
            if len(curves) > 1:
                ax.fill_between(grid, vals.min(axis=0), vals.max(axis=0), color=line.get_color(), alpha=0.15)
            if label == "lora":
                ax.plot(grid / bound, vals.mean(axis=0), ls="--", color="k", lw=1.2,
                        label=f"compute bound: lora / {bound:.2f}")
        ax.set_title(f"{len(slow)} servers, slowdowns {list(slow)}", fontsize=9)
        ax.set_xlabel("training time (s; slowest server per round, evaluation left out)")
        ax.set_ylabel("eval loss (nats per target token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Time to quality under heterogeneity (mean over seeds, band: min-max)")
    if skipped:  # other setups of a method (ablations) are not missing runs: said on the figure only
        fig.text(0.995, 0.005, "; ".join(skipped), fontsize=7, color="0.35", ha="right", va="bottom")
    _note(fig, missing)
    return fig, missing


FIGURES = {"fig13_quality": fig13_quality, "fig14_trainable": fig14_trainable,
           "fig15_convergence": fig15_convergence, "fig16_ablations": fig16_ablations,
           "fig_time_to_quality": fig_time_to_quality}


def write_report(runs: list[Run], out: str | Path, log=print) -> dict[str, Path]:
    """Every figure as PNG and tables.md into `out`; logs what is missing. Returns the files written."""
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    notes: list[str] = []
    for name, fn in FIGURES.items():
        fig, missing = fn(runs)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written[name] = path
        notes += [f"{name}: {m}" for m in missing]
    t2, miss2 = table2_methods(runs)
    t2i, _ = table2_methods(runs, "ideal")
    abl, miss_abl = tables_ablations(runs)
    text = ["# Tables rebuilt from results.h5", "", "## Table II: methods, heterogeneous servers", "", t2, "",
            "## Table II: methods, ideal servers", "", t2i, "", "## Table III: weight selection (FedPipe)", "",
            abl["III"], "", "## Table IV: adaptive vs fixed ranks (FedPipe)", "", abl["IV"], "",
            "## Table V: base precision (FedPipe)", "", abl["V"], ""]
    notes += miss2 + miss_abl
    if notes:
        text += ["## Missing runs", ""] + [f"- {n}" for n in notes] + [""]
    (out / "tables.md").write_text("\n".join(text), encoding="utf-8")
    written["tables"] = out / "tables.md"
    for n in notes:
        log(f"report: {n}")
    return written
