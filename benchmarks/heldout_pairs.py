"""Paired standard errors for the non-iid table's worst-server held-out loss (issue 27): is the default's
worst server really above or below lora_hb's, or inside the 32 held-out examples' noise?

Run on demand from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/heldout_pairs.py --stories-path ../shared/data \\
        --alpha 0.5 --seeds 0 1 2

It runs benchmarks/time_to_quality.py (p4, lora lora_hb fedpipe, --alpha A, work and flat stop clocks, 32
held-out examples a server) with one addition in every job process: each global evaluation also writes each
server's held-out per-example losses (summed target loss, target tokens) to --workdir/examples. The engine
records only each server's mean held-out loss (HDF5 clients/eval_loss_heldout); the mean of two models on the
same 32 examples differs far less than either mean's own standard error, so a comparison needs the paired
per-example differences. Why a process hook rather than an engine option: it is a benchmark's measurement,
and the runs it measures stay the same `fedpipe run` jobs the table reports (their HDF5 is unchanged; the
records are matched to its rounds by the held-out means they also carry).

Per alpha and seed it reports, for the default (fedpipe) against lora_hb, every round's per-server difference
of held-out loss with its paired standard error (lora_hb's round t against fedpipe's last round finished by the
same time: the same round where both run the same plans), and the same at the table's equal-work point (each
method's round whose worst-server loss the table reports; --clock flat: the equal flat-step point). JSON to
--out; --report-only compares the runs already in --workdir.

What the default does on a GPU (plan.step_cost=auto measures there), on this CPU: a simulated fixed step cost and
the measured step cost for every run (lora and lora_hb plan without it), read at the equal flat-step point:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/heldout_pairs.py --stories-path ../shared/data --clock flat \
        --workdir benchmarks/out/heldout_pairs_flat --out benchmarks/out/heldout_pairs_flat.json \
        -- plan.step_cost=measured clients.step_delay_s=0.5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _jobs import write_json  # noqa: E402
from federated_gap import paired_gap as paired  # noqa: E402  (mean difference on the same examples, its se)


def install(dump_dir: str) -> None:
    """In a job process: wrap Run.evaluate so that each global evaluation also writes every hosted server's
    held-out per-example losses, with the run's output dir and the held-out means it returned."""
    import torch

    from fedpipe_dist.data.tokenize import collate
    from fedpipe_dist.metrics.perplexity import example_losses
    from fedpipe_dist.runtime import setup

    original = setup.Run.evaluate
    calls = [0]

    def evaluate(self, state=None, data=None):
        out = original(self, state, data)
        if data is not None or not self.own_eval:
            return out
        rec = {"dir": str(Path(self.cfg.output.dir).resolve()), "heldout": np.asarray(out.get("heldout")),
               "examples": {}}
        was_training = self.model.training  # the bases are still at eval precision: evaluate just set them
        self.model.eval()
        with self.method.attach(state), torch.inference_mode():
            for c, held in self.own_eval.items():
                losses, tokens = [], []
                for i in range(0, len(held), 16):
                    batch = collate(held, list(range(i, min(i + 16, len(held)))), self.pad_id).to(self.comm.device)
                    loss, n = example_losses(self.model, batch)
                    losses.append(loss.double().cpu().numpy())
                    tokens.append(n.double().cpu().numpy())
                rec["examples"][c] = (np.concatenate(losses), np.concatenate(tokens))
        self.model.train(was_training)
        calls[0] += 1
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(dump_dir) / f"{os.getpid()}_{calls[0]:05d}.pkl", "wb") as f:
            pickle.dump(rec, f)
        return out

    setup.Run.evaluate = evaluate


def by_round(records: list[dict], run_dir: Path, heldout_curve: list[list[float]]) -> dict[int, dict]:
    """The records of one run, by round: the record whose held-out means equal that round's HDF5 row."""
    mine = [r for r in records if r["dir"] == str(run_dir.resolve())]
    out = {}
    for t, row in enumerate(heldout_curve):
        hit = [r for r in mine if np.allclose(r["heldout"], row, rtol=0, atol=1e-9)]
        if hit:
            out[t] = hit[-1]["examples"]
    return out


def at_time(cv: dict, clock: str, when: float) -> int:
    """The last evaluated round finished by `when` on `clock` (time_to_quality.worst_own_at's round)."""
    return max(t for t, (x, loss) in enumerate(zip(cv[clock], cv["eval_loss"]))
               if x <= when + 1e-12 and np.isfinite(loss))


def compare(cell: dict, workdir: Path, records: list[dict], clock: str = "work") -> dict:
    """fedpipe minus lora_hb, paired on the same held-out examples: every round of lora_hb against fedpipe's last
    round finished by the same time on `clock` (the same round where both run the same plans), and at the table's
    equal-time point, LoRA's time to its target over the compute bound, on each method's worst server."""
    m = cell["methods"]
    cvs = {k: m[k]["curve"] for k in ("lora_hb", "fedpipe")}
    got = {k: by_round(records, workdir / k, cvs[k]["heldout"]) for k in cvs}
    lora = m["lora"]["curve"]
    r_target = next(t for t, loss in enumerate(lora["eval_loss"]) if loss == cell["target"])
    when = lora[clock][r_target] * cell["equal_time_s"] / cell["t_ref_s"]  # T_R / the compute bound
    end = cvs["fedpipe"][clock][-1] + 1e-12  # only times fedpipe's run reached (it may stop sooner)
    pairs = {t: at_time(cvs["fedpipe"], clock, cvs["lora_hb"][clock][t]) for t in sorted(got["lora_hb"])
             if 0 < t and cvs["lora_hb"][clock][t] <= end}
    pairs = {t: u for t, u in pairs.items() if u in got["fedpipe"]}
    diff = {t: [paired(got["fedpipe"][u][c], got["lora_hb"][t][c]) for c in sorted(got["lora_hb"][t])]
            for t, u in pairs.items()}
    at, at_fp = at_time(cvs["lora_hb"], clock, when), at_time(cvs["fedpipe"], clock, when)
    worst_hb, worst_fp = (int(np.argmax(cvs[k]["heldout"][r])) for k, r in (("lora_hb", at), ("fedpipe", at_fp)))
    assert abs(max(cvs["lora_hb"]["heldout"][at]) - m["lora_hb"][f"worst_heldout_at_equal_{clock}"]) < 1e-12
    worst = {c: paired(got["fedpipe"][at_fp][c], got["lora_hb"][at][c]) for c in {worst_hb, worst_fp}}
    loss, n = got["lora_hb"][at][worst_hb]
    _, se_one = paired((loss, n), (np.zeros_like(loss), n))  # against a zero loss: one model's own se
    lower = sum(g < 0 for t in diff for g, _ in diff[t])
    gap, se = worst[worst_hb]
    return {"rounds": list(pairs), "fedpipe_round_at": {str(t): u for t, u in pairs.items()},
            "diff": {str(t): diff[t] for t in diff}, "clock": clock, "equal_work_round": at, "fedpipe_round": at_fp,
            "worst_server": worst_hb, "fedpipe_worst_server": worst_fp,
            "lora_hb_worst": max(cvs["lora_hb"]["heldout"][at]), "fedpipe_worst": max(cvs["fedpipe"]["heldout"][at_fp]),
            "worst_gap": gap, "worst_gap_se": se,
            "on_servers": {str(c): v for c, v in worst.items()},
            "lora_hb_worst_own_se": se_one, "fedpipe_lower": [lower, sum(len(d) for d in diff.values())]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories-path", default=os.environ.get("FEDPIPE_SHARED_DATA"),
                    help="folder holding models/stories260K-hf and e2e/ (default $FEDPIPE_SHARED_DATA)")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out" / "heldout_pairs"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "heldout_pairs.json"))
    ap.add_argument("--clock", choices=["work", "flat"], default="work",
                    help="the equal-time point compared: work units (the recorded table) or flat steps")
    ap.add_argument("--report-only", action="store_true", help="compare the runs and records in --workdir; run nothing")
    ap.add_argument("extra", nargs="*", help="more dotted overrides for every run (after --)")
    a = ap.parse_args(argv)
    if not a.stories_path or not (Path(a.stories_path) / "models" / "stories260K-hf").is_dir():
        raise SystemExit("heldout_pairs: needs the pretrained stories260K and E2E data; pass --stories-path DIR "
                         "(the folder holding models/stories260K-hf and e2e/) or set FEDPIPE_SHARED_DATA")
    work = Path(a.workdir)
    doc: dict = {"command": " ".join(sys.argv), "cells": {}}
    for alpha in a.alpha:
        for seed in a.seeds:
            cell_dir = work / f"alpha{alpha:g}" / f"seed{seed}"
            dump = cell_dir / "examples"
            env = dict(os.environ, OMP_NUM_THREADS="1", FEDPIPE_HELDOUT_DUMP=str(dump),
                       PYTHONPATH=os.pathsep.join([str(REPO / "benchmarks" / "_hooks"),
                                                   os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
            ttq_json = cell_dir / "time_to_quality.json"
            if not a.report_only:
                cmd = [sys.executable, str(REPO / "benchmarks" / "time_to_quality.py"), "--stories-path",
                       a.stories_path, "--profiles", "p4", "--methods", "lora", "lora_hb", "fedpipe", "--alpha",
                       f"{alpha:g}", "--seeds", str(seed), "--stop-clocks", "work", "flat", "--workdir",
                       str(cell_dir / "runs"), "--out", str(ttq_json), *a.extra]
                subprocess.run(cmd, env=env, check=True, cwd=REPO)
            cell = json.loads(ttq_json.read_text())["profiles"][f"p4-alpha{alpha:g}"]["seeds"][str(seed)]
            records = [pickle.load(open(f, "rb")) for f in sorted(glob.glob(str(dump / "*.pkl")))]
            res = compare(cell, cell_dir / "runs" / f"p4-alpha{alpha:g}" / f"seed{seed}", records, a.clock)
            doc["cells"][f"alpha{alpha:g}/seed{seed}"] = res
            print(f"[alpha {alpha:g} seed {seed}] equal {a.clock}: lora_hb round {res['equal_work_round']}, fedpipe "
                  f"round {res['fedpipe_round']}, worst server {res['worst_server']} / {res['fedpipe_worst_server']}: "
                  f"lora_hb {res['lora_hb_worst']:.4f}, fedpipe {res['fedpipe_worst']:.4f}; "
                  f"paired difference {res['worst_gap']:+.4f} (se {res['worst_gap_se']:.4f}; one model's se "
                  f"{res['lora_hb_worst_own_se']:.4f}); fedpipe lower on {res['fedpipe_lower'][0]} of "
                  f"{res['fedpipe_lower'][1]} (round, server) pairs at equal {a.clock}", file=sys.stderr, flush=True)
            write_json(a.out, doc)  # after every cell: nothing lost
    return doc


if __name__ == "__main__":
    main()
