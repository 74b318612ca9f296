"""Layer: the whole round engine against its recorded behaviour (issue 15). Every method's short run, on one
process and on 4 gloo ranks, must reproduce tests/golden/engine_methods.json (written by `python -m
tests._golden` before the engine was refactored): losses to 5e-4 relative (float rounding across CPUs:
tests/_golden.FLOAT_RTOL), bytes and plans exactly. About 3 minutes.

Run: .venv/bin/python -m pytest tests/test_engine_golden.py -q
"""

import json

import pytest

from ._golden import CASES, GOLDEN, compare, run_case

WANT = json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", [f"{name}@{ws}" for name, (_, sizes) in CASES.items() for ws in sizes])
def test_engine_reproduces_the_golden_run(tmp_path, case):
    name, ws = case.rsplit("@", 1)
    got = run_case(name, int(ws), tmp_path / "run")
    assert set(got) == set(WANT[case])
    problems = compare(got, WANT[case], case)
    assert not problems, "\n".join(problems[:10])


def test_the_golden_file_covers_every_case_and_its_runs_differ():
    """The comparison can fail: every case is recorded, and the methods' losses are not all one curve."""
    assert set(WANT) == {f"{n}@{ws}" for n, (_, sizes) in CASES.items() for ws in sizes}
    curves = {tuple(round(x, 6) for x in WANT[f"{n}@1"]["rounds.eval_loss"]) for n in CASES}
    assert len(curves) == len(CASES)
    a, b = WANT["fedpipe@1"], WANT["flora@1"]
    assert compare(a, b, "x"), "two different methods compared equal"
