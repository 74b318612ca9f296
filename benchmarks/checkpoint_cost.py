"""What per-round checkpoints cost: bytes on disk per rank, seconds per save, and the run's wall-clock with
checkpoints on vs off (a ratio measured in one process, the two variants interleaved).

One process hosts every server (world size 1), so a save here writes the only rank's file plus rank 0's
results.h5 snapshot. Models: the built-in tiny GPT-2 and, with --stories-path, the pretrained stories260K
(Llama architecture), each at fp32 and at nf4 (an NF4 base saves its merged residual instead of weights).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_cost.py                      # about 2 minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_cost.py \\
        --stories-path ../shared/data/models/stories260K-hf

Output: Markdown on stdout and JSON at --out (default benchmarks/out/checkpoint_cost.json).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._jobs import write_json  # noqa: E402
from fedpipe_dist.comm.local import LocalComm  # noqa: E402
from fedpipe_dist.io import checkpoint  # noqa: E402
from fedpipe_dist.job import load_job  # noqa: E402
from fedpipe_dist.runtime.engine import run_job  # noqa: E402

COMMON = ["clients.slowdown=1", "clients.tflops=[1,2,3,4]", "train.local_steps=2", "train.batch_max=4",
          "data.synthetic_train_size=96", "data.synthetic_eval_size=16", "eval.max_samples=16",
          "model.max_length=64", "output.save_final=false", "output.overwrite=true"]


def one_run(overrides: list[str], out: Path, enabled: bool) -> dict:
    saves: list[float] = []
    original = checkpoint.CheckpointDir.save

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        original(self, *a, **k)
        saves.append(time.perf_counter() - t0)

    checkpoint.CheckpointDir.save = timed
    try:
        cfg = load_job("jobs/quickstart.yaml", [*COMMON, *overrides, f"output.dir={out}",
                                                f"checkpoint.enabled={str(enabled).lower()}"])
        t0 = time.perf_counter()
        run_job(cfg, LocalComm(), show_progress=False)
        wall = time.perf_counter() - t0
    finally:
        checkpoint.CheckpointDir.save = original
    files = sorted((out / "checkpoint").glob("*")) if enabled else []
    rank_files = [f for f in files if f.suffix == ".pt"]
    snaps = [f for f in files if f.name.endswith(".results.h5")]
    return dict(wall_s=wall, saves=len(saves), save_s_median=sorted(saves)[len(saves) // 2] if saves else 0.0,
                rank_file_bytes=rank_files[-1].stat().st_size if rank_files else 0,
                results_snapshot_bytes=snaps[-1].stat().st_size if snaps else 0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="on/off pairs per setting (interleaved)")
    ap.add_argument("--stories-path", help="stories260K-hf folder (adds the pretrained Llama-architecture model)")
    ap.add_argument("--runs", default=str(REPO / "benchmarks" / "out" / "checkpoint_cost"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "checkpoint_cost.json"))
    args = ap.parse_args(argv)
    models = {"tiny-gpt2": ["model.name_or_path=tiny-gpt2"]}
    if args.stories_path:
        models["stories260K"] = [f"model.name_or_path={args.stories_path}"]
    rows = []
    for name, model_args in models.items():
        for precision in ("fp32", "nf4"):
            overrides = [*model_args, f"clients.precision={precision}", f"rounds={args.rounds}"]
            on, off = [], []
            warm = Path(args.runs) / f"{name}-{precision}-warmup"  # first-run costs (imports, caches) go here
            one_run(overrides, warm, False)
            shutil.rmtree(warm, ignore_errors=True)
            for _ in range(args.repeats):
                for enabled, sink in ((True, on), (False, off)):
                    out = Path(args.runs) / f"{name}-{precision}-{'on' if enabled else 'off'}"
                    sink.append(one_run(overrides, out, enabled))
                    shutil.rmtree(out, ignore_errors=True)
            rows.append(dict(model=name, precision=precision, rounds=args.rounds,
                             wall_ratio_on_off=sum(r["wall_s"] for r in on) / sum(r["wall_s"] for r in off),
                             save_share_of_wall=on[-1]["saves"] * on[-1]["save_s_median"] / on[-1]["wall_s"],
                             **{k: on[-1][k] for k in ("saves", "save_s_median", "rank_file_bytes",
                                                       "results_snapshot_bytes")}))
    doc = dict(command=" ".join(sys.argv), results=rows)
    write_json(args.out, doc)
    print("| model | base | rank checkpoint KiB | results.h5 snapshot KiB | save ms (median) | saves / wall | "
          "wall on/off |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['rank_file_bytes'] / 1024:.0f} | "
              f"{r['results_snapshot_bytes'] / 1024:.0f} | {1000 * r['save_s_median']:.1f} | "
              f"{100 * r['save_share_of_wall']:.1f} % | {r['wall_ratio_on_off']:.3f} |")
    return doc


if __name__ == "__main__":
    main()
