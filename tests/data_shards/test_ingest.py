"""data_shards.ingest: every format is read, every bad input is raised or counted exactly (issue 3, "Bad input")."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_shards import ingest
from data_shards.ingest import Document, DropCounter, read_documents
from tests.data_shards.corpus import english_documents, japanese_documents, write_jsonl

JA = japanese_documents(3, seed=7)
EN = english_documents(3, seed=7)


def _read(paths, **kw):
    drops = DropCounter()
    docs = list(read_documents(paths, drops=drops, **kw))
    return docs, drops.as_dict()


def test_jsonl_reads_every_record_in_order_with_origin_and_meta(tmp_path):
    path = tmp_path / "web.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(JA + EN):
            f.write(json.dumps({"text": doc, "url": f"https://example.org/{i}"}, ensure_ascii=False) + "\n")
    docs, drops = _read([path])
    assert [d.text for d in docs] == JA + EN
    assert drops == {}
    assert docs[0] == Document(JA[0], "web", f"{path}:1", {"url": "https://example.org/0"})
    assert [d.origin for d in docs] == [f"{path}:{i}" for i in range(1, 7)]


def test_json_extension_and_custom_text_field_and_source(tmp_path):
    path = write_jsonl(tmp_path / "a.json", EN, field="content")
    docs, drops = _read([path], text_field="content", source="books")
    assert [d.text for d in docs] == EN and {d.source for d in docs} == {"books"} and drops == {}


def test_chat_records_pass_through_with_messages(tmp_path):
    messages = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは!"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
                    + json.dumps({"messages": [{"role": "user"}]}) + "\n", encoding="utf-8")
    docs, drops = _read([path])
    assert len(docs) == 1 and docs[0].text == "" and docs[0].meta["messages"] == messages
    assert drops == {"invalid_messages": 1}


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    # CRLF endings and several blank lines between documents; a document's own single newlines are kept.
    path.write_bytes(b"first line\r\nsecond line\r\n\r\n\r\n" + JA[0].replace("\n\n", "\n").encode() + b"\n\n\nlast\n")
    docs, drops = _read([path])
    assert [d.text for d in docs] == ["first line\r\nsecond line", JA[0].replace("\n\n", "\n"), "last"]
    assert [d.origin.rsplit(":", 1)[1] for d in docs] == ["1", "5", str(5 + JA[0].count("\n\n") + 3)]
    assert drops == {} and docs[0].source == "notes"


def test_gzip_jsonl_and_txt(tmp_path):
    jl = tmp_path / "web.jsonl.gz"
    with gzip.open(jl, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in JA)
    tx = tmp_path / "plain.txt.gz"
    with gzip.open(tx, "wb") as f:
        f.write("\n\n".join(d.replace("\n\n", "\n") for d in EN).encode())
    docs, drops = _read([jl, tx])
    assert [d.text for d in docs] == JA + [d.replace("\n\n", "\n") for d in EN]
    assert [d.source for d in docs] == ["web"] * 3 + ["plain"] * 3 and drops == {}


def test_parquet_is_read_in_batches_never_whole(tmp_path, monkeypatch):
    texts = [f"{JA[i % 3]} {i}" for i in range(25)]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts, "id": list(range(25))}), path, row_group_size=10)
    monkeypatch.setattr(ingest, "PARQUET_BATCH_ROWS", 4)  # 25 rows -> 7 batches
    batches = []
    real_iter = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        for b in real_iter(self, *a, **kw):
            batches.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **kw: pytest.fail("whole-file read"))
    docs, drops = _read([path])
    assert [d.text for d in docs] == texts and drops == {}
    assert [d.origin for d in docs] == [f"{path}:{i}" for i in range(25)]
    assert max(batches) <= 4 and sum(batches) == 25


def test_parquet_bad_rows_are_counted(tmp_path):
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": ["ok", None, "fine"]}), path)
    binary = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"text": pa.array([b"good", b"\xff\xfe bad"], pa.binary())}), binary)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    no_column = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["a", "b", "c"]}), no_column)
    docs, drops = _read([path, binary, numbers, no_column])
    assert [d.text for d in docs] == ["ok", "fine", "good"]
    assert drops == {"invalid_text": 2, "invalid_utf8": 1, "missing_text_field": 4}


def test_invalid_utf8_line_costs_one_record_only(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in JA]
    path.write_bytes(good[0] + b"\n" + b'{"text": "\xff\xfe broken"}\n' + good[1] + b"\n" + good[2] + b"\n")
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"before\n\nbroken \xff\xfe line\nsame document\n\nafter\n")
    docs, drops = _read([path, txt])
    assert [d.text for d in docs] == JA + ["before", "after"]
    assert drops == {"invalid_utf8": 2}


def test_malformed_records_are_counted_by_reason(tmp_path):
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": EN[0]}),
        '{"text": "unterminated',            # invalid_json
        json.dumps({"body": "no text field"}),  # missing_text_field
        json.dumps({"text": None}),           # missing_text_field
        json.dumps({"text": 42}),             # invalid_text
        json.dumps(["a", "list"]),            # not_an_object
        "",                                   # blank line: not a record
        json.dumps({"text": EN[1]}),
    ]) + "\n", encoding="utf-8")
    docs, drops = _read([path])
    assert [d.text for d in docs] == EN[:2]
    assert drops == {"invalid_json": 1, "invalid_text": 1, "missing_text_field": 2, "not_an_object": 1}


@pytest.mark.parametrize("name,content", [("empty.jsonl", b""), ("blank.txt", b"\n\n  \n"),
                                          ("empty.parquet", b""), ("empty.jsonl.gz", gzip.compress(b""))])
def test_empty_file_is_a_counted_drop(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    docs, drops = _read([path, write_jsonl(tmp_path / "ok.jsonl", EN[:1])])
    assert len(docs) == 1 and drops == {"empty_file": 1}


def test_parquet_without_rows_is_an_empty_file(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    assert _read([path]) == ([], {"empty_file": 1})


def test_unknown_extension_fails_before_reading_anything(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", EN)
    bad = tmp_path / "data.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type; supported: .*\.jsonl.*\.parquet"):
        read_documents([ok, bad], drops=DropCounter())


def test_missing_file_fails_before_reading_anything(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", EN)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_documents([ok, tmp_path / "nope.jsonl"], drops=DropCounter())


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps({"text": t}) for t in EN * 50).encode())[:200])
    with pytest.raises(ValueError, match="cut.jsonl.gz: corrupt or truncated gzip"):
        _read([path])


def test_order_is_deterministic_and_follows_the_arguments(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", JA)
    b = write_jsonl(tmp_path / "b.jsonl", EN)
    first, _ = _read([b, a])
    again, _ = _read([b, a])
    assert first == again and [d.text for d in first] == EN + JA


def test_drop_counter_adds_merges_and_sorts():
    drops = DropCounter()
    drops.add("too_short")
    drops.add("invalid_json", 3)
    other = DropCounter({"too_short": 2, "near_duplicate": 1})
    assert drops.merge(other).as_dict() == {"invalid_json": 3, "near_duplicate": 1, "too_short": 3}
    assert list(drops.as_dict()) == sorted(drops.as_dict()) and drops.total() == 7
    with pytest.raises(ValueError):
        drops.add("x", -1)
