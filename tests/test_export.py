"""`fedpipe export RUN --adapter` (issue 31): the run's total update as a peft LoRA adapter, loadable with
PeftModel.from_pretrained on the base; for method=lora (one kept global adapter) its eval loss equals final/'s."""

from __future__ import annotations

import json

import pytest
import torch

from fedpipe_dist.cli import main
from tests._util import run_small


def _loss(model, cfg, tok):
    from fedpipe_dist.data import format_example, load_eval_pairs, tokenize_pairs
    from fedpipe_dist.metrics.perplexity import evaluate

    data = tokenize_pairs(tok, [format_example(*p) for p in load_eval_pairs(cfg.data, cfg.seed)], cfg.model.max_length)
    return evaluate(model, data, batch_size=8, pad_id=tok.pad_token_id)["loss"]


@pytest.mark.parametrize("method", ["lora", "fedpipe"])
def test_exported_adapter_loads_with_peft_and_matches_final(tmp_path, method, capsys):
    from peft import PeftModel

    from fedpipe_dist.models import load_model, load_tokenizer

    cfg, _ = run_small(tmp_path, "run", f"method={method}", "rounds=2", "output.save_final=true")
    assert main(["export", str(tmp_path / "run"), "--adapter"]) == 0
    meta = json.loads((tmp_path / "run" / "adapter" / "fedpipe_export.json").read_text())
    tok = load_tokenizer(str(tmp_path / "run" / "final"))
    final = load_model(str(tmp_path / "run" / "final"), seed=cfg.seed, tokenizer=tok).eval()
    base = load_model(cfg.model.name_or_path, seed=cfg.seed, tokenizer=tok)
    with torch.no_grad():
        assert not torch.equal(base.get_input_embeddings().weight, torch.zeros(1))  # the base, not final/
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    want, got = _loss(final, cfg, tok), _loss(adapted, cfg, tok)
    if method == "lora":  # one kept global adapter of rank lora.rank: the factorization is exact
        assert meta["min_retained_share"] > 1 - 1e-9
        assert abs(got - want) <= 1e-5, (got, want)
    else:  # fresh adapters merged every round: rank up to rounds x the servers' ranks, truncated at lora.rank
        assert 0 < meta["min_retained_share"] <= 1
        assert abs(got - want) < 0.05, (got, want)
    assert "retained share" in capsys.readouterr().err


def test_export_refuses_a_run_without_final(tmp_path, capsys):
    run_small(tmp_path, "run", "rounds=1", "output.save_final=false")
    assert main(["export", str(tmp_path / "run"), "--adapter"]) == 2
    assert "output.save_final=true" in capsys.readouterr().err
