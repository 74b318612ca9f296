"""Layer: fedpipe_dist.metrics.e2e (E2E challenge BLEU/NIST/METEOR/ROUGE_L/CIDEr), in one process, no torch.

BLEU and NIST are checked against hand computations, sacrebleu called directly, nltk's NIST (where it
agrees with mteval) and values of the mteval-v13a scoring code. METEOR/ROUGE_L/CIDEr run pycocoevalcap's
jars and skip when `java` is missing; METEOR starts one JVM for the whole file (about 10-15 s).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_e2e_metrics.py -q
"""

import math
import os
import shutil

import pytest

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is not installed (pip install -e .[test])")
pytest.importorskip("nltk", reason="nltk is not installed (pip install -e .[test])")
from nltk.translate.nist_score import corpus_nist  # noqa: E402
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # noqa: E402

from fedpipe_dist.metrics import e2e  # noqa: E402
from fedpipe_dist.metrics.e2e import METRICS, JavaNotFoundError, e2e_bleu, e2e_nist, group_references, score_e2e  # noqa: E402

needs_java = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="java is not installed (pycocoevalcap's PTB tokenizer and METEOR 1.5 are jars); "
           "apt-get install default-jre-headless")

NIST_BETA = math.log(2) / math.log(1.5) ** 2  # penalty 0.5 when output length is 2/3 of the reference mean


# ---------------------------------------------------------------- grouping and input errors (no java)

def test_group_references_keeps_first_seen_order_and_collects_all_references():
    pairs = [("name[A]", "A one."), ("name[B]", "B one."), ("name[A]", "A two."), ("name[C]", "C one."),
             ("name[B]", "B two.")]
    mrs, refs = group_references(pairs)
    assert mrs == ["name[A]", "name[B]", "name[C]"]
    assert refs == [["A one.", "A two."], ["B one.", "B two."], ["C one."]]
    assert group_references([]) == ([], [])
    with pytest.raises(ValueError, match=r"pairs\[1\].*\(MR, reference\) pair"):
        group_references([("mr", "ref"), ("mr only",)])


@pytest.mark.parametrize("hyps, refs, exc, message", [
    ([], [], ValueError, "no hypotheses"),
    (["a b"], [["a b"], ["c d"]], ValueError, "1 hypotheses but 2 reference lists"),
    (["a b", "c d"], [["a b"], []], ValueError, "MR #1 has no references"),
    (["a b"], [["a b", "  "]], ValueError, "reference #1 of MR #0 is empty"),
    (["a b"], ["a b"], TypeError, r"references\[0\] is a string"),
    ("a b", [["a b"]], TypeError, "not a single string"),
    ([None], [["a b"]], TypeError, r"hypotheses\[0\] is NoneType"),
])
def test_bad_input_is_rejected_with_a_clear_message(hyps, refs, exc, message):
    for fn in (e2e_bleu, e2e_nist, score_e2e):
        with pytest.raises(exc, match=message):
            fn(hyps, refs)


def test_missing_java_raises_instead_of_faking_scores(monkeypatch):
    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match=r"need `java` on PATH.*apt-get install default-jre-headless"):
        score_e2e(["the eagle is a pub"], [["the eagle is a pub"]], meteor=False)


def test_a_java_that_fails_raises_instead_of_scoring_empty_text(tmp_path, monkeypatch):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match=r"PTB tokenizer \(java\) returned fewer lines"):
        score_e2e(["the eagle is a pub"], [["the eagle is a pub"]], meteor=False)


# ---------------------------------------------------------------- BLEU (no java)

def test_bleu_hand_computed_with_brevity_penalty_and_mteval_lowercasing():
    # 13a tokens, lowercased (mteval's default): hyp "the eagle is a coffee shop" (6 words),
    # ref "the eagle is a cheap coffee shop near the river" (10 words).
    # 1-grams: 6/6 match. 2-grams: the eagle, eagle is, is a, coffee shop match; "a coffee" not -> 4/5.
    # 3-grams: the eagle is, eagle is a -> 2/4. 4-grams: the eagle is a -> 1/3.
    # BP = exp(1 - 10/6). BLEU = BP * (1 * 4/5 * 2/4 * 1/3) ** (1/4) = 0.51342 * 0.60428 = 0.31025
    expected = math.exp(1 - 10 / 6) * (1 * 4 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert expected == pytest.approx(0.31025, abs=1e-5)
    assert e2e_bleu(["The Eagle is a COFFEE shop"], [["the eagle is a cheap coffee shop near the river"]]) \
        == pytest.approx(expected, rel=1e-12)


def test_bleu_uses_all_references_of_an_mr():
    hyp = ["Blue Spice is a pub near the river in the city centre."]
    other = "Blue Spice serves cheap Italian food at a riverside coffee shop."
    assert e2e_bleu(hyp, [[other, hyp[0]]]) == pytest.approx(1.0, abs=1e-12)  # matches the 2nd reference
    assert e2e_bleu(hyp, [[other]]) < 0.2


def test_bleu_equals_sacrebleu_corpus_bleu_on_transposed_reference_streams():
    hyps = ["The Eagle is a cheap coffee shop near Burger King.",
            "Zizzi is a pub with a customer rating of 5 out of 5.",
            "Cotto, an Italian place, is near the river."]
    refs = [["The Eagle coffee shop is cheap and is near Burger King.", "Cheap coffee shop The Eagle.",
             "Near Burger King is The Eagle, a cheap coffee shop."],
            ["Zizzi is a pub rated 5 out of 5."],
            ["Cotto is an Italian restaurant by the river.", "Italian food at Cotto, near the river."]]
    # sacrebleu wants one stream per reference position; MRs with fewer references are padded with None.
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(3)]
    direct = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100
    assert 0.2 < direct < 0.9
    assert e2e_bleu(hyps, refs) == pytest.approx(direct, rel=1e-12)


def test_bleu_pads_with_none_not_empty_string_like_mteval_skips_empty_references():
    # The short output of MR 2 has references of length 6 and (padding) 0: with "" padding sacrebleu would
    # take 0 as the closest reference length and drop the brevity penalty; mteval skips length-0 refs.
    hyps = ["the eagle is a cheap coffee shop", "the pub"]
    refs = [["the eagle is a cheap coffee shop", "the eagle coffee shop is cheap"], ["the pub is near the river"]]
    padded = {pad: sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs], [refs[0][1], pad]]).score / 100
              for pad in (None, "")}
    assert padded[None] != pytest.approx(padded[""], abs=1e-3)
    assert e2e_bleu(hyps, refs) == pytest.approx(padded[None], rel=1e-12)


def test_bleu_and_nist_match_the_mteval_v13a_scoring_code():
    # Values of e2e-metrics' mteval-v13a-sig.pl (its scoring subs, printing 10 decimals; the script itself
    # prints 4: BLEU 0.5833, NIST 3.9026, and test_official_scorer_agrees_on_unequal_reference_counts reruns it).
    hyps = ["The Eagle is a cheap coffee shop.", "Zizzi, a pub rated 5 out of 5."]
    refs = [["The Eagle is a cheap coffee shop near Burger King.", "Cheap coffee shop The Eagle."],
            ["Zizzi is a pub with a 5 out of 5 rating."]]
    assert e2e_bleu(hyps, refs) == pytest.approx(0.5832725853, abs=1e-9)
    # NIST as e2e-metrics' adapted script computes it (its length penalty: mean non-empty references per MR)
    assert e2e_nist(hyps, refs) == pytest.approx(3.9025929862, abs=1e-9)
    # A bigram whose first token is "0": mteval's Perl truth test sends it down the unigram branch.
    hyps = ["0 stars , 0 stars here", "it has 0 stars"]
    refs = [["it has 0 stars and 0 stars"], ["0 stars for it , 0 stars"]]
    assert e2e_nist(hyps, refs) == pytest.approx(1.2674988115, abs=1e-9)


# ---------------------------------------------------------------- NIST (no java)

def test_nist_hand_computed_information_weights_and_multi_reference_clipping():
    # References (14 words): MR 1 "the pub is cheap", "the pub is near the river"; MR 2 "the cafe is cheap".
    # Counts: the 4, pub 2, is 3, cheap 2, cafe 1; "the pub" 2, "pub is" 2, "is cheap" 2, "the cafe" 1,
    # "cafe is" 1; "the pub is" 2, "pub is cheap" 1, "the cafe is" 1; "the pub is cheap" 1.
    # info(w) = log2(14 / count(w)); info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)).
    # Output 1 "the pub is cheap" matches everything; output 2 "the cafe is near" matches the, cafe, is,
    # "the cafe", "cafe is", "the cafe is". Output n-grams: 8 unigrams, 6 bigrams, 4 trigrams, 2 4-grams.
    uni = (math.log2(14 / 4) + math.log2(14 / 2) + math.log2(14 / 3) + math.log2(14 / 2)
           + math.log2(14 / 4) + math.log2(14 / 1) + math.log2(14 / 3)) / 8
    bi = (math.log2(4 / 2) + math.log2(2 / 2) + math.log2(3 / 2) + math.log2(4 / 1) + math.log2(1 / 1)) / 6
    tri = (math.log2(2 / 2) + math.log2(2 / 1) + math.log2(1 / 1)) / 4
    four = math.log2(2 / 1) / 2
    # 8 output words vs a mean reference length of 14 words / 1.5 references per MR = 9.33: ratio 0.857.
    expected = (uni + bi + tri + four) * math.exp(-NIST_BETA * math.log(8 / (14 / 1.5)) ** 2)
    assert expected == pytest.approx(3.19591, abs=1e-5)  # the official scorer's value
    hyps = ["the pub is cheap", "the cafe is near"]
    refs = [["the pub is cheap", "the pub is near the river"], ["the cafe is cheap"]]
    assert e2e_nist(hyps, refs) == pytest.approx(expected, rel=1e-12)
    # Clipping is against the largest count in any one reference, not the sum over references: "the the"
    # vs "the pub", "the inn" (4 words, info(the) = log2(4/2) = 1) credits one "the": 1 / 2 unigrams.
    assert e2e_nist(["the the"], [["the pub", "the inn"]]) == pytest.approx(0.5, rel=1e-12)


def test_nist_length_penalty_uses_reference_words_over_the_mean_reference_count():
    # e2e-metrics adapted mteval to a variable number of references per MR: the mean reference length is all
    # reference words over the mean number of non-empty references per MR. 12 reference words, 3 references
    # over 2 MRs: 12 / 1.5 = 8; 6 output words -> ratio 0.75. Only unigrams carry information (every bigram
    # continues its prefix always).
    hyps = ["a b c d", "x y"]
    refs = [["a b c d", "a b c d e f"], ["x y"]]
    base = (4 * math.log2(12 / 2) + 2 * math.log2(12 / 1)) / 6
    expected = base * math.exp(-NIST_BETA * math.log(6 / 8) ** 2)
    assert expected == pytest.approx(2.0587, abs=5e-5)  # the official scorer prints 2.0587
    assert e2e_nist(hyps, refs) == pytest.approx(expected, rel=1e-12)
    # The unadapted script's rule (words / number of reference streams = 12 / 2 = 6) would give no penalty:
    assert base > expected + 0.1
    # Output 1 alone: 4 words vs 10 / 2 = 5 -> ratio 0.8, penalty exp(-beta * ln(0.8)^2) = 0.8106.
    assert e2e_nist(hyps[:1], refs[:1]) == pytest.approx(
        math.log2(10 / 2) * math.exp(-NIST_BETA * math.log(0.8) ** 2), rel=1e-12)


def test_nist_with_one_two_and_three_references_per_mr_matches_the_official_scorer():
    # 1, 3 and 2 references: 19 reference words / 2 references per MR = 9.5; 9 output words. The official
    # e2e-metrics scorer prints NIST 4.1224 here (the maximum rule, 19 / 3, would drop the penalty).
    hyps = ["a b c d", "x y", "p q r"]
    refs = [["a b c d"], ["x y", "x y z", "x y z w"], ["p q r s", "p q"]]
    assert e2e_nist(hyps, refs) == pytest.approx(4.1224, abs=5e-5)


def test_nist_equals_nltk_corpus_nist_with_one_reference_per_mr():
    # With a single reference nltk's best-reference choice and mteval's clipping coincide.
    hyps = ["The Eagle is a cheap coffee shop near Burger King.", "Zizzi is a pub, rated 5 out of 5.",
            "Cotto serves Italian food by the river."]
    refs = [["The Eagle coffee shop is cheap and it is near Burger King."], ["Zizzi is a pub with a rating of 5."],
            ["Italian food is served at Cotto, which is by the river in the city centre."]]
    tok = Tokenizer13a()
    nltk_value = corpus_nist([[tok(r.lower()).split() for r in rs] for rs in refs],
                             [tok(h.lower()).split() for h in hyps], 5)
    assert nltk_value > 1
    assert e2e_nist(hyps, refs) == pytest.approx(nltk_value, rel=1e-12)


# ---------------------------------------------------------------- all five metrics (java)

@pytest.fixture(scope="module")
def perfect_scores():
    refs = [["The Eagle is a cheap coffee shop near Burger King.", "Near Burger King is The Eagle, a cheap café."],
            ["Zizzi is a pub with a 5 out of 5 rating."],
            ["Cotto is an Italian restaurant by the river.", "Italian food at Cotto, near the river.",
             "Cotto, by the river, serves Italian food."]]
    hyps = [refs[0][1], refs[1][0], refs[2][2]]
    return score_e2e(hyps, refs)  # the one METEOR run (one JVM) of this file


@needs_java
def test_perfect_match(perfect_scores):
    s = perfect_scores
    assert list(s) == list(METRICS)
    assert s["BLEU"] == pytest.approx(1.0, abs=1e-12)
    assert s["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    assert s["METEOR"] == pytest.approx(1.0, abs=1e-9)  # METEOR 1.5 gives identical strings 1.0, no penalty
    assert s["CIDEr"] > 1.0
    assert s["NIST"] > 2.0


@needs_java
def test_no_overlap_scores_zero_and_meteor_can_be_left_out():
    hyps = ["Blue Spice sits near riverside", "Cotto has high prices"]
    refs = [["The Eagle serves French food"], ["Zizzi is a cheap pub"]]
    s = score_e2e(hyps, refs, meteor=False)
    assert "METEOR" not in s
    assert s == {"BLEU": 0.0, "NIST": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}


@needs_java
def test_cider_is_ten_and_rouge_l_one_for_exact_single_reference_matches():
    # CIDEr-D: identical tf-idf vectors have cosine 1 for n = 1..4, no length penalty, times 10. Every
    # n-gram occurs in fewer than all 3 MRs, so all idf weights are > 0.
    refs = [["The Eagle serves French food."], ["Zizzi is a cheap pub."], ["Blue Spice is near the river."]]
    s = score_e2e([r[0] for r in refs], refs, meteor=False)
    assert s["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert s["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)


@needs_java
def test_rouge_l_hand_computed_takes_best_precision_and_best_recall_over_references():
    # PTB tokens: "the eagle is a pub" vs "the eagle is a coffee shop" (LCS 4: P 4/5, R 4/6) and "a pub"
    # (LCS 2: P 2/5, R 2/2). pycocoevalcap takes max P = 0.8 and max R = 1.0 separately, beta = 1.2:
    # F = (1 + 1.44) * 0.8 * 1.0 / (1.0 + 1.44 * 0.8) = 0.90706.
    s = score_e2e(["The Eagle is a pub."], [["The Eagle is a coffee shop.", "A pub."]], meteor=False)
    assert s["ROUGE_L"] == pytest.approx(2.44 * 0.8 / (1 + 1.44 * 0.8), rel=1e-12)
    assert s["ROUGE_L"] == pytest.approx(0.90706, abs=1e-5)


# ---------------------------------------------------------------- the official scorer itself (optional)

def _official_scorer():
    """(perl script, create_mteval_file) of an e2e-metrics checkout named by FEDPIPE_E2E_METRICS, or a skip
    saying what is missing. create_mteval_file is e2e-metrics' own (read from its measure_scores.py), so the
    .sgm files are written exactly as the official scorer writes them."""
    import ast
    import codecs
    import subprocess
    from pathlib import Path

    root = os.environ.get("FEDPIPE_E2E_METRICS")
    if not root or not (Path(root) / "mteval" / "mteval-v13a-sig.pl").is_file():
        pytest.skip("the official scorer is not here: set FEDPIPE_E2E_METRICS to a checkout of "
                    "github.com/tuetschek/e2e-metrics")
    if shutil.which("perl") is None or subprocess.run(["perl", "-MXML::Twig", "-e", "1"],
                                                      capture_output=True).returncode != 0:
        pytest.skip("mteval-v13a-sig.pl needs perl with XML::Twig (apt-get install libxml-twig-perl)")
    import warnings

    with warnings.catch_warnings():  # its regular expressions are not raw strings
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse((Path(root) / "measure_scores.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "create_mteval_file")
    ns = {"codecs": codecs}
    exec(compile(ast.Module([fn], []), "measure_scores.py", "exec"), ns)
    return Path(root) / "mteval" / "mteval-v13a-sig.pl", ns["create_mteval_file"]


def _official_bleu_nist(hyps, refs, tmp_path) -> tuple[float, float]:
    import re
    import subprocess

    script, create_mteval_file = _official_scorer()
    files = {}
    for kind, data in (("ref", refs), ("tst", hyps), ("src", ["mr"] * len(hyps))):
        files[kind] = str(tmp_path / f"{kind}.sgm")
        create_mteval_file(data, files[kind], kind)
    out = subprocess.run(["perl", str(script), "-r", files["ref"], "-s", files["src"], "-t", files["tst"],
                          "-f", str(tmp_path / "log")], capture_output=True, text=True, check=True).stdout
    return (float(re.search(r"BLEU score = ([0-9.]+)", out).group(1)),
            float(re.search(r"NIST score = ([0-9.]+)", out).group(1)))


def test_official_scorer_agrees_on_unequal_reference_counts(tmp_path):
    """e2e-metrics' mteval-v13a-sig.pl, run for real, against e2e_bleu / e2e_nist (it prints 4 decimals): the
    E2E test set (up to 45 references per MR) when ../shared/data has it, with each MR's last reference as
    the output; and the small sets above."""
    from fedpipe_dist.data.e2e import read_e2e_csv

    from ._util import shared_data

    sets = [(["The Eagle is a cheap coffee shop.", "Zizzi, a pub rated 5 out of 5."],
             [["The Eagle is a cheap coffee shop near Burger King.", "Cheap coffee shop The Eagle."],
              ["Zizzi is a pub with a 5 out of 5 rating."]]),
            (["a b c d", "x y", "p q r"], [["a b c d"], ["x y", "x y z", "x y z w"], ["p q r s", "p q"]])]
    data = shared_data()
    if data is not None and (data / "e2e" / "testset_w_refs.csv").is_file():
        _, grouped = group_references(read_e2e_csv(data / "e2e" / "testset_w_refs.csv", "test"))
        grouped = [rs for rs in grouped if len(rs) > 1][:200]
        sets.append(([rs[-1] for rs in grouped], [rs[:-1] for rs in grouped]))
    for i, (hyps, refs) in enumerate(sets):
        (tmp_path / str(i)).mkdir()
        bleu, nist = _official_bleu_nist(hyps, refs, tmp_path / str(i))
        assert e2e_bleu(hyps, refs) == pytest.approx(bleu, abs=5e-5)
        assert e2e_nist(hyps, refs) == pytest.approx(nist, abs=5e-5)
