"""Alpaca-format instruction data (instruction, input, output) with Stanford Alpaca's prompt template.

Local JSON (a list of records) or JSONL files, or a hub dataset name through `datasets` (data.train_path
null: tatsu-lab/alpaca; or a name such as yahma/alpaca-cleaned). The prompt is the template up to
"### Response:\\n"; the target is the output, so the loss covers the response only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserInputError

# Stanford Alpaca's templates (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
HUB_DEFAULT = "tatsu-lab/alpaca"


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text and input_text.strip():
        return PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _records_to_pairs(records, key: str, where: str) -> list[tuple[str, str]]:
    pairs, skipped = [], 0
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise UserInputError(f"{key}: record {i} of {where} lacks 'instruction' or 'output'; Alpaca records "
                                 "need the fields instruction, input (optional) and output")
        instruction, output = str(r["instruction"] or "").strip(), str(r["output"] or "").strip()
        if not instruction or not output:
            skipped += 1
            continue
        pairs.append((alpaca_prompt(instruction, str(r.get("input") or "")), output))
    if not pairs:
        raise UserInputError(f"{key}: {where} holds no usable records ({skipped} with an empty instruction or "
                             "output); add records or point it at another file")
    return pairs


def read_alpaca_file(path: str | Path, key: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a local Alpaca JSON or JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"{key}: file {str(p)!r} does not exist; point {key} at an Alpaca JSON or JSONL "
                             "file (fields instruction, input, output)")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except UnicodeDecodeError:
        raise UserInputError(f"{key}: {str(p)!r} is not UTF-8; re-save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"{key}: {str(p)!r} is not valid JSON{'L' if p.suffix == '.jsonl' else ''} "
                             f"(line {e.lineno}: {e.msg}); fix the file or convert it") from None
    if not isinstance(records, list):
        raise UserInputError(f"{key}: {str(p)!r} must hold a list of records (or one record per line as .jsonl)")
    return _records_to_pairs(records, key, repr(str(p)))


def is_hub_name(path: str | None) -> bool:
    """data.train_path for alpaca: null (the default hub dataset), or a hub dataset name such as
    yahma/alpaca-cleaned: not an existing file and not ending in .json/.jsonl."""
    if path is None:
        return True
    return not Path(path).exists() and Path(path).suffix not in (".json", ".jsonl") and path.count("/") == 1


def hub_name(path: str | None) -> str:
    return HUB_DEFAULT if path is None else path


def load_alpaca_hub(name: str, key: str) -> list[tuple[str, str]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # any hub/cache failure becomes one actionable message
        raise UserInputError(f"{key}: could not load the hub dataset {name!r} ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''}). Without network access, set "
                             f"{key} to a local Alpaca JSON/JSONL file") from None
    return _records_to_pairs(ds, key, repr(name))


def partition_key(prompt: str) -> str:
    """Non-iid label for Alpaca: whether the task comes with an input, and its first instruction word."""
    head = prompt.split("### Instruction:\n", 1)[-1].split(maxsplit=1)
    return ("input:" if "### Input:" in prompt else "plain:") + (head[0].lower() if head else "")
