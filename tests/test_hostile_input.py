"""Layer: hostile input, property-based (hypothesis): random malformed job files, overrides and data files
go through the real command line (`fedpipe check` / `fedpipe run`, in-process); every case must end with
exit code 2 and a one-line `fedpipe: error:` message, never an exception escaping (a traceback) and never
a hang. Issue 8, acceptance 5.

Run: .venv/bin/python -m pytest tests/test_hostile_input.py -q      (about a minute)
"""

import contextlib
import io
import signal
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpipe_dist.cli import main
from fedpipe_dist.config import _all_keys

KEYS = _all_keys()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DATA_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                      max_leaves=6)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("the command did not finish within 60 s")


def _cli(*argv) -> tuple[int, str]:
    """The command line in-process, its exit code and stderr; a hang becomes a failure after 60 s."""
    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse usage errors exit 2 by themselves
                code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


def _assert_clean_refusal(code, err):
    assert code == 2, f"exit {code}: {err[-500:]}"
    assert "Traceback" not in err
    assert "error" in err.lower() and err.strip()


@SETTINGS
@given(key=st.sampled_from(KEYS), value=values)
def test_a_wrong_value_for_a_real_key(tmp_path, key, value):
    """A real key with a random value: either valid (exit 0) or refused with exit 2; never a traceback."""
    code, err = _cli("check", "jobs/quickstart.yaml", f"output.dir={tmp_path / 'out'}",
                     f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    assert code in (0, 2), f"exit {code}: {err[-500:]}"
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("fedpipe: error:") and key.split(".")[0] in err


@SETTINGS
@given(tree=st.dictionaries(st.text(string.ascii_letters + "._-", min_size=1, max_size=12), values, min_size=1,
                            max_size=4).filter(lambda d: any(k not in KEYS and k.split(".")[0] not in
                                                              {x.split(".")[0] for x in KEYS} for k in d)))
def test_a_job_file_with_unknown_keys(tmp_path, tree):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    _assert_clean_refusal(*_cli("check", str(path), f"output.dir={tmp_path / 'out'}"))


@SETTINGS
@given(blob=st.binary(min_size=1, max_size=200))
def test_a_job_file_of_random_bytes(tmp_path, blob):
    path = tmp_path / "job.yaml"
    path.write_bytes(blob)
    code, err = _cli("check", str(path), f"output.dir={tmp_path / 'out'}")
    assert "Traceback" not in err
    if code != 0:  # random bytes can happen to be valid YAML of an empty or all-default job
        _assert_clean_refusal(code, err)


@SETTINGS
@given(override=st.text(max_size=40))
def test_random_override_strings(tmp_path, override):
    code, err = _cli("check", "jobs/quickstart.yaml", f"output.dir={tmp_path / 'out'}", override)
    assert code in (0, 2) and "Traceback" not in err, err[-500:]


@DATA_SETTINGS
@given(header=st.sampled_from(["mr,ref", "MR,REF", "mr", "ref,text", "", "a,b,c"]),
       rows=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=4),
       encoding=st.sampled_from(["utf-8", "utf-16", "latin-1-garbage", "binary"]))
def test_malformed_e2e_csv_files(tmp_path, header, rows, encoding):
    """A training CSV with wrong columns, empty fields, another encoding or random bytes: the run stops with
    exit 2 before training, or (if the random file happens to be usable) trains one tiny round."""
    text = header + "\n" + "".join(f'"{m.replace(chr(34), "")}","{r.replace(chr(34), "")}"\n' for m, r in rows)
    path = tmp_path / "train.csv"
    if encoding == "binary":
        path.write_bytes(bytes(range(256)) * 2)
    elif encoding == "latin-1-garbage":
        path.write_bytes(text.encode("utf-8") + b"\xff\xfe\xe9 caf\xe9\n")
    else:
        path.write_bytes(text.encode(encoding))
    code, err = _cli("run", "jobs/quickstart.yaml", "data.name=e2e", f"data.train_path={path}",
                     "data.eval_path=" + str(path), "rounds=1", "train.local_steps=1", "eval.max_samples=4",
                     "clients.n=1", "clients.memory_gb=24", "clients.slowdown=1", f"output.dir={tmp_path / 'run'}",
                     "output.overwrite=true", "--no-progress")
    assert "Traceback" not in err
    if code != 0:
        _assert_clean_refusal(code, err)


@DATA_SETTINGS
@given(payload=st.one_of(st.text(max_size=60), st.builds(lambda v: yaml.safe_dump(v), values)),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_malformed_alpaca_files(tmp_path, payload, suffix):
    path = tmp_path / f"alpaca{suffix}"
    path.write_text(payload, encoding="utf-8")
    code, err = _cli("run", "jobs/quickstart.yaml", "data.name=alpaca", f"data.train_path={path}",
                     f"data.eval_path={path}", "rounds=1", "train.local_steps=1", "clients.n=1",
                     "clients.memory_gb=24", "clients.slowdown=1", f"output.dir={tmp_path / 'run'}",
                     "output.overwrite=true", "--no-progress")
    assert "Traceback" not in err
    if code != 0:
        _assert_clean_refusal(code, err)


@pytest.mark.parametrize("path", ["no/such/model", "jobs"])
def test_bad_model_folders(tmp_path, path):
    _assert_clean_refusal(*_cli("run", "jobs/quickstart.yaml", f"model.name_or_path={path}",
                                f"output.dir={tmp_path / 'run'}", "--no-progress"))
