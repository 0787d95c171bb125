"""data_shards.filters: good Japanese and English prose passes, each kind of bad document is dropped with its
reason, the language is told apart, and normalize() does what its docstring says."""

import random

import pytest

from data_shards.filters import FilterConfig, detect_language, normalize, quality_reason
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
