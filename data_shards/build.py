"""`mujina-data shard`: text files in, content-addressed token shards + manifest.json out.

    read (ingest.py) -> normalise -> language -> quality filters (filters.py)
         -> exact + near-duplicate removal across all inputs (dedup.py)
         -> tokenise in batches on all cores -> one shard stream per (source, language)

Each kept document is stored as [BOS] tokens [EOS], so packed sequences stay self-delimited.
Chat records ({"messages": [...]}) are rendered with the chat template and stored in their own
shards with a loss mask (assistant turns only).

Parallelism: the per-document work (normalising, language identification, quality filters,
MinHash fingerprints and tokenisation) runs in `workers` processes on batches of documents,
each stage batched (numpy over the whole batch, one SentencePiece call writing numpy ids);
a batch comes back as a few flat arrays. The main process reads the input and makes the
order-dependent decisions (duplicates, shard boundaries) in input order. Workers are forked
(no imports to repeat) unless the caller runs threads or has torch loaded; then spawned.

Determinism: documents are decided in input order and shards are cut at fixed token counts,
so the same input gives byte-identical shards (and therefore the same SHA-256 names),
whatever the number of workers.

Resumption: every finished shard is appended to OUT/.journal.jsonl. A rerun reads and filters
the input again (cheap, deterministic) but skips tokenising and writing every document that
belongs to a journaled shard. Every dropped document is counted by reason in the manifest's
report (and in OUT/report.json).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .chat import render_chat
from .dedup import Deduplicator
from .filters import FilterConfig, detect_languages, normalize, quality_reasons
from .ingest import Document, DropCounter, read_documents
from .shards import Manifest, ShardInfo, ShardWriter, token_dtype
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
JOURNAL = ".journal.jsonl"


@dataclass
class ShardConfig:
    text_field: str = "text"
    source: str | None = None  # default: each input file's stem
    lang: str = "auto"  # auto: detect per document, keep ja and en; ja / en: keep only that language
    shard_tokens: int = 1 << 24  # a shard is closed once it holds at least this many tokens
    batch_docs: int = 256  # documents per job sent to a worker process
    workers: int | None = None  # processes for the per-document work (default: all cores; 1: in-process)
    dedup: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        if self.lang not in ("auto", "ja", "en"):
            raise ValueError(f"--lang must be auto, ja or en, got {self.lang!r}")
        if self.shard_tokens < 1:
            raise ValueError("--shard-tokens must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError("--workers must be >= 1")


@dataclass
class _Batch:
    """A batch of documents after the per-document work, as a worker sends it back: a few lists and flat arrays,
    not an object per document (pickling a few hundred small objects and arrays per batch cost about as much CPU
    as the quality filters). Everything from `exact` on follows the documents that passed the filters (drop
    None), in input order: K of them."""

    sources: list[str]
    kinds: list[str]  # "text" or "chat"
    drops: list[str | None]  # reason, if the document is dropped before deduplication
    langs: list[str]
    exact: np.ndarray | None  # (K,) uint64 exact-duplicate keys (Deduplicator.fingerprint_arrays); None: no dedup
    sigs: np.ndarray | None  # (K, num_perm) uint32 MinHash signatures
    chars: list[int]  # (K,) characters of each normalised text
    ids: np.ndarray  # the K documents' [BOS] tokens [EOS], one after another (int32)
    ends: np.ndarray  # (K,) end of each document in `ids`; a text left untokenised (resume) has length 0
    masks: dict[int, np.ndarray]  # loss masks of chat records, by position among the K
    texts: list[str] | None  # the K normalised texts, sent back only when tokenisation was skipped


class _Bucket:
    """The open shard of one (source, language, kind); its tokens stream to disk (ShardWriter)."""

    def __init__(self, key: tuple[str, str, str], done_docs: int, next_index: int):
        self.key, self.done_docs, self.index = key, done_docs, next_index
        self.seen = 0  # kept documents of this bucket met so far in this run
        self.writer: ShardWriter | None = None
        self.chars = 0  # characters of the normalised text in the open shard

    @property
    def chat(self) -> bool:
        return self.key[2] == "chat"

    def add(self, out: Path, vocab_size: int, ids: np.ndarray, mask: np.ndarray | None, chars: int) -> int:
        """Append a document; returns the open shard's token count."""
        if self.writer is None:
            self.writer = ShardWriter(out, vocab_size, with_mask=self.chat)
        self.writer.add(ids, mask)
        self.chars += chars
        return self.writer.n_tokens


def _keep_heap() -> None:
    """Tells glibc's malloc to keep up to 64 MB of freed memory at the top of the heap instead of handing it back
    to the kernel at once. Each batch allocates and frees tens of MB of numpy temporaries (hashes, classes,
    token ids); given back after every batch, they were faulted in again by the next, page by page: a fifth of
    a worker's CPU time (300,000 page faults for a 32 MB corpus) went to the kernel, against 3% now. The
    padding is address space until it is used; other C libraries: no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_TOP_PAD, 64 << 20)


_M_TOP_PAD = -2  # <malloc.h>


# ---- per-document work (runs in worker processes) -----------------------------------------------

_W: dict = {}


def _init_worker(tokenizer_dir: str, cfg: ShardConfig) -> None:
    _keep_heap()
    _W["tok"] = Tokenizer(tokenizer_dir)
    _W["cfg"] = cfg
    _W["dedup"] = Deduplicator() if cfg.dedup else None  # only for fingerprints: same parameters as main


def _prepare(job: _Job) -> _Batch:
    """Per-document work for a batch. The filters, fingerprints and tokenisation each run
    batched (a constant number of numpy / SentencePiece calls per batch, data_shards/filters.py and dedup.py),
    which is what makes them cheap per document."""
    docs, tokenize = job
    tok, cfg, dedup = _W["tok"], _W["cfg"], _W["dedup"]
    kinds: list[str] = []
    drops: list[str | None] = []
    texts: list[str] = []
    rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, (text, _, messages) in enumerate(docs):
        if messages is None:
            kinds.append("text")
            texts.append(normalize(text))
            drops.append(None)
            continue
        kinds.append("chat")
        try:
            rendered[i] = render_chat({"messages": messages}, tok.encode, tok.marker_ids,
                                      tok.bos_id, tok.eos_id)
        except ValueError:
            drops.append("invalid_chat")
            texts.append("")
            continue
        texts.append(normalize("\n".join(str(m.get("content", "")) for m in messages)))
        drops.append(None)
    langs = detect_languages(texts)
    for i, lang in enumerate(langs):
        if drops[i] is None and (lang not in ("ja", "en") or (cfg.lang != "auto" and lang != cfg.lang)):
            drops[i] = "language" if cfg.lang == "auto" else "language_mismatch"

    check = [i for i, k in enumerate(kinds) if drops[i] is None and k == "text"]
    for i, reason in zip(check, quality_reasons([texts[i] for i in check], [langs[i] for i in check], cfg.filters),
                         strict=True):
        drops[i] = reason
    kept = [i for i, d in enumerate(drops) if d is None]
    kept_texts = [texts[i] for i in kept]
    exact, sigs = dedup.fingerprint_arrays(kept_texts) if dedup is not None else (None, None)
    encoded = iter(tok.encode_arrays([texts[i] for i in kept if kinds[i] == "text"]) if tokenize else ())
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    masks: dict[int, np.ndarray] = {}
    for k, i in enumerate(kept):
        if i in rendered:  # chat records always come rendered, also while resuming
            ids, masks[k] = rendered[i]
            parts.append(ids.astype(np.int32))
            lengths.append(len(ids))
        elif tokenize:
            ids = next(encoded)
            parts += (tok.bos_array, ids, tok.eos_array)
            lengths.append(len(ids) + 2)
        else:
            lengths.append(0)  # the main process tokenises it if it turns out to be past the resume point
    return _Batch(sources=[source for _, source, _ in docs], kinds=kinds, drops=drops, langs=langs, exact=exact,
                  sigs=sigs, chars=list(map(len, kept_texts)),
                  ids=np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32),
                  ends=np.cumsum(lengths, dtype=np.int64), masks=masks, texts=None if tokenize else kept_texts)


_Job = tuple[list[tuple[str, str, list | None]], bool]  # [(text, source, chat messages or None)], tokenize


def _batches(docs: Iterator[Document], size: int, tokenize: Callable[[], bool]) -> Iterator[_Job]:
    """Jobs for the workers: what _prepare needs of each document as plain tuples (they pickle about twice as
    fast as Document objects, and the records' other fields stay behind)."""
    batch: list[tuple[str, str, list | None]] = []
    for d in docs:
        batch.append((d.text, d.source, d.meta.get("messages") if "messages" in d.meta else None))
        if len(batch) == size:
            yield batch, tokenize()
            batch = []
    if batch:
        yield batch, tokenize()


# ---- the pipeline ---------------------------------------------------------------------------------

def build_shards(inputs: list[str | os.PathLike], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 cfg: ShardConfig) -> Manifest:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(tokenizer_dir)
    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)  # a shard directory is self-describing
    journal = _read_journal(out, tok.sha256)
    finished = [ShardInfo(**r["shard"]) for r in journal]
    buckets: dict[tuple[str, str, str], _Bucket] = {}
    for r in journal:  # resume: documents already in journaled shards are skipped
        key = tuple(r["bucket"])
        b = buckets.setdefault(key, _Bucket(key, 0, 0))
        b.done_docs, b.index = r["docs_through"], r["index"] + 1
    if journal:
        log.info("resuming: %d shards already written", len(journal))

    drops = DropCounter()
    dedup = Deduplicator() if cfg.dedup else None
    kept = Counter()
    t0, n_read, last_log = time.perf_counter(), 0, 0.0
    # While some bucket still has journaled documents ahead, workers skip tokenising (the main
    # process tokenises the few documents past the resume point itself).
    resuming = lambda: any(b.seen < b.done_docs for b in buckets.values())  # noqa: E731
    docs = read_documents(inputs, text_field=cfg.text_field, source=cfg.source, drops=drops)
    jobs = _batches(docs, cfg.batch_docs, lambda: not resuming())
    workers = cfg.workers or os.cpu_count() or 1
    dtype = token_dtype(tok.vocab_size)
    with _pool(workers, str(tokenizer_dir), cfg) as prepare:
        for batch in prepare(jobs):
            # duplicate decisions for the whole batch at once, in input order (the order is all they depend on)
            reasons = iter(dedup.check_arrays(batch.exact, batch.sigs) if dedup is not None and batch.ends.size
                           else ())
            ids_all = batch.ids.astype(dtype)  # the shard's token type, converted once per batch
            k = -1
            for i, drop in enumerate(batch.drops):
                n_read += 1
                if drop is None:
                    k += 1
                    drop = next(reasons, None)
                if drop is not None:
                    drops.add(drop)
                    continue
                key = (batch.sources[i], batch.langs[i], batch.kinds[i])
                bucket = buckets.setdefault(key, _Bucket(key, 0, 0))
                bucket.seen += 1
                kept[f"{key[0]}/{key[1]}"] += 1
                if bucket.seen <= bucket.done_docs:
                    continue  # already in a journaled shard
                start, end = (int(batch.ends[k - 1]) if k else 0), int(batch.ends[k])
                if start == end:  # a worker skipped it while resuming
                    ids = np.array([tok.bos_id, *tok.encode(batch.texts[k]), tok.eos_id], dtype=dtype)
                else:
                    ids = ids_all[start:end]
                if bucket.add(out, tok.vocab_size, ids, batch.masks.get(k), batch.chars[k]) >= cfg.shard_tokens:
                    finished.append(_close(out, bucket, tok))
            now = time.perf_counter()
            if now - last_log > 10:
                last_log = now
                log.info("read %s documents (%s kept, %s dropped), %d shards, %.0f docs/s", f"{n_read:,}",
                         f"{sum(kept.values()):,}", f"{drops.total():,}", len(finished), n_read / (now - t0))
    for bucket in buckets.values():
        if bucket.writer is not None:
            finished.append(_close(out, bucket, tok))

    report = {"documents_read": n_read, "documents_kept": dict(sorted(kept.items())),
              "dropped": drops.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
    manifest = Manifest(tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size,
                        shards=sorted(finished, key=lambda s: (s.source, s.language, s.file)), report=report)
    manifest.save(out)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log.info("done: %d shards, %s documents, %s tokens; dropped %s (%s)", len(manifest.shards),
             f"{manifest.documents:,}", f"{manifest.tokens:,}", f"{drops.total():,}",
             ", ".join(f"{k} {v}" for k, v in drops.as_dict().items()) or "none")
    return manifest


@contextlib.contextmanager
def _pool(workers: int, tokenizer_dir: str, cfg: ShardConfig):
    """Yields prepare(jobs) -> iterator of prepared batches, in order: a process pool, or inline for 1."""
    if workers == 1:
        _init_worker(tokenizer_dir, cfg)
        yield lambda jobs: map(_prepare, jobs)
        return
    # Workers are forked when that is safe: they start at once, with everything imported and built (numpy, the
    # character tables), instead of paying ~0.3 s of imports each. The parent holds no thread that fork could
    # copy mid-state: SentencePiece's threads live only inside an encode call, and OpenBLAS (idle here) handles
    # fork itself. A caller that runs other Python threads or has torch loaded (its thread pools) gets spawn.
    safe = threading.active_count() == 1 and "torch" not in sys.modules
    ctx = multiprocessing.get_context("fork" if safe else "spawn")
    log.info("%d worker processes (%s)", workers, ctx.get_start_method())
    with ctx.Pool(workers, _init_worker, (tokenizer_dir, cfg)) as pool:
        yield lambda jobs: pool.imap(_prepare, jobs, chunksize=1)


def _close(out: Path, bucket: _Bucket, tok: Tokenizer) -> ShardInfo:
    assert bucket.writer is not None
    name, tokens, documents = bucket.writer.close()
    source, lang, kind = bucket.key
    info = ShardInfo(file=name, sha256=name.removesuffix(".bin"), tokens=tokens, documents=documents,
                     source=source if kind == "text" else f"{source}:chat", language=lang,
                     characters=bucket.chars)
    bucket.done_docs += documents
    record = {"bucket": list(bucket.key), "index": bucket.index, "docs_through": bucket.done_docs,
              "tokenizer_sha256": tok.sha256, "shard": asdict(info)}
    with open(out / JOURNAL, "a") as f:  # appended only after the shard file is complete and renamed
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    bucket.index += 1
    bucket.writer, bucket.chars = None, 0
    return info


def _read_journal(out: Path, tokenizer_sha256: str) -> list[dict]:
    path = out / JOURNAL
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from a crash: everything before it is complete
        if r["tokenizer_sha256"] != tokenizer_sha256:
            raise ValueError(f"{out} holds shards from another tokenizer: use a new --out directory")
        if not (out / r["shard"]["file"]).exists():
            break  # journal ahead of the files (should not happen: files are renamed first)
        records.append(r)
    return records
