"""Issue 28, item 1: a run deletes only what the project wrote (io/owned.py). Files a user left in
output.dir/checkpoint/ or output.dir/final/ make a run refuse to start (exit 2, naming them) unless
output.foreign_files=keep, and even then they stay, byte for byte, also through a symlinked folder.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_foreign_files.py -q      (about 1 minute on 2 cores)
"""

import json

import pytest

from fedpipe_dist.cli import main
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.io.owned import MANIFEST, foreign_files, publish_final, remove_checkpoints, remove_results

from ._util import SMALL_RUN

QUICK = [*SMALL_RUN, "rounds=1"]


def _run(out, *extra) -> int:
    return main(["run", "jobs/quickstart.yaml", *QUICK, f"output.dir={out}", "--no-progress", *extra])


def _plant(out):
    """A user's files where an earlier run's would be (and a folder with no results.h5, as in the report)."""
    files = {out / "checkpoint" / "my_model_epoch9.pt": b"weights of another project",
             out / "final" / "notes.txt": b"what I learned",
             out / "final" / "sub" / "more.bin": b"\x00\x01"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _intact(files):
    return all(p.is_file() and p.read_bytes() == data for p, data in files.items())


def test_fresh_run_refuses_a_folder_with_foreign_files_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    files = _plant(out)
    assert _run(out) == 2
    err = capsys.readouterr().err
    for name in ("my_model_epoch9.pt", "notes.txt", "more.bin", "output.foreign_files=keep"):
        assert name in err, err
    assert _intact(files) and not (out / "results.h5").exists()


def test_keep_runs_beside_foreign_files_and_leaves_them(tmp_path):
    out = tmp_path / "run"
    files = _plant(out)
    assert _run(out, "output.foreign_files=keep") == 0
    assert _intact(files)
    assert (out / "final" / "config.json").is_file() and (out / "final" / MANIFEST).is_file()
    assert any(p.name.endswith(".pt") and p.name.startswith("round") for p in (out / "checkpoint").iterdir())
    # the run's own files are not foreign; the user's still are
    assert sorted(p.name for p in foreign_files(out)) == ["more.bin", "my_model_epoch9.pt", "notes.txt"]
    # an overwrite replaces the run's own files (a new run id) and again leaves the user's
    first = Results(out / "results.h5").attrs["run_id"]
    assert _run(out, "output.overwrite=true", "output.foreign_files=keep") == 0
    assert _intact(files) and Results(out / "results.h5").attrs["run_id"] != first
    listed = json.loads((out / "final" / MANIFEST).read_text())["files"]
    assert "config.json" in listed and "notes.txt" not in listed


def test_overwrite_of_a_finished_run_replaces_only_its_own_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    assert foreign_files(out) == []
    assert _run(out, "output.overwrite=true") == 0  # the run's own files are not in the way
    (out / "final" / "notes.txt").write_bytes(b"mine")  # a note added to a finished run's final/
    capsys.readouterr()
    assert _run(out, "output.overwrite=true") == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "final" / "notes.txt").read_bytes() == b"mine" and (out / "final" / "config.json").is_file()


def test_symlinked_checkpoint_folder_keeps_its_foreign_files(tmp_path, capsys):
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    (elsewhere / "my_model_epoch9.pt").write_bytes(b"keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    assert _run(out) == 2
    assert "my_model_epoch9.pt" in capsys.readouterr().err
    assert _run(out, "output.foreign_files=keep") == 0
    assert (elsewhere / "my_model_epoch9.pt").read_bytes() == b"keep me"
    assert (out / "checkpoint").is_symlink()
    assert any(p.name.startswith("round") for p in elsewhere.iterdir())  # the run's checkpoints went there


def test_a_list_that_names_paths_outside_final_deletes_nothing_there(tmp_path):
    """final/'s file list is read from disk: names that leave final/ (absolute, ..) are never followed."""
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    (out / "final" / MANIFEST).write_text(json.dumps({"files": [str(victim), "../../victim.txt"]}))
    remove_results(out)
    remove_checkpoints(out)
    assert victim.read_text() == "x"


def test_publish_final_moves_in_beside_foreign_files(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / "final.tmp"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    (tmp / "nested").mkdir()
    (tmp / "nested" / "w.bin").write_bytes(b"1")
    publish_final(tmp, final)
    assert not tmp.exists()
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()) == \
        sorted([MANIFEST, "config.json", "nested/w.bin", "notes.txt"])
    remove_results(tmp_path)  # an overwrite removes what was published, and only that
    assert [p.name for p in final.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name", ["round000001.rank0000of0001.pt", "round000001.results.h5.sha256",
                                  "round000002.rank0003of0004.pt.tmp", "round000001.results.h5.tmp"])
def test_checkpoint_names_the_project_writes_are_its_own(tmp_path, name):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / name).write_text("")
    assert foreign_files(tmp_path) == []
    remove_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoint").exists()
