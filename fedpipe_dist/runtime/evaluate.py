"""`fedpipe eval FINAL_DIR`: E2E generation and scoring of an exported model, on its own.

    fedpipe eval runs/e2e_stories260k/final --data ../shared/data/e2e/testset_w_refs.csv --max-mrs 100

The decoding settings come from the run's job (results.h5 beside final/, `generation.*`), then from
`generation.key=value` overrides; a model folder without a run beside it uses the defaults. fedadapter runs
keep their adapters in final/houlsby_adapters.safetensors; they are attached. Writes generations.txt and
eval/generation/ in results.h5 beside final/ (when there is one; otherwise generations.txt goes into
--out), and prints the five metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import apply_override
from ..errors import UserInputError
from ..job import job_from_dict


def eval_command(model_dir: str, data: str | None, max_mrs: int | None, out: str | None, overrides: list[str],
                 meteor: bool = True) -> dict[str, float]:
    import torch

    from ..adapters.houlsby import ADAPTER_FILE, HoulsbyAdapters, find_adapter_points, load_adapter_state
    from ..io.hdf5 import Results, write_generation
    from ..metrics.e2e import all_metrics, group_references, score_e2e
    from ..metrics.generate import check_scoring_tools, generate, generation_pairs, one_line, write_generations
    from ..models import load_model, load_tokenizer

    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise UserInputError(f"fedpipe eval: {str(folder)!r} is not a model folder (no config.json); point it at "
                             "a run's final/ folder, e.g. runs/e2e_stories260k/final")
    results = folder.parent / "results.h5"
    tree: dict = {}
    if results.is_file():
        tree = json.loads(Results(results).attrs["config_json"])
        tree["output"]["overwrite"] = True
    for o in overrides:
        apply_override(tree, o)
    if data is not None:
        tree.setdefault("generation", {})["data_path"] = data
    if max_mrs is not None:
        tree.setdefault("generation", {})["max_mrs"] = max_mrs
    tree.setdefault("model", {})["name_or_path"] = str(folder)
    cfg = job_from_dict(tree)
    check_scoring_tools()
    pairs = generation_pairs(cfg.generation.data_path, cfg.data, cfg.seed)
    mrs, refs = group_references(pairs)
    if cfg.generation.max_mrs is not None:
        mrs, refs = mrs[: cfg.generation.max_mrs], refs[: cfg.generation.max_mrs]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(str(folder))
    model = load_model(str(folder), seed=cfg.seed, dtype=cfg.model.dtype, tokenizer=tok).to(device)
    hooks = None
    if (folder / ADAPTER_FILE).is_file():
        state, depth, width = load_adapter_state(folder)
        hooks = HoulsbyAdapters(find_adapter_points(model), state, device=device, trainable=False).attach(model)
        print(f"fedpipe eval: attached FedAdapter adapters (depth {depth}, width {width})", file=sys.stderr)

    def progress(done, total):
        print(f"\rgenerating {done}/{total}", end="", file=sys.stderr, flush=True)

    texts = [one_line(t) for t in generate(model, tok, mrs, cfg.generation, device=device, progress=progress)]
    print(file=sys.stderr)
    if hooks is not None:
        hooks.detach()
    scores = all_metrics(score_e2e(texts, refs, meteor=meteor and cfg.generation.meteor))
    target = folder.parent if results.is_file() else Path(out or ".")
    target.mkdir(parents=True, exist_ok=True)
    write_generations(target / "generations.txt", texts)
    if results.is_file():
        g = cfg.generation
        write_generation(results, scores, {
            "source": g.data_path or "eval split", "n_mrs": len(mrs), "num_beams": g.num_beams,
            "length_penalty": g.length_penalty, "no_repeat_ngram_size": g.no_repeat_ngram_size})
    print(f"E2E on {len(mrs)} MRs of {cfg.generation.data_path or 'the eval split'}:")
    for k, v in scores.items():
        print(f"  {k:8s} {v:.4f}")
    print(f"generations: {target / 'generations.txt'}" + (f"; scores in {results} eval/generation" if
                                                         results.is_file() else ""))
    return scores
