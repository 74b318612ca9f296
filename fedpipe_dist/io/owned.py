"""What the project writes in output.dir, so that it deletes nothing else.

A fresh run (or output.overwrite=true) replaces an earlier run's files; it must never take a user's files
with them. The project's names in output.dir:

    results.h5, results.h5.tmp       the results (io/hdf5.py)
    checkpoint/round*.{rank*of*.pt,results.h5}[.sha256][.tmp]   checkpoints (io/checkpoint.py)
    final/ (its files listed in final/.fedpipe-files), final.tmp/   the exported model (runtime/outputs.py)
    generations.txt, wire_audit/                       written in place, never deleted by a fresh run
    rounds.csv, tensorboard/           live views of results.h5 (io/sinks.py), rewritten by a fresh run
    .fedpipe.lock                      removed by the job that holds it when it ends (io/lock.py)
    .fedpipe.probe-*                   one per rank at the start, removed at once (runtime/outputs.check_shared_dir)

`foreign_files` lists what else sits in the two folders a fresh run clears (checkpoint/ and final/): a run
refuses to start beside them unless output.foreign_files=keep, and then `remove_checkpoints`,
`remove_results` and `publish_final` leave them in place. Files at the top of output.dir are never deleted,
whoever wrote them (a job file or a Slurm log kept beside the results is fine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import suppress
from pathlib import Path

MANIFEST = ".fedpipe-files"
_CHECKPOINT_FILE = re.compile(r"round\d{6}\.(rank\d{4}of\d{4}\.pt|results\.h5)(\.sha256)?(\.tmp)?$")


def _files_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir())


def _manifest(final_dir: Path) -> set[str]:
    """The files of final/ the project wrote (paths relative to final/); empty when no readable list."""
    try:
        names = json.loads((final_dir / MANIFEST).read_text())["files"]
        return {n for n in names if isinstance(n, str) and not Path(n).is_absolute() and ".." not in Path(n).parts}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def foreign_files(out: Path) -> list[Path]:
    """Files in out/checkpoint/ and out/final/ that the project did not write."""
    found = []
    ckpt = out / "checkpoint"
    if ckpt.is_dir():
        found += [p for p in _files_below(ckpt) if p.parent != ckpt or not _CHECKPOINT_FILE.match(p.name)]
    elif ckpt.exists() or ckpt.is_symlink():
        found.append(ckpt)
    final = out / "final"
    if final.is_dir():
        own = _manifest(final) | {MANIFEST}
        found += [p for p in _files_below(final) if str(p.relative_to(final)) not in own]
    elif final.exists() or final.is_symlink():
        found.append(final)
    return found


def describe(paths: list[Path], shown: int = 8) -> str:
    names = ", ".join(repr(str(p)) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _unlink_own(folder: Path, names) -> None:
    """Delete these files of `folder` (relative paths), then the folders they leave empty, `folder` included."""
    for name in names:
        path = folder / name
        with suppress(OSError):
            path.unlink()
        while path.parent != folder:
            path = path.parent
            with suppress(OSError):  # not empty: it holds something else
                path.rmdir()
    with suppress(OSError):
        folder.rmdir()


def remove_checkpoints(out: Path) -> None:
    """Delete an earlier run's checkpoint files (each rank: a node's own disk may hold them); nothing else."""
    ckpt = out / "checkpoint"
    if ckpt.is_dir():  # (a link to a folder elsewhere: its files go, the link stays)
        _unlink_own(ckpt, [p.name for p in ckpt.iterdir() if _CHECKPOINT_FILE.match(p.name) and p.is_file()])


def remove_results(out: Path) -> None:
    """Delete an earlier run's results.h5 and final/ files (rank 0, once the new run is set up); nothing else."""
    with suppress(OSError):
        (out / "results.h5").unlink(missing_ok=True)
    final = out / "final"
    if final.is_dir():
        _unlink_own(final, sorted(_manifest(final) | {MANIFEST}))
    shutil.rmtree(out / "final.tmp", ignore_errors=True)


def publish_final(tmp: Path, final: Path) -> None:
    """Make the complete folder `tmp` the new final/: its file list is written into it, the earlier run's
    final/ files are replaced, and files of final/ the project did not write stay where they are."""
    files = [str(p.relative_to(tmp)) for p in _files_below(tmp)]
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
    if final.is_dir():
        _unlink_own(final, sorted(_manifest(final) | {MANIFEST}))
    if not final.exists():
        tmp.rename(final)  # the usual case: one rename, final/ is whole or absent
        return
    for name in [*files, MANIFEST]:  # foreign files remain: ours move in beside them, the list last
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, final / name)
    shutil.rmtree(tmp, ignore_errors=True)
