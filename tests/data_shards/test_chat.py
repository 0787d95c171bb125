"""Chat records: the exact token layout on a hand-written example (char-level toy tokenizer), the loss mask on
assistant content and its <|end|> only, a clear error for each malformed record, and labels through packing."""

import numpy as np
import pytest

from data_shards.chat import ROLES, ChatTemplate, render_chat
from data_shards.packing import IGNORE, build_sequence, pack

BOS, EOS = 1, 2
MARKERS = {"system": 3, "user": 4, "assistant": 5, "end": 6}


def encode(text: str) -> list[int]:
    """Toy tokenizer: one id per character, above the special ids."""
    return [100 + ord(ch) - ord("a") for ch in text]


def record(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


CONVERSATION = record(("system", "be"), ("user", "hi"), ("assistant", "yo"), ("user", "ok"), ("assistant", "bye"))


def test_layout_and_mask_by_hand():
    ids, mask = render_chat(CONVERSATION, encode, MARKERS, BOS, EOS)
    assert ids.tolist() == [
        BOS,
        3, 101, 104, 6,  # <|system|> b e <|end|>
        4, 107, 108, 6,  # <|user|> h i <|end|>
        5, 124, 114, 6,  # <|assistant|> y o <|end|>
        4, 114, 110, 6,  # <|user|> o k <|end|>
        5, 101, 124, 104, 6,  # <|assistant|> b y e <|end|>
        EOS,
    ]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert ids.dtype == np.int64 and mask.shape == ids.shape


def test_mask_covers_exactly_assistant_content_and_its_end():
    ids, mask = render_chat(CONVERSATION, encode, MARKERS, BOS, EOS)
    learned = ids[mask == 1].tolist()
    assert learned == encode("yo") + [MARKERS["end"]] + encode("bye") + [MARKERS["end"]]
    role_markers = np.isin(ids, [MARKERS[r] for r in ROLES])
    assert (mask[role_markers] == 0).all()


def test_without_bos_and_eos():
    ids, mask = render_chat(record(("user", "a"), ("assistant", "")), encode, MARKERS, None, None)
    assert ids.tolist() == [4, 100, 6, 5, 6] and mask.tolist() == [0, 0, 0, 0, 1]  # empty reply: still learn to stop


@pytest.mark.parametrize("bad,message", [
    ({}, "no 'messages' field"),
    ("not a dict", "no 'messages' field"),
    ({"messages": "hi"}, "not a list"),
    ({"messages": []}, "empty conversation"),
    ({"messages": ["hi"]}, "message 0 is not"),
    (record(("user", "a"), ("bot", "b")), "unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": ["a"]}]}, "content must be a string"),
    ({"messages": [{"role": "assistant", "content": None}]}, "content must be a string"),
    (record(("system", "a"), ("user", "b")), "no assistant turn"),
])
def test_malformed_records_raise_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        render_chat(bad, encode, MARKERS, BOS, EOS)


def test_missing_marker_ids_are_named():
    with pytest.raises(ValueError, match=r"marker_ids lacks \['end'\]"):
        render_chat(CONVERSATION, encode, {k: v for k, v in MARKERS.items() if k != "end"}, BOS, EOS)


def test_template_symbols_and_marker_ids():
    template = ChatTemplate()
    assert template.symbols == ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    vocab = {s: 10 + i for i, s in enumerate(template.symbols)}
    assert template.marker_ids(vocab.__getitem__) == {"system": 10, "user": 11, "assistant": 12, "end": 13}


def test_packed_chat_labels_only_assistant_tokens():
    # Through build_sequence(loss_mask_of=...): a label is kept exactly where its target token is masked in,
    # so the labelled targets are the assistant tokens, each once, across all sequences.
    records = [CONVERSATION, record(("user", "abcdefgh"), ("assistant", "xyz")),
               record(("user", "q"), ("assistant", "a"))]
    rendered = [render_chat(r, encode, MARKERS, BOS, EOS) for r in records]
    seq_len = 16  # shorter than the first record, so a cut chunk is covered too
    bins = pack([len(ids) for ids, _ in rendered], seq_len)
    labelled = []
    for b in bins:
        seq = build_sequence(b, lambda d: rendered[d][0], seq_len, loss_mask_of=lambda d: rendered[d][1])
        pos = 0
        for c in b:
            ids, mask = rendered[c.doc]
            for t in range(c.start, c.end):  # position pos + t - c.start predicts token t + 1
                label = seq.labels[pos + t - c.start]
                if t + 1 < len(ids) and mask[t + 1]:
                    assert label == ids[t + 1]
                    labelled.append((c.doc, t + 1))
                else:
                    assert label == IGNORE
            pos += c.length
    assert sorted(labelled) == sorted((d, t) for d, (_, mask) in enumerate(rendered) for t in np.flatnonzero(mask))
