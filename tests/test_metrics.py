"""Hand-computed cases for pipeline.tasks.metrics (task utilities of docs/method.md section 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.tasks.metrics import (
    anls,
    corpus_bleu,
    corpus_cider,
    levenshtein,
    ndcg_at_k,
    normalize_answer,
    sentence_bleu,
    tokenize_caption,
    vqa_accuracy,
)

# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The Dog.  ", "dog"),
        ("An apple, a pear!", "apple pear"),
        ("3.5", "3.5"),  # decimal point inside a number is kept
        ("3.", "3"),  # a sentence-final period is not
        ("1,000", "1000"),
        ("It's TWO", "its 2"),
        ("zero one ten eleven", "0 1 10 eleven"),
        ("red-white   blue", "red white blue"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


# ------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(("n_match", "expected"), [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 1.0)])
def test_vqa_accuracy_ten_references(n_match: int, expected: float) -> None:
    refs = ["yes"] * n_match + ["no"] * (10 - n_match)
    assert vqa_accuracy("Yes.", refs) == pytest.approx(expected)


def test_vqa_accuracy_number_words() -> None:
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("2", ["two", "Two", "2", "3"]) == 1.0  # 3 matches after normalisation
    assert vqa_accuracy("3", ["two", "2"]) == 0.0


def test_vqa_accuracy_single_reference_containment() -> None:
    assert vqa_accuracy("a red circle", ["red"]) == 1.0
    assert vqa_accuracy("It is the red one.", ["Red"]) == 1.0
    assert vqa_accuracy("redder", ["red"]) == 0.0  # not a whole word
    assert vqa_accuracy("red circle", ["red square"]) == 0.0
    # containment only applies to a single reference: with two, exact matches count
    assert vqa_accuracy("a red circle", ["red", "red"]) == pytest.approx(0.0)


def test_vqa_accuracy_empty_prediction_and_errors() -> None:
    assert vqa_accuracy("", ["red"]) == 0.0
    assert vqa_accuracy("  the ", ["the"]) == 0.0  # normalises to empty
    with pytest.raises(ValueError, match="references"):
        vqa_accuracy("red", [])
    with pytest.raises(ValueError, match="sequence"):
        vqa_accuracy("red", "red")  # a bare string is not a list of references


# ------------------------------------------------------------------------- ANLS


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_levenshtein(a: str, b: str, d: int) -> None:
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_anls_values() -> None:
    assert anls("CAT ", ["cat"]) == 1.0  # lowercased and stripped
    # "hello" vs "helo": distance 1, max length 5 -> 1 - 1/5 = 0.8
    assert anls("hello", ["helo"]) == pytest.approx(0.8)
    # max over references: "dog" (0) and "hello" (1 - 1/5 = 0.8)
    assert anls("helo", ["dog", "hello"]) == pytest.approx(0.8)


def test_anls_threshold_boundary() -> None:
    # "ab" vs "ac": 1 - 1/2 = 0.5 exactly -> kept (only values below 0.5 become 0)
    assert anls("ab", ["ac"]) == pytest.approx(0.5)
    # "abc" vs "axy": 1 - 2/3 = 1/3 < 0.5 -> 0
    assert anls("abc", ["axy"]) == 0.0
    # same pair with a lower threshold keeps 1/3
    assert anls("abc", ["axy"], threshold=0.3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="threshold"):
        anls("a", ["a"], threshold=1.5)


def test_anls_empty() -> None:
    assert anls("", [""]) == 1.0
    assert anls("  ", [""]) == 1.0
    assert anls("", ["cat"]) == 0.0  # distance 3 / length 3 -> similarity 0
    with pytest.raises(ValueError, match="references"):
        anls("cat", [])


# ------------------------------------------------------------------------- BLEU


def test_tokenize_caption() -> None:
    assert tokenize_caption("A dog, running.") == ["a", "dog", ",", "running", "."]
    assert tokenize_caption("  ") == []


def test_bleu_perfect_match() -> None:
    preds = ["a man rides a red bike down the street", "two dogs play in the snow"]
    refs = [["a man rides a red bike down the street", "someone on a bike"], ["two dogs play in the snow"]]
    assert corpus_bleu(preds, refs) == pytest.approx(1.0)
    assert sentence_bleu(preds[0], refs[0]) == pytest.approx(1.0)


def test_bleu_brevity_penalty() -> None:
    # Hypothesis = first 6 of the reference's 8 tokens: every n-gram precision is 1,
    # c = 6, r = 8, BP = exp(1 - 8/6) = exp(-1/3) = 0.716531...
    pred = "a cat sits on the mat"
    ref = "a cat sits on the mat at home"
    assert corpus_bleu([pred], [[ref]]) == pytest.approx(math.exp(-1 / 3))
    assert corpus_bleu([pred], [[ref]]) == pytest.approx(0.7165313)


def test_bleu_closest_reference_length_tie_goes_to_shorter() -> None:
    # c = 5, reference lengths 4 and 6 are equally close -> r = 4 < c -> BP = 1.
    # All hypothesis n-grams occur in the 6-token reference, so BLEU = 1 (with r = 6
    # it would be exp(1 - 6/5) = 0.8187).
    pred = "one two three four five"
    refs = ["one two three six", "one two three four five six"]
    assert corpus_bleu([pred], [refs]) == pytest.approx(1.0)


def test_bleu_zero_four_gram_match() -> None:
    # 1..3-grams match, the single 4-gram does not -> unsmoothed BLEU-4 = 0
    pred, ref = "the cat sat down", "the cat sat up"
    assert corpus_bleu([pred], [[ref]]) == 0.0
    # sentence BLEU+1: p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1), BP = 1
    expected = (0.75 * 0.75 * (2 / 3) * 0.5) ** 0.25  # = 0.658037
    assert sentence_bleu(pred, [ref]) == pytest.approx(expected)
    assert sentence_bleu(pred, [ref]) == pytest.approx(0.6580370)


def test_bleu_multi_reference_clipping() -> None:
    # Papineni et al. (2002): "the" x7, max count of "the" in one reference is 2 ->
    # unigram precision 2/7; c = 7, closest reference length 7 -> BP = 1.
    pred = "the the the the the the the"
    refs = ["the cat is on the mat", "there is a cat on the mat"]
    assert corpus_bleu([pred], [refs], max_n=1) == pytest.approx(2 / 7)
    # the max is taken per reference, not summed over references: 2/7, not 3/7
    assert corpus_bleu([pred], [refs + ["the end"]], max_n=1) == pytest.approx(2 / 7)


def test_bleu_is_corpus_level() -> None:
    # Counts summed over items: p1 = (2 + 1)/4, p2 = (1 + 0)/2, c = r = 4 ->
    # BLEU-2 = sqrt(3/4 * 1/2) = 0.612372 (item 2 alone would give 0).
    preds, refs = ["a b", "c d"], [["a b"], ["c e"]]
    assert corpus_bleu(preds, refs, max_n=2) == pytest.approx(math.sqrt(3 / 8))


def test_bleu_empty_predictions() -> None:
    assert corpus_bleu([""], [["a cat"]]) == 0.0
    assert sentence_bleu("", ["a cat"]) == 0.0
    assert sentence_bleu("dog", ["a cat"]) == 0.0  # no unigram match


def test_bleu_errors() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match=r"references\[1\]"):
        corpus_bleu(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu(["a"], [["a"]], max_n=0)
    with pytest.raises(ValueError, match="references"):
        sentence_bleu("a", [])


# ------------------------------------------------------------------------ CIDEr


def test_cider_hand_computed() -> None:
    # 2 items, idf = log 2 - log df. Item 1 "a cat" vs ref "a cat": unigram "a" has
    # df 2 (weight 0), "cat" df 1 (weight log 2) -> cosine 1; bigram cosine 1; no
    # 3-/4-grams -> 0. Equal lengths -> no penalty. Score = 10 * mean(1, 1, 0, 0) = 5.
    refs = [["a cat"], ["a dog"]]
    assert corpus_cider(["a cat", "a dog"], refs) == pytest.approx(5.0)
    # Wrong caption on item 2 ("a cat" vs "a dog") shares only the zero-weight "a" -> 0,
    # corpus mean (5 + 0) / 2 = 2.5.
    assert corpus_cider(["a cat", "a cat"], refs) == pytest.approx(2.5)


def test_cider_identical_candidate_ranks_higher() -> None:
    refs = [
        ["a red circle on the left", "a red circle at left"],
        ["a blue square in the middle", "blue square in the middle"],
        ["a green triangle on the right", "a triangle that is green"],
    ]
    exact = corpus_cider(["a red circle on the left", *[r[0] for r in refs[1:]]], refs)
    other = corpus_cider(["a yellow star on the bottom", *[r[0] for r in refs[1:]]], refs)
    assert exact > other > 0.0


def test_cider_errors() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        corpus_cider(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="sigma"):
        corpus_cider(["a"], [["a"]], sigma=0.0)


# ------------------------------------------------------------------------- NDCG


def test_ndcg_positive_first() -> None:
    assert ndcg_at_k([3.0, 1.0, 2.0, -1.0], positive_index=0) == 1.0


def test_ndcg_rank_three_and_six() -> None:
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert ndcg_at_k(scores, positive_index=2) == pytest.approx(0.5)  # 1/log2(4)
    assert ndcg_at_k(scores, positive_index=5) == 0.0  # rank 6 > k = 5
    assert ndcg_at_k(scores, positive_index=5, k=6) == pytest.approx(1 / math.log2(7))


def test_ndcg_ties_use_expected_rank() -> None:
    # Full tie of 10: ranks 1..10 equally likely, ranks 6..10 give 0 ->
    # (1 + 1/log2 3 + 1/log2 4 + 1/log2 5 + 1/log2 6) / 10 = 0.2948459
    expected = sum(1 / math.log2(r + 1) for r in range(1, 6)) / 10
    assert ndcg_at_k(np.zeros(10), positive_index=4) == pytest.approx(expected)
    assert ndcg_at_k(np.zeros(10), positive_index=4) == pytest.approx(0.2948459)
    # one higher score, positive tied with one other: ranks 2 and 3 -> mean(1/log2 3, 1/2)
    assert ndcg_at_k([9.0, 1.0, 1.0, 0.0], positive_index=2) == pytest.approx((1 / math.log2(3) + 0.5) / 2)


def test_ndcg_errors() -> None:
    with pytest.raises(ValueError, match=r"scores\[2\] is NaN"):
        ndcg_at_k([1.0, 0.0, float("nan")], positive_index=0)
    with pytest.raises(ValueError, match="out of range"):
        ndcg_at_k([1.0, 0.0], positive_index=2)
    with pytest.raises(ValueError, match="out of range"):
        ndcg_at_k([1.0, 0.0], positive_index=-1)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k([1.0, 0.0], positive_index=0, k=0)


# ------------------------------------------------------- the authors' evaluation code


def test_clean_generation_strips_prefixes_in_order_keeps_first_line_and_unquotes():
    from pipeline.tasks.metrics import clean_generation

    assert clean_generation('  Answer: A: "red"\nsecond line') == "red"
    assert clean_generation("answer:blue") == "blue"  # case-insensitive prefix
    assert clean_generation("Caption: A dog.") == "A dog."  # case kept
    # Each prefix is tried once, in order: "A:" after "Caption:" is not tried again.
    assert clean_generation("Caption: A: x") == "A: x"
    assert clean_generation("'\"quoted\"'") == '"quoted"'  # double quotes first, then single
    assert clean_generation("") == ""
    with pytest.raises(ValueError, match="text must be a str"):
        clean_generation(None)


def test_paper_vqa_accuracy_matches_either_way_as_substring_against_one_answer():
    from pipeline.tasks.metrics import paper_normalize_answer, paper_vqa_accuracy

    assert paper_normalize_answer("Answer : The Red-Car!") == "the redcar"
    assert paper_vqa_accuracy("reddish", ["red"]) == 1.0  # reference inside prediction
    assert paper_vqa_accuracy("red", ["dark red"]) == 1.0  # prediction inside reference
    assert paper_vqa_accuracy("blue", ["red"]) == 0.0
    assert paper_vqa_accuracy("!!", ["red"]) == 0.0  # empty after normalisation
    assert paper_vqa_accuracy("red", ["", "?"]) == 0.0  # no non-empty reference
    # Two or more answers: exact matches over three, no substring rule.
    assert paper_vqa_accuracy("red", ["red", "red", "reddish"]) == pytest.approx(2 / 3)
    assert paper_vqa_accuracy("red", ["red", "red", "red", "blue"]) == 1.0
    # The standard variant disagrees where the substring rule decides.
    assert vqa_accuracy("reddish", ["red"]) == 0.0


def test_paper_anls_uses_the_first_reference_without_non_word_characters():
    from pipeline.tasks.metrics import paper_anls

    assert paper_anls("B-O O.K", ["book"]) == 1.0  # spaces and punctuation removed
    assert paper_anls("book", ["cook", "book"]) == pytest.approx(0.75)  # first reference only
    assert anls("book", ["cook", "book"]) == 1.0  # the standard variant takes the best
    assert paper_anls("abcd", ["wxyz"]) == 0.0
    assert paper_anls("ab", ["abcd"]) == 0.5  # exactly the threshold is kept
    assert paper_anls("...", ["book"]) == 0.0
    with pytest.raises(ValueError, match="references is empty"):
        paper_anls("book", [])


@pytest.mark.parametrize(
    ("references", "predictions", "nltk_value"),
    [
        # Values of nltk 3.9.1 (the authors' pinned version): corpus_bleu(refs, hyps,
        # weights=(0.25,) * 4, smoothing_function=SmoothingFunction().method1) on lower().split().
        ([["a red square on the left ."]], ["a red square the left"], 0.2241350160088414),
        (
            [["a red square ."], ["two shapes : a blue circle ."]],
            ["A red square .", "two shapes a blue circle"],
            0.5152415957866355,
        ),
        ([["a red square"]], ["red"], 0.024066394763145416),
    ],
)
def test_paper_corpus_bleu_equals_nltk_with_smoothing_method_1(references, predictions, nltk_value):
    from pipeline.tasks.metrics import paper_corpus_bleu

    assert paper_corpus_bleu(predictions, references) == pytest.approx(nltk_value, abs=1e-15)


def test_paper_corpus_bleu_by_hand():
    from pipeline.tasks.metrics import paper_corpus_bleu

    # "red" against "a red square": p1 = 1, p2..p4 have no match and count 0.1 matches over a
    # denominator of at least 1; brevity penalty exp(1 - 3 / 1).
    assert paper_corpus_bleu(["red"], [["a red square"]]) == pytest.approx(0.1**0.75 * math.exp(-2.0), rel=1e-12)
    assert paper_corpus_bleu(["blue"], [["a red square"]]) == 0.0  # no unigram match
    assert paper_corpus_bleu([""], [["a red square"]]) == 0.0
    with pytest.raises(ValueError, match=r"references\[0\]: every reference is blank"):
        paper_corpus_bleu(["red"], [["  "]])


def test_model_quality_reports_the_standard_variant_of_the_same_generations(tiny_adapter, annotations, images):
    from pipeline.model.evaluation import aggregate_utility, evaluate_conditions, standard_utility
    from pipeline.model.quality import evaluate_model_quality

    quality = evaluate_model_quality(
        tiny_adapter,
        annotations,
        images,
        tasks=["vqa", "caption", "retrieval"],
        split="test",
        batch_size=8,
        max_new_tokens=4,
        max_items=3,
    )
    assert set(quality) == {"generative", "generative_standard", "generative_by_question_type", "likelihood"}
    assert set(quality["generative_standard"]) == {"vqa", "caption"}  # retrieval ranks, generates nothing
    for task in ("vqa", "caption"):
        items = annotations[(annotations["split"] == "test") & (annotations["task"] == task)].head(3)
        run = evaluate_conditions(
            tiny_adapter, task, items, images, {"generative": [0]}, batch_size=8, max_new_tokens=4
        )["generative"][0]
        assert quality["generative"][task] == round(aggregate_utility(task, run.predictions, items)[0], 6)
        assert quality["generative_standard"][task] == round(standard_utility(task, run.predictions, items), 6)


def test_paper_vqa_utility_scores_the_majority_answer_alone():
    """The first reference is the majority answer (the COCO importer puts it first); the paper's
    utility matches against it alone, the standard variant counts every annotator."""
    import pandas as pd

    from pipeline.model.evaluation import aggregate_utility, standard_utility

    items = pd.DataFrame({"references": [["red", "blue", "blue"], ["dark red", "red"]]})
    value, per = aggregate_utility("vqa", ["Answer: blue", "red"], items)
    assert per.tolist() == [0.0, 1.0]  # "blue" is not the majority "red"; "red" is in "dark red"
    assert value == 0.5
    # Standard: three-annotator rule over every reference: 2/3 for "blue", 1/3 for "red".
    assert standard_utility("vqa", ["blue", "red"], items) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_generated_captions_are_scored_from_one_cleaning():
    """The corpus BLEU, the per-item scores and the statistics a bootstrap resamples all score
    the cleaned captions, as the authors' evaluation cleans them."""
    import pandas as pd

    from pipeline.model.evaluation import generative_scores
    from pipeline.tasks import metrics

    raw = ['Caption: "a red square"\nand more', "Answer: a blue circle on grey", "a green"]
    cleaned = ["a red square", "a blue circle on grey", "a green"]
    refs = [["a red square on grey", "red square"], ["a blue circle on grey"], ["a green triangle"]]
    items = pd.DataFrame({"references": refs})
    assert [metrics.clean_generation(p) for p in raw] == cleaned
    value, per, stats = generative_scores("caption", raw, items)
    assert value == metrics.paper_corpus_bleu(cleaned, refs)
    np.testing.assert_array_equal(stats, metrics.paper_bleu_statistics(cleaned, refs))
    assert per.tolist() == [metrics.sentence_bleu(p, r) for p, r in zip(cleaned, refs)]
    assert generative_scores("vqa", ["Answer: red"], pd.DataFrame({"references": [["red"]]}))[2] is None


def test_model_quality_breaks_a_task_down_by_question_type(tiny_adapter, annotations, images):
    """Each question type's value is the paper's utility of that type's items alone, on the very
    generations of the task's overall value; a task of one type has no breakdown."""
    from pipeline.model.evaluation import aggregate_utility, evaluate_conditions
    from pipeline.model.quality import evaluate_model_quality

    test = annotations[annotations["split"] == "test"]
    vqa = test[test["task"] == "vqa"].head(12)
    assert vqa["question_type"].nunique() > 1
    assert test[test["task"] == "caption"]["question_type"].nunique() == 1
    quality = evaluate_model_quality(
        tiny_adapter,
        annotations,
        images,
        tasks=["vqa", "caption"],
        split="test",
        batch_size=8,
        max_new_tokens=4,
        max_items=12,
        utilities=("generative",),
    )
    by_type = quality["generative_by_question_type"]
    assert set(by_type) == {"vqa"}
    run = evaluate_conditions(tiny_adapter, "vqa", vqa, images, {"generative": [0]}, batch_size=8, max_new_tokens=4)
    predictions = np.asarray(run["generative"][0].predictions, dtype=object)
    kinds = vqa["question_type"].to_numpy()
    assert list(by_type["vqa"]) == list(dict.fromkeys(kinds))
    for k, value in by_type["vqa"].items():
        sel = kinds == k
        assert value == round(aggregate_utility("vqa", list(predictions[sel]), vqa[sel])[0], 6)
    # The overall value weighs the types by their item counts.
    counts = vqa["question_type"].value_counts()
    overall = sum(by_type["vqa"][k] * counts[k] for k in by_type["vqa"]) / len(vqa)
    assert quality["generative"]["vqa"] == pytest.approx(overall, abs=1e-5)
