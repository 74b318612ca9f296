"""Every method's gap to the centralized limit at equal samples (issue 26): iid, homogeneous servers.

Run on demand from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated_gap.py --stories-path ../shared/data
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federated_gap.py --stories-path ../shared/data \\
        --steps 1 --methods lora --seeds 0 1 2                         # the acceptance line alone

Every run is a real `fedpipe run` of jobs/e2e_stories260k.yaml (the pretrained stories260K on the real E2E rows)
in one process hosting every server: 4 servers, iid shards, slowdown 1, fp32 bases, batch 8, lr 2e-3, rank 8 on
q/k/v/o, max_length 256, --rounds R rounds of S local steps (S in --steps). Beside each (S, seed) the job's
centralized limit runs (`central=true`, runtime/central.py: one process, one AdamW, each step the union of the
servers' batches of that step, so exactly the federated samples); for ft its limit trains every parameter.

Each final model (final/, FedAdapter's adapters attached) is scored per example on the run's own eval sample
(--eval-samples examples of the dev set, the run's order), and the gap to the limit is the difference of the
token-weighted mean losses, its standard error from the paired per-example differences (the ratio estimator:
sqrt(sum_i (d_i - D n_i)^2) / sum_i n_i, d_i the difference of example i's summed losses, n_i its tokens).
Methods run interleaved: for each seed and S, the methods one after another, so machine load favours none.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _jobs import CENTRAL, METHODS, process_job, write_json  # noqa: E402

# Variants run only when named in --methods: what a method's gap becomes with one switch changed.
VARIANTS = {
    "lora+moments": ["method=lora", "train.optimizer_state=kept"],  # each server keeps its AdamW moments
    "ft+moments": ["method=ft", "train.optimizer_state=kept"],  # the same for every parameter (ft's own limit)
    "fedpipe+shared_a": ["method=fedpipe", "lora.carry=shared_a"],  # one frozen A, only B trains and travels
    "fedpipe+svd": ["method=fedpipe", "lora.rebalance=svd"],  # the kept adapter split by its SVD each round
    "fedpipe+orth": ["method=fedpipe", "lora.rebalance=orth"],  # the same SVD, A's rows at a fresh draw's norm
    "lora+orth": ["method=lora", "lora.rebalance=orth"],  # the same on FedAvg-LoRA's global adapter
    "fedpipe+no_orth": ["method=fedpipe", "lora.rebalance=none"],  # the kept adapter as it trained (before orth)
    # the same at 4x the job's lr (FFA-LoRA trains B alone at a larger lr); the limit stays at the job's lr
    "fedpipe+shared_a+lr4x": ["method=fedpipe", "lora.carry=shared_a", "train.lr=8e-3"],
    "fedpipe+lr4x": ["method=fedpipe", "train.lr=8e-3"],  # the kept adapter at that lr: shared_a's comparison
    # a server optimizer on the kept global adapter (aggregation.server_opt; OpenFedLLM's defaults but eta)
    "lora+fedavgm": ["method=lora", "aggregation.server_opt=fedavgm"],
    "lora+fedadam": ["method=lora", "aggregation.server_opt=fedadam"],
    "lora+fedadam+eta1e-2": ["method=lora", "aggregation.server_opt=fedadam", "aggregation.server_lr=1e-2"],
    "lora+fedyogi+eta1e-2": ["method=lora", "aggregation.server_opt=fedyogi", "aggregation.server_lr=1e-2"],
    "fedpipe+fedadam+eta1e-2": ["method=fedpipe", "aggregation.server_opt=fedadam", "aggregation.server_lr=1e-2"],
    # capacity controls: the heterogeneous-rank baselines give equal servers their top rank max(lora.ranks) = 16,
    # twice the limit's and the others' 8; at top rank 8, and the default at rank 16 (the limit stays at rank 8)
    "flexlora@r8": ["method=flexlora", "lora.ranks=[8,6,4,2]"],
    "hetlora@r8": ["method=hetlora", "lora.ranks=[8,6,4,2]"],
    "fedpipe@r16": ["method=fedpipe", "lora.rank=16"],
}
RUNS = {**METHODS, **VARIANTS}

# Why a method may sit above the limit by construction (the table's notes; measured, not assumed: the gap is).
NOTES = {
    "fedpipe": "keeps one global adapter (lora.carry=adapter); a fresh optimizer every round, as LoRA's",
    "fedpipe-paper": "re-initializes its adapters every round; Algorithm 1 puts the budget on two weight types",
    "flora": "re-initializes its adapters every round (stacked update merged into the base)",
    "fedadapter": "another adapter (Houlsby) than the LoRA limit, grown by trials",
    "hetlora": "ranks differ per server and self-prune; a rank regularizer joins every step",
    "flexlora": "each server restarts from a truncated SVD of the global update",
    "lora+moments": "FedAvg-LoRA whose servers keep their AdamW moments across rounds (train.optimizer_state=kept)",
    "ft+moments": "full fine-tuning FedAvg whose servers keep their AdamW moments across rounds",
    "fedpipe+shared_a": "one A for every server, frozen; only B trains (lora.carry=shared_a)",
    "fedpipe+svd": "the default with its kept adapter split by its SVD each round (lora.rebalance=svd)",
    "fedpipe+orth": "the default with its kept adapter refactored each round as A = V^T / sqrt(3), B = U S sqrt(3)",
    "lora+orth": "FedAvg-LoRA with its global adapter refactored each round as fedpipe+orth's",
    "fedpipe+no_orth": "the default without refactoring: the kept adapter's factors as they trained",
    "fedpipe+shared_a+lr4x": "lora.carry=shared_a at train.lr=8e-3, 4x the job's (the limit at the job's lr)",
    "fedpipe+lr4x": "the default (kept adapter) at train.lr=8e-3, 4x the job's (the limit at the job's lr)",
    "lora+fedavgm": "FedAvg-LoRA with FedAvgM on the global factors (OpenFedLLM's: m = 0.9 m + 0.1 Delta)",
    "lora+fedadam": "FedAvg-LoRA with FedAdam on the global factors (OpenFedLLM's eta = tau = 1e-3, b = 0.9, 0.99)",
    "lora+fedadam+eta1e-2": "FedAvg-LoRA with FedAdam at server eta 1e-2 (tau 1e-3)",
    "lora+fedyogi+eta1e-2": "FedAvg-LoRA with FedYogi at server eta 1e-2 (tau 1e-3)",
    "fedpipe+fedadam+eta1e-2": "the default (kept adapter) with FedAdam on its factors at server eta 1e-2",
    "flexlora@r8": "FlexLoRA with its top rank at the limit's 8 (lora.ranks=[8,6,4,2]; equal servers get it)",
    "hetlora@r8": "HetLoRA with its top rank at the limit's 8 (lora.ranks=[8,6,4,2])",
    "fedpipe@r16": "the default at lora.rank=16, the heterogeneous-rank baselines' top rank (the limit at 8)",
    "peft-fedavg": ("FedAvg-LoRA written with peft (benchmarks/peft_fedavg.py), same samples and initial A; "
                    "se not paired"),
}


def full_ft(name: str) -> bool:
    """True: the run fine-tunes every parameter, so its limit is ft's (every parameter), not LoRA's."""
    return [o for o in RUNS[name] if o.startswith("method=")][-1] == "method=ft"


def example_losses(final: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example of the run's eval sample (its first k in the run's order): summed target loss, target tokens."""
    import torch
    from transformers.utils import logging as hf_logging

    from fedpipe_dist.adapters.houlsby import ADAPTER_FILE, HoulsbyAdapters, find_adapter_points, load_adapter_state
    from fedpipe_dist.data import format_example, load_eval_pairs, tokenize_pairs
    from fedpipe_dist.data.tokenize import collate
    from fedpipe_dist.io.hdf5 import Results
    from fedpipe_dist.job import job_from_dict
    from fedpipe_dist.metrics.perplexity import example_losses as per_example
    from fedpipe_dist.models import load_model, load_tokenizer

    hf_logging.disable_progress_bar()
    cfg = job_from_dict(json.loads(Results(final.parent / "results.h5").attrs["config_json"]))
    tok = load_tokenizer(str(final))
    model = load_model(str(final), seed=cfg.seed, dtype="float32", tokenizer=tok).eval()
    if (final / ADAPTER_FILE).is_file():
        state, _, _ = load_adapter_state(final)
        HoulsbyAdapters(find_adapter_points(model), state, trainable=False).attach(model)
    pairs = load_eval_pairs(cfg.data, cfg.seed)
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(pairs))[:k]  # runtime/setup._load_eval's order
    data = tokenize_pairs(tok, [format_example(*pairs[i]) for i in order], cfg.model.max_length)
    losses, tokens = [], []
    with torch.inference_mode():
        for start in range(0, len(data), 16):
            batch = collate(data, list(range(start, min(start + 16, len(data)))), tok.pad_token_id)
            loss, n = per_example(model, batch)
            losses.append(loss.double().numpy())
            tokens.append(n.double().numpy())
    return np.concatenate(losses), np.concatenate(tokens)


def paired_gap(a: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Mean loss of a minus that of ref over the same examples, and its standard error (ratio estimator)."""
    (la, n), (lr, n_ref) = a, ref
    assert np.array_equal(n, n_ref), "the two models were scored on different examples"
    d = la - lr
    gap = d.sum() / n.sum()
    se = math.sqrt(np.sum((d - gap * n) ** 2) * len(d) / (len(d) - 1)) / n.sum()
    return float(gap), float(se)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories-path", default=os.environ.get("FEDPIPE_SHARED_DATA"),
                    help="folder holding models/stories260K-hf and e2e/ (default $FEDPIPE_SHARED_DATA)")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10], help="local steps S per round")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(RUNS),
                    help=f"default: every method; variants only when named: {list(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out" / "federated_gap"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "federated_gap.json"))
    ap.add_argument("--reuse", action="store_true",
                    help="score finished runs already in --workdir instead of rerunning")
    ap.add_argument("--peft-reference", action="store_true",
                    help="also run benchmarks/peft_fedavg.py (FedAvg-LoRA written with peft, OpenFedLLM's loop) on the "
                         "same samples: its final eval loss beside method=lora's")
    ap.add_argument("extra", nargs="*", help="more dotted overrides for every run")
    a = ap.parse_args(argv)
    if not a.stories_path or not (Path(a.stories_path) / "models" / "stories260K-hf").is_dir():
        raise SystemExit("federated_gap: needs the pretrained stories260K and E2E data; pass --stories-path DIR "
                         "(the folder holding models/stories260K-hf and e2e/) or set FEDPIPE_SHARED_DATA")
    data = Path(a.stories_path).resolve()
    eval_path = str(data / "e2e" / "devset.csv")
    common = ["jobs/e2e_stories260k.yaml", f"model.name_or_path={data / 'models' / 'stories260K-hf'}",
              f"data.train_path={data / 'e2e' / 'trainset.csv'}", f"data.eval_path={eval_path}", "clients.n=4",
              "clients.slowdown=1", "clients.memory_gb=24", "clients.precision=fp32", "train.batch_max=8",
              "train.lr=2e-3", "lora.rank=8", "model.max_length=256", f"rounds={a.rounds}",
              f"eval.max_samples={a.eval_samples}", f"eval.every={a.rounds}", "eval.final_full=false",
              "checkpoint.enabled=false", "output.overwrite=true", *a.extra]
    work = Path(a.workdir)
    doc: dict = {"command": " ".join(sys.argv), "rounds": a.rounds, "runs": {}}

    def run(label: str, overrides: list[str], seed: int, S: int) -> tuple[np.ndarray, np.ndarray]:
        out = work / f"S{S}" / f"seed{seed}" / label
        done = (out / "final" / "config.json").is_file()
        t = 0.0
        if not (a.reuse and done):
            t = process_job([*common, *overrides, f"seed={seed}", f"train.local_steps={S}", f"output.dir={out}"],
                            f"{label} S={S} seed={seed}")
        scored = example_losses(out / "final", a.eval_samples)
        doc["runs"].setdefault(f"S{S}", {}).setdefault(label, {})[str(seed)] = {
            "loss": float(scored[0].sum() / scored[1].sum()), "wall_s": t}
        return scored

    for seed in a.seeds:
        for S in a.steps:
            t0 = time.perf_counter()
            limits = {"peft": run("central", CENTRAL, seed, S)}
            if any(full_ft(name) for name in a.methods):
                limits["ft"] = run("central-ft", ["method=ft", "central=true"], seed, S)
            if a.peft_reference:
                from peft_fedavg import peft_fedavg

                from fedpipe_dist.job import load_job

                cfg = load_job(common[0], [*common[1:], "method=lora", f"seed={seed}", f"train.local_steps={S}",
                                           f"output.dir={work / 'peft_reference'}"])
                loss = peft_fedavg(cfg)[-1]
                central = doc["runs"][f"S{S}"]["central"][str(seed)]["loss"]
                doc["runs"][f"S{S}"].setdefault("peft-fedavg", {})[str(seed)] = {"loss": loss, "gap": loss - central,
                                                                                "se": math.nan}
                print(f"[S={S} seed {seed}] peft FedAvg reference loss {loss:.4f}", file=sys.stderr, flush=True)
            for name in a.methods:
                scored = run(name, RUNS[name], seed, S)
                gap, se = paired_gap(scored, limits["ft" if full_ft(name) else "peft"])
                doc["runs"][f"S{S}"][name][str(seed)].update(gap=gap, se=se)
                print(f"[S={S} seed {seed}] {name:14s} gap {gap:+.4f} (se {se:.4f})", file=sys.stderr, flush=True)
            print(f"[S={S} seed {seed}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            write_json(a.out, doc)  # after every (seed, S): nothing lost
    doc["table"] = markdown(doc)
    write_json(a.out, doc)
    print(doc["table"])
    return doc


def markdown(doc: dict) -> str:
    """Per method and S: the mean gap over seeds, the seeds' spread and the mean paired standard error."""
    steps = list(doc["runs"])
    methods = [m for m in [*RUNS, "peft-fedavg"] if any(m in doc["runs"][s] for s in steps)]
    lines = ["| method | " + " | ".join(f"gap at {s[1:]} local step(s) (se)" for s in steps) + " | note |",
             "|---|" + "---|" * len(steps) + "---|"]
    lim = ["| centralized limit (loss) | " + " | ".join(
        f"{np.mean([r['loss'] for r in doc['runs'][s]['central'].values()]):.4f}" for s in steps) + " | |"]
    for m in methods:
        cells = []
        for s in steps:
            rows = list(doc["runs"][s].get(m, {}).values())
            g = [r["gap"] for r in rows if "gap" in r]
            cells.append(f"{np.mean(g):+.4f} ± {np.std(g):.4f} ({np.mean([r['se'] for r in rows]):.4f})" if g else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {NOTES.get(m, '')} |")
    return ("\n".join(lines[:2] + lim + lines[2:])
            + "\n\nMean over seeds ± their standard deviation (mean paired standard error).")


if __name__ == "__main__":
    main()
