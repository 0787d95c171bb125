"""Normalisation, language identification and quality filters that work for Japanese as well as English.

The filters follow Gopher (Rae et al. 2021, appendix A) with one change for Japanese, which has no spaces
between words: repetition is measured on *character* n-grams for Japanese and on *word* n-grams for English.
A Japanese word (morpheme) is about two characters long, so Japanese n-gram sizes are the English word sizes
times `ja_chars_per_word` (2): top n-grams of 4/6/8 characters, duplicated n-grams of 10..20 characters.
The thresholds are Gopher's; our tests check that varied Japanese and English prose passes all of them.

Use, after `ingest.read_documents`:

    text = normalize(doc.text)
    lang = detect_language(text)              # or the --lang the user forced
    reason = quality_reason(text, lang, cfg)  # None: keep; else a drop reason for the DropCounter

or, for a batch of texts (the same reasons, 3-4x less CPU for a few hundred documents):

    reasons = quality_reasons(texts, langs, cfg)

Reasons, in the order they are checked (cheap checks first; a document reports the first it fails):
too_short, too_long, language, symbol_ratio, letter_ratio, duplicate_lines, bullet_lines, ellipsis_lines,
ngram_repetition.
"""

from __future__ import annotations

import os
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

# ---------------------------------------------------------------------------------------------- normalize

# Characters that normalize() removes or turns into \n: C0/C1 controls except \t and \n, BOM and zero-width
# space (invisible, and they split n-grams), and the other line separators. One character class, so the common
# case (none present) costs a single scan.
_ODD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\u200b\u2028\u2029]")
_ODD_TABLE = {cp: None for cp in [*range(0x09), *range(0x0E, 0x20), *range(0x7F, 0xA0), 0xFEFF, 0x200B]}
_ODD_TABLE.update({cp: "\n" for cp in (0x0B, 0x0C, 0x0D, 0x85, 0x2028, 0x2029)})
_ODD_CHARS = "".join(map(chr, _ODD_TABLE))  # the characters _ODD matches
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{4,}")  # 3+ blank lines


def normalize(text: str) -> str:
    """NFKC (full-width ASCII -> ASCII, half-width katakana -> full-width, "…" -> "..."), newlines unified to
    \\n, control characters removed (except \\n and \\t), trailing spaces per line removed, runs of 3+ blank
    lines collapsed to 2, leading/trailing whitespace stripped. Idempotent: normalize(normalize(x)) ==
    normalize(x). Controls go before NFKC, so removing them cannot leave a combining mark that a second NFKC
    would compose. Each step is skipped when a cheap test shows it has nothing to do (~10 us for 2 KB).
    """
    return _normalize(text, _ODD.search(text) is not None)


def normalize_many(texts: list[str]) -> list[str]:
    """[normalize(t) for t in texts], testing all texts for characters to remove in one C call (when built)."""
    if _native is None:
        return list(map(normalize, texts))
    return list(map(_normalize, texts, _native.contains_any(texts, _ODD_CHARS)))


def _normalize(text: str, odd: bool) -> str:
    """normalize(text); odd: whether text has characters of _ODD."""
    if odd:
        text = text.replace("\r\n", "\n").translate(_ODD_TABLE)
    text = unicodedata.normalize("NFKC", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("\n", text)
    if "\n\n\n\n" in text:
        text = _BLANKS.sub("\n\n\n", text)
    return text.strip()


# ------------------------------------------------------------------------------------ character classes

# One class per code point, looked up with numpy: a single pass gives every count the filters need.
OTHER, SPACE, DIGIT, SYMBOL, LATIN, KANA, KANJI, OTHER_LETTER = range(8)
_TABLE_SIZE = 0x30000  # through CJK extension G; code points above count as OTHER
_KANA_RANGES = ((0x3041, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))
_KANJI_RANGES = ((0x3005, 0x3005), (0x3007, 0x3007), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
                 (0x20000, 0x2FA1F))
_LATIN_RANGES = ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF))
_EXTRA_SYMBOLS = "#*@_\\"  # ASCII marks that spam and markup use; the rest of ASCII punctuation is sentence punctuation


def _build_classes() -> np.ndarray:
    """Symbols are Unicode categories Sm, Sc, Sk, So (★■♪→=+ and emoji) plus #*@_\\; sentence punctuation
    (、。「」,.!?) is OTHER: Japanese prose is ~10% punctuation and that is fine. Built with C-level map() calls
    over all code points and numpy masks (~80 ms, against ~120 ms for a Python loop)."""
    chars = list(map(chr, range(_TABLE_SIZE)))
    space = np.fromiter(map(str.isspace, chars), dtype=bool, count=_TABLE_SIZE)
    alpha = np.fromiter(map(str.isalpha, chars), dtype=bool, count=_TABLE_SIZE)
    category = np.array(list(map(unicodedata.category, chars)))  # (_TABLE_SIZE,) "Lu", "Nd", "So" ...
    symbol = np.isin(category, ["Sm", "Sc", "Sk", "So"])
    symbol[[ord(c) for c in _EXTRA_SYMBOLS]] = True
    table = np.full(_TABLE_SIZE, OTHER, dtype=np.uint8)
    # the order of the tests of a per-character if/elif chain: space, letter, decimal digit, symbol
    table[symbol] = SYMBOL
    table[category == "Nd"] = DIGIT
    table[alpha] = OTHER_LETTER
    table[space] = SPACE
    for ranges, cls in ((_LATIN_RANGES, LATIN), (_KANA_RANGES, KANA)):
        for a, b in ranges:
            block = table[a: b + 1]
            block[block == OTHER_LETTER] = cls
    for a, b in _KANJI_RANGES:
        table[a: b + 1] = KANJI
    return table


def _build_word_chars() -> np.ndarray:
    """(_TABLE_SIZE,) bool: True where the regex \\w matches (str.isalnum() or "_")."""
    marked = re.sub(r"\W", "\0", "".join(map(chr, range(_TABLE_SIZE))))  # \W covers the lone surrogates
    return np.frombuffer(marked.encode("utf-32-le"), dtype=np.uint32) != 0


# Both tables come from Python's Unicode database and take ~100 ms to build: at every start of `mujina-data
# shard` (and of every spawned worker) that was a tenth of the whole run on a 32 MB corpus. unicode_tables.bin
# holds them for one Unicode version, zlib-compressed (3.5 KB); another version builds them at import.
# Regenerate: python -c "from data_shards.filters import write_unicode_tables; write_unicode_tables()"
# (tests/data_shards/test_filters.py fails when the file differs from what this Python builds).
_TABLES_FILE = Path(__file__).with_name("unicode_tables.bin")
_TABLES_MAGIC = b"mujina unicode tables v1"


def _tables_header() -> bytes:
    return b"%s unicode=%s size=%d\n" % (_TABLES_MAGIC, unicodedata.unidata_version.encode(), _TABLE_SIZE)


def _load_tables() -> tuple[np.ndarray, np.ndarray]:
    """(character classes, \\w table): from unicode_tables.bin if it was written for this Unicode version."""
    header = _tables_header()
    try:
        data = _TABLES_FILE.read_bytes()
    except OSError:
        data = b""
    if data.startswith(header):
        raw = np.frombuffer(zlib.decompress(data[len(header):]), dtype=np.uint8)
        return raw[:_TABLE_SIZE].copy(), np.unpackbits(raw[_TABLE_SIZE:], count=_TABLE_SIZE).astype(bool)
    return _build_classes(), _build_word_chars()


def write_unicode_tables(path: Path = _TABLES_FILE) -> None:
    """Writes the tables this Python builds to `path` (unicode_tables.bin by default)."""
    payload = _build_classes().tobytes() + np.packbits(_build_word_chars()).tobytes()
    path.write_bytes(_tables_header() + zlib.compress(payload, 9))


_CLASSES, _WORD_CHARS = _load_tables()


def _load_native():
    """The C loops (data_shards/_native.c), or None for numpy: when they were not built (no compiler at
    install time) or MUJINA_NATIVE=0. Both give the same results bit for bit (tests/data_shards/test_native.py);
    without the C loops `mujina-data shard` takes about 1.5x the CPU."""
    if os.environ.get("MUJINA_NATIVE", "1") == "0":
        return None
    try:
        from data_shards import _native
    except ImportError:
        return None
    return _native


_native = _load_native()


def char_class_counts(text: str) -> np.ndarray:
    """(8,) counts of OTHER, SPACE, DIGIT, SYMBOL, LATIN, KANA, KANJI, OTHER_LETTER characters in `text`."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (n,) code points
    return np.bincount(_CLASSES[np.minimum(cps, _TABLE_SIZE - 1)], minlength=8)


class CharClasses(NamedTuple):
    """The characters of a batch of texts, looked up once for language identification and the quality filters.
    cps, doc and classes are None when the C loops counted them (they need only `counts`)."""

    cps: np.ndarray | None  # (C,) uint32 code points of all texts, one after another
    doc: np.ndarray | None  # (C,) the text each belongs to
    classes: np.ndarray | None  # (C,) uint8 class of each (OTHER ... OTHER_LETTER)
    counts: np.ndarray  # (D, 8) per text: counts[d] == char_class_counts(texts[d])


def char_classes(texts: list[str]) -> CharClasses:
    """All texts' characters in one pass: the C loop when it is built, else numpy (see CharClasses)."""
    if _native is not None:
        counts = np.empty((len(texts), 8), dtype=np.int64)
        _native.class_counts(texts, _CLASSES, counts)
        return CharClasses(None, None, None, counts)
    return _char_arrays(texts)


def _char_arrays(texts: list[str]) -> CharClasses:
    """char_classes with numpy, every field filled."""
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)  # (C,)
    doc = np.repeat(np.arange(len(texts)), [len(t) for t in texts])  # (C,)
    classes = _CLASSES[np.minimum(cps, _TABLE_SIZE - 1)]  # (C,)
    counts = np.bincount(doc * 8 + classes, minlength=8 * len(texts)).reshape(len(texts), 8)
    return CharClasses(cps, doc, classes, counts)


# ----------------------------------------------------------------------------------------------- language

JA_MIN_CJK_SHARE = 0.3
"""Kana+kanji over all letters for "ja". Low because one Japanese character carries about as much as a whole
Latin word: "PythonでWebアプリを作る" is 9 Latin letters to 8 Japanese characters, and is Japanese."""
JA_MIN_KANA_SHARE = 0.05
"""Kana over kana+kanji for "ja". Japanese prose is over half kana and even headlines carry some, while Chinese
has none: kanji without kana is "other"."""
EN_MIN_LATIN_SHARE = 0.6
"""Latin letters over all letters for "en". Any Latin-script language passes; a stop-word test could tell
English from French, but the corpus this project reads is Japanese and English."""


def detect_language(text: str) -> str:
    """"ja", "en" or "other", from script statistics over letters (kana, kanji, Latin, other alphabets):

        ja    : (kana + kanji) / letters >= 0.3  and  kana / (kana + kanji) >= 0.05
        en    : Latin / letters >= 0.6
        other : everything else, including text without letters.
    """
    counts = char_class_counts(text)
    return _language(counts)


def detect_languages(texts: list[str], chars: CharClasses | None = None) -> list[str]:
    """[detect_language(t) for t in texts], with one numpy pass over the whole batch (~6x less CPU for a few
    hundred documents). chars: char_classes(texts), if the caller has it."""
    if not texts:
        return []
    return list(map(_language, (chars or char_classes(texts)).counts.tolist()))


def _language(counts: np.ndarray | list[int]) -> str:
    kana, kanji, latin = int(counts[KANA]), int(counts[KANJI]), int(counts[LATIN])
    letters = latin + kana + kanji + int(counts[OTHER_LETTER])
    if letters == 0:
        return "other"
    cjk = kana + kanji
    if kana > 0 and cjk >= JA_MIN_CJK_SHARE * letters and kana >= JA_MIN_KANA_SHARE * cjk:
        return "ja"
    if latin >= EN_MIN_LATIN_SHARE * letters:
        return "en"
    return "other"


# ------------------------------------------------------------------------------------------------ quality

_WORD = re.compile(r"\w+")
_BULLET = ("-", "*", "•", "●", "・", "■", "□", "◆", "◇", "★", "☆", "→", "+")


@dataclass(frozen=True)
class FilterConfig:
    """Quality thresholds; the defaults are Gopher's, chosen to keep ordinary Japanese and English prose."""

    min_chars: int = 100
    """Fewer characters (after normalisation) -> too_short. 100 characters is ~50 Japanese morphemes or ~20
    English words: a short paragraph; less is usually a menu item, a caption or a title."""
    max_chars: int = 500_000
    """More characters -> too_long: dumps, logs and concatenated pages; also bounds filter time per document."""
    languages: tuple[str, ...] = ("ja", "en")
    """Languages to keep; a document whose language is not listed -> language."""
    max_symbol_ratio: float = 0.1
    """Symbols (★■♪=+#*@ and emoji; not 、。,.!?) over non-space characters above this -> symbol_ratio."""
    min_letter_ratio: float = 0.6
    """Letters (incl. kana and kanji) over non-space characters below this -> letter_ratio: number tables,
    code, base64. Prose of either language is 80-90% letters."""
    max_duplicate_line_fraction: float = 0.3
    """Fraction of non-blank lines that repeat an earlier line above this -> duplicate_lines (Gopher 0.30)."""
    max_duplicate_line_char_fraction: float = 0.2
    """Fraction of characters in repeated lines above this -> duplicate_lines (Gopher 0.20)."""
    max_bullet_line_fraction: float = 0.9
    """Fraction of lines starting with a bullet (-, *, ・, ■ ...) above this -> bullet_lines (Gopher 0.90)."""
    max_ellipsis_line_fraction: float = 0.3
    """Fraction of lines ending in "..." above this -> ellipsis_lines (Gopher 0.30): truncated snippets."""
    max_top_ngram_fraction: float = 0.2
    """Characters covered by the most frequent 2-gram above this -> ngram_repetition; 0.02 less for 3-grams and
    again for 4-grams (Gopher 0.20/0.18/0.16). Words for English, characters x ja_chars_per_word for Japanese."""
    max_duplicate_ngram_fraction: float = 0.15
    """Characters covered by 5-grams that occur more than once above this -> ngram_repetition; 0.01 less per
    step up to 10-grams (Gopher 0.15..0.10)."""
    ja_chars_per_word: int = 2
    """Japanese n-gram sizes are word sizes times this (a morpheme is ~2 characters): 4/6/8 and 10..20."""

    def __post_init__(self):
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise ValueError(f"FilterConfig: need 0 <= min_chars < max_chars, got {self.min_chars}, {self.max_chars}")
        for name in ("max_symbol_ratio", "min_letter_ratio", "max_duplicate_line_fraction",
                     "max_duplicate_line_char_fraction", "max_bullet_line_fraction", "max_ellipsis_line_fraction",
                     "max_top_ngram_fraction", "max_duplicate_ngram_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FilterConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_top_ngram_fraction < 0.04 or self.max_duplicate_ngram_fraction < 0.05:
            raise ValueError("FilterConfig: max_top_ngram_fraction must be >= 0.04 and max_duplicate_ngram_fraction "
                             ">= 0.05 (the per-n steps are subtracted from them)")
        if self.ja_chars_per_word < 1:
            raise ValueError(f"FilterConfig.ja_chars_per_word must be >= 1, got {self.ja_chars_per_word}")
        bad = [lang for lang in self.languages if lang not in ("ja", "en", "other")]
        if bad:
            raise ValueError(f"FilterConfig.languages: unknown {bad}; use 'ja', 'en' or 'other'")


_DEFAULT = FilterConfig()

# Odd 64-bit multipliers for rolling n-gram hashes (uint64 arithmetic wraps: that is the modulus).
_MULT = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93,
                  0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5, 0xFF51AFD7ED558CCD,
                  0xC4CEB9FE1A85EC53, 0x8CB92BA72F3D8DD7, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB,
                  0x8EBC6AF09C88C6E3, 0x589965CC75374CC3, 0x1D8E4E27C47D124F, 0xEB44ACCAB455D165,
                  0x9FB21C651E98DF25, 0xF1357AEA2E62A9C5, 0x2545F4914F6CDD1D, 0xD1B54A32D192ED03],
                 dtype=np.uint64)


def _runs(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorts n-gram hashes: (order, run_starts, run_counts); run k holds order[run_starts[k]:...+run_counts[k]]."""
    order = np.argsort(h, kind="stable")
    sh = h[order]
    starts = np.flatnonzero(np.concatenate([[True], sh[1:] != sh[:-1]]))
    return order, starts, np.diff(np.append(starts, len(h)))


def _ngram_repetition(units: np.ndarray, weights: np.ndarray, sizes_top: tuple[int, ...],
                      sizes_dup: tuple[int, ...], cfg: FilterConfig) -> bool:
    """Gopher's repetition tests on a sequence of units (word ids or code points) weighted by their length in
    characters. True if the document repeats too much. n-gram i is units[i:i+n], hashed by a rolling
    polynomial (uint64, wrapping); a collision could only over-count repetition, with probability ~n^2/2^64.

    Coverage by duplicated n-grams can only shrink as n grows, so when the smallest n is already under the
    smallest limit (ordinary prose) the larger sizes are skipped.
    """
    total = float(weights.sum())
    length = len(units)
    if total == 0:
        return False
    limits_top = {n: cfg.max_top_ngram_fraction - 0.02 * i for i, n in enumerate(sizes_top)}
    limits_dup = {n: cfg.max_duplicate_ngram_fraction - 0.01 * i for i, n in enumerate(sizes_dup)}
    lowest_dup_limit = min(limits_dup.values())
    cum_w = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
    h = np.zeros(length, dtype=np.uint64)
    check_dup = True
    with np.errstate(over="ignore"):
        for n in range(1, max(*sizes_top, *sizes_dup) + 1):
            if n > length:
                break
            h = h[: length - n + 1] + units[n - 1:] * _MULT[(n - 1) % len(_MULT)]  # (length-n+1,) n-gram hashes
            top, dup = n in limits_top, n in limits_dup and check_dup
            if not (top or dup):
                continue
            order, starts, counts = _runs(h)
            if top:
                most = int(counts.max())
                if most > 1:
                    # Among equally frequent n-grams, the one covering the most characters: a choice that does
                    # not depend on the hashes (English word hashes are salted per process).
                    firsts = order[starts[counts == most]]  # first occurrence of each
                    widest = float((cum_w[firsts + n] - cum_w[firsts]).max())
                    if most * widest / total > limits_top[n]:
                        return True
            if dup:
                repeated = np.repeat(counts > 1, counts)  # (length-n+1,) in sorted order
                first = np.sort(order[repeated])  # start positions of n-grams that occur more than once
                if len(first):
                    # Units covered by a duplicated n-gram: +1 at each start, -1 n units later.
                    delta = np.zeros(length + 1, dtype=np.int32)
                    delta[first] += 1
                    delta[first + n] -= 1
                    fraction = float(weights[np.cumsum(delta[:length]) > 0].sum()) / total
                else:
                    fraction = 0.0
                if fraction > limits_dup[n]:
                    return True
                check_dup = fraction > lowest_dup_limit
    return False


def quality_reason(text: str, lang: str, cfg: FilterConfig | None = None) -> str | None:
    """None if the normalised `text` of language `lang` ("ja", "en", "other") passes, else the drop reason.

    Ratios are over non-space characters; repetition is Gopher's (see the module docstring). Cost is linear in
    the text plus a sort per n-gram size: well under a millisecond for a 2 KB document. cfg: default
    FilterConfig().
    """
    cfg = cfg or _DEFAULT
    n_chars = len(text)
    if n_chars < cfg.min_chars:
        return "too_short"
    if n_chars > cfg.max_chars:
        return "too_long"
    if lang not in cfg.languages:
        return "language"
    counts = char_class_counts(text)
    nonspace = n_chars - int(counts[SPACE])
    letters = int(counts[LATIN] + counts[KANA] + counts[KANJI] + counts[OTHER_LETTER])
    if nonspace == 0:
        return "letter_ratio"
    if counts[SYMBOL] > cfg.max_symbol_ratio * nonspace:
        return "symbol_ratio"
    if letters < cfg.min_letter_ratio * nonspace:
        return "letter_ratio"

    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        seen.add(line)
    line_chars = sum(map(len, lines))
    if (dup_lines > cfg.max_duplicate_line_fraction * len(lines)
            or dup_chars > cfg.max_duplicate_line_char_fraction * line_chars):
        return "duplicate_lines"
    if len(lines) > 1:
        if sum(line.startswith(_BULLET) for line in lines) > cfg.max_bullet_line_fraction * len(lines):
            return "bullet_lines"
        if sum(line.endswith("...") for line in lines) > cfg.max_ellipsis_line_fraction * len(lines):
            return "ellipsis_lines"

    if lang == "ja":
        # Whitespace is not part of Japanese n-grams: line breaks would split otherwise equal runs.
        compact = "".join(text.split())
        units = np.frombuffer(compact.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        weights = np.ones(len(units), dtype=np.float64)
        k = cfg.ja_chars_per_word
        sizes_top, sizes_dup = (2 * k, 3 * k, 4 * k), tuple(n * k for n in range(5, 11))
    else:
        words = _WORD.findall(text.lower())
        # Python's str hash is salted per process, but only equality between words of this one document
        # matters here, so the result is the same in every process.
        units = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
        weights = np.fromiter(map(len, words), dtype=np.float64, count=len(words))
        sizes_top, sizes_dup = (2, 3, 4), tuple(range(5, 11))
    if _ngram_repetition(units, weights, sizes_top, sizes_dup, cfg):
        return "ngram_repetition"
    return None


# ------------------------------------------------------------------------------------------ quality, batched

# quality_reasons() gives quality_reason()'s verdicts for a whole batch. With the C loops (data_shards/_native.c)
# the line tests and the n-gram test run in C, exactly, document by document. Without them (the numpy fallback)
# cheap checks are the same Python per document; the n-gram test, ~80% of quality_reason's time, is where the
# batch saves: ordinary prose is *cleared* by upper bounds computed for all documents at once, and only the
# documents a bound cannot clear (repetitive ones, usually dropped anyway) run the single-document
# _ngram_repetition. A bound never clears a document that _ngram_repetition would drop, so the verdicts are
# identical; tests/data_shards/test_filters.py checks that on the whole test corpus.
#
# The bounds hash every n-gram into one of 2^_BUCKET_BITS buckets per document (a few bits of the same rolling
# hash _ngram_repetition uses, so n-grams it counts as equal share a bucket):
#   top n-gram : the most frequent n-gram's covered characters <= the largest weight summed over one bucket;
#   duplicates : n-grams that occur twice sit in buckets holding 2+ n-grams under two independent choices of
#                bits; those few candidates (~2% of positions in prose) are then grouped exactly, so the
#                coverage of the smallest duplicate size is exact, and at or below the lowest duplicate limit
#                it settles every larger size too (coverage only shrinks as n grows, as _ngram_repetition uses).
_BUCKET_BITS = 10
_POWERS_MAX = 1 << 21  # word characters per batch the power tables below cover (2 x 16 MB at most)
_powers = np.ones(1, dtype=np.uint64)  # _MULT[0]^i mod 2^64
_inverse_powers = np.ones(1, dtype=np.uint64)  # its inverse (odd numbers are invertible mod 2^64)


def quality_reasons(texts: list[str], langs: list[str], cfg: FilterConfig | None = None,
                    chars: CharClasses | None = None) -> list[str | None]:
    """quality_reason for a batch: [quality_reason(t, l, cfg) for t, l in zip(texts, langs)], the same reasons,
    for 3-4x less CPU on a batch of a few hundred documents (build._prepare's 256; a batch of one gains
    nothing). texts: normalize()d, as for quality_reason; langs: "ja", "en" or "other" per text; chars:
    char_classes(texts), if the caller has it (used when no text fails the length or language test).

        chars = char_classes(texts)
        reasons = quality_reasons(texts, detect_languages(texts, chars), cfg, chars)
    """
    cfg = cfg or _DEFAULT
    out: list[str | None] = [None] * len(texts)
    todo = []
    for j, (text, lang) in enumerate(zip(texts, langs, strict=True)):
        if len(text) < cfg.min_chars:
            out[j] = "too_short"
        elif len(text) > cfg.max_chars:
            out[j] = "too_long"
        elif lang not in cfg.languages:
            out[j] = "language"
        else:
            todo.append(j)
    if not todo:
        return out
    if chars is None or len(todo) < len(texts):  # the characters of the remaining documents
        chars = char_classes([texts[j] for j in todo])
    cps, doc, classes, counts = chars
    ja, en = [], []  # (index in texts, index in todo)
    lined = []  # (index in texts, index in todo) of the documents that reach the line tests
    for i, (j, c) in enumerate(zip(todo, counts.tolist(), strict=True)):
        nonspace = len(texts[j]) - c[SPACE]
        if nonspace == 0:
            out[j] = "letter_ratio"
        elif c[SYMBOL] > cfg.max_symbol_ratio * nonspace:
            out[j] = "symbol_ratio"
        elif c[LATIN] + c[KANA] + c[KANJI] + c[OTHER_LETTER] < cfg.min_letter_ratio * nonspace:
            out[j] = "letter_ratio"
        else:
            lined.append((j, i))
    if _native is not None:
        codes = _native.line_reasons([texts[j] for j, _ in lined], _CLASSES, "".join(_BULLET),
                                     cfg.max_duplicate_line_fraction, cfg.max_duplicate_line_char_fraction,
                                     cfg.max_bullet_line_fraction, cfg.max_ellipsis_line_fraction)
        line_reasons = [_LINE_REASONS[code] for code in codes]
    else:
        line_reasons = [_line_reason(texts[j], cfg) for j, _ in lined]
    for (j, i), reason in zip(lined, line_reasons, strict=True):
        out[j] = reason
        if reason is None:
            (ja if langs[j] == "ja" else en).append((j, i))
    if _native is not None:  # the exact test in C, document by document: no bounds needed
        for lang, docs, repetition, table in (("ja", ja, _native.char_repetition, _CLASSES),
                                              ("en", en, _native.word_repetition, _WORD_CHARS)):
            batch = [texts[j] if lang == "ja" else texts[j].lower() for j, _ in docs]  # en: words of text.lower()
            sizes_top, sizes_dup = _sizes(lang, cfg)
            limits_top = [cfg.max_top_ngram_fraction - 0.02 * i for i in range(len(sizes_top))]
            limits_dup = [cfg.max_duplicate_ngram_fraction - 0.01 * i for i in range(len(sizes_dup))]
            repeats = repetition(batch, table, sizes_top, limits_top, sizes_dup, limits_dup, _MULT)
            for (j, _), repeat in zip(docs, repeats, strict=True):
                if repeat:
                    out[j] = "ngram_repetition"
        return out
    if ja:
        if cps is None:
            cps, doc, classes, _ = _char_arrays([texts[j] for j in todo])
        # "".join(text.split()) of every text: SPACE is exactly str.isspace(), and no code point past the class
        # table is a space.
        chosen = np.zeros(len(todo), dtype=bool)
        chosen[[i for _, i in ja]] = True
        keep = chosen[doc] & (classes != SPACE)
        units = cps[keep].astype(np.uint64)
        lengths = np.bincount(doc[keep], minlength=len(todo))[[i for _, i in ja]]
        sizes_top, sizes_dup = _sizes("ja", cfg)
        cleared = _cleared(units, np.ones(len(units)), lengths, sizes_top, sizes_dup, cfg)
        _settle([j for j, _ in ja], cleared, texts, "ja", cfg, out)
    if en:
        units, weights, lengths, unsure = _en_units([texts[j] for j, _ in en])
        sizes_top, sizes_dup = _sizes("en", cfg)
        cleared = _cleared(units, weights, lengths, sizes_top, sizes_dup, cfg) & ~unsure
        _settle([j for j, _ in en], cleared, texts, "en", cfg, out)
    return out


def _sizes(lang: str, cfg: FilterConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(top sizes, duplicate sizes) of quality_reason's n-gram test for `lang`."""
    k = cfg.ja_chars_per_word if lang == "ja" else 1
    return (2 * k, 3 * k, 4 * k), tuple(n * k for n in range(5, 11))


def _settle(docs: list[int], cleared: np.ndarray, texts: list[str], lang: str, cfg: FilterConfig,
            out: list[str | None]) -> None:
    """Runs quality_reason's own n-gram test on the documents the bounds did not clear."""
    sizes_top, sizes_dup = _sizes(lang, cfg)
    for d in np.flatnonzero(~cleared).tolist():
        text = texts[docs[d]]
        if lang == "ja":
            units = np.frombuffer("".join(text.split()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
            weights = np.ones(len(units), dtype=np.float64)
        else:
            words = _WORD.findall(text.lower())
            units = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
            weights = np.fromiter(map(len, words), dtype=np.float64, count=len(words))
        if _ngram_repetition(units, weights, sizes_top, sizes_dup, cfg):
            out[docs[d]] = "ngram_repetition"


def _line_reason(text: str, cfg: FilterConfig) -> str | None:
    """quality_reason's line checks (duplicate, bullet and ellipsis lines), with fewer Python-level steps:
    a repeated line is one the set of distinct lines does not add, and every bullet is one character."""
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    distinct = set(lines)
    line_chars = sum(map(len, lines))
    dup_lines, dup_chars = len(lines) - len(distinct), line_chars - sum(map(len, distinct))
    if (dup_lines > cfg.max_duplicate_line_fraction * len(lines)
            or dup_chars > cfg.max_duplicate_line_char_fraction * line_chars):
        return "duplicate_lines"
    if len(lines) > 1:
        if sum(line[0] in _BULLET_CHARS for line in lines) > cfg.max_bullet_line_fraction * len(lines):
            return "bullet_lines"
        if sum(line.endswith("...") for line in lines) > cfg.max_ellipsis_line_fraction * len(lines):
            return "ellipsis_lines"
    return None


_BULLET_CHARS = frozenset(_BULLET)
_LINE_REASONS = (None, "duplicate_lines", "bullet_lines", "ellipsis_lines")  # _native.line_reasons' codes
assert all(len(b) == 1 for b in _BULLET), "_line_reason tests only the first character of a line"


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (as dedup._mix64): spreads every input bit over the output's top bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(P^i, P^-i) mod 2^64 for i < at least n, P = _MULT[0]; grown by doubling, kept for the next batch."""
    global _powers, _inverse_powers
    if len(_powers) < n:
        size = max(n, 2 * len(_powers))
        inverse = np.uint64(pow(int(_MULT[0]), -1, 1 << 64))
        _powers = np.concatenate([np.ones(1, np.uint64), np.cumprod(np.full(size - 1, _MULT[0]))])
        _inverse_powers = np.concatenate([np.ones(1, np.uint64), np.cumprod(np.full(size - 1, inverse))])
    return _powers, _inverse_powers


def _en_units(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The words quality_reason's _WORD.findall(text.lower()) finds, for all texts at once, as 64-bit hashes:
    (units (W,) uint64, weights (W,) word lengths, words per text (D,), unsure (D,) bool).

    Equal words get equal hashes (a polynomial of the code points; unequal words may collide, which can only
    make the bounds larger), so these units can clear a document but never stand in for _ngram_repetition's.
    unsure: texts with code points past the class table (its \\w is not known here); never cleared.
    """
    lows = [t.lower() for t in texts]  # lower() may change a text's length ("İ"), so split after it
    cps = np.frombuffer("\n".join(lows).encode("utf-32-le"), dtype=np.uint32)  # "\n" ends every last word
    text_start = np.cumsum([0] + [len(t) + 1 for t in lows[:-1]])  # (D,)
    is_word = _WORD_CHARS[np.minimum(cps, _TABLE_SIZE - 1)]  # (C,)
    unsure = np.zeros(len(texts), dtype=bool)
    unsure[np.searchsorted(text_start, np.flatnonzero(cps >= _TABLE_SIZE), side="right") - 1] = True
    edges = np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts  # (W,)
    if len(starts) == 0:
        return np.zeros(0, np.uint64), np.zeros(0), np.zeros(len(texts), np.int64), unsure
    offsets = np.cumsum(lengths) - lengths  # (W,) each word's first character among all word characters
    chars = cps[is_word].astype(np.uint64)  # (Wc,) the words' characters, one after another
    # A word's hash: sum of its characters times P^(position in the word), P = _MULT[0]. Computed as a sum of
    # character g times P^g (g: index among all word characters), times P^-(index of the word's first).
    powers, inverse = _power_tables(min(len(chars), _POWERS_MAX))
    with np.errstate(over="ignore"):
        if len(chars) <= len(powers):
            sums = np.add.reduceat(chars * powers[: len(chars)], offsets) * inverse[offsets]
        else:  # a huge batch: each character's power from its position in its word
            k = np.arange(len(chars)) - np.repeat(offsets, lengths)
            sums = np.add.reduceat(chars * _power_tables(int(lengths.max()) + 1)[0][k], offsets)
        units = _mix64(sums + lengths.astype(np.uint64))
    per_text = np.bincount(np.searchsorted(text_start, starts, side="right") - 1, minlength=len(texts))
    return units, lengths.astype(np.float64), per_text, unsure


def _per_doc_max(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Maximum of x over each [starts[d], starts[d+1]) (the last to the end): np.maximum.reduceat, allowing
    no starts."""
    return np.maximum.reduceat(x, starts) if len(starts) else np.zeros(0, dtype=x.dtype)


def _cleared(units: np.ndarray, weights: np.ndarray, lengths: np.ndarray, sizes_top: tuple[int, ...],
             sizes_dup: tuple[int, ...], cfg: FilterConfig) -> np.ndarray:
    """(D,) True for documents that certainly pass _ngram_repetition (see the comment above quality_reasons).

    units, weights: (L,) all documents' units, concatenated; lengths: (D,) units per document.
    """
    n_docs, n_units = len(lengths), len(units)
    bits, spare = _BUCKET_BITS, len(lengths) << _BUCKET_BITS  # spare: the bucket of n-grams that cross texts
    ends = np.cumsum(lengths)
    starts = ends - lengths
    base = np.repeat(np.arange(n_docs) << bits, lengths)  # (L,) first bucket of each unit's document
    uniform = bool((weights == 1).all())  # Japanese: an n-gram covers n characters
    # (L+1,) cumulative weights: sums of small integers, exact in float64 (so is every difference below)
    cum_w = None if uniform else np.concatenate([[0.0], np.cumsum(weights)])
    total = lengths.astype(np.float64) if uniform else cum_w[ends] - cum_w[starts]  # (D,) float(weights.sum())
    total[total == 0] = 1.0  # such a document has no n-grams: its bounds are 0 and it passes, as in the original
    limits_top = {n: cfg.max_top_ngram_fraction - 0.02 * i for i, n in enumerate(sizes_top)}
    lowest_dup = min(cfg.max_duplicate_ngram_fraction - 0.01 * i for i in range(len(sizes_dup)))
    n_dup = sizes_dup[0]
    cleared = np.ones(n_docs, dtype=bool)
    max_count = None  # (D,) uniform weights: a bound on any n-gram's count, also for every larger n
    h = np.zeros(n_units, dtype=np.uint64)
    tmp = np.empty(n_units, dtype=np.uint64)
    for n in range(1, max(*sizes_top, n_dup) + 1):
        span = n_units - n + 1  # n-grams of the concatenation, some across two documents
        if span <= 0:
            break
        h[:span] += np.multiply(units[n - 1:], _MULT[(n - 1) % len(_MULT)], out=tmp[:span])  # _ngram_repetition's
        top = n in limits_top and (max_count is None or (max_count * n / total > limits_top[n]).any())
        if not (top or n == n_dup):
            continue
        hv = h[:span]
        key = base[:span] + (hv >> np.uint64(64 - bits)).view(np.int64)  # (span,) document, top bits of hash
        cross = ends[:, None] - np.arange(1, n)  # (D, n-1) starts of n-grams that run past their document's end
        cross = cross[(cross >= starts[:, None]) & (cross < span)]
        key[cross] = spare
        if uniform or n == n_dup:  # n-grams per bucket
            counts = np.bincount(key, minlength=spare + 1)
            counts[spare] = 0
        seg = starts[(lengths >= n)]  # documents with n-grams; a shorter one between adds only zeros
        some = lengths >= n
        if top:
            if uniform:
                max_count = np.zeros(n_docs, dtype=np.int64)
                max_count[some] = _per_doc_max(counts[key], seg)
                bound = max_count * float(n)
            else:
                w = cum_w[n: n + span] - cum_w[:span]  # (span,) characters each n-gram covers
                sums = np.bincount(key, w, minlength=spare + 1)
                sums[spare] = 0.0
                bound = np.zeros(n_docs)
                bound[some] = _per_doc_max(sums[key], seg)
            cleared &= bound / total <= limits_top[n]  # the same division as _ngram_repetition: an exact bound
        if n == n_dup:
            at = np.flatnonzero(counts[key] > 1)  # (M,) n-grams sharing their bucket; the others occur once
            hv = hv[at]
            key = base[at] + ((hv >> np.uint64(40)) & np.uint64((1 << bits) - 1)).view(np.int64)  # other bits
            maybe = np.bincount(key, minlength=spare)[key] > 1
            at, dv = at[maybe], (key[maybe] >> bits).view(np.uint64)
            # Group equal (document, hash) pairs with one sort of a single key: the hash's top bits with the document
            # in the low bits. Dropping low hash bits can only merge distinct n-grams (more coverage: a bound that
            # is still safe), and no order within a group is needed, so numpy's fast unstable sort does.
            doc_bits = np.uint64(max(1, n_docs.bit_length()))
            grouped = ((hv[maybe] >> doc_bits) << doc_bits) | dv  # (M,)
            order = np.argsort(grouped)
            sh = grouped[order]
            new = np.concatenate([[True], sh[1:] != sh[:-1]])
            run_len = np.diff(np.append(np.flatnonzero(new), len(sh)))
            first = at[order[np.repeat(run_len > 1, run_len)]]  # starts of n-grams occurring 2+ times
            delta = np.zeros(n_units + 1, dtype=np.int32)
            delta[first] += 1
            delta[first + n] -= 1
            covered = np.cumsum(delta[:n_units]) > 0  # (L,)
            covered_w = np.concatenate([[0.0], np.cumsum(covered if uniform else np.where(covered, weights, 0.0),
                                                         dtype=np.float64)])
            cleared &= (covered_w[ends] - covered_w[starts]) / total <= lowest_dup
    return cleared
