"""data_shards.dedup: exact and near duplicates go, distinct documents stay, the first occurrence wins, and the
MinHash estimate agrees with the exact Jaccard similarity of shingle sets computed here with Python sets."""

import pytest

from data_shards.dedup import SHINGLE_CHARS, Deduplicator
from data_shards.filters import normalize
from tests.data_shards import corpus

JA = corpus.japanese_documents(200, seed=0)
EN = corpus.english_documents(200, seed=0)


def shingles(text: str) -> set[str]:
    """The reference: character 5-grams of the normalised text with whitespace runs as one space."""
    t = " ".join(normalize(text).split())
    return {t[i: i + SHINGLE_CHARS] for i in range(len(t) - SHINGLE_CHARS + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_distinct_documents_are_all_kept():
    dedup = Deduplicator()
    assert [dedup.check(d) for d in JA + EN] == [None] * 400
    assert len(dedup) == 400


def test_exact_duplicates_are_dropped():
    dedup = Deduplicator()
    for d in JA[:20] + EN[:20]:
        assert dedup.check(d) is None
    # The same text, and the same text after normalisation (CRLF, trailing spaces).
    assert [dedup.check(d) for d in JA[:20] + EN[:20]] == ["exact_duplicate"] * 40
    assert [dedup.check(corpus.exact_duplicate(d)) for d in JA[:20] + EN[:20]] == ["exact_duplicate"] * 40


@pytest.mark.parametrize("kind", ["edit", "append"])
def test_near_duplicates_are_dropped(kind):
    dedup = Deduplicator()
    originals = JA[:40] + EN[:40]
    for d in originals:
        dedup.check(d)
    near = [corpus.near_duplicate(d, seed=i, kind=kind) for i, d in enumerate(originals)]
    assert all(n != d for n, d in zip(near, originals, strict=True))
    assert [dedup.check(n) for n in near] == ["near_duplicate"] * len(near)


def test_first_occurrence_is_kept():
    stream = [EN[0], corpus.near_duplicate(EN[0], seed=1), EN[1], EN[0], JA[0], corpus.near_duplicate(JA[0], seed=2)]
    dedup = Deduplicator()
    assert [dedup.check(d) for d in stream] == [None, "near_duplicate", None, "exact_duplicate", None,
                                                 "near_duplicate"]
    # In the other order the edited copy comes first and is the one kept.
    dedup = Deduplicator()
    assert [dedup.check(d) for d in stream[1::-1]] == [None, "near_duplicate"]


def test_same_decisions_for_the_same_seed_and_input():
    stream = JA[:30] + [corpus.near_duplicate(d, seed=i) for i, d in enumerate(JA[:30])] + EN[:30]
    a, b = Deduplicator(seed=3), Deduplicator(seed=3)
    decisions = [a.check(d) for d in stream]
    assert decisions == [b.check(d) for d in stream]
    assert decisions == [None] * 30 + ["near_duplicate"] * 30 + [None] * 30


def test_estimated_jaccard_matches_exact_jaccard():
    dedup = Deduplicator()
    pairs = [(JA[0], corpus.near_duplicate(JA[0], seed=0)), (EN[0], corpus.near_duplicate(EN[0], seed=0)),
             (EN[1], EN[1] + " " + EN[2]), (JA[1], JA[1] + JA[2]), (JA[3], JA[4]), (EN[3], EN[4]),
             (JA[5], EN[5]), (JA[6], JA[6][: len(JA[6]) // 2])]
    for a, b in pairs:
        exact = jaccard(a, b)
        estimate = dedup.estimated_jaccard(dedup.signature(normalize(a)), dedup.signature(normalize(b)))
        assert abs(estimate - exact) <= 0.1, (exact, estimate, a[:30], b[:30])


def test_memory_per_document_does_not_depend_on_its_length():
    short, long = Deduplicator(), Deduplicator()
    many = corpus.english_documents(1000, seed=9)
    for i, d in enumerate(EN[:100]):
        short.check(d)
        long.check(" ".join(many[10 * i: 10 * i + 10]))  # ten times longer
    assert len(short) == len(long) == 100
    assert short.nbytes() == long.nbytes()


def test_short_texts_and_empty_text():
    dedup = Deduplicator()
    assert dedup.check("") is None and dedup.check("") == "exact_duplicate"
    assert dedup.check("abc") is None and dedup.check("abd") is None


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="bands"):
        Deduplicator(num_perm=128, bands=10)
    with pytest.raises(ValueError, match="threshold"):
        Deduplicator(threshold=0.0)
