"""`fedpipe notebooks RUNS --out DIR`: execute the analysis notebooks headless (nbclient, installed by
scripts/setup.sh; no Jupyter server or `jupyter` command needed), with their parameters runs_dir and out_dir
set, so each writes its figure or tables into DIR; the executed notebooks, outputs included, go there too.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "analysis"


def notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))


def run_notebooks(runs: str | Path, out: str | Path, names: list[str] | None = None, log=print) -> list[Path]:
    """Execute each notebook (all by default) on the runs below `runs` (a folder or one results.h5), writing
    into `out`. Returns the executed notebooks' paths; a notebook that fails raises with its error."""
    try:
        import nbclient
        import nbformat
    except ImportError:
        raise UserInputError("fedpipe notebooks needs nbclient, nbformat and ipykernel: pip install -e .[analysis] "
                             "(scripts/setup.sh installs them)") from None
    available = notebook_names()
    if not available:
        raise UserInputError(f"fedpipe notebooks: no notebooks in {NOTEBOOK_DIR} (they ship with the repository; "
                             "use an editable install of a checkout)")
    unknown = sorted(set(names or []) - set(available))
    if unknown:
        raise UserInputError(f"fedpipe notebooks: no notebook {unknown}; choose from {available}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or available:
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        if len(cells) != 1:
            raise UserInputError(f"fedpipe notebooks: {name}.ipynb has no single cell tagged `parameters`")
        cells[0].source = f"runs_dir = {str(Path(runs).resolve())!r}\nout_dir = {str(out)!r}"
        log(f"notebooks: {name}")
        try:
            # the kernel's own log level: its warning about local TCP sockets is not the user's to act on
            nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", extra_arguments=[
                "--IPKernelApp.log_level=ERROR"], resources={"metadata": {"path": str(out)}}).execute()
        finally:  # the executed notebook, with its outputs (or the error), beside the figures
            nbformat.write(nb, out / f"{name}.ipynb")
        written.append(out / f"{name}.ipynb")
    return written
