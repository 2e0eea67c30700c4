import math

import pytest

from attrsparse.data.textmetrics import (
    NO_COMMENT,
    mean_and_stderr,
    official_corpus_bleu,
    rouge_l,
    sentence_bleu,
    truth_scores,
)


@pytest.mark.parametrize("text", ["Paris", "New York", "a b c", "the cat sat on the mat", "¿Qué?"])
def test_identical_texts_score_100(text):
    assert sentence_bleu(text, text) == 100.0
    assert rouge_l(text, text) == 100.0


def test_official_corpus_bleu_pitfall():
    # The paper's variant has no effective order: an identical 2-word answer scores 0.
    assert official_corpus_bleu("New York", "New York") == 0.0
    assert sentence_bleu("New York", "New York") == 100.0
    # From four words on, both agree on identical texts.
    assert official_corpus_bleu("the cat sat down", "the cat sat down") == pytest.approx(100.0)


def test_empty_texts():
    # two empty answers are undefined (NaN), not a perfect match (issue 16: a broken model's empty
    # answers scored 100 against each other); the means leave them out and count them
    assert math.isnan(sentence_bleu("", ""))
    assert math.isnan(rouge_l("  ", ""))
    assert mean_and_stderr([100.0, math.nan, 0.0])[0] == 50.0
    assert all(math.isnan(x) for x in mean_and_stderr([math.nan]))
    assert sentence_bleu("", "Paris") == 0.0
    assert sentence_bleu("Paris", "") == 0.0
    assert rouge_l("", "Paris") == 0.0
    assert rouge_l("Paris", " ") == 0.0


def test_bleu_hand_checked():
    # "the cat sat" vs "the cat sat on the mat": effective order 3, every 1-3-gram matches,
    # brevity penalty exp(1 - 6/3) = exp(-1).
    assert sentence_bleu("the cat sat", "the cat sat on the mat") == pytest.approx(100 * math.exp(-1), abs=1e-6)
    assert sentence_bleu("dogs bark loudly", "the cat sat on the mat") == 0.0


def test_rouge_hand_checked():
    # LCS 3, precision 3/3, recall 3/6 -> F = 2/3.
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(200 / 3)
    # Porter stemming: cats/cat and running/run match.
    assert rouge_l("cats running", "cat run") == pytest.approx(100.0)
    assert rouge_l("dogs bark", "the cat sat") == 0.0


def test_truth_scores_sign():
    correct = ["The seeds pass through you", "Nothing happens"]
    incorrect = ["You grow watermelons in your stomach", "You die"]
    good = truth_scores("Nothing happens", correct, incorrect)
    assert good["bleu_max_correct"] == 100.0
    assert good["bleu_diff"] > 0 and good["bleu_acc"] == 1.0
    assert good["rougeL_diff"] > 0 and good["rougeL_acc"] == 1.0
    assert good["bleu_diff"] == pytest.approx(good["bleu_max_correct"] - good["bleu_max_incorrect"])
    bad = truth_scores("You grow watermelons in your stomach", correct, incorrect)
    assert bad["bleu_max_incorrect"] == 100.0
    assert bad["bleu_diff"] < 0 and bad["bleu_acc"] == 0.0
    assert bad["rougeL_diff"] < 0 and bad["rougeL_acc"] == 0.0
    assert set(good) == {f"{m}_{k}" for m in ("bleu", "rougeL")
                         for k in ("max_correct", "max_incorrect", "diff", "acc")}


def test_truth_scores_options():
    scores = truth_scores(NO_COMMENT, ["Paris"], ["London"], add_no_comment=True)
    assert scores["bleu_max_correct"] == 100.0 and scores["bleu_acc"] == 1.0
    tie = truth_scores("Berlin", ["Paris"], [])
    assert tie["bleu_max_incorrect"] == 0.0 and tie["bleu_acc"] == 0.0  # diff 0 is not > 0
    with pytest.raises(ValueError):
        truth_scores("x", [], ["y"])


def test_mean_and_stderr():
    mean, se = mean_and_stderr([1, 2, 3, 4])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3) / 2)
    assert mean_and_stderr([0.0, 100.0]) == (50.0, pytest.approx(50.0))
    m1, s1 = mean_and_stderr([7.0])
    assert m1 == 7.0 and math.isnan(s1)
    with pytest.raises(ValueError):
        mean_and_stderr([])
