"""data_shards.filters: good Japanese and English prose passes, each kind of bad document is dropped with its
reason, the language is told apart, and normalize() does what its docstring says."""

import random
import re

import numpy as np
import pytest

from data_shards.filters import (
    FilterConfig,
    char_classes,
    detect_language,
    detect_languages,
    normalize,
    quality_reason,
    quality_reasons,
)
from tests.data_shards import corpus

JA_DOCS = [normalize(d) for d in corpus.japanese_documents(200, seed=0)]
EN_DOCS = [normalize(d) for d in corpus.english_documents(200, seed=0)]


@pytest.mark.parametrize("lang,docs", [("ja", JA_DOCS), ("en", EN_DOCS)])
def test_every_good_document_passes(lang, docs):
    assert {detect_language(d) for d in docs} == {lang}
    failures = [(quality_reason(d, lang), d[:80]) for d in docs if quality_reason(d, lang) is not None]
    assert failures == []


@pytest.mark.parametrize("lang", ["ja", "en"])
@pytest.mark.parametrize("make,reason", [
    (corpus.too_short_document, "too_short"),
    (corpus.repeated_lines_document, "duplicate_lines"),
    (corpus.ngram_spam_document, "ngram_repetition"),
    (corpus.symbol_spam_document, "symbol_ratio"),
])
def test_bad_documents_are_dropped_with_their_reason(lang, make, reason):
    text = normalize(make(lang))
    assert detect_language(text) == lang  # dropped for what it is, not for its language
    assert quality_reason(text, lang) == reason


def test_number_table_fails_letter_ratio():
    assert quality_reason(normalize(corpus.number_table_document()), "en") == "letter_ratio"


def test_too_long():
    assert quality_reason(EN_DOCS[0], "en", FilterConfig(max_chars=len(EN_DOCS[0]) - 1)) == "too_long"


def test_bullet_and_ellipsis_lines():
    bullets = "\n".join(f"・{d.replace(chr(10), '')[:60]}" for d in JA_DOCS[:10])
    assert quality_reason(bullets, "ja") == "bullet_lines"
    snippets = "\n".join(f"{d.splitlines()[2][:70]}..." for d in EN_DOCS[:10])
    assert quality_reason(snippets, "en") == "ellipsis_lines"


@pytest.mark.parametrize("docs", [corpus.korean_documents(5), corpus.russian_documents(5)])
def test_other_languages_are_dropped_as_language(docs):
    for doc in map(normalize, docs):
        assert detect_language(doc) == "other"
        assert quality_reason(doc, detect_language(doc)) == "language"


@pytest.mark.parametrize("text,lang", [
    (JA_DOCS[0], "ja"),
    (EN_DOCS[0], "en"),
    (corpus.korean_documents(1)[0], "other"),
    (corpus.russian_documents(1)[0], "other"),
    (corpus.chinese_document(), "other"),                  # hanzi without kana is not Japanese
    (corpus.mixed_japanese_english_document(), "ja"),     # Japanese with many English words still is
    ("PythonでWebアプリを作る", "ja"),
    ("The word 寿司 means sushi and ラーメン means ramen in Japanese cooking.", "en"),
    ("12345 !!! ???", "other"),
    ("", "other"),
])
def test_detect_language(text, lang):
    assert detect_language(normalize(text)) == lang


def test_detect_languages_is_detect_language_for_a_batch(loops):
    texts = [normalize(t) for t in (*JA_DOCS[:30], *EN_DOCS[:30], corpus.korean_documents(1)[0],
                                    corpus.chinese_document(), "", "ー", "12345 !!! ???", "PythonでWebアプリを作る",
                                    "\U0002f800 \U00031350 text")]
    random.Random(3).shuffle(texts)
    assert detect_languages(texts) == [detect_language(t) for t in texts]
    assert detect_languages([]) == []


def test_normalize_width_newlines_controls_spaces_blank_lines():
    assert normalize("ＡＢＣ　ｘｙｚ　１２３！") == "ABC xyz 123!"  # full-width ASCII and ideographic space
    assert normalize("ﾃｽﾄ") == "テスト"                              # half-width katakana
    assert normalize("a\r\nb\rc\u2028d") == "a\nb\nc\nd"
    assert normalize("a\x00b\x07c\x1bd\ufeffe\u200bf\tg\x7f") == "abcdef\tg"
    assert normalize("line   \nnext\t\n") == "line\nnext"
    assert normalize("a\n\n\n\n\n\nb\n\nc") == "a\n\n\nb\n\nc"
    assert normalize("  \n\n text \n\n ") == "text"


def test_normalize_is_idempotent():
    pool = [chr(c) for c in [*range(0x80), 0x85, 0xA0, 0x301, 0x308, 0x3099, 0x309A, 0x2028, 0xFEFF, 0x200B,
                             0x3000, 0xFF21, 0xFF76, 0xFF9E, 0x2026, 0x1100, 0x1161, 0xAC00, 0x212B, 0x2460]]
    r = random.Random(0)
    samples = ["".join(r.choice(pool) for _ in range(r.randint(0, 30))) for _ in range(3000)]
    samples += [corpus.exact_duplicate(d) for d in corpus.japanese_documents(5, seed=3)]
    for s in samples:
        once = normalize(s)
        assert normalize(once) == once, repr(s)


def test_exact_duplicate_helper_normalises_to_the_original():
    doc = corpus.english_documents(1, seed=5)[0]
    assert normalize(corpus.exact_duplicate(doc)) == normalize(doc)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_symbol_ratio"):
        FilterConfig(max_symbol_ratio=1.5)
    with pytest.raises(ValueError, match="min_chars"):
        FilterConfig(min_chars=10, max_chars=5)
    with pytest.raises(ValueError, match="languages"):
        FilterConfig(languages=("fr",))


# ---- quality_reasons (batch) must agree with quality_reason, document by document -------------------------

EXOTIC = ["İstanbul ΣΟΦΙΑ σοφός", "naïve café_au_lait 42nd", "\U00031350\U00031351漢字", "tag\U000E0041\U000E0042",
          "e\u0301e\u0301", "①②③ ½ ٣٤", "𝐀𝐁𝐂 math", "ﬁne ﬂow", "ß STRASSE", "x" * 300]


def _mutations(doc: str, r: random.Random) -> list[str]:
    """Variants of a good document around the repetition thresholds and with awkward characters."""
    out = []
    for _ in range(3):
        a = r.randrange(len(doc))
        piece = doc[a: a + r.randint(2, 40)]
        at = r.randrange(len(doc))
        out.append(doc[:at] + piece * r.randint(2, 12) + doc[at:])  # a repeated run: top and duplicate n-grams
    lines = doc.split("\n")
    out.append("\n".join(lines + r.sample(lines, min(len(lines), r.randint(1, 3)))))  # some repeated lines
    out.append(doc[: r.randint(60, len(doc))])  # truncated, around min_chars
    out.append(" ".join(r.choice(EXOTIC) for _ in range(3)).join([doc[: len(doc) // 2], doc[len(doc) // 2:]]))
    words = doc.split()
    if len(words) > 20:
        phrase = " ".join(words[5: 5 + r.randint(1, 12)])
        out.append(doc + ("\n" + phrase) * r.randint(1, 6))  # an English phrase repeated: word n-grams
    return [normalize(d) for d in out]


def _parity_corpus() -> list[str]:
    r = random.Random(0)
    docs = JA_DOCS + EN_DOCS
    for lang in ("ja", "en"):
        docs.append(normalize(corpus.too_short_document(lang)))
        for seed in range(3):
            makers = (corpus.repeated_lines_document, corpus.ngram_spam_document, corpus.symbol_spam_document)
            docs += [normalize(make(lang, seed)) for make in makers]
    docs += [normalize(corpus.number_table_document(s)) for s in range(3)]
    docs += [normalize(d) for d in corpus.korean_documents(3) + corpus.russian_documents(3)]
    docs += [normalize(corpus.chinese_document()), normalize(corpus.mixed_japanese_english_document()), "", "   "]
    docs += ["\n".join(f"・{d.replace(chr(10), '')[:60]}" for d in JA_DOCS[:10]),
             "\n".join(f"{d.splitlines()[2][:70]}..." for d in EN_DOCS[:10])]
    docs += [JA_DOCS[0] + "\n" + EN_DOCS[0], EN_DOCS[1] + JA_DOCS[1]]
    for d in JA_DOCS[:60] + EN_DOCS[:60]:
        docs += _mutations(d, r)
    return docs


PARITY_DOCS = _parity_corpus()


@pytest.mark.parametrize("cfg", [
    FilterConfig(),
    FilterConfig(max_top_ngram_fraction=0.06, max_duplicate_ngram_fraction=0.07),  # most documents near a limit
    FilterConfig(ja_chars_per_word=1, min_chars=20, languages=("ja", "en", "other")),
    FilterConfig(ja_chars_per_word=3, max_duplicate_line_fraction=0.05),
])
def test_batch_quality_reasons_match_quality_reason(cfg, loops):
    """Our batch filter must agree with the single-document quality_reason (the reference, unchanged) on every
    document of the test corpus: good, bad, mutated near the repetition limits, and with odd characters; with the
    detected language and with each language forced."""
    r = random.Random(1)
    for forced in (None, "ja", "en") if cfg == FilterConfig() else (None,):
        langs = [forced or detect_language(d) for d in PARITY_DOCS]
        expected = [quality_reason(d, lang, cfg) for d, lang in zip(PARITY_DOCS, langs, strict=True)]
        order = list(range(len(PARITY_DOCS)))
        r.shuffle(order)  # mix languages and verdicts inside a batch
        got = [None] * len(order)
        for start in range(0, len(order), 97):
            batch = order[start: start + 97]
            for i, reason in zip(batch, quality_reasons([PARITY_DOCS[i] for i in batch], [langs[i] for i in batch],
                                                        cfg), strict=True):
                got[i] = reason
        assert got == expected
        # Batches whose texts all reach the character tests, with the characters looked up by the caller
        # (build._prepare shares them with detect_languages).
        reach = [i for i in order if expected[i] not in ("too_short", "too_long", "language")]
        for start in range(0, len(reach), 97):
            batch = reach[start: start + 97]
            texts = [PARITY_DOCS[i] for i in batch]
            chars = char_classes(texts)
            assert quality_reasons(texts, [langs[i] for i in batch], cfg, chars) == [expected[i] for i in batch]
    # The corpus reaches the n-gram test both ways, so the parity above covers cleared and settled documents.
    default = [quality_reason(d, detect_language(d)) for d in PARITY_DOCS]
    assert default.count("ngram_repetition") >= 20 and default.count(None) >= 400


def test_batch_quality_reasons_edge_batches():
    assert quality_reasons([], []) == []
    assert quality_reasons([EN_DOCS[0]], ["en"]) == [None]
    with pytest.raises(ValueError):
        quality_reasons([EN_DOCS[0]], [])


def test_word_table_matches_the_regex():
    """The numpy \\w table that splits English words in the batch must be re's \\w, character by character."""
    from data_shards.filters import _TABLE_SIZE
    from data_shards.filters import _WORD_CHARS as table
    probe = [0, 0x30, 0x5F, 0x130, 0x2160, 0x3005, 0xFF10, 0x1D400, _TABLE_SIZE - 1, *random.Random(2).sample(
        range(_TABLE_SIZE), 3000)]
    assert [bool(table[cp]) for cp in probe] == [bool(re.fullmatch(r"\w", chr(cp))) for cp in probe]


def test_shipped_unicode_tables_are_what_this_python_builds(tmp_path, monkeypatch):
    """unicode_tables.bin (loaded at import instead of ~100 ms of building) must equal the tables built from this
    Python's Unicode database; a file for another Unicode version, or none, makes the module build them."""
    from data_shards import filters
    built = filters._build_classes(), filters._build_word_chars()
    loaded = filters._load_tables()
    assert filters._TABLES_FILE.read_bytes().startswith(filters._tables_header()), (
        "data_shards/unicode_tables.bin was written for another Unicode version; regenerate it: python -c "
        "'from data_shards.filters import write_unicode_tables; write_unicode_tables()'")
    assert all(np.array_equal(a, b) for a, b in zip(loaded, built, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip((filters._CLASSES, filters._WORD_CHARS), built, strict=True))
    stale = tmp_path / "tables.bin"
    stale.write_bytes(filters._TABLES_FILE.read_bytes().replace(b"unicode=", b"unicode=0.", 1))
    monkeypatch.setattr(filters, "_TABLES_FILE", stale)
    monkeypatch.setattr(filters, "_build_classes", lambda: "built")
    monkeypatch.setattr(filters, "_build_word_chars", lambda: "built too")
    assert filters._load_tables() == ("built", "built too")
    monkeypatch.setattr(filters, "_TABLES_FILE", tmp_path / "missing.bin")
    assert filters._load_tables() == ("built", "built too")


def test_english_word_hashes_do_not_depend_on_the_power_tables(monkeypatch):
    """A batch longer than the power tables hashes each word from per-word powers: the same units."""
    from data_shards import filters
    texts = EN_DOCS[:20] + [" ".join(EXOTIC), "w" * 3000]
    expected = filters._en_units(texts)
    monkeypatch.setattr(filters, "_POWERS_MAX", 8)
    monkeypatch.setattr(filters, "_powers", np.ones(1, dtype=np.uint64))
    monkeypatch.setattr(filters, "_inverse_powers", np.ones(1, dtype=np.uint64))
    got = filters._en_units(texts)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
