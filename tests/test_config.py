"""Layer: fedpipe_dist.config (job YAML + dotted overrides -> validated JobConfig), in one process, no torch.

Run: .venv/bin/python -m pytest tests/test_config.py -q
"""

from pathlib import Path

import pytest

from fedpipe_dist.config import ConfigError, JobConfig, per_client_values
from fedpipe_dist.job import load_job

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
# jobs/ holds job files and sweep files (a top-level `sweeps:` key; fedpipe_dist/campaign.py)
SWEEP_FILES = sorted(p for p in (REPO / "jobs").glob("*.yaml") if "\nsweeps:" in "\n" + p.read_text())
JOB_FILES = sorted(set((REPO / "jobs").glob("*.yaml")) - set(SWEEP_FILES))


def test_quickstart_loads_with_its_documented_values():
    cfg = load_job(QUICKSTART)
    assert isinstance(cfg, JobConfig)
    assert cfg.method == "fedpipe"
    assert cfg.rounds == 10
    assert cfg.model.name_or_path == "tiny-gpt2"
    assert cfg.model.max_length == 256
    assert cfg.data.name == "synthetic-e2e"
    assert cfg.clients.n == 4
    assert cfg.clients.memory_gb == [24, 20, 16, 12]
    assert cfg.clients.slowdown == [1, 1.5, 2, 3]
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.lora.targets == ["q", "k", "v", "o"]
    assert cfg.lora.rank == 8
    assert cfg.aggregation.transport == "factored"
    assert cfg.eval.batch_size == 32
    assert cfg.output.dir == "runs/quickstart"
    assert cfg.output.overwrite is False


def test_jobs_folder_is_not_empty():
    assert QUICKSTART in JOB_FILES


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: p.name)
def test_every_shipped_job_file_validates(job):
    cfg = load_job(job)
    assert cfg.rounds >= 1
    # The validated config round-trips through its dict form (what results.h5 stores).
    from fedpipe_dist.job import job_from_dict

    assert job_from_dict(cfg.to_dict()).to_json() == cfg.to_json()


@pytest.mark.parametrize("sweep", SWEEP_FILES, ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates_every_point(sweep, monkeypatch):
    from fedpipe_dist.campaign import load_campaign

    monkeypatch.chdir(REPO)  # a sweep's base job is relative to the working directory
    c = load_campaign(sweep)  # loads and validates every point's job
    size = 66 if sweep.name == "sweep_quick.yaml" else 60  # the quick campaign: 8 methods x 2 + 6, 3 seeds
    assert len(c.points) == size and len({p.name for p in c.points}) == size
    methods = {load_job(c.base, p.overrides).method for p in c.points}
    assert methods >= {"fedpipe", "ft", "lora", "fedadapter", "flora", "flexlora", "hetlora"}, methods


def test_no_job_file_gives_the_defaults():
    cfg = load_job(None)
    assert cfg.rounds == 20 and cfg.train.lr == 2.0e-4 and cfg.clients.n == 4


# ---- overrides -------------------------------------------------------------------------------------


def test_override_list_is_parsed_as_yaml():
    cfg = load_job(QUICKSTART, ["clients.slowdown=[1,2,2,3]"])
    assert cfg.clients.slowdown == [1, 2, 2, 3]


def test_override_scientific_notation_string_becomes_float():
    # PyYAML (YAML 1.1) reads 2e-4 as the string '2e-4'; a float field must still get 0.0002.
    cfg = load_job(QUICKSTART, ["train.lr=2e-4"])
    assert cfg.train.lr == 0.0002
    assert isinstance(cfg.train.lr, float)


def test_override_scalars_and_nested_groups():
    cfg = load_job(QUICKSTART, ["rounds=3", "seed=7", "lora.targets=[q, v]", "output.overwrite=true",
                                "data.max_train_samples=null", "eval.max_samples=16"])
    assert (cfg.rounds, cfg.seed) == (3, 7)
    assert cfg.lora.targets == ["q", "v"]
    assert cfg.output.overwrite is True
    assert cfg.data.max_train_samples is None
    assert cfg.eval.max_samples == 16


def test_later_override_wins():
    assert load_job(QUICKSTART, ["rounds=3", "rounds=5"]).rounds == 5


def test_integer_in_scientific_notation_is_accepted_for_int_fields():
    assert load_job(QUICKSTART, ["model.max_length=1e3"]).model.max_length == 1000


# ---- errors: each names the key and how to fix it --------------------------------------------------


def _error(*overrides, path=QUICKSTART) -> str:
    with pytest.raises(ConfigError) as ei:
        load_job(path, list(overrides))
    return str(ei.value)


def test_mistyped_key_names_it_and_suggests_the_right_one():
    msg = _error("train.lrr=1")
    assert "'train.lrr'" in msg
    assert "did you mean 'train.lr'?" in msg
    assert "train.lrr=1" in msg  # says which override set it


def test_unknown_top_level_key_is_refused():
    msg = _error("colour=blue")
    assert "unknown key 'colour'" in msg
    assert "valid keys here are" in msg and "'rounds'" in msg


def test_key_in_the_wrong_group_suggests_the_group():
    msg = _error("lr=1e-3")
    assert "unknown key 'lr'" in msg
    assert "did you mean 'train.lr'?" in msg


def test_unknown_key_in_a_job_file_names_the_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("rounds: 2\nlora:\n  rnak: 4\n")
    msg = _error(path=job)
    assert "unknown key 'lora.rnak'" in msg
    assert "did you mean 'lora.rank'?" in msg
    assert str(job) in msg


def test_wrong_type_for_an_integer():
    msg = _error("rounds=abc")
    assert msg.startswith("rounds: expected an integer (got 'abc')")
    assert "whole number" in msg


def test_wrong_type_for_a_float_and_a_bool():
    assert _error("train.lr=fast").startswith("train.lr: expected a number (got 'fast')")
    assert _error("output.overwrite=1").startswith("output.overwrite: expected true or false (got 1)")


def test_non_finite_numbers_are_refused():
    assert "train.lr: must be a finite number" in _error("train.lr=inf")
    assert "clients.memory_gb: values must be finite" in _error("clients.memory_gb=.nan")


def test_group_given_a_scalar():
    msg = _error("train=5")
    assert msg.startswith("train: is a group of settings, not a value")
    assert "train.local_steps=" in msg


def test_memory_list_of_wrong_length():
    msg = _error("clients.memory_gb=[24, 12]")
    assert msg.startswith("clients.memory_gb: has 2 entries but clients.n=4")
    assert "give 4 values" in msg


def test_changing_n_without_the_lists_blames_the_list_in_the_file():
    msg = _error("clients.n=3")
    assert msg.startswith("clients.memory_gb: has 4 entries but clients.n=3")
    assert "jobs/quickstart.yaml" in msg


def test_bad_literal_suggests_the_closest_choice():
    msg = _error("aggregation.transport=densee")
    assert msg.startswith("aggregation.transport: 'densee' is not allowed")
    assert "choose one of ['factored', 'dense']" in msg
    assert "did you mean 'dense'?" in msg


def test_batch_bounds_blame_the_key_that_was_set():
    msg = _error("train.batch_max=0")
    assert msg.startswith("train.batch_max: must be >= train.batch_min=1 (got 0)")


@pytest.mark.parametrize("override, key", [
    ("data.max_train_samples=0", "data.max_train_samples"),  # an empty training set
    ("eval.max_samples=0", "eval.max_samples"),
    ("seed=-1", "seed"),
    ("rounds=0", "rounds"),
    ("clients.fraction=1.5", "clients.fraction"),
    ("train.lr_min=1", "train.lr_min"),  # above train.lr: a cosine that rises
])
def test_out_of_range_values_name_their_key(override, key):
    assert _error(override).startswith(f"{key}: must be")


@pytest.mark.parametrize("override, key, says", [
    ("clients.precision=[fp32,nf4,nf4,fp8]", "clients.precision", "unknown precision 'fp8'"),
    ("clients.precision=[fp32,nf4]", "clients.precision", "has 2 entries but clients.n=4"),
    ("eval.precision=int8", "eval.precision", "must be 'auto' or one of"),
    ("quant.block_size=1", "quant.block_size", "must be >= 2"),
])
def test_bad_precision_settings_name_their_key(override, key, says):
    msg = _error(override)
    assert msg.startswith(f"{key}: ") and says in msg, msg


def test_fp32_base_needs_an_fp32_model():
    msg = _error("model.dtype=bfloat16", "clients.precision=fp32")
    assert msg.startswith("clients.precision: fp32 bases need model.dtype=float32"), msg
    assert "eval.precision: fp32 needs" in _error("model.dtype=bfloat16", "eval.precision=fp32")


def test_malformed_overrides():
    assert "not of the form dotted.key=value" in _error("rounds")
    assert "empty key" in _error("=3")
    assert "is not valid YAML" in _error("train.lr=[1")
    assert "'rounds' is a value, not a group of keys" in _error("rounds.x=1")


def test_missing_job_file(tmp_path):
    msg = _error(path=tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in msg and "does not exist" in msg


def test_job_file_that_is_not_yaml(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("rounds: 2\ntrain:\n  lr: 1e-3\n   bad: [\n")
    msg = _error(path=job)
    assert str(job) in msg and "is not valid YAML" in msg
    assert "line 4" in msg and "Fix the syntax" in msg


def test_job_file_that_is_a_list(tmp_path):
    job = tmp_path / "list.yaml"
    job.write_text("- rounds: 2\n")
    assert "must hold a mapping of keys at the top (got list)" in _error(path=job)


# ---- per-server draws ------------------------------------------------------------------------------


def test_uniform_memory_draw_is_seeded_and_within_bounds():
    a = load_job(QUICKSTART, ["clients.memory_gb={uniform: [12, 24]}", "seed=3"])
    b = load_job(QUICKSTART, ["clients.memory_gb={uniform: [12, 24]}", "seed=3"])
    c = load_job(QUICKSTART, ["clients.memory_gb={uniform: [12, 24]}", "seed=4"])
    assert a.clients.memory_gb == {"uniform": [12, 24]}  # the spec is kept; the draw is derived from it
    va = per_client_values(a.clients.memory_gb, 4, "clients.memory_gb", seed=a.seed)
    vb = per_client_values(b.clients.memory_gb, 4, "clients.memory_gb", seed=b.seed)
    vc = per_client_values(c.clients.memory_gb, 4, "clients.memory_gb", seed=c.seed)
    assert va == vb
    assert va != vc
    assert len(va) == 4 and len(set(va)) == 4
    assert all(12.0 <= v <= 24.0 for v in va + vc)


def test_uniform_draw_with_reversed_bounds_is_refused():
    msg = _error("clients.memory_gb={uniform: [24, 12]}")
    assert msg.startswith("clients.memory_gb: uniform needs two numbers [lo, hi] with lo <= hi")


def test_per_client_values_scalar_and_list():
    assert per_client_values(2, 3, "clients.slowdown", seed=0) == [2.0, 2.0, 2.0]
    assert per_client_values([1, 2], 2, "clients.slowdown", seed=0) == [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"clients.slowdown: values must be > 0"):
        per_client_values([1, 0], 2, "clients.slowdown", seed=0, positive=True)


def test_every_wrong_key_and_value_is_named_at_once_with_where_it_was_set(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("method: lora\ntrain:\n  lrr: 0.1\n  local_steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_job(job, ["data.partiton=iid", "rounds=3", "eval.every=often", "broken-override"])
    msg = str(e.value)
    assert msg.startswith("5 problems in the job:") and len(e.value.problems) == 5, msg
    for expected in ("unknown key 'train.lrr': did you mean 'train.lr'?", "train.local_steps: expected an integer",
                     "unknown key 'data.partiton'", "eval.every: expected an integer", "'broken-override' is not"):
        assert expected in msg, (expected, msg)
    assert f"(in job file {str(job)!r})" in msg and "(from the override 'data.partiton=iid')" in msg
    # one problem stays one plain message, as before
    with pytest.raises(ConfigError, match=r"^unknown key 'train.lrr'"):
        load_job(None, ["train.lrr=1"])
