"""SentencePiece unigram tokenizer trained on MeCab-segmented text, loadable by transformers too.

Training (`train_tokenizer`):
  * unigram model with byte fallback (no <unk> for any input), digits split one by one,
    SentencePiece's "nfkc" normaliser, character coverage 0.9995;
  * no dummy prefix and no whitespace collapsing, so decode(encode(x)) == normalise(x) exactly,
    for Japanese (no spaces invented) and English alike; "\\n" is one piece;
  * Japanese pre-segmentation: each training line is cut into morphemes by MeCab (fugashi +
    unidic-lite) and the morphemes are joined with an invisible delimiter that SentencePiece's
    `pretokenization_delimiter` treats as a hard boundary. No learned piece spans two morphemes
    of the training text. MeCab is used only to *learn* the vocabulary: encoding is plain
    SentencePiece, which is what lets transformers reproduce the same ids (the approach of the
    llm-jp tokenizers). `--no-mecab` trains on raw lines instead.

Special tokens: <unk> (id 0), the chat markers <|system|> <|user|> <|assistant|> <|end|> (always
one piece when they appear in text), and <s> </s> <pad>, placed at the *end* of the vocabulary
(see `_move_controls_last`) so that the Hugging Face tokenizer can never produce them from text,
exactly like SentencePiece.

Output directory:
    tokenizer.model             the SentencePiece model (the source of truth)
    tokenizer.json              the same model for `tokenizers` / transformers (Unigram + byte fallback)
    tokenizer_config.json       so that AutoTokenizer.from_pretrained(DIR) works
    special_tokens_map.json
    mujina_special_ids.json     bos/eos/pad ids, read by `mujina-model export`
    mujina_tokenizer.json       how it was trained, and the SHA-256 of tokenizer.model (the tokenizer's hash)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .shards import file_sha256

log = logging.getLogger(__name__)

CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NEWLINE = "\n"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
DELIMITER = "\u2063"  # INVISIBLE SEPARATOR: marks morpheme boundaries for the trainer, then removed
MAX_LINE_CHARS = 2000  # SentencePiece skips training sentences above max_sentence_length bytes
# A prefix that the NFKC normaliser always rewrites (OHM SIGN -> GREEK OMEGA): a vocabulary entry
# starting with it can never match normalised text. Used for <unk> in tokenizer.json.
_UNREACHABLE = "\u2126"


@dataclass(frozen=True)
class TokenizerTrainConfig:
    vocab_size: int = 65000
    mecab: bool = True
    character_coverage: float = 0.9995
    max_sentences: int = 2_000_000  # training lines sampled (reservoir) from the input
    seed: int = 0
    threads: int | None = None  # trainer threads (default: all cores); the same input gives the same model

    def __post_init__(self) -> None:
        if self.vocab_size < 64:
            raise ValueError(f"--vocab-size {self.vocab_size} is too small: use at least 64")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in [0.9, 1.0], got {self.character_coverage}")


# ---- training ------------------------------------------------------------------------------------

def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines, long ones cut so SentencePiece does not silently skip them."""
    for text in texts:
        for line in text.replace(DELIMITER, "").split("\n"):
            line = line.strip()
            for i in range(0, len(line), MAX_LINE_CHARS):
                yield line[i: i + MAX_LINE_CHARS]


def _sample(lines: Iterable[str], k: int, seed: int) -> list[str]:
    """Reservoir sample of k lines, deterministic for the seed; keeps input order when all fit."""
    rng = random.Random(seed)
    keep: list[str] = []
    for n, line in enumerate(lines):
        if n < k:
            keep.append(line)
        elif (j := rng.randrange(n + 1)) < k:
            keep[j] = line
    return keep


def mecab_segmenter():
    """A function line -> line with morphemes joined by DELIMITER (spaces kept with the next morpheme)."""
    try:
        import fugashi
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise RuntimeError("MeCab pre-segmentation needs fugashi and unidic-lite: pip install fugashi "
                           "unidic-lite, or train with --no-mecab") from e
    tagger = fugashi.Tagger()

    def segment(line: str) -> str:
        return DELIMITER.join(w.white_space + w.surface for w in tagger(line))

    return segment


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, cfg: TokenizerTrainConfig) -> Path:
    """Train on `texts` (already normalised documents) and write the tokenizer directory."""
    out = Path(out_dir)
    lines = _sample(_lines(texts), cfg.max_sentences, cfg.seed)
    if not lines:
        raise ValueError("no text to train the tokenizer on: the inputs are empty after filtering")
    if cfg.mecab:
        segment = mecab_segmenter()
        lines = [segment(line) for line in lines]
    log.info("training a %d-piece unigram tokenizer on %d lines%s", cfg.vocab_size, len(lines),
             " (MeCab pre-segmented)" if cfg.mecab else "")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=prefix, model_type="unigram",
                vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
                byte_fallback=True, split_digits=True, normalization_rule_name="nfkc",
                add_dummy_prefix=False, remove_extra_whitespaces=False,
                pretokenization_delimiter=DELIMITER if cfg.mecab else "",
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
                pad_piece=PAD, user_defined_symbols=[*CHAT_MARKERS, NEWLINE],
                max_sentence_length=4 * MAX_LINE_CHARS + 64, num_threads=cfg.threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e)
            if "Vocabulary size too high" in msg or "smaller than required_chars" in msg:
                reason = msg.split("]")[-1].strip()
                raise ValueError(f"cannot train a {cfg.vocab_size}-piece vocabulary on this text ({reason}): "
                                 "lower --vocab-size, add text, or lower --character-coverage") from e
            raise
        out.mkdir(parents=True, exist_ok=True)
        model_bytes = _move_controls_last(Path(prefix + ".model").read_bytes())
    _write_dir(out, model_bytes, cfg)
    return out


def _move_controls_last(model_bytes: bytes) -> bytes:
    """Put <s> </s> <pad> at the end of the vocabulary.

    transformers' fast tokenizer runs its Viterbi over every vocabulary entry, so a literal "<s>"
    in text would come out as the BOS id, which SentencePiece never does. With the control pieces
    last, tokenizer.json leaves them out of the Unigram vocabulary and declares them as added
    special tokens, which `tokenizers` numbers after the vocabulary: the same ids as here.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    control = pb.ModelProto.SentencePiece.CONTROL
    pieces = [p for p in proto.pieces if p.type != control] + [p for p in proto.pieces if p.type == control]
    del proto.pieces[:]
    for p in pieces:
        proto.pieces.add().CopyFrom(p)
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    spec = proto.trainer_spec
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = ids[UNK], ids[BOS], ids[EOS], ids[PAD]
    spec.model_prefix = "tokenizer"  # was a random temporary path: same input must give the same bytes
    return proto.SerializeToString()


def _hf_tokenizer_json(model_bytes: bytes) -> str:
    """The SentencePiece model as a `tokenizers` Unigram model giving identical ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    kind = pb.ModelProto.SentencePiece
    vocab = [(_UNREACHABLE + p.piece if p.type == kind.UNKNOWN else p.piece, p.score)
             for p in proto.pieces if p.type != kind.CONTROL]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),  # SentencePiece's own NFKC table
        normalizers.Replace(" ", "▁"),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == kind.USER_DEFINED])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type == kind.CONTROL])
    return tok.to_str()


def _write_dir(out: Path, model_bytes: bytes, cfg: TokenizerTrainConfig) -> None:
    (out / "tokenizer.model").write_bytes(model_bytes)
    (out / "tokenizer.json").write_text(_hf_tokenizer_json(model_bytes), encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    # split_special_tokens: text such as "<s>" is encoded as characters, never as the BOS id (as in
    # SentencePiece); the data pipeline inserts BOS/EOS itself.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 1 << 30,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "mujina_special_ids.json").write_text(json.dumps(ids, indent=2) + "\n")
    (out / "mujina_tokenizer.json").write_text(json.dumps({
        "sha256": hashlib.sha256(model_bytes).hexdigest(), "vocab_size": sp.vocab_size(),
        "mecab": cfg.mecab, "character_coverage": cfg.character_coverage, "seed": cfg.seed,
        "chat_markers": {m: sp.piece_to_id(m) for m in CHAT_MARKERS}, **ids,
    }, indent=2, ensure_ascii=False) + "\n")


# ---- use -----------------------------------------------------------------------------------------

class Tokenizer:
    """The runtime tokenizer: SentencePiece with the ids the shards and the model use.

        >>> tok = Tokenizer("tok/")
        >>> tok.decode(tok.encode("吾輩は猫である。")) == "吾輩は猫である。"
        True
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        model = self.directory / "tokenizer.model"
        if not model.exists():
            raise FileNotFoundError(f"{self.directory} has no tokenizer.model: train one with "
                                    "`mujina-data tokenizer train --input FILE --vocab-size N --out DIR`")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model))
        except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError("INTERNAL: could not parse ...")
            raise ValueError(f"{model} is not a SentencePiece model ({str(e).splitlines()[0] if str(e) else e!r}): "
                             "copy the tokenizer directory again, or train one with `mujina-data tokenizer train "
                             "--input FILE --vocab-size N --out DIR`") from None
        self.sha256 = file_sha256(model)  # the tokenizer's identity, recorded in every shard manifest
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.marker_ids = {m.strip("<|>"): self.sp.piece_to_id(m) for m in CHAT_MARKERS}
        self.bos_array = np.array([self.bos_id], dtype=np.int32)
        self.eos_array = np.array([self.eos_id], dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """Encode many texts on `threads` cores (SentencePiece's own C++ threads; default: all)."""
        return self.sp.encode(texts, num_threads=threads or os.cpu_count() or 1)

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """The ids of each text as an int32 array: the same ids as `encode`, with SentencePiece writing them into
        numpy buffers (about 30% less CPU than building Python lists of ints). threads: 1 where the caller
        already runs one process per core."""
        return self.sp.encode(texts, return_type="numpy", num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
