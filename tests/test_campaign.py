"""Layer: campaigns (fedpipe_dist/campaign.py, `fedpipe sweep`): a sweep file's points run one after another in
subprocesses, finished points are skipped, interrupted or extended ones resume, bad sweeps fail before anything
runs. The job-array path is in test_slurm.py. About a minute.

Run: .venv/bin/python -m pytest tests/test_campaign.py -q
"""

import subprocess
import sys

import pytest
import yaml

from fedpipe_dist.campaign import load_campaign, state
from fedpipe_dist.config import UserInputError
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.job import load_job

from ._util import REPO, SMALL_RUN, subprocess_env


def _sweep_file(tmp_path, rounds: int, **extra) -> str:
    spec = {"base": str(REPO / "jobs" / "quickstart.yaml"), "out": str(tmp_path / "camp"),
            "overrides": [*[o for o in SMALL_RUN if not o.startswith("rounds=")], f"rounds={rounds}"],
            "sweeps": [{"axes": {"method": ["fedpipe", "lora"], "seed": [0, 1]}}], **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _fedpipe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedpipe_dist", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


def test_points_names_and_overrides_come_from_the_axes(tmp_path):
    c = load_campaign(_sweep_file(tmp_path, 1))
    assert [p.name for p in c.points] == ["method-fedpipe_seed-0", "method-fedpipe_seed-1", "method-lora_seed-0",
                                          "method-lora_seed-1"]
    cfg = load_job(c.base, c.points[3].overrides)
    assert (cfg.method, cfg.seed, cfg.rounds, cfg.output.dir) == ("lora", 1, 1, str(tmp_path / "camp" /
                                                                                     "method-lora_seed-1"))
    assert all(state(c, p) == "todo" for p in c.points)
    named = load_campaign(_sweep_file(tmp_path, 1, sweeps=[{"axes": {
        "setting": {"ideal": ["clients.slowdown=1", "clients.memory_gb=24"], "heterogeneous": []},
        "lora.client_ranks": [[8, 4, 4, 2]], "method": ["flora"]}}]))
    assert [p.name for p in named.points] == ["setting-ideal_lora.client-ranks-8-4-4-2_method-flora",
                                              "setting-heterogeneous_lora.client-ranks-8-4-4-2_method-flora"]
    assert load_job(named.base, named.points[0].overrides).lora.client_ranks == [8, 4, 4, 2]


@pytest.mark.parametrize("spec, message", [
    ({"sweeps": [{"axes": {"method": ["fedpipe", "nope"]}}]}, "point method-nope: method: unknown method"),
    ({"sweeps": [{"axes": {"method": []}}]}, "must be a non-empty list"),
    ({"sweeps": []}, "needs `base`"),
    ({"overrides": ["rounds"]}, "dotted.key=value"),
    ({"typo": 1}, "unknown keys \\['typo'\\]"),
])
def test_a_bad_sweep_fails_before_anything_runs_and_names_the_problem(tmp_path, spec, message):
    with pytest.raises(UserInputError, match=message):
        load_campaign(_sweep_file(tmp_path, 1, **spec))
    assert not (tmp_path / "camp").exists()


def test_sweep_runs_every_point_then_skips_them_and_resumes_when_rounds_grow(tmp_path):
    two = {"sweeps": [{"axes": {"method": ["fedpipe", "lora"], "seed": [1]}}]}  # two points keep it short
    sweep = _sweep_file(tmp_path, 1, **two)
    camp = tmp_path / "camp"
    # a leftover of an attempt that died before its first checkpoint: replaced, not resumed
    (camp / "method-lora_seed-1").mkdir(parents=True)
    (camp / "method-lora_seed-1" / "results.h5").write_bytes(b"not hdf5")
    r = _fedpipe("sweep", sweep)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 of 2 points done; running 2" in r.stderr
    for method in ("fedpipe", "lora"):
        res = Results(camp / f"method-{method}_seed-1" / "results.h5")
        assert res.attrs["finished"] and res.n_rounds == 1 and res.attrs["method"] == method
        assert '"seed": 1' in res.attrs["config_json"]
    stamp = (camp / "method-fedpipe_seed-1" / "results.h5").stat().st_mtime_ns
    r = _fedpipe("sweep", sweep)  # everything is done: nothing runs
    assert r.returncode == 0 and "2 of 2 points done; running 0" in r.stderr
    assert (camp / "method-fedpipe_seed-1" / "results.h5").stat().st_mtime_ns == stamp
    sweep = _sweep_file(tmp_path, 2, **two)  # the campaign grows to 2 rounds: every point continues from its checkpoint
    listing = _fedpipe("sweep", sweep, "--list")
    assert listing.stdout.count("] partial ") == 2, listing.stdout
    r = _fedpipe("sweep", sweep)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("(resuming)") == 2
    res = Results(camp / "method-lora_seed-1" / "results.h5")
    assert res.attrs["finished"] and res.n_rounds == 2 and list(res.rounds["round"]) == [0, 1, 2]
    assert "2 done, 0 partial, 0 to do" in r.stdout
    # one array task's view: its point's arguments, or nothing when done
    assert _fedpipe("sweep", sweep, "--point", "1", "--args").stdout == ""
    bad = _fedpipe("sweep", sweep, "--point", "9", "--args")
    assert bad.returncode == 2 and "points 0..1" in bad.stderr


def test_a_point_done_since_the_list_was_made_or_held_by_another_sweep_is_not_run(tmp_path):
    """Issue 28, item 3: two sweep processes on one file. A point the first finished while the second's to-do
    list was stale is read again under the point's lock and skipped (it used to run again with
    output.overwrite=true, replacing results.h5 and final/); a point another sweep holds is skipped."""
    from fedpipe_dist.campaign import point_lock, run_local

    c = load_campaign(_sweep_file(tmp_path, 1))
    p, q = c.points[0], c.points[1]
    stale = [p, q]  # the second process's list, made before the first finished p
    assert run_local(c, todo=[p], log=lambda m: None) == 0
    assert state(c, p) == "done"
    before = (p.out_dir / "results.h5").read_bytes()
    said = []
    with point_lock(q) as mine:  # the first process is still running q
        assert mine
        assert run_local(c, todo=stale, log=said.append) == 0
    assert (p.out_dir / "results.h5").read_bytes() == before  # not run again
    assert any("finished meanwhile; skipped" in m and p.name in m for m in said), said
    assert any("another sweep process is running it; skipped" in m and q.name in m for m in said), said
    assert state(c, q) == "todo"
    with pytest.raises(ValueError, match="is done"):
        c.job_args(p)


def test_only_selects_points_by_label_and_names_the_axes_when_wrong(tmp_path):
    from fedpipe_dist.campaign import select

    c = load_campaign(_sweep_file(tmp_path, 1))
    assert [p.name for p in select(c, ["method=lora"])] == ["method-lora_seed-0", "method-lora_seed-1"]
    assert [p.index for p in select(c, ["method=lora", "seed=1"])] == [3]
    with pytest.raises(UserInputError, match=r"an axis of .*\['method', 'seed'\]"):
        select(c, ["methd=lora"])
    with pytest.raises(UserInputError, match=r"has labels \['fedpipe', 'lora'\]"):
        select(c, ["method=flora"])


def test_jobs_run_points_side_by_side_with_times_and_an_eta(tmp_path):
    path = _sweep_file(tmp_path, 1)
    p = _fedpipe("sweep", path, "--jobs", "2", "--only", "seed=0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "running 2, 2 at a time" in p.stderr
    done = [ln for ln in p.stderr.splitlines() if ": done in " in ln]
    assert len(done) == 2 and any("ETA" in ln for ln in done), p.stderr
    c = load_campaign(path)
    assert [state(c, q) for q in c.points] == ["done", "todo", "done", "todo"]


def test_one_process_points_with_waited_out_slowdowns_say_so_once(tmp_path):
    from fedpipe_dist.campaign import serial_wait_note

    c = load_campaign(_sweep_file(tmp_path, 1, overrides=["clients.slowdown=[1,2,3,4]", "rounds=1"]))
    note = serial_wait_note(c, c.points[0])
    assert "one after another" in note and "--nproc 4" in note
    plain = load_campaign(_sweep_file(tmp_path, 1))
    assert serial_wait_note(plain, plain.points[0]) is None  # SMALL_RUN: slowdown 1
