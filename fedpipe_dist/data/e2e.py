"""The E2E NLG challenge data: CSV files with columns `mr,ref` (one row per reference).

Read with the standard csv module rather than `datasets`: N ranks reading the same local file through
`datasets` would each write an Arrow cache, and the CSVs are small. The hub copy (`e2e_nlg`) goes
through `datasets` when no local path is given.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserInputError


class Rows(list):
    """(mr, ref) pairs read from a file, with the number of rows left out for an empty mr or ref."""

    dropped: int = 0


def read_e2e_csv(path: str | Path, key: str) -> Rows:
    """(mr, ref) rows of an E2E CSV (rows with an empty mr or ref are left out and counted in `.dropped`).
    `key` names the setting in messages (e.g. data.train_path)."""
    p = Path(path).expanduser()
    what = "training" if "train" in key else "eval"
    fix = f"point {key} at an E2E CSV with a header row mr,ref, e.g. trainset.csv from the E2E dataset"
    if p.is_dir():
        raise UserInputError(f"{key}: {str(p)!r} is a folder, not a CSV file; {fix}")
    if not p.is_file():
        raise UserInputError(f"{key}: file {str(p)!r} does not exist; {fix}")
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate the BOM spreadsheets write
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise UserInputError(f"{key}: {str(p)!r} is empty (no header row); {fix}")
            cols = [(c or "").strip().lower() for c in reader.fieldnames]
            missing = [c for c in ("mr", "ref") if c not in cols]
            if missing:
                raise UserInputError(f"{key}: {str(p)!r} has columns {reader.fieldnames} and lacks "
                                     f"{' and '.join(missing)}; an E2E CSV needs a header row with the "
                                     f"columns mr,ref: rename its columns to mr,ref or {fix}")
            names = dict(zip(cols, reader.fieldnames))
            rows, skipped = [], 0
            for row in reader:
                mr = (row.get(names["mr"]) or "").strip()
                ref = (row.get(names["ref"]) or "").strip()
                if mr and ref:
                    rows.append((mr, ref))
                else:
                    skipped += 1
    except UnicodeDecodeError as e:
        raise UserInputError(f"{key}: {str(p)!r} is not UTF-8 ({e.reason} at byte {e.start}); re-save it "
                             "as UTF-8") from None
    except csv.Error as e:
        raise UserInputError(f"{key}: {str(p)!r} is not a readable CSV ({e}); {fix}") from None
    except OSError as e:
        raise UserInputError(f"{key}: {str(p)!r} cannot be read ({e.strerror}); check its permissions or "
                             f"{fix}") from None
    if not rows:
        if skipped == 0:
            why = "has a header row but no data rows"
        else:
            why = f"has {skipped} row(s), but every one has an empty mr or ref"
        raise UserInputError(f"{key}: {str(p)!r} {why}, so the {what} set would be empty; add rows with both "
                             f"mr and ref filled in, or {fix}")
    out = Rows(rows)
    out.dropped = skipped
    return out


def load_e2e_hub(split: str, key: str) -> list[tuple[str, str]]:
    """E2E from the Hugging Face hub (`e2e_nlg`): needs network access or a warm datasets cache."""
    try:
        import datasets

        ds = datasets.load_dataset("e2e_nlg", split=split)
    except Exception as e:  # any hub/cache failure becomes one actionable message
        raise UserInputError(
            f"{key}: data.name=e2e with no local path loads the hub dataset 'e2e_nlg', which failed "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:160]}). Set data.train_path and "
            "data.eval_path to local E2E CSVs (trainset.csv, devset.csv)") from None
    return [(r["meaning_representation"], r["human_reference"]) for r in ds]


def partition_key(mr: str) -> str:
    """The label a Dirichlet (non-iid) split is drawn over: the MR's food type."""
    start = mr.find("food[")
    if start < 0:
        return "none"
    end = mr.find("]", start)
    return mr[start + 5:end] if end > 0 else "none"
