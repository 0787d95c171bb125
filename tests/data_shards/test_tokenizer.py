"""`mujina-data tokenizer train`: SentencePiece and transformers give the same ids; decode(encode(x)) is x
after NFKC; MeCab pre-segmentation keeps pieces inside morphemes (reference: MeCab's own segmentation)."""

import json
import unicodedata

import pytest
from transformers import AutoTokenizer

from data_shards.tokenizer import Tokenizer
from tests.data_shards.conftest import VOCAB, mujina_data

EDGE = [
    "吾輩は猫である。名前はまだ無い。", "Hello  world\n\nnew paragraph\ttab", "ＡＢＣ全角 and ｶﾀｶﾅ半角 ①②",
    "絵文字😀と顔文字(^_^)", "<|user|>こんにちは<|end|>\n<|assistant|>はい<|end|>", "literal <s> </s> <pad> <unk>",
    "  leading and trailing  ", "2024年11月22日 3.14159 1,000,000", "e\u0301 combining", "",
]


def test_sentencepiece_and_transformers_agree(corpus, tokenizer_dir):
    tok, hf = Tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in corpus["ja"][:80] + corpus["en"][:80] + EDGE:
        assert hf(text).input_ids == tok.encode(text), text[:60]
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {VOCAB - 3, VOCAB - 2, VOCAB - 1}  # controls last


def test_round_trip_is_exact_after_nfkc(corpus, tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    for text in corpus["ja"][:80] + corpus["en"][:80] + EDGE:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFKC", text)
    assert " " not in tok.decode(tok.encode("吾輩は猫である"))  # no spaces invented in Japanese


def test_special_tokens_digits_and_newlines(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1 and not p.startswith("<0x")]  # digits split
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tok.encode(marker) == [tok.sp.piece_to_id(marker)]
    assert tok.encode("\n") == [tok.sp.piece_to_id("\n")]
    assert tok.bos_id not in tok.encode("<s>")  # text never becomes a control token
    meta = json.loads((tokenizer_dir / "mujina_tokenizer.json").read_text())
    assert meta["sha256"] == tok.sha256 and meta["mecab"] is True


def _boundary_recall(tok, lines):
    """Share of MeCab morpheme boundaries that are also piece boundaries."""
    import fugashi

    tagger = fugashi.Tagger()
    kept = total = 0
    for line in lines:
        morph, pos = set(), 0
        for w in tagger(line):
            pos += len(w.white_space) + len(w.surface)
            morph.add(pos)
        pieces, pos = set(), 0
        for p in tok.sp.encode(line, return_type="proto").pieces:
            pos += len(p.surface)
            pieces.add(pos)
        kept, total = kept + len(morph & pieces), total + len(morph)
    return kept / total


def test_mecab_keeps_pieces_inside_morphemes(corpus, tokenizer_dir, tmp_path):
    mujina_data("tokenizer", "train", "--input", *map(str, corpus["files"]), "--vocab-size", str(VOCAB),
                "--no-mecab", "--out", str(tmp_path / "raw"))
    lines = [line for doc in corpus["ja"][:100] for line in doc.split("\n") if line]
    with_mecab = _boundary_recall(Tokenizer(tokenizer_dir), lines)
    without = _boundary_recall(Tokenizer(tmp_path / "raw"), lines)
    assert with_mecab >= 0.97  # measured 0.99 on this corpus
    assert with_mecab > without + 0.05  # measured 0.84 without MeCab


def test_training_is_deterministic(corpus, tokenizer_dir, tmp_path):
    mujina_data("tokenizer", "train", "--input", *map(str, corpus["files"]), "--vocab-size", str(VOCAB),
                "--out", str(tmp_path / "again"))
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()


def test_impossible_vocabulary_is_a_clear_error(corpus, tmp_path):
    r = mujina_data("tokenizer", "train", "--input", str(corpus["files"][0]), "--vocab-size", "60000",
                    "--out", str(tmp_path / "t"), check=False)
    assert r.returncode == 2 and "lower --vocab-size" in r.stderr


@pytest.mark.parametrize("missing", ["tokenizer.model"])
def test_loading_a_directory_without_a_model_says_how_to_make_one(tmp_path, missing):
    with pytest.raises(FileNotFoundError, match="mujina-data tokenizer train"):
        Tokenizer(tmp_path)
