"""`fedpipe check`: what can be checked before a job waits in a queue for hours, then fails in a minute.

    warnings = preflight(cfg, world_size=16)    # raises UserInputError naming each problem and its fix

Beyond the job file's own validation (config/), it reads what the job will read: the model folder and its
config (and max_length against the model's position limit), the data files with their columns and enough
rows for clients.n, the generation data, whether output.dir can be written (and is not an earlier run's
folder without resume=true or output.overwrite=true), and how many ranks would host no server. Hub names
(a model or dataset to download) cannot be checked offline; they come back as notes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import JobConfig
from .errors import UserInputError


def gathered(checks) -> list:
    """Run every check (a callable; each may raise UserInputError) and raise one UserInputError naming all the
    problems found, not only the first; returns the checks' results when none raised."""
    results, errors = [], []
    for check in checks:
        try:
            results.append(check())
        except UserInputError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise UserInputError(errors[0])
    if errors:
        raise UserInputError(f"{len(errors)} problems:\n" + "\n".join(f"  {i}. {e}" for i, e in enumerate(errors, 1)))
    return results


def before_run(cfg: JobConfig, *, resuming: bool) -> None:
    """What `fedpipe run` checks on every rank before it starts (file-system reads only, no model or data
    loaded): the model path and output.dir, each named if wrong, so that one mistake does not hide behind
    another (an occupied output.dir used to hide a wrong model path until the first was fixed)."""
    from .models import check_model_path
    from .runtime.outputs import check_output_dir

    gathered([lambda: check_model_path(cfg.model.name_or_path),
              lambda: check_output_dir(Path(cfg.output.dir), cfg.output.overwrite or resuming,
                                       cfg.output.foreign_files)])


def preflight(cfg: JobConfig, *, world_size: int = 1) -> list[str]:
    """Raise UserInputError naming every problem found (model, data, output.dir); return notes and warnings
    for what is not an error."""
    model, data, _ = gathered([lambda: _model(cfg), lambda: _data(cfg, world_size), lambda: _output_dir(cfg)])
    notes: list[str] = [*model, *data]
    from .runtime.launch import idle_ranks_warning

    idle = idle_ranks_warning(world_size, cfg.clients.n)
    if idle:
        notes.append(idle)
    return notes


def _model(cfg: JobConfig) -> list[str]:
    from .models import TINY_CONFIGS, _looks_local, check_max_length, check_model_path

    name = cfg.model.name_or_path
    check_model_path(name)
    if name in TINY_CONFIGS:
        config = TINY_CONFIGS[name]
    elif _looks_local(name):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserInputError(f"model.name_or_path: {name!r} has a config.json that cannot be read "
                                 f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); point it at a "
                                 "Hugging Face model folder written by save_pretrained") from None
    else:
        return [f"note: model.name_or_path={name!r} is a hub name: it is downloaded when the job starts (compute "
                "nodes often have no network: download it once, point model.name_or_path at the folder, and set "
                "HF_HUB_OFFLINE=1)"]
    check_max_length(cfg.model.max_length, config, name)
    return []


def _data(cfg: JobConfig, world_size: int = 1) -> list[str]:
    from .data import load_eval_pairs, load_train_pairs
    from .data.alpaca import is_hub_name

    d = cfg.data
    hub = (d.name == "e2e" and (d.train_path is None or d.eval_path is None)) or \
        (d.name == "alpaca" and is_hub_name(d.train_path))
    if hub:
        if d.name == "e2e":  # the file that is given must still be there and readable
            from .data.e2e import read_e2e_csv

            for path, key in ((d.train_path, "data.train_path"), (d.eval_path, "data.eval_path")):
                if path is not None:
                    read_e2e_csv(path, key)
        return [f"note: data.name={d.name} without a local file is downloaded when the job starts (set "
                "data.train_path/data.eval_path to files on the shared filesystem for compute nodes without "
                "network)"]
    if d.name == "synthetic-e2e" and d.train_path is None:
        n = d.synthetic_train_size  # generated at the start; nothing to read
    else:
        n = len(load_train_pairs(d, cfg.seed))  # reads the file: missing files, columns, encoding, empty sets fail here
    n = n if d.max_train_samples is None else min(n, d.max_train_samples)
    if n < cfg.clients.n:
        raise UserInputError(f"data.train_path: {n} training example(s) for clients.n={cfg.clients.n} servers; every "
                             f"server needs at least one: add rows, raise data.max_train_samples, or lower clients.n")
    synthetic_eval = d.name == "synthetic-e2e" and d.eval_path is None
    n_eval = d.synthetic_eval_size if synthetic_eval else len(load_eval_pairs(d, cfg.seed))
    notes = [eval_shares(n_eval if cfg.eval.max_samples is None else min(n_eval, cfg.eval.max_samples), world_size)]
    if cfg.generation.enabled:
        from .metrics.generate import generation_pairs

        if not generation_pairs(cfg.generation.data_path, cfg.data, cfg.seed):
            raise UserInputError("generation.data_path: no (mr, ref) pairs to generate from; point it at an E2E "
                                 "CSV, or set generation.enabled=false")
    return notes


def eval_shares(n: int, world_size: int) -> str:
    """What each rank evaluates every round: the eval sample dealt round-robin (runtime/setup.py); a rank with
    no share adds nothing to the sums the loss is formed from."""
    counts = [len(range(r, n, world_size)) for r in range(world_size)]
    idle = [r for r, k in enumerate(counts) if k == 0]
    text = f"eval: {n} example(s) each round over {world_size} rank(s), {min(counts)}-{max(counts)} per rank"
    if idle:
        text += (f"; rank(s) {idle[0]}..{idle[-1]} have none and add nothing (raise eval.max_samples to spread the "
                 "eval)" if len(idle) > 1 else f"; rank {idle[0]} has none and adds nothing")
    return text


def _output_dir(cfg: JobConfig) -> None:
    from .io.space import existing_ancestor
    from .runtime.outputs import check_output_dir

    out = Path(cfg.output.dir).expanduser()
    try:
        out.exists()
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the filesystem
        raise UserInputError(f"output.dir: {cfg.output.dir!r} is not a usable path ({e}); choose another "
                             "output.dir") from None
    # resume=true: an earlier results.h5 is the point
    check_output_dir(out, cfg.output.overwrite or cfg.resume, cfg.output.foreign_files)
    existing = existing_ancestor(out)  # the folder the run would create its own folders in
    if not existing.is_dir():
        raise UserInputError(f"output.dir: {str(existing)!r} is a file, so {str(out)!r} cannot be created; choose "
                             "another output.dir")
    try:  # a real write: permission bits alone do not tell (root, read-only mounts, quotas)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".fedpipe-check-"):
            pass
    except OSError as e:
        where = repr(str(out)) if existing == out else f"{str(out)!r} cannot be created: {str(existing)!r}"
        raise UserInputError(f"output.dir: {where} is not writable ({e.strerror or type(e).__name__}); choose an "
                             "output.dir you can write to") from None


def world_size_from_env() -> int:
    """The ranks a launcher would start, when `fedpipe check` itself runs under one (else 1)."""
    from .runtime.launch import detect_launch

    return detect_launch(dict(os.environ)).world_size
