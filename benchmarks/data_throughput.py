"""Data pipeline benchmark: `mujina-data shard` against plain SentencePiece, packing quality, peak memory.

    python benchmarks/data_throughput.py                  # about 2 minutes on an idle 2-core CPU
    python benchmarks/data_throughput.py --docs 3000 --repeats 2 --mem-factor 5 --profile

Everything runs in one process on one machine, from a bilingual corpus written by
tests/data_shards/corpus.py (templates, no downloads): Japanese and English documents about 2:1
(distinct seeds), `--docs` documents (about 1.6 KB each: the default 20,000 documents are ~32 MB of
text), as two JSONL files in a temporary directory. A tokenizer is trained once on a sample of it.
The default size makes one shard run last several seconds, so that the interpreter start-up and
imports (~0.2 s, paid once per run; workers are forked, not spawned) are a small part of it, as in
a real run of minutes; the "pipeline" figures leave them out altogether (steady state).

1. Throughput. (a) `python -m data_shards.cli shard --workers W` as a subprocess, end to end:
   interpreter start, reading JSONL, normalising, language identification, quality filters,
   MinHash dedup, tokenising, writing shards and the manifest. Filters and dedup are on (the
   CLI's defaults). (b) The baseline: one plain call `SentencePieceProcessor.encode(texts,
   num_threads=W)` (Python lists of ids, SentencePiece's default) on the same texts, read into
   memory beforehand (untimed). Both use W = `--workers` cores (2): the CLI W worker processes
   plus its main process, SentencePiece W threads. A second row encodes with
   return_type="numpy" (ids written into numpy arrays, what the workers use), for reference;
   the ratio is against the default call.
   MB/s counts the UTF-8 bytes of the documents' text (the same numerator for both);
   tokens/s counts text tokens (the shards' tokens minus the BOS and EOS of each document),
   which equal the baseline's when no document is dropped. The runs are interleaved (shard,
   baseline, shard with one worker, shard with numpy loops, then the next repeat) and each figure is the median over
   `--repeats`. ratio = shard MB/s / baseline MB/s; the goal (issue 3) is >= 0.5. "pipeline
   MB/s" uses the time build_shards itself reports (OUT/report.json), without interpreter
   start-up and imports; the gap to the end-to-end figure shrinks as the corpus grows.
   The single-worker run shows how the CLI scales with cores (2 workers / 1 worker). A last run
   per repeat sets MUJINA_NATIVE=0: the same CLI with the numpy fallback of its C loops
   (data_shards/_native.c), to show what they buy (native_speedup = its time / the default's).
   `--compare CHECKOUT` also runs another checkout's CLI (e.g. `git worktree add /tmp/old
   b7dcef9`) in every repeat: before/after ratios taken in the same run, under the same load.
   "CPU s" is user + system time of the CLI and all its workers (or of the encoding threads):
   cpu_ratio = baseline CPU s / shard CPU s compares the work per MB and moves much less than
   the wall-clock ratio when other jobs share the machine. On a shared machine with the
   kernel's autogroup scheduling, the processes of one session share one session's CPU share,
   so a second worker may add no CPU at all while others are busy: read worker_scaling with
   the load average printed at the end.

2. Packing quality (`data_shards.packing.packing_stats`, best-fit decreasing) at seq_len 2048
   and 4096 on `--lengths` synthetic document lengths, lognormal with median 600 tokens and
   sigma 1.0 (a web-text-like spread: 10% of documents above ~2,200 tokens), and on the real
   document lengths of the shards from part 1. fill_rate = real tokens / (sequences * seq_len),
   goal >= 0.99. "cut" columns: documents split across sequences by best fit (only those longer
   than seq_len) and by concatenate-and-chunk.

3. Peak memory as the corpus grows: the same CLI run on `--docs` / `--mem-factor` and `--docs`
   documents (an order of magnitude apart by default). "largest process" is ru_maxrss of
   RUSAGE_CHILDREN in a small wrapper process that runs the CLI: it covers the CLI and every
   worker the CLI waited for, and is the peak RSS of the single biggest of them. "process
   tree" is the peak of the summed RSS of the CLI and its workers (pages they share, such as
   libraries, count once per process), sampled from /proc every 50 ms (it can miss a shorter
   spike). Each size runs twice: with the CLI's default --shard-tokens (16M tokens: one open
   shard per (source, language), its tokens streamed to a temporary file, its document
   offsets in memory), and with `--mem-shard-tokens` (256K), small enough that both sizes
   write many shards, so that any
   remaining growth is what the pipeline keeps per document: the dedup index, ~1.1 KB per
   kept document, up to 2x that while its arrays double (O(documents) by design, not flat).

`--profile` also times each stage of build_shards directly on the corpus, batched as the workers
run them (one core, no profiler: CPU seconds, ms per document, share), the start-up of a fresh
process that imports the pipeline and loads the tokenizer, and runs build_shards in this process
with one worker under cProfile (cumulative time per stage).

Results go to JSON (--json) with the machine they were taken on. Timings on a shared 2-core
machine vary by 10-20% or more: compare runs, not single figures.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
from data_shards.build import ShardConfig, build_shards  # noqa: E402
from data_shards.dedup import Deduplicator  # noqa: E402
from data_shards.filters import (  # noqa: E402
    char_classes,
    detect_languages,
    normalize,
    normalize_many,
    quality_reasons,
)
from data_shards.packing import packing_stats  # noqa: E402
from data_shards.shards import Manifest, ShardReader  # noqa: E402
from data_shards.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer  # noqa: E402
from tests.data_shards.corpus import english_documents, japanese_documents, write_jsonl  # noqa: E402

JA_SEED, EN_SEED = 101, 202  # distinct seeds: the two generators never share a random stream
SEQ_LENS = (2048, 4096)
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- corpus and tokenizer ------------------------------------------------------------------------

def make_corpus(directory: Path, n_docs: int) -> dict[str, Any]:
    """ja.jsonl and en.jsonl with n_docs documents in all, ja:en = 2:1. A smaller corpus is a prefix of a larger."""
    directory.mkdir(parents=True, exist_ok=True)
    n_ja = round(n_docs * 2 / 3)
    ja, en = japanese_documents(n_ja, seed=JA_SEED), english_documents(n_docs - n_ja, seed=EN_SEED)
    files = [write_jsonl(directory / "ja.jsonl", ja), write_jsonl(directory / "en.jsonl", en)]
    texts = ja + en  # the order shard reads them in
    return {"files": files, "texts": texts, "documents": len(texts), "ja": len(ja), "en": len(en),
            "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
            "file_bytes": sum(f.stat().st_size for f in files)}


def train(texts: list[str], out: Path, vocab_size: int, sample: int, mecab: bool) -> int:
    """Trains on every k-th document (about `sample` documents, both languages); returns the vocabulary size used.

    The template corpus supports only so many pieces (with MeCab pre-segmentation about 1,800): if
    `vocab_size` is too high, train again at the largest size SentencePiece says it can reach.
    """
    step = max(1, len(texts) // sample)
    sample_texts = [normalize(t) for t in texts[::step]]
    try:
        train_tokenizer(sample_texts, out, TokenizerTrainConfig(vocab_size=vocab_size, mecab=mecab, threads=2))
        return vocab_size
    except ValueError as e:
        m = re.search(r"<= (\d+)", str(e))
        if not m:
            raise
        smaller = int(m.group(1))
        print(f"  this corpus supports at most {smaller} pieces, not {vocab_size}: training with {smaller}",
              file=sys.stderr)
        train_tokenizer(sample_texts, out, TokenizerTrainConfig(vocab_size=smaller, mecab=mecab, threads=2))
        return smaller


# ---- running the CLI and measuring its memory ---------------------------------------------------

def _descendants_rss(root: int, include_root: bool = True) -> int:
    """Summed RSS in bytes of `root` and all its descendants, from /proc (0 for processes gone meanwhile)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        parent[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    if not include_root:
        tree.discard(root)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


# Runs the CLI and reports its wall time and getrusage(RUSAGE_CHILDREN).ru_maxrss: the peak RSS of the
# largest of the CLI and the workers it waited for. A fresh, small process per run, because ru_maxrss
# of a child also counts the RSS its parent had when it forked (vfork) the child: measured from this
# benchmark, which holds the corpus in memory, every run would read at least this process's size.
_WRAPPER = """import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    json.dump({"rc": rc, "wall_s": wall, "cpu_s": u.ru_utime + u.ru_stime, "maxrss_kb": u.ru_maxrss}, f)
"""
SAMPLE_EVERY_S = 0.05  # one /proc scan takes ~4 ms: every 50 ms it costs <10% of a core


def run_shard(inputs: list[Path], tokenizer: Path, out: Path, workers: int, log: Path,
              shard_tokens: int | None = None, sample_tree: bool = False, repo: Path = REPO,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """`mujina-data shard` in a fresh subprocess: wall time, peak RSS, the manifest's counts.

    sample_tree: also sample the summed RSS of the CLI and its workers from /proc (costs CPU: not while timing).
    """
    shutil.rmtree(out, ignore_errors=True)  # a leftover directory would make the CLI resume, not rebuild
    cmd = [sys.executable, "-m", "data_shards.cli", "shard", "--input", *map(str, inputs),
           "--tokenizer", str(tokenizer), "--out", str(out), "--workers", str(workers)]
    if shard_tokens is not None:
        cmd += ["--shard-tokens", str(shard_tokens)]
    env = {**os.environ, "PYTHONPATH": str(repo), **(env or {})}
    usage_file = log.with_suffix(".usage.json")
    peak_tree, stop = [0], threading.Event()
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(usage_file), *cmd], cwd=repo, env=env,
                                stdout=logf, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not stop.wait(SAMPLE_EVERY_S):
                peak_tree[0] = max(peak_tree[0], _descendants_rss(proc.pid, include_root=False))

        sampler = threading.Thread(target=sample, daemon=True)
        if sample_tree:
            sampler.start()
        proc.wait()
        stop.set()
        if sample_tree:
            sampler.join()
    usage = json.loads(usage_file.read_text()) if usage_file.exists() else {"rc": proc.returncode}
    if proc.returncode != 0 or usage["rc"] != 0:
        raise RuntimeError(f"mujina-data shard failed (exit {usage['rc']}); its output is in {log}:\n"
                           + log.read_text()[-2000:])
    m = Manifest.load(out)
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": usage["wall_s"], "cpu_s": usage["cpu_s"], "pipeline_s": report["seconds"],
            "documents": m.documents, "tokens": m.tokens, "text_tokens": m.tokens - 2 * m.documents,
            "shards": len(m.shards), "dropped": sum(report["dropped"].values()),
            "peak_rss_mb": usage["maxrss_kb"] / 1024,  # KiB on Linux
            "tree_peak_rss_mb": peak_tree[0] / 2**20 if sample_tree else None}


# ---- part 1: throughput ---------------------------------------------------------------------------

def bench_throughput(corpus: dict[str, Any], tok_dir: Path, work: Path, workers: int, repeats: int,
                     compare: Path | None = None) -> dict:
    """compare: another checkout whose CLI also runs, with `workers`, in every repeat (ratios in the same run)."""
    texts = corpus["texts"]  # in memory before anything is timed
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    sp.encode(texts[:64], num_threads=workers)  # warm-up: first-call allocations
    runs: dict[str, list[dict]] = {"shard": [], "baseline": [], "baseline_numpy": [], "shard_1": [],
                                   "shard_numpy": []}
    for r in range(repeats):
        print(f"  repeat {r + 1}/{repeats}: shard --workers {workers}, sentencepiece (lists, numpy), "
              f"shard --workers 1, shard --workers {workers} with MUJINA_NATIVE=0", file=sys.stderr, flush=True)
        runs["shard"].append(run_shard(corpus["files"], tok_dir, work / "out", workers, work / "shard.log"))
        for name, kw in (("baseline", {}), ("baseline_numpy", {"return_type": "numpy"})):
            c0, t0 = _cpu_self(), time.perf_counter()
            ids = sp.encode(texts, num_threads=workers, **kw)
            wall, cpu = time.perf_counter() - t0, _cpu_self() - c0
            runs[name].append({"wall_s": wall, "cpu_s": cpu, "text_tokens": sum(map(len, ids))})
            del ids
        runs["shard_1"].append(run_shard(corpus["files"], tok_dir, work / "out", 1, work / "shard.log"))
        runs["shard_numpy"].append(run_shard(corpus["files"], tok_dir, work / "out", workers, work / "shard.log",
                                             env={"MUJINA_NATIVE": "0"}))
        if compare is not None:
            runs.setdefault("compare", []).append(run_shard(corpus["files"], tok_dir, work / "out", workers,
                                                            work / "shard.log", repo=compare))
    mb = corpus["text_bytes"] / 1e6

    def med(name: str, key: str = "wall_s") -> float:
        return statistics.median(x[key] for x in runs[name])

    shard, base, one = med("shard"), med("baseline"), med("shard_1")
    cpu = {name: med(name, "cpu_s") for name in runs}
    last = runs["shard"][-1]
    return {
        "workers": workers, "repeats": repeats, "input_mb": mb, "documents": corpus["documents"],
        "documents_kept": last["documents"], "documents_dropped": last["dropped"],
        "shard_text_tokens": last["text_tokens"], "baseline_tokens": runs["baseline"][-1]["text_tokens"],
        "shard_s": shard, "baseline_s": base, "shard_1_s": one, "shard_pipeline_s": med("shard", "pipeline_s"),
        "shard_mb_per_s": mb / shard, "baseline_mb_per_s": mb / base, "shard_1_mb_per_s": mb / one,
        "baseline_numpy_s": med("baseline_numpy"), "baseline_numpy_mb_per_s": mb / med("baseline_numpy"),
        "shard_pipeline_mb_per_s": mb / med("shard", "pipeline_s"),
        "shard_1_pipeline_mb_per_s": mb / med("shard_1", "pipeline_s"),
        "shard_tokens_per_s": last["text_tokens"] / shard,
        "baseline_tokens_per_s": runs["baseline"][-1]["text_tokens"] / base,
        "shard_1_tokens_per_s": last["text_tokens"] / one,
        "ratio": base / shard,  # = shard MB/s / baseline MB/s
        "shard_cpu_s": cpu["shard"], "baseline_cpu_s": cpu["baseline"], "shard_1_cpu_s": cpu["shard_1"],
        "baseline_numpy_cpu_s": cpu["baseline_numpy"],
        "cpu_ratio": cpu["baseline"] / cpu["shard"],  # MB per CPU-second, shard over baseline
        "pipeline_ratio": base / med("shard", "pipeline_s"),  # steady state: no interpreter start-up, imports
        "ratio_vs_numpy": med("baseline_numpy") / shard,
        # the same CLI with its numpy loops instead of data_shards._native (MUJINA_NATIVE=0)
        "shard_numpy_s": med("shard_numpy"), "shard_numpy_cpu_s": cpu["shard_numpy"],
        "shard_numpy_pipeline_s": med("shard_numpy", "pipeline_s"), "numpy_loops_ratio": base / med("shard_numpy"),
        "native_speedup": med("shard_numpy") / shard, "native_cpu_saving": cpu["shard_numpy"] / cpu["shard"],
        "load_avg_1m": os.getloadavg()[0],
        "worker_scaling": one / shard,  # 2 workers' speed over 1 worker's
        **({"compare": str(compare), "compare_s": med("compare"), "compare_cpu_s": med("compare", "cpu_s"),
            "compare_ratio": base / med("compare"), "compare_cpu_ratio": cpu["baseline"] / med("compare", "cpu_s"),
            "compare_pipeline_ratio": base / med("compare", "pipeline_s")} if compare is not None else {}),
        "runs": runs,
    }


def _cpu_self() -> float:
    """CPU seconds of this process, all threads (SentencePiece's encoding threads included)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


# ---- part 2: packing ------------------------------------------------------------------------------

def synthetic_lengths(n: int, median: float, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(1, np.round(rng.lognormal(np.log(median), sigma, n))).astype(np.int64)


def shard_lengths(directory: Path) -> np.ndarray:
    m = Manifest.load(directory)
    return np.concatenate([ShardReader(directory / s.file).lengths() for s in m.shards]).astype(np.int64)


def bench_packing(distributions: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name, lengths in distributions.items():
        for seq_len in SEQ_LENS:
            t0 = time.perf_counter()
            st = packing_stats(lengths.tolist(), seq_len)
            rows.append({"lengths": name, "seq_len": seq_len, **st, "seconds": time.perf_counter() - t0,
                         "median_length": float(np.median(lengths)) if len(lengths) else 0.0})
    return rows


# ---- part 3: memory -------------------------------------------------------------------------------

def bench_memory(small: dict[str, Any], large: dict[str, Any], tok_dir: Path, work: Path, workers: int,
                 shard_tokens: int) -> list[dict]:
    rows = []
    for label, tokens in (("default", None), (f"{shard_tokens}", shard_tokens)):
        for size, corpus in (("small", small), ("large", large)):
            print(f"  {size} corpus ({corpus['documents']:,} documents), --shard-tokens {label}",
                  file=sys.stderr, flush=True)
            r = run_shard(corpus["files"], tok_dir, work / "out_mem", workers, work / "mem.log", tokens,
                          sample_tree=True)
            rows.append({"size": size, "shard_tokens": label, "documents": corpus["documents"],
                         "input_mb": corpus["text_bytes"] / 1e6, **r})
    return rows


# ---- profile (optional) ---------------------------------------------------------------------------

STAGES = (  # (label, file suffix, function): cumulative time of each, inside _prepare or the main loop
    ("read JSONL", "ingest.py", "_read_all"),
    ("normalize_many", "filters.py", "normalize_many"),
    ("char_classes + detect_languages", "filters.py", "char_classes"),
    ("", "filters.py", "detect_languages"),
    ("quality_reasons (filters)", "filters.py", "quality_reasons"),
    ("  of which _cleared (n-gram bounds, numpy loops)", "filters.py", "_cleared"),
    ("dedup fingerprint_arrays (MinHash)", "dedup.py", "fingerprint_arrays"),
    ("dedup check_arrays", "dedup.py", "check_arrays"),
    ("SentencePiece encode_arrays", "tokenizer.py", "encode_arrays"),
    ("ShardWriter.add + close", "shards.py", "add"),
    ("", "shards.py", "close"),
)



def profile_build(corpus: dict[str, Any], tok_dir: Path, out: Path) -> list[dict]:
    """build_shards in this process with one worker under cProfile: cumulative seconds and share per stage."""
    shutil.rmtree(out, ignore_errors=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(build_shards, corpus["files"], tok_dir, out, ShardConfig(workers=1))
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    rows = []
    for label, suffix, name in STAGES:
        ct = sum(v[3] for (file, _, fn), v in stats.items() if fn == name and file.endswith(suffix))
        if label:
            rows.append({"stage": label, "seconds": ct, "share": ct / total})
        else:  # a second function of the row above
            rows[-1]["seconds"] += ct
            rows[-1]["share"] += ct / total
    rows.append({"stage": "build_shards total (profiled)", "seconds": total, "share": 1.0})
    return rows


def time_stages(corpus: dict[str, Any], tok_dir: Path, batch: int = 256) -> list[dict]:
    """Each stage of build_shards run alone over the corpus on one core, without a profiler, in CPU seconds.

    The same public functions, batched as in build._prepare (in the workers: `batch` documents a call) and the
    main loop (dedup decisions, in input order). Also: the start-up of a fresh process that imports the pipeline
    and loads the tokenizer (what a spawned worker would pay; forked workers inherit it), in a subprocess.
    """
    texts = corpus["texts"]
    tok, dedup = Tokenizer(tok_dir), Deduplicator()
    batches = [texts[i: i + batch] for i in range(0, len(texts), batch)]
    timings: list[tuple[str, str, float]] = []

    def timed(stage: str, where: str, fn, inputs):
        c0 = time.process_time()
        result = [fn(x) for x in inputs]
        timings.append((stage, where, time.process_time() - c0))
        return result

    norm = timed("normalize_many", "worker", normalize_many, batches)
    langs = timed("char_classes + detect_languages", "worker", lambda b: detect_languages(b, char_classes(b)), norm)
    timed("quality_reasons (filters)", "worker", lambda bl: quality_reasons(*bl), list(zip(norm, langs, strict=True)))
    fps = timed("dedup fingerprint_arrays (MinHash)", "worker", dedup.fingerprint_arrays, norm)
    ids = timed("SentencePiece encode_arrays", "worker", tok.encode_arrays, norm)
    timed("ids -> one [BOS] ids [EOS] array a batch", "worker",
          lambda b: np.concatenate([p for x in b for p in (tok.bos_array, x, tok.eos_array)]), ids)
    timed("dedup check_arrays", "main", lambda f: dedup.check_arrays(*f), fps)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from data_shards.build import ShardConfig, _init_worker; "
                    "_init_worker(sys.argv[1], ShardConfig())", str(tok_dir)], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    startup = time.perf_counter() - t0
    total = sum(t for _, _, t in timings)
    n, mb = len(texts), corpus["text_bytes"] / 1e6
    rows = [{"stage": stage, "process": where, "seconds": t, "ms_per_doc": 1e3 * t / n, "share": t / total,
             "mb_per_s_alone": mb / t} for stage, where, t in timings]
    rows.append({"stage": "sum of the stages", "process": "", "seconds": total, "ms_per_doc": 1e3 * total / n,
                 "share": 1.0, "mb_per_s_alone": mb / total})
    rows.append({"stage": "start-up of a fresh process (wall)", "process": "", "seconds": startup,
                 "ms_per_doc": None, "share": None, "mb_per_s_alone": None})
    return rows


# ---- reporting ------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "sentencepiece": spm.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_start": os.getloadavg()[0],
    }


def format_table(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(col)) for col in column) for column in zip(header, *lines, strict=True)]
    fmt = lambda cells: " | ".join(  # text left, numbers right
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def throughput_table(t: dict[str, Any]) -> str:
    w = t["workers"]
    mb = t["input_mb"]
    rows = [
        (f"mujina-data shard --workers {w}", t["shard_s"], t["shard_mb_per_s"], t["shard_tokens_per_s"],
         t["shard_pipeline_mb_per_s"], t["shard_cpu_s"], t["ratio"]),
        ("mujina-data shard --workers 1", t["shard_1_s"], t["shard_1_mb_per_s"], t["shard_1_tokens_per_s"],
         t["shard_1_pipeline_mb_per_s"], t["shard_1_cpu_s"], t["baseline_s"] / t["shard_1_s"]),
        ("  same, numpy loops (MUJINA_NATIVE=0)", t["shard_numpy_s"], mb / t["shard_numpy_s"],
         t["shard_text_tokens"] / t["shard_numpy_s"], mb / t["shard_numpy_pipeline_s"], t["shard_numpy_cpu_s"],
         t["numpy_loops_ratio"]),
        (f"sentencepiece encode, {w} threads", t["baseline_s"], t["baseline_mb_per_s"], t["baseline_tokens_per_s"],
         t["baseline_mb_per_s"], t["baseline_cpu_s"], 1.0),
        ("  same, return_type=numpy", t["baseline_numpy_s"], t["baseline_numpy_mb_per_s"],
         t["baseline_tokens_per_s"] * t["baseline_s"] / t["baseline_numpy_s"], t["baseline_numpy_mb_per_s"],
         t["baseline_numpy_cpu_s"], t["baseline_s"] / t["baseline_numpy_s"]),
    ]
    return format_table(("", "seconds", "MB/s", "tokens/s", "pipeline MB/s", "CPU s", "MB/CPU-s", "vs sentencepiece"),
                        [(n, f"{s:.2f}", f"{mbs:.2f}", f"{tps:,.0f}", f"{p:.2f}", f"{c:.2f}", f"{mb / c:.2f}",
                          f"{r:.3f}") for n, s, mbs, tps, p, c, r in rows])


def packing_table(rows: list[dict]) -> str:
    return format_table(
        ("lengths", "seq_len", "documents", "median", "sequences", "fill_rate", "cut best fit", "cut concat"),
        [(r["lengths"], str(r["seq_len"]), f"{r['documents']:,}", f"{r['median_length']:.0f}",
          f"{r['sequences']:,}", f"{r['fill_rate']:.4f}", f"{r['split_documents']:,}",
          f"{r['concat_split_documents']:,}") for r in rows])


def memory_table(rows: list[dict]) -> str:
    return format_table(
        ("corpus", "--shard-tokens", "documents", "input MB", "shards", "seconds", "largest process MB",
         "process tree MB"),
        [(r["size"], r["shard_tokens"], f"{r['documents']:,}", f"{r['input_mb']:.1f}", str(r["shards"]),
          f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['tree_peak_rss_mb']:.0f}") for r in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Throughput of `mujina-data shard` (filters + dedup + tokenising) against plain SentencePiece "
        "encoding of the same text, packing fill rate, and peak memory at two corpus sizes. "
        "ratio = shard MB/s / sentencepiece MB/s; goal >= 0.5.")
    p.add_argument("--docs", type=int, default=20000,
                   help="documents in the throughput corpus, ja:en = 2:1, ~1.6 KB each (default: 20000, ~32 MB)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each timed run (default: 3)")
    p.add_argument("--workers", type=int, default=2,
                   help="shard --workers and sentencepiece num_threads (default: 2, the cores of the dev machine)")
    p.add_argument("--vocab-size", type=int, default=4000,
                   help="tokenizer pieces; lowered automatically if the corpus supports fewer (default: 4000)")
    p.add_argument("--mecab", action="store_true",
                   help="train the tokenizer with MeCab pre-segmentation (caps this corpus at ~1,800 pieces; "
                   "encoding is plain SentencePiece either way)")
    p.add_argument("--lengths", type=int, default=200_000,
                   help="synthetic document lengths for the packing figures (default: 200000)")
    p.add_argument("--median-length", type=float, default=600, help="median synthetic length in tokens (default: 600)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the synthetic lengths (default: 1.0)")
    p.add_argument("--mem-factor", type=int, default=10,
                   help="the small memory run has --docs / this many documents, the large one --docs (default: 10)")
    p.add_argument("--mem-shard-tokens", type=int, default=1 << 18,
                   help="--shard-tokens of the second pair of memory runs (default: 262144)")
    p.add_argument("--no-memory", action="store_true", help="skip part 3 (peak memory)")
    p.add_argument("--compare", type=Path, metavar="CHECKOUT",
                   help="also run the shard CLI of another checkout of the repository (e.g. a `git worktree` of an "
                   "older commit) in every repeat, for before/after ratios taken in the same run")
    p.add_argument("--profile", action="store_true",
                   help="also profile build_shards in-process (one worker) and print each stage's share")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "data_throughput.json",
                   help="where to write the results; the directory is created "
                   "(default: benchmarks/results/data_throughput.json in the repository)")
    args = p.parse_args(argv)
    for flag in ("docs", "repeats", "workers", "lengths", "mem_factor", "mem_shard_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.docs < 30:
        p.error("--docs must be at least 30 (the tokenizer needs some text to train on)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    t_start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine, "config": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="mujina-data-bench-") as tmp:
        work = Path(tmp)
        print(f"load average (1 min) at the start: {machine['load_avg_1m_start']:.1f}", file=sys.stderr, flush=True)
        print(f"writing a {args.docs:,}-document corpus and training a tokenizer ...", file=sys.stderr, flush=True)
        corpus = make_corpus(work / "small", args.docs)
        vocab = train(corpus["texts"], work / "tok", args.vocab_size, sample=1500, mecab=args.mecab)
        results["corpus"] = {k: corpus[k] for k in ("documents", "ja", "en", "text_bytes", "file_bytes")}
        results["tokenizer"] = {"vocab_size": vocab, "mecab": args.mecab}

        print("part 1: throughput", file=sys.stderr, flush=True)
        t = bench_throughput(corpus, work / "tok", work, args.workers, args.repeats, args.compare)
        results["throughput"] = t

        print("part 2: packing", file=sys.stderr, flush=True)
        dists = {f"lognormal({args.median_length:g}, {args.sigma:g})":
                 synthetic_lengths(args.lengths, args.median_length, args.sigma),
                 "shards (part 1)": shard_lengths(work / "out")}
        packing = bench_packing(dists)
        results["packing"] = packing

        memory: list[dict] = []
        if not args.no_memory:
            print(f"part 3: memory (corpus / {args.mem_factor} and corpus)", file=sys.stderr, flush=True)
            small = make_corpus(work / "mem_small", max(1, args.docs // args.mem_factor))
            memory = bench_memory(small, corpus, work / "tok", work, args.workers, args.mem_shard_tokens)
            results["memory"] = memory

        profile: list[dict] = []
        stages: list[dict] = []
        if args.profile:
            print("timing the stages, then profiling build_shards (one worker, in-process) ...", file=sys.stderr,
                  flush=True)
            stages = time_stages(corpus, work / "tok")
            profile = profile_build(corpus, work / "tok", work / "out_prof")
            results["stages"], results["profile"] = stages, profile

    # flat keys for dashboards and closing notes
    synth = {r["seq_len"]: r for r in packing if not r["lengths"].startswith("shards")}
    real = {r["seq_len"]: r for r in packing if r["lengths"].startswith("shards")}
    flat = {k: t[k] for k in ("shard_mb_per_s", "baseline_mb_per_s", "shard_tokens_per_s", "baseline_tokens_per_s",
                              "ratio", "cpu_ratio", "shard_1_mb_per_s", "worker_scaling", "shard_pipeline_mb_per_s",
                              "pipeline_ratio", "ratio_vs_numpy", "numpy_loops_ratio", "native_speedup")}
    for L in SEQ_LENS:
        flat[f"fill_rate_{L}"] = synth[L]["fill_rate"]
        flat[f"split_best_fit_{L}"] = synth[L]["split_documents"]
        flat[f"split_concat_{L}"] = synth[L]["concat_split_documents"]
        flat[f"fill_rate_shards_{L}"] = real[L]["fill_rate"]
    for r in memory:
        suffix = "" if r["shard_tokens"] == "default" else "_small_shards"
        flat[f"peak_rss_mb_{r['size']}{suffix}"] = r["peak_rss_mb"]
        flat[f"tree_peak_rss_mb_{r['size']}{suffix}"] = r["tree_peak_rss_mb"]
    for suffix in ("", "_small_shards"):
        if f"peak_rss_mb_large{suffix}" in flat:
            flat[f"rss_ratio{suffix}"] = flat[f"peak_rss_mb_large{suffix}"] / flat[f"peak_rss_mb_small{suffix}"]
            flat[f"tree_rss_ratio{suffix}"] = (flat[f"tree_peak_rss_mb_large{suffix}"]
                                               / flat[f"tree_peak_rss_mb_small{suffix}"])
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    machine["benchmark_seconds"] = round(time.perf_counter() - t_start, 1)
    results = {**flat, **results}

    c = results["corpus"]
    print(f"\ncorpus: {c['documents']:,} documents ({c['ja']:,} ja, {c['en']:,} en), {c['text_bytes'] / 1e6:.2f} MB "
          f"of text; tokenizer: {vocab} pieces{' (MeCab)' if args.mecab else ''}; "
          f"{os.cpu_count()} CPUs; medians of {args.repeats} interleaved repeats\n")
    print("1. throughput (filters and dedup on)")
    print(throughput_table(t))
    print(f"ratio = shard MB/s / sentencepiece MB/s = {t['ratio']:.3f} (goal >= 0.5); "
          f"{args.workers} workers / 1 worker = {t['worker_scaling']:.2f}x; "
          f"kept {t['documents_kept']:,} of {t['documents']:,} documents; text tokens: shard "
          f"{t['shard_text_tokens']:,}, sentencepiece {t['baseline_tokens']:,}")
    print("pipeline MB/s: build_shards' own time (report.json), without interpreter start-up. CPU s: user+sys of "
          "the CLI and its workers, or of the encoding threads")
    print(f"cpu_ratio = sentencepiece CPU s / shard CPU s = {t['cpu_ratio']:.3f} (less sensitive to other load "
          "than the wall-clock ratio)")
    print(f"steady state (pipeline_ratio, without start-up) = {t['pipeline_ratio']:.3f}; against the numpy encode: "
          f"{t['ratio_vs_numpy']:.3f}; load average (1 min) after part 1: {t['load_avg_1m']:.1f}")
    print(f"C loops (data_shards._native) against their numpy fallback in the same CLI: {t['native_speedup']:.2f}x "
          f"faster, {t['native_cpu_saving']:.2f}x less CPU\n")
    if "compare" in t:
        print(f"{t['compare']}, shard --workers {args.workers} in the same repeats: {t['compare_s']:.2f} s, "
              f"{t['compare_cpu_s']:.2f} CPU s; ratio {t['compare_ratio']:.3f}, "
              f"cpu_ratio {t['compare_cpu_ratio']:.3f}, steady state {t['compare_pipeline_ratio']:.3f}\n")
    print("2. packing (best-fit decreasing)")
    print(packing_table(packing))
    print("fill_rate goal >= 0.99; cut = documents split across sequences\n")
    if memory:
        print(f"3. peak memory, {max(1, args.docs // args.mem_factor):,} vs {args.docs:,} documents, "
              f"--workers {args.workers}")
        print(memory_table(memory))
        print("largest process: ru_maxrss (exact); process tree: summed RSS sampled every 50 ms. "
              f"RSS ratio large/small: {flat['rss_ratio']:.2f} (default shards), {flat['rss_ratio_small_shards']:.2f} "
              f"(--shard-tokens {args.mem_shard_tokens})\n")
    if stages:
        print(f"stages of build_shards, each alone over the {args.docs:,} documents on one core, batched as in the "
              "workers (CPU seconds, no profiler)")
        print(format_table(
            ("stage", "process", "seconds", "ms/doc", "share", "MB/s alone"),
            [(r["stage"], r["process"], f"{r['seconds']:.2f}",
              *(("", "", "") if r["share"] is None else
                (f"{r['ms_per_doc']:.3f}", f"{r['share']:.0%}", f"{r['mb_per_s_alone']:.1f}"))) for r in stages]))
        print()
    if profile:
        print("profile: build_shards, one worker, in-process (cumulative time per stage; cProfile adds overhead)")
        print(format_table(("stage", "seconds", "share"),
                           [(r["stage"], f"{r['seconds']:.2f}", f"{r['share']:.0%}") for r in profile]))
        print()
    busiest = max(machine["load_avg_1m_start"], machine["load_avg_1m_end"])
    if busiest > args.workers + 1:
        print(f"warning: load average reached {busiest:.1f} with {args.workers} workers here: other processes "
              "competed for the CPU and the timings are noisy; re-run on a quiet machine")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json} ({machine['benchmark_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
