"""Layer: E2E generation and scoring at the end of a run and through `fedpipe eval` on a final/ folder
(beam search with transformers' generate, scores from metrics/e2e.py). Issue 6, acceptance 2.

Run: .venv/bin/python -m pytest tests/test_generation.py -q      (under a minute; java-dependent parts skip
without java)
"""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from fedpipe_dist.comm.local import LocalComm
from fedpipe_dist.config import GenerationConfig
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.job import load_job
from fedpipe_dist.metrics.e2e import group_references
from fedpipe_dist.metrics.generate import generate, write_generations
from fedpipe_dist.models import load_model, load_tokenizer
from fedpipe_dist.runtime.engine import run_job

from ._util import REPO, shared_data, subprocess_env

JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not JAVA, reason="java is not installed (ROUGE-L/CIDEr tokenizer and METEOR are "
                                "jars; apt-get install default-jre-headless)")
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
GEN = ["generation.enabled=true", "generation.max_mrs=6", "generation.num_beams=2", "generation.max_new_tokens=24",
       "generation.meteor=false"]
# Enough training that the outputs share words with the references (scores above 0; measured ROUGE_L 0.08).
TRAINED = ["rounds=3", "train.local_steps=10", "data.synthetic_train_size=400", "data.synthetic_eval_size=24",
           "model.max_length=96", "eval.max_samples=24", "clients.slowdown=1"]


def test_generations_file_has_one_line_per_mr_whatever_the_model_emits(tmp_path):
    """Line breaks of every kind a reader may split on (\\r, \\r\\n, \\v, \\f, \\x1c, \\x85, U+2028, U+2029) become
    spaces: splitlines(), universal-newline reading and a split on "\\n" all see one line per MR."""
    hyps = ["a\rb", "c\r\nd", "e\x0bf\x0cg", "h\x1ci", "j\x85k", "l\u2028m\u2029n", "", "plain"]
    path = tmp_path / "generations.txt"
    write_generations(path, hyps)
    raw = path.read_bytes().decode("utf-8")
    assert len(raw.splitlines()) == len(raw.split("\n")) - 1 == len(hyps)
    with open(path, encoding="utf-8") as f:  # universal newlines: \r alone ends a line too
        assert [line.rstrip("\n") for line in f] == ["a b", "c d", "e f g", "h i", "j k", "l m n", "", "plain"]


def test_beam_search_batches_do_not_change_outputs():
    """Left padding: a prompt decodes to the same text alone and inside a batch of longer prompts."""
    tok = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", seed=0, dtype="float32", tokenizer=tok)
    sources = ["name[A], food[Thai]", "name[The Long Name Here], eatType[pub], area[riverside], food[Indian]"]
    together = generate(model, tok, sources, GenerationConfig(num_beams=3, max_new_tokens=8, batch_size=2))
    alone = [generate(model, tok, [x], GenerationConfig(num_beams=3, max_new_tokens=8, batch_size=1))[0]
             for x in sources]
    assert together == alone and len(together) == 2


@needs_java
def test_run_generates_scores_and_fedpipe_eval_reproduces_them(tmp_path):
    cfg = load_job("jobs/quickstart.yaml", [*TRAINED, *GEN, f"output.dir={tmp_path / 'run'}"])
    run_job(cfg, LocalComm(), show_progress=False)
    r = Results(tmp_path / "run" / "results.h5")
    g = r.generation
    assert g["n_mrs"] == 6 and g["num_beams"] == 2 and g["source"] == "eval split"
    assert all(np.isfinite(g[k]) for k in ("BLEU", "NIST", "ROUGE_L", "CIDEr")) and np.isnan(g["METEOR"])
    assert g["ROUGE_L"] > 0 and g["NIST"] > 0  # the comparison below is not between zeros
    lines = (tmp_path / "run" / "generations.txt").read_text().splitlines()
    assert len(lines) == 6
    # fedpipe eval on final/ with the run's settings: the same outputs, so the same scores
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "eval", str(tmp_path / "run" / "final"), "--no-meteor"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "generations.txt").read_text().splitlines() == lines
    again = Results(tmp_path / "run" / "results.h5").generation
    for k in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):
        assert again[k] == pytest.approx(g[k], abs=1e-12)
        assert f"{k:8s} {g[k]:.4f}" in p.stdout


def test_fedpipe_eval_errors_are_clear(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "eval", str(tmp_path)], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a model folder" in p.stderr and "Traceback" not in p.stderr


def test_generation_needs_e2e_data():
    from fedpipe_dist.config import ConfigError

    with pytest.raises(ConfigError, match="generation.enabled"):
        load_job("jobs/quickstart.yaml", ["generation.enabled=true", "data.name=alpaca"])


@needs_java
@pytest.mark.skipif(shared_data() is None, reason="../shared/data (stories260K-hf, E2E CSVs) is not here; set "
                    "FEDPIPE_SHARED_DATA")
def test_fedpipe_eval_on_stories260k_e2e_test_subset(tmp_path):
    """Acceptance 2 on the real model and data: one short round, then `fedpipe eval` on the E2E test set's
    first 20 MRs (all their references) prints the five metrics and records the same in HDF5."""
    root = shared_data()
    cfg = load_job("jobs/e2e_stories260k.yaml", [
        f"model.name_or_path={root / 'models' / 'stories260K-hf'}", f"data.train_path={root / 'e2e' / 'trainset.csv'}",
        f"data.eval_path={root / 'e2e' / 'devset.csv'}", "data.max_train_samples=400", "rounds=1",
        "train.local_steps=3", "eval.max_samples=64", "clients.slowdown=1", f"output.dir={tmp_path / 'run'}"])
    run_job(cfg, LocalComm(), show_progress=False)
    test_csv = root / "e2e" / "testset_w_refs.csv"
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "eval", str(tmp_path / "run" / "final"), "--data",
                        str(test_csv), "--max-mrs", "20", "generation.num_beams=4"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    g = Results(tmp_path / "run" / "results.h5").generation
    assert g["n_mrs"] == 20 and g["source"] == str(test_csv)
    for k in METRICS:
        assert np.isfinite(g[k]) and f"{k:8s} {g[k]:.4f}" in p.stdout
    from fedpipe_dist.data.e2e import read_e2e_csv

    mrs, refs = group_references(read_e2e_csv(test_csv, "test"))
    assert len((tmp_path / "run" / "generations.txt").read_text().splitlines()) == 20 and len(refs[0]) > 1
