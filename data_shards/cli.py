"""`mujina-data`: tokenizer, shards and their statistics.

    mujina-data tokenizer train --input ja.jsonl en.txt --vocab-size 65000 --out tok/
    mujina-data shard --input ja.jsonl en.txt --tokenizer tok/ --out shards/ [--source web] [--lang auto]
    mujina-data stats shards/ --seq-len 2048 [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from .shards import MANIFEST, Manifest, ShardError, ShardReader


def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from .filters import normalize
    from .ingest import DropCounter, read_documents
    from .tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(vocab_size=a.vocab_size, mecab=not a.no_mecab,
                               character_coverage=a.character_coverage, max_sentences=a.max_sentences,
                               threads=a.threads)
    drops = DropCounter()
    texts = (normalize(d.text) for d in read_documents(a.input, text_field=a.text_field, drops=drops) if d.text)
    out = train_tokenizer(texts, a.out, cfg)
    meta = json.loads((out / "mujina_tokenizer.json").read_text())
    print(f"tokenizer with {meta['vocab_size']} pieces{' (MeCab pre-segmented)' if cfg.mecab else ''} in {out} "
          f"(sha256 {meta['sha256'][:12]})")


def cmd_shard(a: argparse.Namespace) -> None:
    from .build import ShardConfig, build_shards

    cfg = ShardConfig(text_field=a.text_field, source=a.source, lang=a.lang, shard_tokens=a.shard_tokens,
                      workers=a.workers, dedup=not a.no_dedup)
    m = build_shards(a.input, a.tokenizer, a.out, cfg)
    dropped = m.report["dropped"]
    print(f"{len(m.shards)} shards, {m.documents:,} documents, {m.tokens:,} tokens in {a.out}; dropped "
          f"{sum(dropped.values()):,} documents" + (f" ({', '.join(f'{k}: {v}' for k, v in dropped.items())})"
                                                    if dropped else ""))


def shard_stats(directory: str | Path, seq_len: int, verify: bool = False) -> dict:
    """Documents, tokens, tokens per character by language, and packing quality at seq_len."""
    from .packing import packing_stats

    m = Manifest.load(directory)  # refuses a manifest that lists a shard twice
    by_lang: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "tokens": 0, "characters": 0})
    lengths = []
    fix = "rerun `mujina-data shard` with the same arguments to rebuild it"
    for s in m.shards:
        r = ShardReader(Path(directory) / s.file, expected_sha256=s.sha256 if verify else None)
        if (r.num_documents, r.num_tokens) != (s.documents, s.tokens):
            raise ShardError(f"{Path(directory) / MANIFEST} says shard {s.file} holds {s.documents} documents and "
                             f"{s.tokens} tokens, the file holds {r.num_documents} and {r.num_tokens}: {fix}")
        lengths.append(r.lengths())
        d = by_lang[s.language]
        d["documents"] += s.documents
        d["tokens"] += s.tokens
        d["characters"] += s.characters
    kept = m.report.get("documents_kept")
    if verify and isinstance(kept, dict) and sum(kept.values()) != m.documents:
        raise ShardError(f"{Path(directory) / MANIFEST}: its shards hold {m.documents} documents but its report "
                         f"kept {sum(kept.values())}: {fix}")
    languages = {
        lang: {**d, "tokens_per_character": round((d["tokens"] - 2 * d["documents"]) / d["characters"], 4)
               if d["characters"] else None}
        for lang, d in sorted(by_lang.items())
    }
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    return {"documents": m.documents, "tokens": m.tokens, "shards": len(m.shards), "languages": languages,
            "seq_len": seq_len, **{k: v for k, v in packing_stats(all_lengths.tolist(), seq_len).items()
                                   if k in ("sequences", "fill_rate", "split_documents", "concat_split_documents")}}


def cmd_stats(a: argparse.Namespace) -> None:
    st = shard_stats(a.dir, a.seq_len, verify=a.verify)
    if a.json:
        print(json.dumps(st, indent=2))
        return
    print(f"{a.dir}: {st['shards']} shards, {st['documents']:,} documents, {st['tokens']:,} tokens")
    for lang, d in st["languages"].items():
        print(f"  {lang}: {d['documents']:,} documents, {d['tokens']:,} tokens, "
              f"{d['tokens_per_character']} tokens/character")
    print(f"  packing at {st['seq_len']}: {st['sequences']:,} sequences, fill rate {st['fill_rate']:.4f}; "
          f"documents cut: best fit {st['split_documents']:,}, concatenation {st['concat_split_documents']:,}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mujina-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    s = t.add_parser("train", help="SentencePiece unigram on MeCab-segmented text (loads in transformers too)")
    s.add_argument("--input", nargs="+", required=True, help="JSONL, text or parquet files (as for `shard`)")
    s.add_argument("--vocab-size", type=int, required=True, help="pieces incl. special and byte tokens, e.g. 65000")
    s.add_argument("--out", required=True, help="tokenizer directory to write")
    s.add_argument("--no-mecab", action="store_true", help="train on raw lines, without MeCab pre-segmentation")
    s.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text [text]")
    s.add_argument("--character-coverage", type=float, default=0.9995, help="share of characters kept [0.9995]")
    s.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training [2M]")
    s.add_argument("--threads", type=int, help="trainer threads [all cores]")
    s.set_defaults(fn=cmd_tokenizer_train)

    s = sub.add_parser("shard", help="filter, deduplicate and tokenise text into shards")
    s.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl[.gz]), text (.txt[.gz]) or parquet files")
    s.add_argument("--tokenizer", required=True, help="tokenizer directory (`mujina-data tokenizer train`)")
    s.add_argument("--out", required=True, help="shard directory to write (rerun to resume)")
    s.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text [text]")
    s.add_argument("--source", help="source name recorded in the manifest [each file's stem]")
    s.add_argument("--lang", default="auto", choices=["auto", "ja", "en"],
                   help="auto: detect, keep ja and en; ja/en: keep only that language [auto]")
    s.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard [16777216]")
    s.add_argument("--workers", type=int, help="processes for filtering and tokenising [all cores]")
    s.add_argument("--no-dedup", action="store_true", help="skip exact and near-duplicate removal")
    s.set_defaults(fn=cmd_shard)

    s = sub.add_parser("stats", help="documents, tokens and packing quality of a shard directory")
    s.add_argument("dir", help="shard directory")
    s.add_argument("--seq-len", type=int, required=True, help="sequence length for the packing figures")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--verify", action="store_true",
                   help="check every shard's SHA-256, and that the report's kept documents add up to the shards'")
    s.set_defaults(fn=cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, ShardError) as e:
        print(f"mujina-data {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
