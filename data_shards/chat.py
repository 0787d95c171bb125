"""Chat records to token sequences with a loss mask on assistant turns only.

A record is `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`.
Each turn becomes `<|role|> content <|end|>`, and the conversation `[bos] turn turn ... [eos]`:

    tokens:  bos  <|user|>  Hi  <|end|>  <|assistant|>  Hello!  <|end|>  eos
    mask:     0      0      0      0          0           1        1      0

The mask is 1 on assistant content and its closing <|end|>, so the model learns to answer and
to stop, but is never trained to imitate the user or the system prompt; role markers are 0
because the conversation, not the model, decides whose turn it is. Pass the mask to
packing.build_sequence(loss_mask_of=...): target token t then gets a label only where mask[t] == 1.

Tokenizer-agnostic: `encode` is any text -> ids callable that adds no bos/eos of its own, and
the markers are user-defined symbols the tokenizer maps to single ids (ChatTemplate.symbols).

    >>> ids = {"system": 1, "user": 2, "assistant": 3, "end": 4}
    >>> toks, mask = render_chat({"messages": [{"role": "user", "content": "hi"},
    ...                                        {"role": "assistant", "content": "yo"}]},
    ...                          lambda s: [ord(c) for c in s], ids, bos_id=5, eos_id=6)
    >>> toks.tolist(), mask.tolist()
    ([5, 2, 104, 105, 4, 3, 121, 111, 4, 6], [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ROLES = ("system", "user", "assistant")
MARKER_KEYS = (*ROLES, "end")  # the keys render_chat needs in marker_ids


@dataclass(frozen=True)
class ChatTemplate:
    """Special-token markers, as strings the tokenizer maps to single ids (user-defined symbols)."""

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"

    @property
    def symbols(self) -> tuple[str, ...]:
        """The marker strings, in MARKER_KEYS order: give these to the tokenizer trainer as user-defined symbols."""
        return tuple(getattr(self, key) for key in MARKER_KEYS)

    def marker_ids(self, piece_to_id: Callable[[str], int]) -> dict[str, int]:
        """{"system", "user", "assistant", "end"} -> id, e.g. `template.marker_ids(sp.piece_to_id)`."""
        return {key: int(piece_to_id(getattr(self, key))) for key in MARKER_KEYS}


def _check_record(record: object) -> list[dict]:
    """The record's messages, or a ValueError saying what is wrong and what a record looks like."""
    shape = 'expected {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}'
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError(f"chat record has no 'messages' field: {shape}")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"chat record's 'messages' is a {type(messages).__name__}, not a list: {shape}")
    if not messages:
        raise ValueError(f"chat record has an empty conversation (no messages): drop it or {shape}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} is not a {{'role': ..., 'content': ...}} object: {msg!r}")
        if msg["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {msg['role']!r}: use one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise ValueError(f"message {i} ({msg['role']}) has {type(msg['content']).__name__} content: "
                             "content must be a string (join multi-part content into text first)")
    if not any(msg["role"] == "assistant" for msg in messages):
        raise ValueError("chat record has no assistant turn, so there is nothing to learn from it: "
                         "drop it or add the assistant's reply")
    return messages


def render_chat(
    record: dict,
    encode: Callable[[str], list[int]],
    marker_ids: dict[str, int],
    bos_id: int | None,
    eos_id: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One chat record -> (token ids (n,) int64, loss mask (n,) uint8).

    marker_ids maps "system", "user", "assistant" and "end" to token ids (ChatTemplate.marker_ids);
    bos_id / eos_id are added at the ends unless None. Raises ValueError for a malformed record:
    missing or non-list "messages", an empty conversation, an unknown role, non-string content,
    or no assistant turn.
    """
    missing = [key for key in MARKER_KEYS if key not in marker_ids]
    if missing:
        raise ValueError(f"marker_ids lacks {missing}: map each of {list(MARKER_KEYS)} to its token id "
                         "(ChatTemplate().marker_ids(piece_to_id))")
    ids: list[int] = []
    mask: list[int] = []

    def emit(tokens: list[int], learn: int) -> None:
        ids.extend(tokens)
        mask.extend([learn] * len(tokens))

    if bos_id is not None:
        emit([bos_id], 0)
    for msg in _check_record(record):
        learn = int(msg["role"] == "assistant")
        emit([marker_ids[msg["role"]]], 0)  # whose turn it is comes from the data, not the model
        emit(list(encode(msg["content"])), learn)
        emit([marker_ids["end"]], learn)  # learning to emit <|end|> is learning to stop
    if eos_id is not None:
        emit([eos_id], 0)
    return np.array(ids, dtype=np.int64), np.array(mask, dtype=np.uint8)
