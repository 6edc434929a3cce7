"""The n-gram baseline against nltk.lm, naive dict-of-tuples references, and its invariants (sums to one)."""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from nltk.lm import KneserNeyInterpolated, Lidstone, Vocabulary
from nltk.util import everygrams

from pipeline_lib.text.ngram import METHODS, NGramLM, bits_per_character

# Starts with a sentence it repeats later, so every n-gram of the stream start also occurs with a left neighbour:
# there nltk's Kneser-Ney is normalised and matches ours exactly (see NGramLM's docstring for the exception).
TOY_SENTENCES = [
    "the cat sat on the mat .",
    "the dog sat on the log .",
    "the cat saw the dog .",
    "a dog sat on the cat .",
]
TOY_TEXT = [word for sentence in [*TOY_SENTENCES, TOY_SENTENCES[0]] for word in sentence.split()]
TOY_WORDS = sorted(set(TOY_TEXT))
TOY_VOCAB = len(TOY_WORDS) + 1  # the last id is never in the stream: nltk's <UNK>
TOY_IDS = [TOY_WORDS.index(word) for word in TOY_TEXT]
# An n-gram only at the start ("a x"; "x" seen only there as a bigram context): the edge case of the docstring.
EDGE_IDS = [0, 3, 1, 0, 2, 0, 2]

Probability = Callable[[tuple[int, ...], int], float]  # (context, word) -> P(word | context)


def _nltk_id(word: str) -> int:
    return TOY_WORDS.index(word) if word in TOY_WORDS else TOY_VOCAB - 1


def _toy_contexts(order: int) -> list[tuple[str, ...]]:
    """Every context of length 0..n-1 in the toy stream, plus unseen ones (unseen pair, <UNK> id, mixed)."""
    seen = {tuple(TOY_TEXT[max(0, i - j) : i]) for i in range(len(TOY_TEXT) + 1) for j in range(order)}
    unseen = {("mat", "saw", "a")[-(order - 1) :], ("zebra",), ("zebra", "the")[-(order - 1) :]} if order > 1 else set()
    return sorted(seen | unseen)


def naive_kneser_ney(stream: list[int], order: int, vocab_size: int, discount: float, uniform: bool) -> Probability:
    """P(w | h) straight from the formulas of NGramLM's docstring, on dicts of tuples."""
    grams = Counter(tuple(stream[i : i + k]) for k in range(1, order + 1) for i in range(len(stream) - k + 1))
    continuation = Counter(gram[1:] for gram in grams if len(gram) >= 2)

    def prob(context: tuple[int, ...], word: int) -> float:
        context = context[len(context) - min(len(context), order - 1) :]
        highest = len(context) == order - 1
        counts = grams if highest else continuation
        followers = {g[-1]: counts[g] for g in counts if len(g) == len(context) + 1 and g[:-1] == context}
        total = sum(followers.values())
        lower = prob(context[1:], word) if context else (1 / vocab_size if uniform else 0.0)
        d = discount if (context or uniform or highest) else 0.0
        if total == 0:
            return lower
        return max(followers.get(word, 0) - d, 0) / total + d * len(followers) / total * lower

    return prob


def naive_add_k(stream: list[int], order: int, vocab_size: int, k: float) -> Probability:
    grams = Counter(tuple(stream[i : i + n]) for n in range(1, order + 1) for i in range(len(stream) - n + 1))

    def prob(context: tuple[int, ...], word: int) -> float:
        context = context[len(context) - min(len(context), order - 1) :]
        total = sum(c for g, c in grams.items() if len(g) == len(context) + 1 and g[:-1] == context)
        return (grams[(*context, word)] + k) / (total + k * vocab_size)

    return prob


def _repetitive_text(num_chars: int, seed: int) -> np.ndarray:
    """ASCII ids of random picks from a few phrases: a source a 5-gram can nearly memorise."""
    phrases = ["the cat sat on the mat. ", "a dog ran to the log. ", "the bird saw a cat. ", "we sat on a log. "]
    rng = np.random.default_rng(seed)
    text = "".join(phrases[i] for i in rng.integers(0, len(phrases), num_chars // 15 + 1))[:num_chars]
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kneser_ney_matches_nltk(order: int) -> None:
    """interpolate_uniform=False is nltk's KneserNeyInterpolated: every context x every word, <UNK> included."""
    reference = KneserNeyInterpolated(order, discount=0.75, vocabulary=Vocabulary(TOY_TEXT, unk_cutoff=1))
    reference.fit([everygrams(TOY_TEXT, max_len=order)])
    assert len(reference.vocab) == TOY_VOCAB
    lm = NGramLM(order, TOY_VOCAB, "kneser_ney", discount=0.75, interpolate_uniform=False).fit(TOY_IDS)
    worst = 0.0
    for context in _toy_contexts(order):
        ids = [_nltk_id(word) for word in context]
        ours = lm.distribution(ids)
        for word in [*TOY_WORDS, "<UNK>"]:
            worst = max(worst, abs(ours[_nltk_id(word)] - reference.score(word, context)))
    print(f"order {order}: max |ours - nltk| = {worst:.1e} over {len(_toy_contexts(order))} contexts")
    assert worst < 1e-9


@pytest.mark.parametrize("order", [1, 2, 3])
def test_add_k_matches_nltk_lidstone(order: int) -> None:
    reference = Lidstone(0.5, order, vocabulary=Vocabulary(TOY_TEXT, unk_cutoff=1))
    reference.fit([everygrams(TOY_TEXT, max_len=order)])
    lm = NGramLM(order, TOY_VOCAB, "add_k", k=0.5).fit(TOY_IDS)
    worst = 0.0
    for context in _toy_contexts(order):
        ids = [_nltk_id(word) for word in context]
        for word in [*TOY_WORDS, "<UNK>"]:
            worst = max(worst, abs(lm.prob(ids, _nltk_id(word)) - reference.score(word, context or None)))
    assert worst < 1e-12


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("stream", [TOY_IDS, EDGE_IDS], ids=["toy", "start-only-ngram"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_matches_naive_reference(order: int, stream: list[int], uniform: bool) -> None:
    vocab_size = max(stream) + 3  # two ids never seen
    lm = NGramLM(order, vocab_size, discount=0.6, interpolate_uniform=uniform).fit(stream)
    naive = naive_kneser_ney(stream, order, vocab_size, 0.6, uniform)
    contexts = {tuple(stream[max(0, i - j) : i]) for i in range(len(stream) + 1) for j in range(order + 1)}
    contexts |= {(vocab_size - 1,), (vocab_size - 1, stream[0]), (stream[-1], stream[0], stream[-1], stream[0])}
    for context in contexts:
        expected = [naive(context, word) for word in range(vocab_size)]
        np.testing.assert_allclose(lm.distribution(list(context)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_add_k_matches_naive_reference(order: int) -> None:
    lm = NGramLM(order, TOY_VOCAB, "add_k", k=0.3).fit(TOY_IDS)
    naive = naive_add_k(TOY_IDS, order, TOY_VOCAB, 0.3)
    for context in [(), (TOY_IDS[0],), tuple(TOY_IDS[3:6]), (TOY_VOCAB - 1, TOY_IDS[1])]:
        expected = [naive(context, word) for word in range(TOY_VOCAB)]
        np.testing.assert_allclose(lm.distribution(list(context)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "options"),
    [("kneser_ney", {}), ("kneser_ney", {"interpolate_uniform": False}), ("add_k", {"k": 0.1})],
)
@pytest.mark.parametrize("stream", [TOY_IDS, EDGE_IDS], ids=["toy", "start-only-ngram"])
def test_distributions_sum_to_one(method: str, options: dict, stream: list[int]) -> None:
    """Seen, partially seen (only a suffix seen), unseen (never-seen ids), short, empty and over-long contexts."""
    order, vocab_size = 4, max(stream) + 3
    lm = NGramLM(order, vocab_size, method, **options).fit(stream)
    unseen = vocab_size - 1
    contexts = [
        stream[:3],  # seen, full order
        stream[-3:],  # seen at the very end only: no follower at the highest order
        [unseen, *stream[1:3]],  # partially seen: the suffix is, the whole is not
        [stream[2], stream[1], stream[0]],  # probably unseen as a whole
        [unseen, unseen, unseen],  # never-seen ids
        [],
        stream[:1],
        stream[:7],  # longer than n - 1: cut to the last 3 ids
    ]
    for context in contexts:
        distribution = lm.distribution(context)
        assert distribution.shape == (vocab_size,)
        assert np.all(distribution >= 0)
        assert abs(distribution.sum() - 1.0) < 1e-9, (context, distribution.sum())


@pytest.mark.parametrize("method", METHODS)
def test_log_prob_sequence_is_sum_of_per_position_probs(method: str) -> None:
    train = _repetitive_text(3000, seed=0)
    held_out = np.concatenate([_repetitive_text(400, seed=1), [127, 126]])  # two ids never in training
    lm = NGramLM(5, 128, method, k=0.5).fit(train)
    naive = sum(math.log(lm.prob(held_out[max(0, i - 4) : i], int(held_out[i]))) for i in range(len(held_out)))
    assert lm.log_prob_sequence(held_out) == pytest.approx(naive, rel=1e-12)
    assert lm.log_prob_sequence(held_out[:2]) == pytest.approx(
        math.log(lm.prob([], int(held_out[0]))) + math.log(lm.prob(held_out[:1], int(held_out[1]))), rel=1e-12
    )
    assert lm.bits_per_token(held_out) == pytest.approx(-naive / math.log(2) / len(held_out), rel=1e-12)
    assert lm.prob([1, 2, 3], 4) == lm.distribution([1, 2, 3])[4]


@pytest.mark.parametrize(("method", "options"), [("kneser_ney", {}), ("add_k", {"k": 0.01})])
def test_unseen_tokens_get_nonzero_probability(method: str, options: dict) -> None:
    lm = NGramLM(3, TOY_VOCAB + 5, method, **options).fit(TOY_IDS)
    for context in [TOY_IDS[:2], [TOY_VOCAB + 4, TOY_VOCAB + 3], []]:
        assert all(lm.prob(context, token) > 0 for token in range(TOY_VOCAB - 1, TOY_VOCAB + 5))
    assert math.isfinite(lm.log_prob_sequence([TOY_VOCAB + 1, TOY_VOCAB + 2, *TOY_IDS]))
    # nltk's definition (interpolate_uniform=False) gives ids never seen after another one probability 0.
    nltk_style = NGramLM(3, TOY_VOCAB, interpolate_uniform=False).fit(TOY_IDS)
    assert nltk_style.prob(TOY_IDS[:2], TOY_VOCAB - 1) == 0.0


def test_more_data_and_higher_order_lower_held_out_bits() -> None:
    train, held_out = _repetitive_text(20_000, seed=0), _repetitive_text(2_000, seed=1)
    by_order = [NGramLM(order, 128).fit(train).bits_per_token(held_out) for order in (1, 2, 3, 5)]
    by_size = [NGramLM(5, 128).fit(train[:size]).bits_per_token(held_out) for size in (300, 2_000, 20_000)]
    print("held-out bits/char by order 1, 2, 3, 5:", np.round(by_order, 3), "by training size:", np.round(by_size, 3))
    assert all(a > b for a, b in itertools.pairwise(by_order))
    assert all(a > b for a, b in itertools.pairwise(by_size))
    assert by_order[-1] < 0.5  # the source is nearly deterministic given 4 characters


def test_fit_5gram_on_465k_ids() -> None:
    """Fit and score timings (printed, not asserted); V = 8192 makes V**5 overflow int64, the trie codes do not."""
    rng = np.random.default_rng(0)
    vocab_size = 8192
    ids = np.minimum(rng.zipf(1.3, 465_000) - 1, vocab_size - 1)
    start = time.perf_counter()
    lm = NGramLM(5, vocab_size).fit(ids)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    bits = lm.bits_per_token(ids[:50_000])
    score_seconds = time.perf_counter() - start
    print(f"5-gram on {len(ids)} ids: fit {fit_seconds:.2f} s, 50k-token score {score_seconds:.3f} s, {bits:.3f} bits")
    assert math.isfinite(bits)
    assert abs(lm.distribution(ids[100:104]).sum() - 1) < 1e-9
    assert lm.prob(ids[100:104], int(ids[104])) > lm.prob(ids[100:104], vocab_size - 2)  # seen beats unseen


def test_bits_per_character() -> None:
    ids = _repetitive_text(500, seed=2)
    lm = NGramLM(3, 128).fit(_repetitive_text(2000, seed=0))
    # One id per character: bits per character is bits per token.
    assert bits_per_character(-lm.log_prob_sequence(ids), len(ids)) == pytest.approx(lm.bits_per_token(ids))
    assert bits_per_character(3 * math.log(2), 1) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="negative log-likelihood"):
        bits_per_character(-1.0, 10)
    with pytest.raises(ValueError, match="num_chars"):
        bits_per_character(1.0, 0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"order": 0, "vocab_size": 5}, "order=0"),
        ({"order": 2, "vocab_size": 5, "method": "witten_bell"}, "add_k, kneser_ney"),
        ({"order": 2, "vocab_size": 5, "discount": 1.5}, r"discount=1.5: must be in \(0, 1\]"),
        ({"order": 2, "vocab_size": 5, "method": "add_k", "k": 0}, "k=0"),
    ],
)
def test_rejects_bad_hyperparameters(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NGramLM(**arguments)


def test_rejects_bad_ids_and_unfitted_use() -> None:
    lm = NGramLM(2, 5)
    with pytest.raises(RuntimeError, match="call fit"):
        lm.prob([0], 1)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        lm.fit([0, 1, 5])
    with pytest.raises(ValueError, match="integer token ids"):
        lm.fit(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        lm.fit([])
    lm.fit([0, 1, 2])
    with pytest.raises(ValueError, match="context"):
        lm.distribution([-1])
