"""Table II analog: every method the engine runs, under the same job and the same heterogeneity.

Each method is a real `torchrun` job (one rank per edge server, gloo on CPU) writing its own results.h5;
the table is read back from those files alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_methods.py --stories-path ../shared/data --rounds 10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_methods.py --rounds 5       # offline: tiny GPT-2, synthetic

Columns (means over rounds 1..R unless said): trainable parameters per participating server and round;
bytes up and down per round (the engine's counts: client uploads; the broadcast payload x servers);
final eval loss and perplexity; wall-clock (sum of the rounds' wall_s on rank 0, slowdown waits included);
under-training rate; with --generate-mrs N, the five E2E scores on the first N test-set MRs. Output:
Markdown on stdout, JSON at --out (default benchmarks/out/compare_methods.json), and the runs' folders under
--runs (default benchmarks/out/compare_methods/).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:  # run as a plain script from a checkout
        sys.path.insert(0, str(p))

from _jobs import torchrun_job, write_json  # noqa: E402

from fedpipe_dist.io.hdf5 import Results  # noqa: E402
from fedpipe_dist.methods import REGISTRY as METHODS  # noqa: E402
from fedpipe_dist.metrics.e2e import METRICS as E2E  # noqa: E402


def job_args(args) -> tuple[str, list[str]]:
    if args.stories_path:
        root = Path(args.stories_path)
        return "jobs/e2e_stories260k.yaml", [
            f"model.name_or_path={root / 'models' / 'stories260K-hf'}",
            f"data.train_path={root / 'e2e' / 'trainset.csv'}",
            f"data.eval_path={root / 'e2e' / 'devset.csv'}", f"eval.max_samples={args.eval_samples}",
            f"data.max_train_samples={args.train_samples}", *(
                [] if not args.generate_mrs else
                ["generation.enabled=true", f"generation.data_path={root / 'e2e' / 'testset_w_refs.csv'}",
                 f"generation.max_mrs={args.generate_mrs}"])]
    return "jobs/quickstart.yaml", []


def run_method(args, method: str, out: Path) -> float:
    job, extra = job_args(args)
    return torchrun_job(args.ranks, [job, *extra, f"method={method}", f"rounds={args.rounds}",
                                     f"clients.n={args.ranks}", f"eval.every={args.eval_every}", f"output.dir={out}",
                                     "output.overwrite=true", *args.overrides], method)


def summarize(path: Path) -> dict:
    r = Results(path)
    rows = slice(1, None)
    sel = r.clients["selected"][rows].astype(bool)
    done = r.clients["completed"][rows].astype(bool)
    params = r.clients["trainable_params"][rows][done]
    return dict(trainable_params=float(params.mean()) if params.size else float("nan"),
                bytes_up=float(r.rounds["bytes_up"][rows].mean()),
                bytes_down=float(r.rounds["bytes_down"][rows].mean()),
                eval_loss0=float(r.rounds["eval_loss"][0]), eval_loss=r.last_eval_loss(),
                ppl=float(np.exp(r.last_eval_loss())), wall_s=float(r.rounds["wall_s"][rows].sum()),
                under_training=float(1 - done.sum() / max(1, sel.sum())), rounds=r.n_rounds,
                e2e={k: r.generation[k] for k in E2E if k in r.generation},
                curve_wall_s=np.cumsum(r.rounds["wall_s"]).tolist(), curve_loss=r.rounds["eval_loss"].tolist())


def loss_at(s: dict, t: float) -> float:
    """The last eval loss recorded by wall-clock t (rank 0's cumulative round time)."""
    best = s["eval_loss0"]
    for w, loss in zip(s["curve_wall_s"], s["curve_loss"]):
        if w <= t + 1e-9 and np.isfinite(loss):
            best = loss
    return best


def markdown(doc: dict) -> str:
    t_min = min(s["wall_s"] for s in doc["methods"].values())
    e2e = [k for k in E2E if any(k in s.get("e2e", {}) for s in doc["methods"].values())]
    head = ["method", "trainable params / server", "MiB up / round", "MiB down / round", "eval loss R0 -> R", "PPL",
            *e2e, "wall-clock s", f"eval loss at {t_min:.0f} s", "under-training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in doc["methods"].items():
        scores = [f"{s['e2e'].get(k, float('nan')):.4f}" for k in e2e]
        lines.append(" | ".join([
            f"| {m}", f"{s['trainable_params']:,.0f}", f"{s['bytes_up'] / 2**20:.3f}", f"{s['bytes_down'] / 2**20:.3f}",
            f"{s['eval_loss0']:.4f} -> {s['eval_loss']:.4f}", f"{s['ppl']:.2f}", *scores, f"{s['wall_s']:.1f}",
            f"{loss_at(s, t_min):.4f}", f"{s['under_training']:.2f} |"]))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--stories-path", default=os.environ.get("FEDPIPE_SHARED_DATA"),
                    help="a folder with models/stories260K-hf and e2e/ (default: $FEDPIPE_SHARED_DATA; none: "
                         "the offline quickstart job)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--generate-mrs", type=int, default=0,
                    help="with --stories-path: beam-search the first N MRs of the E2E test set at the end of each "
                    "run and add BLEU, NIST, METEOR, ROUGE-L, CIDEr to the table (0: off; needs java)")
    ap.add_argument("--eval-every", type=int, default=1, help="evaluate every k rounds (curves for the "
                    "equal-wall-clock column)")
    ap.add_argument("--runs", default=str(REPO / "benchmarks" / "out" / "compare_methods"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "compare_methods.json"))
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every method's job")
    args = ap.parse_args(argv)
    doc = dict(command=" ".join(sys.argv), job=job_args(args)[0], ranks=args.ranks, rounds=args.rounds, methods={})
    for m in args.methods:
        out = Path(args.runs) / m
        elapsed = run_method(args, m, out)
        doc["methods"][m] = dict(summarize(out / "results.h5"), job_s=elapsed)
        print(f"{m}: done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    write_json(args.out, doc)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
