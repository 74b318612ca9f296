"""Layer: results.h5's rows (issue 30). Adding a column to rounds/ is two lines: its name and type in
io/schema.py and the line in runtime/record.round_row that produces its value. The test makes exactly those two
edits in a copy of the package, runs a job with the copy, and finds the new column in results.h5, filled in
every row; nothing else (the writer, the reader, resume) is told about it.

Run: .venv/bin/python -m pytest tests/test_results_column.py -q      (about 20 s)
"""

import shutil
import subprocess
import sys

import numpy as np

from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, SMALL_RUN, subprocess_env


def _insert_after(path, anchor: str, line: str) -> None:
    """Put `line` after the line that starts with `anchor` (which must be unique)."""
    lines = path.read_text().splitlines(keepends=True)
    at = [i for i, x in enumerate(lines) if x.startswith(anchor)]
    assert len(at) == 1, f"{path.name}: the anchor {anchor!r} moved; update the test"
    lines.insert(at[0] + 1, line + "\n")
    path.write_text("".join(lines))


def test_a_new_results_column_is_the_schema_line_plus_the_line_that_makes_it(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "fedpipe_dist", src / "fedpipe_dist", ignore=shutil.ignore_patterns("__pycache__"))
    _insert_after(src / "fedpipe_dist" / "io" / "schema.py", '    "n_rejected": "i4",',
                  '    "samples_total": "i8",  # added by tests/test_results_column.py')
    _insert_after(src / "fedpipe_dist" / "runtime" / "record.py",
                  '        "under_training_rate": (1.0 - len(done) / n_selected) if n_selected else math.nan,',
                  '        "samples_total": sum(s.samples for s in done),')
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "run", str(REPO / "jobs" / "quickstart.yaml"),
                        *SMALL_RUN, f"output.dir={out}", "--no-progress"], cwd=src, capture_output=True, text=True,
                       env=subprocess_env(PYTHONPATH=str(src)), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{src / 'fedpipe_dist'}" in subprocess.run(
        [sys.executable, "-c", "import fedpipe_dist; print(fedpipe_dist.__file__)"], cwd=src, capture_output=True,
        text=True, env=subprocess_env(PYTHONPATH=str(src))).stdout  # the job ran the edited copy
    r = Results(out / "results.h5")
    assert "samples_total" in r.rounds and r.n_rounds == 3
    np.testing.assert_array_equal(r.rounds["samples_total"], r.clients["samples"].sum(axis=1))
    assert (r.rounds["samples_total"][1:] > 0).all() and r.rounds["samples_total"][0] == 0  # row 0: the base
