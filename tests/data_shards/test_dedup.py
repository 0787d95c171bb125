"""data_shards.dedup: exact and near duplicates go, distinct documents stay, the first occurrence wins, and the
MinHash estimate agrees with the exact Jaccard similarity of shingle sets computed here with Python sets."""

import numpy as np
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


# ---- batch APIs must agree with the single-document ones, bit for bit ---------------------------------------

def _fingerprint_corpus() -> list[str]:
    """Good documents, their near and exact duplicates, every bad-document helper, odd and short texts."""
    docs = JA[:120] + EN[:120]
    docs += [corpus.near_duplicate(d, seed=i, kind=("edit", "append")[i % 2]) for i, d in enumerate(JA[:40] + EN[:40])]
    docs += [corpus.exact_duplicate(d) for d in JA[:10] + EN[:10]]
    for lang in ("ja", "en"):
        docs += [corpus.too_short_document(lang), corpus.repeated_lines_document(lang),
                 corpus.ngram_spam_document(lang), corpus.symbol_spam_document(lang)]
    docs += [corpus.number_table_document(), corpus.chinese_document(), corpus.mixed_japanese_english_document()]
    docs += corpus.korean_documents(3) + corpus.russian_documents(3)
    docs += ["", " ", "abc", "abcd", "abcde", "abcdef", "a  b\n\nc d e", "\U00031350\U000E0041 x", "日本語のテキスト"]
    docs += [EN[0][:k] for k in (5, 6, 50, 300)] + ["x" * 20_000]
    return docs


FP_DOCS = _fingerprint_corpus()


@pytest.mark.parametrize("num_perm,bands,seed", [(128, 16, 0), (64, 8, 3), (100, 10, 7), (256, 32, 1)])
def test_batch_fingerprints_match_fingerprint(num_perm, bands, seed, loops):
    """Our batch MinHash must give fingerprint()'s exact keys and bit-identical signatures (the reference is the
    single-document fingerprint, unchanged), for batches of any size and mix, with and without normalising."""
    dedup = Deduplicator(num_perm=num_perm, bands=bands, seed=seed)
    expected = [dedup.fingerprint(d) for d in FP_DOCS]
    for size in (1, 7, 256):
        got = [fp for i in range(0, len(FP_DOCS), size) for fp in dedup.fingerprints(FP_DOCS[i: i + size])]
        assert [k for k, _ in got] == [k for k, _ in expected]
        assert all(s.dtype == e.dtype and np.array_equal(s, e) for (_, s), (_, e) in zip(got, expected, strict=True))
    normalised = [normalize(d) for d in FP_DOCS]
    got = dedup.fingerprints(normalised, normalized=True)
    assert all(k == e and np.array_equal(s, es) for (k, s), (e, es) in zip(got, expected, strict=True))
    assert dedup.fingerprints([]) == []


def test_batch_check_fingerprints_matches_check_fingerprint(loops):
    """check_fingerprints must decide as check_fingerprint called in the same order (duplicates inside one batch
    included) and leave the same state: signatures, both indexes (the same keys -> documents, size and capacity;
    a probe run may be filled in another order), and nbytes."""
    stream = FP_DOCS + FP_DOCS[::3] + [corpus.near_duplicate(d, seed=9) for d in JA[:60] + EN[:60]]
    reference = Deduplicator()
    fps = reference.fingerprints(stream)
    expected = [reference.check_fingerprint(*fp) for fp in fps]
    assert {"exact_duplicate", "near_duplicate", None} <= set(expected)
    # batches of 100 meet most duplicates in an earlier batch; one batch of everything meets them all inside it
    for size in (100, len(fps)):
        batched = Deduplicator()
        got = [r for i in range(0, len(fps), size) for r in batched.check_fingerprints(fps[i: i + size])]
        assert got == expected
        assert len(batched) == len(reference) and np.array_equal(batched._sigs, reference._sigs)
        for a, b in ((batched._exact, reference._exact), (batched._band_index, reference._band_index)):
            keys = b.keys[b.keys != 0]
            assert a.size == b.size == len(keys) and len(a.keys) == len(b.keys)
            assert np.array_equal(np.sort(a.keys[a.keys != 0]), np.sort(keys))
            assert np.array_equal(a.get_many(keys), b.get_many(keys))
        assert batched.nbytes() == reference.nbytes()
    assert batched.check_fingerprints([]) == []
    keys, sigs = reference.fingerprint_arrays([normalize(d) for d in stream[:50]])
    assert [(int(k), s.tolist()) for k, s in zip(keys, sigs, strict=True)] == [(k, s.tolist()) for k, s in fps[:50]]


def test_index_get_many_matches_get():
    dedup = Deduplicator()
    for d in JA[:50] + EN[:50]:
        dedup.check(d)
    index = dedup._band_index
    probe = np.concatenate([index.keys[index.keys != 0][:300], np.arange(1, 2001, 2, dtype=np.uint64)])
    assert index.get_many(probe).tolist() == [index.get(int(k)) for k in probe]
