"""Beam-search generation for E2E: one output per distinct meaning representation (MR).

The LoRA paper's E2E decoding (its Table 11): beam 10, length penalty 0.8, no repeated 4-grams; these are
settings (`generation.*` in the job). Prompts are the training prompts without a target ('<mr> =>'), left
padded so that a batch of prompts ends at the same position, decoded with transformers' `generate`.
"""

from __future__ import annotations

import torch

from ..config import GenerationConfig
from ..data import format_example


@torch.no_grad()
def generate(model, tokenizer, sources: list[str], settings: GenerationConfig, *, device="cpu",
             progress=None) -> list[str]:
    """The model's continuation of each source's prompt, decoded to text (special tokens and the leading
    space of the target format stripped), with the job's decoding settings (`cfg.generation`).
    `progress(done, total)` is called after each batch."""
    prompts = [format_example(s, "")[0] for s in sources]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), settings.batch_size):
            chunk = prompts[start:start + settings.batch_size]
            batch = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in chunk]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):  # left padding: every prompt ends at the last position
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
            gen = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), num_beams=settings.num_beams,
                length_penalty=settings.length_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
                max_new_tokens=settings.max_new_tokens, early_stopping=True, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
            for row in gen[:, width:]:
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            if progress is not None:
                progress(len(out), len(prompts))
    finally:
        model.train(was_training)
    return out


def generation_pairs(data_path: str | None, data, seed: int) -> list[tuple[str, str]]:
    """(MR, reference) rows to generate for: generation.data_path, or else the eval split of the job's `data`
    section (config.DataConfig; `seed`: the job's)."""
    from ..data import load_eval_pairs
    from ..data.e2e import read_e2e_csv

    return read_e2e_csv(data_path, "generation.data_path") if data_path else load_eval_pairs(data, seed)


def check_scoring_tools() -> None:
    """Fail before any training or decoding when the E2E scorer cannot run (java for its jars)."""
    from ..errors import UserInputError
    from .e2e import JavaNotFoundError, _require_java

    try:
        _require_java()
    except JavaNotFoundError as e:
        raise UserInputError(f"generation: {e}; or set generation.enabled=false") from None


def one_line(text: str) -> str:
    """`text` with every line boundary a reader may split on (\\n, \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028,
    U+2029: what str.splitlines() splits on) replaced by a space, so one output stays one line."""
    return " ".join(text.splitlines())


def write_generations(path, hypotheses: list[str]) -> None:
    """One output per line, in MR order: the system-output format of the E2E scorer. Written with "\\n"
    only (no platform translation), so the file has exactly one line per MR for any reader."""
    from pathlib import Path

    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        f.write("".join(one_line(h) + "\n" for h in hypotheses))
