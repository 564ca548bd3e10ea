"""Task-utility metrics P_t of the HONES benchmark (docs/method.md section 1).

Every metric is "higher is better" and dimensionless; the per-item metrics return a
score in [0, 1], CIDEr-D is on its usual 0..10 scale.

Map of this module:
- ``normalize_answer``: VQA-style answer normalisation (case, punctuation, articles,
  number words, whitespace).
- ``vqa_accuracy`` (task ``vqa``): min(#matching refs / 3, 1) with several references;
  normalised exact or whole-word containment match with a single reference.
- ``levenshtein`` / ``anls`` (task ``ocr``): edit distance and Average Normalised
  Levenshtein Similarity with the usual 0.5 threshold.
- ``tokenize_caption`` / ``corpus_bleu`` / ``sentence_bleu`` (task ``caption``):
  BLEU-4 (Papineni et al. 2002) at corpus level, and a smoothed per-item variant.
- ``corpus_cider`` (task ``caption``, optional): CIDEr-D as in coco-caption.
- ``ndcg_at_k`` (task ``retrieval``): NDCG@k with one relevant candidate, ties broken
  by expectation over a uniformly random order.

The paper's metrics, as the authors' evaluation code computes them (docs/method.md section 1),
are the ``paper_*`` functions: what the ``generative`` utility reports. The functions above
are this project's standard variants (the VQA and DocVQA conventions), reported beside them as
``generative_standard`` by the model-quality stage:
- ``clean_generation``: the authors' answer cleaning (assistant prefixes, first line, quotes),
  applied to every generated answer before a ``paper_*`` metric.
- ``paper_vqa_accuracy``: their normalisation (lowercase, only ``[a-z0-9]`` and spaces) and,
  against one answer, a match when either string contains the other; with two or more
  answers min(#exact matches / 3, 1).
- ``paper_anls``: against the first reference only, both strings lowercased with every
  non-word character (spaces too) removed.
- ``paper_bleu_statistics`` / ``paper_bleu_from_statistics`` / ``paper_corpus_bleu``: NLTK's
  corpus BLEU-4 with smoothing method 1, on lowercased whitespace tokens.
- ``utility_of_values``: a task's utility from per-item values (a mean, or the corpus BLEU of
  summed statistics), what ``outcomes.statistics`` resamples.

Only numpy and the standard library are used. Invalid input raises ``MetricError`` (a
``PipelineError``, hence a ``ValueError``) naming the offending value; nothing is skipped silently.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "levenshtein",
    "anls",
    "tokenize_caption",
    "corpus_bleu",
    "sentence_bleu",
    "corpus_cider",
    "ndcg_at_k",
    "clean_generation",
    "paper_normalize_answer",
    "paper_vqa_accuracy",
    "paper_anls",
    "paper_bleu_statistics",
    "paper_bleu_from_statistics",
    "paper_corpus_bleu",
    "MetricError",
]


class MetricError(PipelineError):
    """A metric was given invalid input (a prediction, reference, score or parameter); the message names it."""


_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_APOSTROPHE = re.compile(r"['\u2019]")  # "it's" -> "its", "don't" -> "dont"
# Any punctuation/symbol (incl. "_"), except a period with a digit on both sides.
_PUNCT = re.compile(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]|_")
_CAPTION_TOKEN = re.compile(r"[^\W_]+|[^\w\s]|_")


def _check_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise MetricError(f"{name} must be a str, got {type(value).__name__}: {value!r}")
    return value


def _check_refs(references: object, name: str = "references") -> list[str]:
    """Validate a non-empty sequence of reference strings (a bare str is rejected)."""
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise MetricError(f"{name} must be a sequence of str, got {references!r}")
    if len(references) == 0:
        raise MetricError(f"{name} is empty: at least one reference is required")
    return [_check_str(r, f"{name}[{i}]") for i, r in enumerate(references)]


# --------------------------------------------------------------------------- VQA


def normalize_answer(text: str) -> str:
    """VQA-style normalisation of a short answer.

    Lowercase and strip; drop thousands separators ("1,000" -> "1000") and apostrophes
    ("it's" -> "its"); replace every other punctuation/symbol character by a space,
    except a period between two digits ("3.5" stays); drop the articles a/an/the; map
    the number words zero..ten to digits; collapse whitespace to single spaces.
    """
    s = _check_str(text, "text").lower().strip()
    s = _APOSTROPHE.sub("", _THOUSANDS_COMMA.sub("", s))
    s = _PUNCT.sub(" ", s)
    tokens = [_NUMBER_WORDS.get(t, t) for t in s.split() if t not in _ARTICLES]
    return " ".join(tokens)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction, in [0, 1].

    With >= 2 references: ``min(#refs equal to the prediction / 3, 1)`` after
    ``normalize_answer`` on both sides (the simplified form of the official metric,
    which additionally averages over 10-choose-9 reference subsets). With exactly one
    reference: 1.0 on a normalised exact match or when the normalised reference occurs
    as a whole-word span of the normalised prediction ("a red circle" contains "red",
    "redder" does not), else 0.0. An empty (after normalisation) prediction scores 0.0.

    Raises:
        MetricError: ``references`` is empty, a bare string, or holds a non-string.
    """
    refs = [normalize_answer(r) for r in _check_refs(references)]
    pred = normalize_answer(prediction)
    if not pred:
        return 0.0
    if len(refs) == 1:
        ref = refs[0]
        return float(bool(ref) and f" {ref} " in f" {pred} ")
    return min(sum(r == pred for r in refs) / 3.0, 1.0)


# --------------------------------------------------------------------------- OCR


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1), in characters.

    Two-row dynamic programme: O(len(a) * len(b)) time, O(min(len)) memory.
    """
    a, b = _check_str(a, "a"), _check_str(b, "b")
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction, in [0, 1] (Biten et al. 2019, DocVQA/ST-VQA).

    Strings are lowercased, stripped and whitespace-collapsed (as in the DocVQA
    evaluator). Per reference, similarity = 1 - levenshtein / max(len(pred), len(ref))
    (lengths in characters); the maximum over references is returned, and a value
    below ``threshold`` counts as 0 (default 0.5: normalised distance > 0.5 -> 0; a
    similarity of exactly ``threshold`` is kept). Both strings empty -> 1.0.

    Raises:
        MetricError: empty/invalid ``references`` or ``threshold`` outside [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise MetricError(f"threshold must be in [0, 1], got {threshold!r}")
    pred = " ".join(_check_str(prediction, "prediction").lower().split())
    best = 0.0
    for ref in _check_refs(references):
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        sim = 1.0 if longest == 0 else 1.0 - levenshtein(pred, ref) / longest
        best = max(best, sim)
    return best if best >= threshold else 0.0


# ----------------------------------------------------------------------- captions


def tokenize_caption(text: str) -> list[str]:
    """Lowercase ``text`` and split it into word and single-punctuation tokens.

    ``"A dog, running."`` -> ``["a", "dog", ",", "running", "."]``.
    """
    return _CAPTION_TOKEN.findall(_check_str(text, "text").lower())


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check_corpus(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenize: Callable[[str], list[str]] = tokenize_caption,
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Validate and tokenize a caption corpus: (hypothesis tokens, reference tokens)."""
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise MetricError(f"predictions must be a sequence of str, got {predictions!r}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise MetricError(f"references must be a sequence of sequences of str, got {references!r}")
    if len(predictions) != len(references):
        raise MetricError(f"predictions and references differ in length: {len(predictions)} != {len(references)}")
    if len(predictions) == 0:
        raise MetricError("empty corpus: predictions and references hold no items")
    hyps = [tokenize(_check_str(p, f"predictions[{i}]")) for i, p in enumerate(predictions)]
    refs = [[tokenize(r) for r in _check_refs(rs, f"references[{i}]")] for i, rs in enumerate(references)]
    return hyps, refs


def _bleu_stats(
    hyp: list[str], refs: list[list[str]], max_n: int, min_total: int = 0
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per-item BLEU statistics: (clipped matches per n, hypothesis n-grams per n (at least
    ``min_total``), hypothesis length, closest reference length with ties going to the shorter)."""
    matches, totals = np.zeros(max_n), np.zeros(max_n)
    for n in range(1, max_n + 1):
        counts = _ngram_counts(hyp, n)
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            max_ref |= _ngram_counts(ref, n)  # element-wise max over references
        matches[n - 1] = sum(min(c, max_ref[g]) for g, c in counts.items())
        totals[n - 1] = max(len(hyp) - n + 1, min_total)
    closest = min((len(r) for r in refs), key=lambda r: (abs(r - len(hyp)), r))
    return matches, totals, len(hyp), closest


def _bleu(precisions: np.ndarray, hyp_len: int, ref_len: int) -> float:
    """Geometric mean of precisions (uniform weights) times the brevity penalty."""
    if hyp_len == 0 or np.any(precisions <= 0):
        return 0.0
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return float(bp * math.exp(np.mean(np.log(precisions))))


def _check_max_n(max_n: int) -> int:
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise MetricError(f"max_n must be a positive int, got {max_n!r}")
    return max_n


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus-level BLEU-``max_n`` (Papineni et al. 2002), in [0, 1]; no smoothing.

    Captions are tokenized with ``tokenize_caption``. Each hypothesis n-gram count is
    clipped by its maximum count in any single reference of the same item; clipped
    matches and hypothesis n-gram totals are summed over the corpus before dividing.
    The score is the geometric mean of the ``max_n`` precisions (uniform weights) times
    the brevity penalty exp(1 - r/c) when c <= r, where c is the total hypothesis
    length and r sums, per item, the reference length closest to the hypothesis
    length (ties -> the shorter). Any precision with zero matches gives 0.0.

    Raises:
        MetricError: length mismatch, empty corpus, an item without references, or
            ``max_n`` < 1.
    """
    return float(bleu_from_statistics(bleu_statistics(predictions, references, max_n).sum(axis=0)))


def bleu_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> np.ndarray:
    """Per-item BLEU statistics [n_items, 2 * max_n + 2]: clipped matches for n = 1..max_n,
    hypothesis n-grams for n = 1..max_n, hypothesis length, closest reference length.

    Summed over any subset of items they give that subset's corpus BLEU
    (``bleu_from_statistics``): what lets a bootstrap resample items without re-tokenizing.
    """
    _check_max_n(max_n)
    hyps, refs = _check_corpus(predictions, references)
    out = np.zeros((len(hyps), 2 * max_n + 2))
    for k, (hyp, rs) in enumerate(zip(hyps, refs)):
        m, t, c, r = _bleu_stats(hyp, rs, max_n)
        out[k, :max_n], out[k, max_n : 2 * max_n], out[k, -2], out[k, -1] = m, t, c, r
    return out


def bleu_from_statistics(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU [...] of summed ``bleu_statistics`` [..., 2 * max_n + 2] (the rules of ``corpus_bleu``)."""
    stats = np.asarray(stats, dtype=np.float64)
    max_n = (stats.shape[-1] - 2) // 2
    matches, totals = stats[..., :max_n], stats[..., max_n : 2 * max_n]
    hyp_len, ref_len = stats[..., -2], stats[..., -1]
    zero = np.any(matches <= 0, axis=-1) | (hyp_len <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.log(np.where(matches > 0, matches, 1.0) / np.where(totals > 0, totals, 1.0)).mean(axis=-1)
        bp = np.where(hyp_len > ref_len, 1.0, np.exp(1.0 - ref_len / np.where(hyp_len > 0, hyp_len, 1.0)))
    return np.where(zero, 0.0, bp * np.exp(log_p))


def sentence_bleu(prediction: str, references: Sequence[str], max_n: int = 4) -> float:
    """Smoothed BLEU-``max_n`` of one caption, in [0, 1], for per-item scores.

    Same statistics as ``corpus_bleu`` on a one-item corpus, but with add-one smoothing
    of the n >= 2 precisions, (matches + 1) / (total + 1) ("BLEU+1", Lin & Och 2004;
    NLTK's method 2 also smooths n = 1, this does not), so a missing 4-gram does not
    zero the score. The unigram precision is unsmoothed: no unigram match, or an empty
    prediction, gives 0.0. Not comparable to ``corpus_bleu`` values.
    """
    _check_max_n(max_n)
    hyps, refs = _check_corpus([prediction], [_check_refs(references)])
    matches, totals, hyp_len, ref_len = _bleu_stats(hyps[0], refs[0], max_n)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    precisions = (matches + 1.0) / (totals + 1.0)
    precisions[0] = matches[0] / totals[0]
    return _bleu(precisions, hyp_len, ref_len)


def corpus_cider(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus mean of CIDEr-D (Vedantam et al. 2015), as in coco-caption's ``CiderScorer``.

    Per item and per n-gram order 1..n: tf-idf vectors with document frequencies taken
    from the references of this corpus (idf = log(#items) - log(max(1, df))); for each
    reference, the cosine similarity with the hypothesis counts clipped by the
    reference counts, times the length penalty exp(-delta^2 / (2 sigma^2)), where delta
    is, as in coco-caption, the difference in bigram counts (= word-length difference).
    The per-item score averages over orders and references and is multiplied by 10
    (usual range 0..10, can exceed 10). Captions are tokenized with
    ``tokenize_caption`` (coco-caption's PTB tokenizer also drops punctuation).

    idf depends on the whole corpus: with a single item every idf is 0 and so is the
    score (logged as a warning).

    Raises:
        MetricError: length mismatch, empty corpus, an item without references,
            ``n`` < 1 or ``sigma`` <= 0.
    """
    _check_max_n(n)
    if not sigma > 0:
        raise MetricError(f"sigma must be > 0, got {sigma!r}")
    hyps, refs = _check_corpus(predictions, references)
    if len(hyps) == 1:
        log.warning("CIDEr-D on a single-item corpus: idf is 0 everywhere, score is 0")

    def counts(tokens: list[str]) -> Counter[tuple[str, ...]]:
        total: Counter[tuple[str, ...]] = Counter()
        for k in range(1, n + 1):
            total.update(_ngram_counts(tokens, k))
        return total

    hyp_counts = [counts(h) for h in hyps]
    ref_counts = [[counts(r) for r in rs] for rs in refs]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for rcs in ref_counts:
        doc_freq.update(set().union(*rcs))
    log_n_docs = math.log(len(hyps))

    def vectorize(cnt: Counter) -> tuple[list[dict], np.ndarray, int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in cnt.items():
            vec[len(gram) - 1][gram] = tf * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
        norms = np.array([math.sqrt(sum(v * v for v in d.values())) for d in vec])
        length = sum(tf for gram, tf in cnt.items() if len(gram) == 2)
        return vec, norms, length

    def clipped_dot(hyp: dict, ref: dict) -> float:
        # CIDEr-D clipping: the hypothesis weight is capped by the reference weight
        return float(sum(min(v, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, v in hyp.items()))

    scores = []
    for hc, rcs in zip(hyp_counts, ref_counts):
        vec_h, norm_h, len_h = vectorize(hc)
        total = np.zeros(n)
        for rc in rcs:
            vec_r, norm_r, len_r = vectorize(rc)
            val = np.array([clipped_dot(vec_h[k], vec_r[k]) for k in range(n)])
            nonzero = (norm_h != 0) & (norm_r != 0)
            val[nonzero] /= norm_h[nonzero] * norm_r[nonzero]
            total += val * math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
        scores.append(10.0 * total.mean() / len(rcs))
    return float(np.mean(scores))


# ------------------------------------------------------- the authors' evaluation code

_ASSISTANT_PREFIXES = ("Answer:", "A:", "assistant:", "Assistant:", "Caption:")
_PAPER_ANSWER_PREFIX = re.compile(r"^(answer\s*:|assistant\s*:|a\s*:)")
_PAPER_NON_ALNUM = re.compile(r"[^a-z0-9\s]")
_NON_WORD = re.compile(r"[^\w]")
# NLTK's SmoothingFunction().method1: a precision with no match counts epsilon matches.
_NLTK_EPSILON = 0.1


def clean_generation(text: str) -> str:
    """A generated answer as the authors' evaluation cleans it before scoring.

    Strip whitespace; then, in this order, each of the prefixes "Answer:", "A:",
    "assistant:", "Assistant:", "Caption:" is removed (matched case-insensitively, once each)
    when the text starts with it, and the rest stripped; keep the first line; strip
    whitespace, then double quotes, then single quotes from both ends. Case is kept.
    """
    text = _check_str(text, "text").strip()
    for prefix in _ASSISTANT_PREFIXES:
        if text.lower().startswith(prefix.lower()):
            text = text[len(prefix) :].strip()
    return text.split("\n")[0].strip().strip('"').strip("'")


def paper_normalize_answer(text: str) -> str:
    """The authors' answer normalisation: lowercase and strip, drop a leading "answer:",
    "assistant:" or "a:" (spaces allowed before the colon), delete every character but
    a-z, 0-9 and whitespace, collapse whitespace."""
    s = _check_str(text, "text").lower().strip()
    s = _PAPER_ANSWER_PREFIX.sub("", s).strip()
    return " ".join(_PAPER_NON_ALNUM.sub("", s).split())


def paper_vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy as the authors compute it, in [0, 1], after ``paper_normalize_answer``.

    With two or more non-empty references: min(#references equal to the prediction / 3, 1).
    With one: 1.0 when prediction and reference are equal or either contains the other as a
    substring ("red" in "reddish" counts), else 0.0. An empty prediction, or no non-empty
    reference, scores 0.0. The authors pass the single majority answer of a VQA item, so
    the substring rule is what decides their accuracy.
    """
    pred = paper_normalize_answer(prediction)
    if not pred:
        return 0.0
    refs = [r for r in (paper_normalize_answer(x) for x in _check_refs(references)) if r]
    if len(refs) > 1:
        return min(sum(pred == r for r in refs) / 3.0, 1.0)
    if not refs:
        return 0.0
    ref = refs[0]
    return float(pred == ref or pred in ref or ref in pred)


def paper_anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS as the authors compute it, in [0, 1]: against the first reference only, both
    strings lowercased with every non-word character (spaces included) removed; similarity
    1 - levenshtein / max(len) kept when >= ``threshold``, else 0. Either string empty -> 0."""
    if not 0.0 <= threshold <= 1.0:
        raise MetricError(f"threshold must be in [0, 1], got {threshold!r}")
    ref = _check_refs(references)[0]
    p = _NON_WORD.sub("", _check_str(prediction, "prediction").lower())
    g = _NON_WORD.sub("", ref.lower())
    if not p or not g:
        return 0.0
    score = 1.0 - levenshtein(p, g) / max(len(p), len(g))
    return score if score >= threshold else 0.0


def _whitespace_tokens(text: str) -> list[str]:
    return text.lower().split()


def paper_bleu_statistics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> np.ndarray:
    """Per-item statistics of NLTK's corpus BLEU [n_items, 2 * max_n + 2], laid out as
    ``bleu_statistics``: lowercased whitespace tokens (punctuation stays on its word), blank
    references dropped, and each item's hypothesis n-gram count at least 1 (NLTK's
    ``modified_precision`` denominator). Summed over items: ``paper_bleu_from_statistics``."""
    _check_max_n(max_n)
    kept = [[r for r in _check_refs(rs, f"references[{i}]") if r.strip()] for i, rs in enumerate(references)]
    for i, rs in enumerate(kept):
        if not rs:
            raise MetricError(f"references[{i}]: every reference is blank")
    hyps, refs = _check_corpus(predictions, kept, tokenize=_whitespace_tokens)
    out = np.zeros((len(hyps), 2 * max_n + 2))
    for k, (hyp, rs) in enumerate(zip(hyps, refs)):
        m, t, c, r = _bleu_stats(hyp, rs, max_n, min_total=1)
        out[k, :max_n], out[k, max_n : 2 * max_n], out[k, -2], out[k, -1] = m, t, c, r
    return out


def paper_bleu_from_statistics(stats: np.ndarray) -> np.ndarray:
    """NLTK's corpus BLEU with uniform weights and smoothing method 1, [...], of summed
    ``paper_bleu_statistics`` [..., 2 * max_n + 2]: 0 when no unigram matches (or the
    hypotheses are empty); a higher order without matches counts 0.1 matches; brevity
    penalty exp(1 - r / c) when c <= r."""
    stats = np.asarray(stats, dtype=np.float64)
    max_n = (stats.shape[-1] - 2) // 2
    matches, totals = stats[..., :max_n], stats[..., max_n : 2 * max_n]
    hyp_len, ref_len = stats[..., -2], stats[..., -1]
    smoothed = np.where(matches > 0, matches, _NLTK_EPSILON)
    zero = (matches[..., 0] <= 0) | (hyp_len <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = (np.log(smoothed / np.where(totals > 0, totals, 1.0)) / max_n).sum(axis=-1)
        bp = np.where(hyp_len > ref_len, 1.0, np.exp(1.0 - ref_len / np.where(hyp_len > 0, hyp_len, 1.0)))
    return np.where(zero, 0.0, bp * np.exp(log_p))


def utility_of_values(values: np.ndarray, kind: str) -> np.ndarray:
    """A task's utility under each of C conditions from its per-item values: [C] float64.

    ``kind="mean"``: ``values`` [C, n] per-item scores, the utility their mean;
    ``kind="corpus_bleu"``: ``values`` [C, n, S] per-item ``paper_bleu_statistics``, the utility
    the paper's corpus BLEU of their sum over items."""
    v = np.asarray(values, dtype=np.float64)
    if kind == "mean":
        return v.mean(axis=1)
    if kind == "corpus_bleu":
        return paper_bleu_from_statistics(v.sum(axis=1))
    raise MetricError(f"unknown utility kind {kind!r}; known: mean, corpus_bleu")


def paper_corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """NLTK's ``corpus_bleu`` (weights 1 / max_n each, ``SmoothingFunction().method1``) on
    ``predictions`` and ``references`` lowercased and split on whitespace, as the authors'
    evaluation computes caption BLEU-4 (its pycocoevalcap path needs a package and Java that
    its requirements do not install)."""
    return float(paper_bleu_from_statistics(paper_bleu_statistics(predictions, references, max_n).sum(axis=0)))


# ---------------------------------------------------------------------- retrieval


def ndcg_at_k(scores: Sequence[float], positive_index: int, k: int = 5) -> float:
    """NDCG@k of one ranking with a single relevant candidate, in [0, 1].

    ``scores`` are the model's candidate scores (any real unit, higher = better, e.g.
    logit("Yes") - logit("No")); ``positive_index`` is the relevant candidate. Its rank
    is 1 + #(scores strictly greater than its score). With t other candidates tied with
    it, the result is the expectation over a uniformly random order of the tied group:
    the mean of 1/log2(r + 1) over r = rank..rank + t, counting 0 for r > k. With one
    relevant item the ideal DCG is 1, so NDCG = DCG.

    Raises:
        MetricError: a NaN score (its index is named), ``positive_index`` out of range,
            non 1-D ``scores`` or ``k`` < 1.
    """
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 1:
        raise MetricError(f"scores must be 1-D, got shape {arr.shape}")
    nan = np.flatnonzero(np.isnan(arr))
    if nan.size:
        raise MetricError(f"scores[{int(nan[0])}] is NaN")
    try:
        pos = operator.index(positive_index)
    except TypeError:
        raise MetricError(f"positive_index must be an int, got {positive_index!r}") from None
    if isinstance(positive_index, bool) or not 0 <= pos < arr.size:
        raise MetricError(f"positive_index {positive_index!r} out of range for {arr.size} scores")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MetricError(f"k must be a positive int, got {k!r}")
    rank = 1 + int(np.sum(arr > arr[pos]))
    n_tied_others = int(np.sum(arr == arr[pos])) - 1
    ranks = np.arange(rank, rank + n_tied_others + 1)
    gains = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    return float(gains.mean())
