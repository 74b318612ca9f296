"""Layer: analysis/ and `fedpipe report`: the paper's figures and tables rebuilt from results.h5 files of
short real runs (the session fixture `analysis_runs` in conftest.py), and the notebooks executed headless.
Issue 6, acceptance 3.

Run: .venv/bin/python -m pytest tests/test_analysis.py -q      (about 2 minutes: the runs, then the plots)
"""

import subprocess
import sys

import pytest

from fedpipe_dist.analysis import figures, load_runs

from ._util import REPO, subprocess_env


def test_runs_are_classified_from_their_hdf5(analysis_runs):
    runs = {r.name: r for r in load_runs(analysis_runs)}
    assert len(runs) == 16
    assert runs["hetero/ft"].setting == "hetero" and runs["ideal/ft"].setting == "ideal"
    assert runs["ablation/importance_random"].importance == "random"
    assert runs["ablation/fixed_rank4"].plan_mode == "uniform"
    assert runs["ablation/precision_nf4"].precision == "nf4" and runs["ablation/precision_fp32"].precision == "fp32"
    assert runs["hetero/ft"].trainable_params() > 10 * runs["hetero/lora"].trainable_params()  # 149,440 vs 8,192


def test_tables_from_runs(analysis_runs):
    runs = load_runs(analysis_runs)
    t2, missing = figures.table2_methods(runs)
    assert missing == []
    rows = [line for line in t2.splitlines()[2:]]
    assert [r.split("|")[1].strip() for r in rows] == list(figures.METHOD_ORDER)
    abl, missing = figures.tables_ablations(runs)
    assert missing == []
    assert "| nf4 |" in abl["V"] and "| fp32 |" in abl["V"] and "1.000x" in abl["V"]  # fp32 is its own reference
    first_cells = {r.split("|")[1].strip() for r in abl["III"].splitlines()}
    assert {"platon", "fixed", "random"} <= first_cells


def test_missing_runs_are_named_not_fatal(analysis_runs, tmp_path):
    runs = [r for r in load_runs(analysis_runs) if r.name.startswith("hetero/")]
    fig, missing = figures.fig13_quality(runs)
    assert any("no ideal run for: fedpipe, ft, lora, fedadapter" in m for m in missing)
    fig, missing = figures.fig16_ablations(runs)
    assert any("weights" in m and "fixed, random" in m for m in missing)
    assert all(ax.get_lines() for ax in fig.axes)  # a panel only where an ablation has runs: none empty
    both = [r for r in load_runs(analysis_runs) if r.name.startswith("hetero/") or r.name == "ideal/fedpipe"]
    fig, _ = figures.fig13_quality(both)  # a method with a bar in one setting only is named on the figure
    assert any("in one setting only" in n and "lora (heterogeneous)" in n for n in fig.fedpipe_notes)


def test_fedpipe_report_writes_every_figure(analysis_runs, tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "report", str(analysis_runs), "--out", str(tmp_path)],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for name in figures.FIGURES:
        png = tmp_path / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert (tmp_path / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    text = (tmp_path / "tables.md").read_text()
    assert "Table II" in text and "Table V" in text and "Missing runs" not in text


def test_report_on_a_folder_without_runs_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "report", str(tmp_path)], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no results.h5" in p.stderr and "Traceback" not in p.stderr


def test_time_to_quality_figure_and_training_time(analysis_runs):
    """Training time per round leaves evaluation out and, with every server in one process, is the slowest
    server's local time plus the process's time outside training; the figure draws each method and the
    compute bound's ideal curve (LoRA's time divided by sum(1/s) / (N / max s) = 1.875 for [1, 1.5, 2, 3])."""
    import numpy as np

    from fedpipe_dist.analysis.runs import compute_bound, round_train_s

    assert compute_bound([1, 1.5, 2, 3]) == pytest.approx(1.875)
    assert compute_bound([1, 1, 1.5, 2, 2, 3, 4, 6]) == pytest.approx(53 / 16)
    runs = {r.name: r for r in load_runs(analysis_runs)}
    res = runs["hetero/lora"].results
    t = round_train_s(res)
    local, rows = res.clients["local_s"], res.rounds
    assert t[0] == 0.0
    assert np.all(t[1:] >= np.nanmax(local[1:], axis=1))  # at least the slowest server
    assert np.all(t[1:] <= rows["wall_s"][1:] - rows["eval_s"][1:] + 1e-9)  # never the evaluation
    assert np.all(rows["eval_s"][1:] > 0)
    assert runs["hetero/fedpipe"].label == "fedpipe" and runs["hetero/lora"].label == "lora"
    fig, missing = figures.fig_time_to_quality(list(runs.values()))
    assert missing == []
    assert any("5 other fedpipe setup(s)" in t.get_text() for t in fig.texts)  # the ablations: said, not drawn
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "compute bound: lora's time / 1.88 (no server idle)" in labels
    assert "fedpipe (n=1)" in labels and "lora (n=1)" in labels
    fig, missing = figures.fig_time_to_quality([runs["hetero/fedpipe"]])
    assert missing == ["no heterogeneous lora run (the reference for the compute bound)"]


NOTEBOOKS = ["fig13_quality", "fig14_trainable", "fig15_convergence", "fig16_ablations", "fig_time_to_quality",
             "tables"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_headless_and_writes_its_output(analysis_runs, tmp_path, name):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e .[test])")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e .[test])")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e .[test])")
    nb = nbformat.read(REPO / "analysis" / f"{name}.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f"runs_dir = {str(analysis_runs)!r}\nout_dir = {str(tmp_path / 'out')!r}"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "16 run(s)" in outputs and "Traceback" not in outputs
    written = tmp_path / "out" / (f"{name}.png" if name != "tables" else "tables.md")
    assert written.is_file() and written.stat().st_size > 1000
    if name != "tables":  # the figure is in the notebook itself, and as a vector PDF beside the PNG
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert len(images) == 1 and written.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_notebook_names_missing_runs(tmp_path):
    """An empty folder of runs: the notebook still runs and says what is missing."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e .[test])")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e .[test])")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e .[test])")
    nb = nbformat.read(REPO / "analysis" / "fig13_quality.ipynb", as_version=4)
    next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source = \
        f"runs_dir = {str(tmp_path)!r}\nout_dir = {str(tmp_path / 'out')!r}"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "0 run(s)" in outputs and "missing: no heterogeneous run for: fedpipe" in outputs


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory):
    """Two seeds of fedpipe and of lora at 2 rounds, and one lora run at 3 rounds (another cohort)."""
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.job import load_job
    from fedpipe_dist.runtime.engine import run_job

    from .conftest import ANALYSIS_SMALL

    root = tmp_path_factory.mktemp("seeded_runs")
    points = {f"{m}_s{s}": [f"method={m}", f"seed={s}", "rounds=2"] for m in ("fedpipe", "lora") for s in (0, 1)}
    points["long/lora_s0"] = ["method=lora", "seed=0", "rounds=3"]
    for name, extra in points.items():
        cfg = load_job("jobs/quickstart.yaml", [*ANALYSIS_SMALL, *extra, f"output.dir={root / name}",
                                                "output.save_final=false"])
        run_job(cfg, LocalComm(), show_progress=False)
    return root


def test_seeds_are_aggregated_and_cohorts_never_mixed(seeded_runs, tmp_path):
    runs = load_runs(seeded_runs)
    t2, _ = figures.table2_methods(runs)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in t2.splitlines()[2:]}
    assert set(rows) == {"fedpipe", "lora"} and rows["lora"][1] == "2"  # the 2-round cohort: 2 seeds each
    loss = {r.name: r.final_loss() for r in runs}
    lo, hi = sorted([loss["lora_s0"], loss["lora_s1"]])
    assert rows["lora"][5] == f"{(lo + hi) / 2:.4f} [{lo:.4f}, {hi:.4f}]"  # mean [min, max] over the seeds
    fig, _ = figures.fig15_convergence(runs)
    assert fig.fedpipe_runs == ["fedpipe_s0", "fedpipe_s1", "lora_s0", "lora_s1"]
    assert any("long/lora_s0" not in n and "3 rounds" in n for n in fig.fedpipe_notes)  # named, not drawn
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {"fedpipe (n=2)", "lora (n=2)"}
    written = figures.write_report(runs, tmp_path, log=lambda m: None)
    text = (tmp_path / "tables.md").read_text()
    assert text.count("### Table II: methods, heterogeneous servers; tiny-gpt2 on synthetic-e2e, 2 rounds") == 1
    assert text.count("### Table II: methods, heterogeneous servers; tiny-gpt2 on synthetic-e2e, 3 rounds") == 1
    other = tmp_path / "tiny-gpt2_on_synthetic-e2e_3_rounds"
    assert (other / "fig15_convergence.png").is_file() and "fig15_convergence (tiny-gpt2 on synthetic-e2e, 3 rounds)" \
        in written
    assert (tmp_path / "fig15_convergence.runs.txt").read_text().splitlines()[1:5] == [
        "fedpipe_s0", "fedpipe_s1", "lora_s0", "lora_s1"]
    assert (other / "fig15_convergence.runs.txt").read_text().splitlines()[1] == "long/lora_s0"


def test_report_accepts_one_results_file(seeded_runs, tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "report", str(seeded_runs / "lora_s1" / "results.h5"),
                        "--out", str(tmp_path)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "fig13_quality.runs.txt").read_text().splitlines()[1:] == ["lora_s1"]


def test_fedpipe_notebooks_executes_them_headless_into_out(seeded_runs, tmp_path):
    """The documented headless command: no jupyter executable, parameters on the command line, outputs in --out
    (nothing written into the source tree)."""
    pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e .[analysis])")
    before = sorted(p.name for p in (REPO / "analysis").iterdir())
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "notebooks", str(seeded_runs), "--out",
                        str(tmp_path / "nb"), "--only", "fig15_convergence", "tables"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "IPKernelApp" not in p.stderr  # the kernel's warnings are not the user's to act on
    assert (tmp_path / "nb" / "fig15_convergence.png").stat().st_size > 10_000
    assert "Table II" in (tmp_path / "nb" / "tables.md").read_text()
    assert (tmp_path / "nb" / "tables.ipynb").is_file() and "5 run(s)" in (tmp_path / "nb" / "tables.ipynb").read_text()
    assert sorted(p.name for p in (REPO / "analysis").iterdir()) == before
    bad = subprocess.run([sys.executable, "-m", "fedpipe_dist", "notebooks", str(seeded_runs), "--only", "fig99"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no notebook ['fig99']" in bad.stderr


def test_a_method_outside_the_papers_list_is_drawn_not_dropped(analysis_runs):
    runs = [r for r in load_runs(analysis_runs) if r.name.startswith(("hetero/", "ideal/"))]
    plugin = next(r for r in runs if r.name == "hetero/lora")
    plugin.results.attrs["method"] = "myplugin"  # as a method added in one file (tests/test_method_plugin.py)
    fig, _ = figures.fig13_quality(runs)
    labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert "myplugin" in labels, labels
