"""Writes the notebooks in this folder (run it after changing one: `python analysis/build_notebooks.py`).

Each notebook takes the folder of runs as a parameter (first cell, tagged `parameters` for papermill),
rebuilds one of the paper's figures or its tables from the results.h5 files alone through
fedpipe_dist.analysis (the same code as `fedpipe report`), says which runs are missing, and writes its PNG.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
PARAMS = '''# Parameters: the folder holding the runs (any depth; every results.h5 below it is read) and where the
# figures go. Make runs with e.g. `fedpipe run jobs/e2e_stories260k.yaml method=lora output.dir=runs/hetero/lora`.
runs_dir = "../runs"
out_dir = "figures"  # headless: fedpipe notebooks RUNS_DIR --out DIR sets both'''
LOAD = '''from pathlib import Path

from fedpipe_dist.analysis import figures, load_runs

runs = load_runs(runs_dir)
Path(out_dir).mkdir(parents=True, exist_ok=True)
print(f"{len(runs)} run(s) in {runs_dir}:", ", ".join(r.name for r in runs) or "none")'''

FIGURES = {
    "fig13_quality": ("Fig. 13: converged quality per method, heterogeneous vs ideal servers",
                      "Final eval perplexity (and BLEU where a run scored generations) of each method's run on "
                      "heterogeneous servers (`clients.slowdown`/`memory_gb` differ) and on ideal ones "
                      "(all slowdown 1, equal memory)."),
    "fig14_trainable": ("Fig. 14: trainable parameters per method",
                        "Trainable parameters per server that completed a round (HDF5 clients/trainable_params), "
                        "on heterogeneous servers, log scale: one dot per method at its mean over runs (seeds), "
                        "labelled with the value; an error bar spans the min-max over seeds where there are two "
                        "or more."),
    "fig15_convergence": ("Fig. 15: convergence",
                          "Eval loss after every evaluated round, against the round and against rank 0's cumulative "
                          "wall-clock, on heterogeneous servers."),
    "fig16_ablations": ("Fig. 16: ablations of FedPipe",
                        "(a) importance-selected weights (platon) vs a fixed order or random choice "
                        "(`plan.importance`), (b) adaptive ranks vs fixed ones (`plan.mode=uniform`), (c) the base "
                        "precision (`clients.precision`)."),
    "fig_time_to_quality": ("Time to quality under heterogeneity",
                            "Eval loss against training time (each round: its slowest server; evaluation left "
                            "out), one panel per heterogeneity profile: every method's mean over seeds with its "
                            "min-max band, and the compute bound's ideal curve: LoRA's curve with its time divided "
                            "by the bound B = sum_i (1/s_i) / (N / max_i s_i), the most a method that leaves no "
                            "server idle could speed up sample throughput on slowdowns s_i. "
                            "`benchmarks/time_to_quality.py` makes such runs."),
}


def figure_notebook(name: str, title: str, text: str):
    return new_notebook(cells=[
        new_markdown_cell(f"# {title}\n\n{text} Built from results.h5 files alone; runs that are missing are "
                          "named below instead of failing."),
        new_code_cell(PARAMS, metadata={"tags": ["parameters"]}),
        new_code_cell(LOAD.replace("from pathlib import Path\n", "from pathlib import Path\n\nfrom IPython.display "
                                   "import Image\n", 1)),
        new_code_cell(f'fig, missing = figures.{name}(runs)\nfor m in missing:\n    print("missing:", m)\n'
                      f'png = Path(out_dir) / "{name}.png"\nfig.savefig(png, dpi=200)\n'
                      'fig.savefig(png.with_suffix(".pdf"))  # vector, for papers\n'
                      "Image(filename=str(png))  # embedded in the notebook (a headless kernel shows no figure "
                      "itself)"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def tables_notebook():
    return new_notebook(cells=[
        new_markdown_cell("# Tables II-V\n\nII: methods (trainable parameters, bytes per round, eval loss/PPL, E2E "
                          "scores where present, wall-clock, under-training); III: weight selection; IV: adaptive vs "
                          "fixed ranks; V: base precision (memory of the base vs fp32). Rebuilt from results.h5, one "
                          "section per cohort (model, dataset, rounds); each row the mean over its seeds."),
        new_code_cell(PARAMS, metadata={"tags": ["parameters"]}),
        new_code_cell(LOAD),
        new_code_cell("from IPython.display import Markdown, display\n\n"
                      "text, missing = figures.tables_markdown(runs)  # every cohort's tables, each headed by it\n"
                      "for m in missing:\n    print('missing:', m)\n"
                      "(Path(out_dir) / 'tables.md').write_text(text)\n"
                      "display(Markdown(text))"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


if __name__ == "__main__":
    for name, (title, text) in FIGURES.items():
        nbformat.write(figure_notebook(name, title, text), HERE / f"{name}.ipynb")
    nbformat.write(tables_notebook(), HERE / "tables.ipynb")
    print("wrote", ", ".join(sorted(p.name for p in HERE.glob("*.ipynb"))))
