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
belongs to a journaled shard. The journal is idempotent per (bucket, index): a rerun first checks
every journaled shard (present, size, SHA-256, document count), keeps each bucket's shards up to its
first missing or damaged one, and rebuilds from there; so deleting or damaging a shard and rerunning
(as often as you like) gives the manifest of a clean build. Every dropped document is counted by
reason in the manifest's report (and in OUT/report.json).
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
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import filters
from .chat import render_chat
from .dedup import Deduplicator
from .filters import FilterConfig, char_classes, detect_languages, normalize_many, quality_reasons
from .ingest import Document, DropCounter, RawLine, parse_json_line, read_documents
from .shards import Manifest, ShardError, ShardInfo, ShardReader, ShardWriter, token_dtype
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

    read_drops: dict[str, int]  # JSON lines dropped while parsing, by reason (they are not among the documents)
    sources: list[str]
    kinds: list[str]  # "text" or "chat"
    drops: list[str | None]  # reason, if the document is dropped before deduplication
    langs: list[str]
    exact: np.ndarray | None  # (K,) uint64 exact-duplicate keys (Deduplicator.fingerprint_arrays); None: no dedup
    sigs: np.ndarray | None  # (K, num_perm) uint32 MinHash signatures
    chars: list[int]  # (K,) characters of each normalised text
    ids: np.ndarray  # the K documents' [BOS] tokens [EOS], one after another (the shards' token type)
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

    def add_run(self, out: Path, vocab_size: int, ids: np.ndarray, lengths: np.ndarray, chars: np.ndarray,
                shard_tokens: int, close: Callable[[_Bucket], None]) -> None:
        """Append documents of a text bucket (tokens one after another, (n,) lengths and characters) with one
        write per shard they fall in, calling close(self) where `add` one by one would have returned
        >= shard_tokens: after the first document that brings the open shard to shard_tokens."""
        done = start = 0
        while done < len(lengths):
            if self.writer is None:
                self.writer = ShardWriter(out, vocab_size)
            reached = self.writer.n_tokens + np.cumsum(lengths[done:])  # (remaining,) shard size after each
            full = int(np.searchsorted(reached, shard_tokens))  # the first to reach shard_tokens, if any
            stop = done + min(full + 1, len(reached))
            end = start + int(lengths[done:stop].sum())
            self.writer.add_many(ids[start:end], lengths[done:stop])
            self.chars += int(chars[done:stop].sum())
            if stop - done == full + 1:
                close(self)
            done, start = stop, end


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
    _W["dtype"] = token_dtype(_W["tok"].vocab_size)  # ids travel back in the shards' type: half of int32
    _W["cfg"] = cfg
    _W["dedup"] = Deduplicator() if cfg.dedup else None  # only for fingerprints: same parameters as main


def _prepare(job: _Job) -> _Batch:
    """Per-document work for a batch. The filters, fingerprints and tokenisation each run
    batched (a constant number of numpy / SentencePiece calls per batch, data_shards/filters.py and dedup.py),
    which is what makes them cheap per document."""
    items, tokenize = job
    tok, cfg, dedup = _W["tok"], _W["cfg"], _W["dedup"]
    read_drops: Counter[str] = Counter()  # JSON lines that do not parse into a record
    docs: list[tuple[str, str, list | None]] = []
    for payload, source, messages in items:
        if isinstance(payload, bytes):  # a raw JSON line
            parsed = parse_json_line(payload, cfg.text_field)
            if isinstance(parsed, str):
                read_drops[parsed] += 1
                continue
            payload, record = parsed
            messages = record["messages"] if "messages" in record else None
        docs.append((payload, source, messages))
    kinds: list[str] = []
    drops: list[str | None] = []
    raw: list[str] = []  # each document's text before normalising
    rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, (text, _, messages) in enumerate(docs):
        if messages is None:
            kinds.append("text")
            raw.append(text)
            drops.append(None)
            continue
        kinds.append("chat")
        try:
            rendered[i] = render_chat({"messages": messages}, tok.encode, tok.marker_ids,
                                      tok.bos_id, tok.eos_id)
        except ValueError:
            drops.append("invalid_chat")
            raw.append("")
            continue
        raw.append("\n".join(str(m.get("content", "")) for m in messages))
        drops.append(None)
    texts = normalize_many(raw)
    chars = char_classes(texts)
    langs = detect_languages(texts, chars)
    for i, lang in enumerate(langs):
        if drops[i] is None and (lang not in ("ja", "en") or (cfg.lang != "auto" and lang != cfg.lang)):
            drops[i] = "language" if cfg.lang == "auto" else "language_mismatch"

    check = [i for i, k in enumerate(kinds) if drops[i] is None and k == "text"]
    reasons = quality_reasons([texts[i] for i in check], [langs[i] for i in check], cfg.filters,
                              chars if len(check) == len(texts) else None)
    for i, reason in zip(check, reasons, strict=True):
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
    return _Batch(read_drops=dict(read_drops), sources=[source for _, source, _ in docs], kinds=kinds, drops=drops,
                  langs=langs, exact=exact, sigs=sigs, chars=list(map(len, kept_texts)),
                  ids=np.concatenate(parts, dtype=_W["dtype"], casting="unsafe") if parts else np.zeros(0, _W["dtype"]),
                  ends=np.cumsum(lengths, dtype=np.int64), masks=masks, texts=None if tokenize else kept_texts)


_Job = tuple[list[tuple[str | bytes, str, list | None]], bool]
"""([(text or raw JSON line, source, chat messages or None)], tokenize)"""


def _batches(docs: Iterator[Document | RawLine], size: int, tokenize: Callable[[], bool]) -> Iterator[_Job]:
    """Jobs for the workers: what _prepare needs of each document as plain tuples (they pickle about twice as
    fast as Document objects, and the records' other fields stay behind). JSON lines travel unparsed, as bytes:
    the workers parse them, in parallel, and a bytes object pickles at memory speed."""
    batch: list[tuple[str | bytes, str, list | None]] = []
    for d in docs:
        if isinstance(d, RawLine):
            batch.append((d.raw, d.source, None))
        else:
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
        if r["index"] >= b.index:  # (a bucket's records need not come in index order)
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
    docs = read_documents(inputs, text_field=cfg.text_field, source=cfg.source, drops=drops, raw_json=True)
    jobs = _batches(docs, cfg.batch_docs, lambda: not resuming())
    workers = cfg.workers or os.cpu_count() or 1
    dtype = token_dtype(tok.vocab_size)
    with _pool(workers, str(tokenizer_dir), cfg) as prepare:
        for batch in prepare(jobs):
            # duplicate decisions for the whole batch at once, in input order (the order is all they depend on)
            reasons = iter(dedup.check_arrays(batch.exact, batch.sigs) if dedup is not None and batch.ends.size
                           else ())
            ids_all = batch.ids.astype(dtype, copy=False)  # the shard's token type (the workers convert)
            drops.merge(batch.read_drops)
            n_read += len(batch.drops)
            # the documents kept, in order, as runs of consecutive documents of one bucket (usually the whole batch)
            runs: list[tuple[tuple[str, str, str], list[int]]] = []
            k = -1
            for i, drop in enumerate(batch.drops):
                if drop is None:
                    k += 1
                    drop = next(reasons, None)
                if drop is not None:
                    drops.add(drop)
                    continue
                key = (batch.sources[i], batch.langs[i], batch.kinds[i])
                if not runs or runs[-1][0] != key:
                    runs.append((key, []))
                runs[-1][1].append(k)
            for key, ks in runs:
                bucket = buckets.setdefault(key, _Bucket(key, 0, 0))
                kept[f"{key[0]}/{key[1]}"] += len(ks)
                skip = min(len(ks), max(0, bucket.done_docs - bucket.seen))  # already in journaled shards
                bucket.seen += len(ks)
                _write_run(bucket, ks[skip:], batch, ids_all, out, tok, cfg.shard_tokens, finished)
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
    """Yields prepare(jobs) -> iterator of prepared batches, in order: worker processes, or inline for 1."""
    log.info("filters and MinHash: %s", "C loops (data_shards._native)" if filters._native is not None else
             "numpy (data_shards._native is not built, or MUJINA_NATIVE=0; same results, about 1.5x the CPU)")
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
    pool = _OrderedPool(ctx, workers, (tokenizer_dir, cfg))
    try:
        yield pool.map
    finally:
        pool.close()


class _OrderedPool:
    """Worker processes that each take every n-th job and answer in order, over a pair of pipes per worker.

    multiprocessing.Pool.imap does the same with three threads in this process, one of which wakes up for every
    result a worker sends and then spins until the result thread has read it: ~0.15 CPU-s for a 32 MB corpus,
    out of ~1 s for everything the main process does. Here a single feeder thread pickles and sends the jobs,
    at most `depth` ahead of the results per worker (memory stays bounded); the caller's thread reads the
    results itself. Jobs are dealt round-robin, so a slow batch holds up the others by at most `depth` jobs.

    A worker that raises sends the exception back, and map() raises it here; one that dies (killed, out of
    memory) makes map() raise RuntimeError; an exception of the feeder (reading the input) is raised as it is.
    """

    def __init__(self, ctx, n: int, initargs: tuple, depth: int = 2):
        self.procs, self.jobs, self.results = [], [], []
        for _ in range(n):
            job_r, job_w = ctx.Pipe(duplex=False)
            res_r, res_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_serve, args=(job_r, res_w, *initargs), daemon=True)
            proc.start()
            job_r.close()  # the worker's ends: closed here, so that a dead worker reads as EOF
            res_w.close()
            self.procs.append(proc)
            self.jobs.append(job_w)
            self.results.append(res_r)
        self.slots = [threading.Semaphore(depth) for _ in range(n)]
        self.sent: int | None = None  # jobs sent, once the feeder has sent them all
        self.failure: BaseException | None = None

    def map(self, jobs: Iterator[_Job]) -> Iterator[_Batch]:
        feeder = threading.Thread(target=self._feed, args=(jobs,), name="shard-feeder", daemon=True)
        feeder.start()
        n = len(self.procs)
        j = 0
        while True:
            conn = self.results[j % n]
            while not conn.poll(0.05):  # wait for result j, watching the feeder
                if self.failure is not None:
                    raise self.failure  # as Pool.imap did: e.g. the ValueError of a corrupt gzip file
                if self.sent is not None and j >= self.sent:
                    return
            try:
                kind, value = conn.recv()
            except EOFError:
                code = self.procs[j % n].exitcode
                raise RuntimeError(f"shard worker {j % n} died (exit code {code}); the run can be resumed") from None
            self.slots[j % n].release()
            if kind == "error":
                exc, trace = value
                raise exc from _WorkerTraceback(trace)
            yield value
            j += 1

    def _feed(self, jobs: Iterator[_Job]) -> None:
        n, sent = len(self.procs), 0
        try:
            for job in jobs:
                self.slots[sent % n].acquire()
                self.jobs[sent % n].send(job)
                sent += 1
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            self.failure = e
            return
        self.sent = sent

    def close(self) -> None:
        for slot in self.slots:  # a feeder waiting for room sends into a closed pipe instead, and stops
            slot.release()
        for conn, proc in zip(self.jobs, self.procs, strict=True):
            with contextlib.suppress(OSError):
                if self.sent is not None and proc.is_alive():
                    conn.send(None)  # finished: the worker exits
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5 if self.sent is not None else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.results:
            conn.close()


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in a shard worker (the cause of the exception re-raised here)."""


def _serve(jobs, results, tokenizer_dir: str, cfg: ShardConfig) -> None:
    """A shard worker: prepares the batches it receives until it receives None (or the main process is gone)."""
    _init_worker(tokenizer_dir, cfg)
    while True:
        try:
            job = jobs.recv()
        except EOFError:  # the main process died or gave up: nobody waits for the results
            return
        if job is None:
            return
        try:
            reply = ("ok", _prepare(job))
        except Exception as e:  # noqa: BLE001 - sent to the main process, which raises it
            reply = ("error", (e, traceback.format_exc()))
        try:
            results.send(reply)
        except BrokenPipeError:  # the main process is gone
            return
        except Exception:  # an exception that does not pickle: send its text
            if reply[0] != "error":
                raise
            e, trace = reply[1]
            results.send(("error", (RuntimeError(f"{type(e).__name__}: {e}"), trace)))


def _write_run(bucket: _Bucket, ks: list[int], batch: _Batch, ids: np.ndarray, out: Path, tok: Tokenizer,
               shard_tokens: int, finished: list[ShardInfo]) -> None:
    """Appends the batch's kept documents `ks` (indexes among its K) to `bucket`, closing shards as they fill."""
    if not ks:
        return
    ends = batch.ends[ks]
    starts = ends - np.diff(batch.ends, prepend=0)[ks]
    if bucket.chat or bool((starts == ends).any()):  # loss masks, or documents a worker left untokenised (resume)
        for k, start, end in zip(ks, starts.tolist(), ends.tolist(), strict=True):
            if start == end:
                doc = np.array([tok.bos_id, *tok.encode(batch.texts[k]), tok.eos_id], dtype=ids.dtype)
            else:
                doc = ids[start:end]
            if bucket.add(out, tok.vocab_size, doc, batch.masks.get(k), batch.chars[k]) >= shard_tokens:
                finished.append(_close(out, bucket, tok))
        return
    if ks[-1] - ks[0] == len(ks) - 1:  # consecutive documents: their tokens are one slice
        run = ids[int(starts[0]): int(ends[-1])]
    else:
        run = np.concatenate([ids[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])
    chars = np.array(batch.chars, dtype=np.int64)[ks]
    bucket.add_run(out, tok.vocab_size, run, ends - starts, chars, shard_tokens,
                   lambda b: finished.append(_close(out, b, tok)))


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
    """The journal's records that a rerun can keep, in journal order: at most one per (bucket, index), each
    bucket's indexes 0, 1, 2, ... without a gap, and every shard present and intact (its size, SHA-256 and
    document count checked against the record). A bucket stops at its first missing, truncated or corrupted
    shard: that shard and the bucket's later ones are rebuilt (the documents are decided in input order, so
    the rebuilt files are the same), while the other buckets keep theirs. The journal is rewritten to hold
    exactly these records, so a rerun never lists a shard twice, however often it is repeated."""
    path = out / JOURNAL
    if not path.exists():
        return []
    text = path.read_text()
    first: dict[tuple[tuple, int], dict] = {}  # (bucket, index) -> its first record, in journal order
    for line in text.splitlines():
        try:
            r = json.loads(line)
            key = (tuple(r["bucket"]), int(r["index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            break  # a torn last line from a crash: everything before it is complete
        if r["tokenizer_sha256"] != tokenizer_sha256:
            raise ValueError(f"{out} holds shards from another tokenizer: use a new --out directory")
        first.setdefault(key, r)  # a (bucket, index) journaled twice counts once
    keep: set[tuple[tuple, int]] = set()
    for bucket in {b for b, _ in first}:
        docs, index = 0, 0
        while (r := first.get((bucket, index))) is not None:
            problem = _shard_problem(out, r["shard"], docs + r["shard"]["documents"], r["docs_through"])
            if problem is not None:
                log.warning("shard %d of %s: %s; rebuilding it and the %d after it", index, "/".join(bucket),
                            problem, sum(1 for b, i in first if b == bucket and i > index))
                if problem != "missing":
                    (out / r["shard"]["file"]).unlink(missing_ok=True)
                break
            keep.add((bucket, index))
            docs, index = r["docs_through"], index + 1
    records = [r for key, r in first.items() if key in keep]
    kept = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if kept != text:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return records


def _shard_problem(out: Path, info: dict, docs_through: int, journaled_through: int) -> str | None:
    """Why the journaled shard `info` cannot be kept (missing, truncated, corrupted, counts that do not add
    up), or None. Reads the whole file once (its SHA-256)."""
    if docs_through != journaled_through:
        return f"the journal's document count ({journaled_through}) does not add up ({docs_through})"
    try:
        reader = ShardReader(out / info["file"], expected_sha256=info["sha256"])
    except FileNotFoundError:
        return "missing"
    except ShardError as e:
        return str(e).removeprefix(f"{out / info['file']}: ")
    if (reader.num_documents, reader.num_tokens) != (info["documents"], info["tokens"]):
        return (f"it holds {reader.num_documents} documents and {reader.num_tokens} tokens, the journal says "
                f"{info['documents']} and {info['tokens']}")
    return None
