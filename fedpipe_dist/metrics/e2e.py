"""E2E NLG challenge scores (BLEU, NIST, METEOR, ROUGE-L, CIDEr), computed as the official scorer does.

The official scorer is tuetschek/e2e-metrics (`measure_scores.py`). It groups the references of each
meaning representation (MR), scores one system output per MR against all of them, and reports

* BLEU and NIST from the Perl script mteval-v13a-sig.pl, run with its default options (no `-c`, so the
  text is lowercased; "closest" brevity penalty; smoothed BLEU). The references go in as one SGML
  reference set per reference position, padded with empty segments where an MR has fewer references.
  BLEU is printed as a fraction ("BLEU score = 0.6593"), and so is it here (0-1 scale).
* METEOR, ROUGE_L and CIDEr from pycocoevalcap's COCOEvalCap: the Stanford PTB tokenizer (lowercases,
  drops punctuation tokens), then METEOR 1.5 (`-l en -norm`), ROUGE-L (LCS F-measure with beta 1.2 from
  the best precision and the best recall over the references, which may come from different references;
  averaged over MRs) and CIDEr (see below).

What computes what here:

* BLEU: `sacrebleu` corpus BLEU, tokenize="13a" (sacrebleu's port of the mteval-v13a tokenizer), default
  "exp" smoothing (sacrebleu's port of mteval's smoothing), all references of an MR as multi-references.
  Text is lowercased like mteval does it: ASCII A-Z only (mteval uses `tr/[A-Z]/[a-z]/`; sacrebleu's own
  `lowercase=True` would use Python's full Unicode `str.lower()`). References are transposed into
  streams padded with None, not "": sacrebleu drops None references, while an "" reference would count
  as a length-0 candidate in its closest-reference-length brevity penalty; mteval skips length-0
  references there, so None is the padding that matches.
* NIST: our own ~30-line implementation (`e2e_nist`) of mteval-v13a's NIST on the same 13a-tokenized,
  lowercased text. n-grams up to 5; information weight of an n-gram w1..wn is
  log2(count(w1..wn-1) / count(w1..wn)) (unigrams: log2(total reference words / count(w))), with counts
  over all references of all MRs; per order n, the information of the hypothesis n-grams that match
  (clipped to the largest count in any one reference of the MR) is summed over the corpus and divided
  by the number of hypothesis n-grams; the five ratios are added and multiplied by the brevity penalty
  exp(-beta * ln(r)^2) for r < 1, beta = -ln(0.5) / ln(1.5)^2, r = hypothesis words / (total reference
  words / mean number of non-empty references per MR). That divisor is e2e-metrics' adaptation of mteval
  to a variable number of references (it pads every MR to the largest count with empty references and
  counts only the non-empty ones, `$cum_ref_count / $cum_seg_count`); the unadapted script divides by the
  number of reference sets (the maximum), which overstates NIST when MRs have unequal reference counts
  (12% on 200 E2E test MRs of a real run). One Perl quirk is
  mirrored too: mteval tests the (n-1)-gram prefix for Perl truth, so a bigram starting with the token
  "0" takes the unigram branch (total reference words / count); no E2E dev/test reference has that token.
  `nltk.translate.nist_score.corpus_nist` is not used because it differs from mteval with several
  references: it scores each output against the single best reference (mteval clips against all
  references at once) and its length penalty uses the length of the reference it picked (mteval: the
  mean over reference sets above). With one reference per MR both agree, which the tests use as an independent
  check.
* METEOR, ROUGE_L, CIDEr: `pycocoevalcap` (PyPI), the same code COCOEvalCap runs: PTBTokenizer, then
  Meteor(), Rouge(), Cider(). pycocoevalcap's `Cider` is CIDEr-D (the coco-caption version): tf-idf
  n-gram vectors (n = 1..4, document frequencies over the references of the scored corpus, so the score
  depends on the whole eval set), hypothesis weights clipped to the reference weights, a Gaussian length
  penalty (sigma 6), averaged over references and n, times 10. These three need `java` on PATH (the PTB
  tokenizer and METEOR are jars); without it `score_e2e` raises `JavaNotFoundError` rather than
  returning made-up numbers. METEOR alone can be left out with `meteor=False` (it starts a JVM that
  loads paraphrase tables for 10-15 s and asks for a 2 GB heap); ROUGE_L and CIDEr still need java for the
  tokenizer. `e2e_bleu` and `e2e_nist` need no java. PTBTokenizer writes its input to a temporary file
  inside pycocoevalcap's own package folder, so that folder must be writable.

Deviations from the official scorer. BLEU and NIST are checked against e2e-metrics' mteval-v13a-sig.pl run
for real (tests/test_e2e_metrics.py, test_official_scorer_agrees_on_unequal_reference_counts, with
FEDPIPE_E2E_METRICS naming a checkout; on 200 E2E test MRs with 1 to 44 references each, BLEU 0.5503 and
NIST 8.0992 agree to the 4 decimals it prints) and against its scoring subs printing 10 decimals (the
values pinned in that file).

* The official script prints 4 decimals; we return unrounded floats.
* BLEU when no n-gram of any order matches anywhere in the corpus: sacrebleu returns 0.0, mteval's
  smoothing gives a small positive number (0.0799 for output "a b c d" against "e f g h"). Likewise,
  if every output has fewer than 4 words, sacrebleu gives 0 where mteval counts the missing orders as
  precision 1. Neither happens on a real eval set.
* Text goes in as given, one string per output: the official scorer reads files line by line, so an
  output or reference can never contain a line break there; here all whitespace runs (line breaks
  included) are collapsed to one space first, which mteval and the PTB tokenizer would have done to a
  one-line input anyway. mteval also reads its input as SGML written without escaping, so a "<" in the
  text could corrupt its parse; we have no such issue.
* `group_references` collects all references of an MR wherever they appear in the split; measure_scores
  groups only consecutive rows with the same MR. The E2E dev and test CSVs list each MR's references
  consecutively, so both give the same groups there.
* pycocoevalcap 1.2 (PyPI) returns a CIDEr of 0 for an n-gram order with an all-zero vector (e.g. a
  one-word output has no bigrams) where the original coco-caption code divides by zero (NaN).
* Bad input raises ValueError up front here (no hypotheses, lengths that differ, an MR without
  references, an empty reference); measure_scores only asserts equal lengths.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Sequence

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HINT = ("install a Java runtime, e.g. `apt-get install default-jre-headless` (Debian/Ubuntu), or score "
             "BLEU and NIST alone with e2e_bleu / e2e_nist, which need no java")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_NIST_ORDER = 5
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # penalty 0.5 at 2/3 of the mean reference length


class JavaNotFoundError(RuntimeError):
    """METEOR, ROUGE_L or CIDEr were asked for but `java` is not on PATH."""


def group_references(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """(MR, reference) pairs of an eval split -> distinct MRs in first-seen order, all references per MR."""
    groups: dict[str, list[str]] = {}
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] is {pair!r}; expected an (MR, reference) pair")
        mr, ref = pair
        groups.setdefault(mr, []).append(ref)
    return list(groups), list(groups.values())


def score_e2e(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
              meteor: bool = True) -> dict[str, float]:
    """BLEU, NIST, METEOR, ROUGE_L, CIDEr of one output per MR against all references of that MR.

    `meteor=False` leaves METEOR (and its key) out. Raises JavaNotFoundError without java on PATH.
    """
    hyps, refs = _clean(hypotheses, references)
    _require_java()  # before the fast metrics, so a missing JVM fails at once
    scores = {"BLEU": _bleu(hyps, refs), "NIST": _nist(hyps, refs)}
    scores.update(_coco_scores(hyps, refs, meteor=meteor))
    return {k: scores[k] for k in METRICS if k in scores}


def all_metrics(scores: dict[str, float]) -> dict[str, float]:
    """The five metrics in METRICS order, one left out (METEOR with meteor=False) as NaN rather than absent:
    the fixed set of fields results.h5 and the reports expect."""
    return {k: float(scores.get(k, math.nan)) for k in METRICS}


def e2e_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-1) as mteval-v13a computes it in the E2E scorer; needs no java."""
    return _bleu(*_clean(hypotheses, references))


def e2e_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus NIST (5-grams) as mteval-v13a computes it in the E2E scorer; needs no java."""
    return _nist(*_clean(hypotheses, references))


def _clean(hypotheses, references) -> tuple[list[str], list[list[str]]]:
    """Check the input; collapse whitespace runs (the official scorer reads one text per line)."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be lists (one hypothesis / one list of references "
                        "per MR), not a single string")
    hyps, refs = list(hypotheses), list(references)
    if not hyps:
        raise ValueError("no hypotheses to score: pass one generated text per MR")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists: pass exactly one "
                         "hypothesis per MR, in the order of group_references()")
    for i, h in enumerate(hyps):
        if not isinstance(h, str):
            raise TypeError(f"hypotheses[{i}] is {type(h).__name__}, expected str")
    for i, rs in enumerate(refs):
        if isinstance(rs, str):
            raise TypeError(f"references[{i}] is a string; pass a list of references per MR, e.g. [[ref], ...]")
        if len(rs) == 0:
            raise ValueError(f"MR #{i} has no references; every MR needs at least one")
        for j, r in enumerate(rs):
            if not isinstance(r, str):
                raise TypeError(f"references[{i}][{j}] is {type(r).__name__}, expected str")
            if not r.strip():
                raise ValueError(f"reference #{j} of MR #{i} is empty")
    return [" ".join(h.split()) for h in hyps], [[" ".join(r.split()) for r in rs] for rs in refs]


def _mteval_case(text: str) -> str:
    return text.translate(_ASCII_LOWER)  # mteval lowercases ASCII letters only


def _bleu(hyps: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.metrics import BLEU

    streams = [[_mteval_case(rs[k]) if k < len(rs) else None for rs in refs]
               for k in range(max(len(rs) for rs in refs))]
    # force=True: score the text as given, without sacrebleu's "looks tokenized" warning.
    bleu = BLEU(tokenize="13a", lowercase=False, smooth_method="exp", force=True)
    return bleu.corpus_score([_mteval_case(h) for h in hyps], streams).score / 100.0


def _nist(hyps: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    hyp_toks = [tok(_mteval_case(h)).split() for h in hyps]
    ref_toks = [[tok(_mteval_case(r)).split() for r in rs] for rs in refs]

    counts: Counter = Counter()
    ref_words = 0
    for rs in ref_toks:
        for r in rs:
            ref_words += len(r)
            counts.update(_ngrams(r))
    if ref_words == 0:
        return 0.0

    def info(g: tuple[str, ...]) -> float:
        # mteval tests the (n-1)-gram prefix for Perl truth, so a prefix that is the single token "0" is
        # treated like a unigram's empty prefix (total reference words). Kept for identical scores.
        prefix = " ".join(g[:-1])
        return math.log2((counts[g[:-1]] if prefix not in ("", "0") else ref_words) / counts[g])

    gained = [0.0] * (_NIST_ORDER + 1)  # information of matched n-grams, per order n
    total = [0] * (_NIST_ORDER + 1)  # hypothesis n-grams, per order n
    for h, rs in zip(hyp_toks, ref_toks):
        ref_max: Counter = Counter()
        for r in rs:
            ref_max |= Counter(_ngrams(r))  # | keeps the larger count: clip against any one reference
        for g, c in Counter(_ngrams(h)).items():
            if g in ref_max:
                gained[len(g)] += info(g) * min(c, ref_max[g])
        for n in range(1, _NIST_ORDER + 1):
            total[n] += max(len(h) - n + 1, 0)
    score = sum(gained[n] / max(total[n], 1) for n in range(1, _NIST_ORDER + 1))
    # The length penalty compares the output's length with the mean reference length, taken as all reference
    # words over the mean number of non-empty references per MR: e2e-metrics' mteval-v13a-sig.pl, adapted to
    # a variable number of references ($cum_ref_count / $cum_seg_count in score_system). The unadapted
    # script divides by the number of reference streams (the maximum), which overstates NIST on sets whose
    # MRs have unequal reference counts.
    mean_refs = sum(sum(1 for r in rs if r) for rs in ref_toks) / len(ref_toks)
    return score * _nist_length_penalty(total[1] / (ref_words / mean_refs))


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def _ngrams(tokens: list[str], max_n: int = _NIST_ORDER):
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            yield tuple(tokens[i:i + n])


def _require_java() -> None:
    if shutil.which("java") is None:
        raise JavaNotFoundError("METEOR, ROUGE_L and CIDEr need `java` on PATH (pycocoevalcap runs the "
                                f"Stanford PTB tokenizer and METEOR 1.5 jars) and none was found: {JAVA_HINT}")


def _coco_scores(hyps: list[str], refs: list[list[str]], *, meteor: bool) -> dict[str, float]:
    """METEOR / ROUGE_L / CIDEr the way COCOEvalCap computes them (PTB tokenization first)."""
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError(f"METEOR/ROUGE_L/CIDEr need pycocoevalcap ({e}); `pip install 'fedpipe_dist[eval]'` "
                          "or `pip install pycocoevalcap`") from e
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    # A failed JVM yields no lines: missing entries, or all-empty text (references are never blank here).
    if (len(res) != len(hyps) or len(gts) != len(refs) or any(len(gts[i]) != len(rs) for i, rs in enumerate(refs))
            or not any(r for rs in gts.values() for r in rs)):
        raise RuntimeError("the PTB tokenizer (java) returned fewer lines than it was given; check that "
                           "`java -version` works and that pycocoevalcap's tokenizer folder is writable")
    scores: dict[str, float] = {}
    if meteor:
        scores["METEOR"] = _meteor(Meteor, gts, res)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _meteor(meteor_cls, gts: dict, res: dict) -> float:
    scorer = meteor_cls()  # starts `java -jar -Xmx2G meteor-1.5.jar`
    try:
        return float(scorer.compute_score(gts, res)[0])
    except ValueError as e:  # the JVM died: it printed nothing where a score was expected
        if scorer.lock.locked():
            scorer.lock.release()  # compute_score holds it; Meteor.__del__ would block on it forever
        scorer.meteor_p.kill()
        err = scorer.meteor_p.stderr.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"METEOR 1.5 (java -Xmx2G -jar meteor-1.5.jar) gave no score (it asks for a 2 GB "
                           f"Java heap). Its stderr: {err or '(empty)'}") from e
    finally:
        del scorer
