"""Synthetic data, the pure part: personas x seed texts x templates -> prompts; judge prompts; DPO records.

    personas = load_personas("configs/personas.ja.yaml")
    prompts = build_prompts(personas, seeds=[("ja", text), ...], templates=["qa", "summary"], max_prompts=100)
    prompts[0].id, prompts[0].messages      # a stable id; [{"role": "system", ...}, {"role": "user", ...}]
    reason = check_output(answer, "ja", min_chars=20, max_chars=20000)   # None, or why it is refused
    judge = judge_messages(prompt.messages, answer_a, answer_b, "ja")    # the rubric prompt
    scores = parse_judgement(judge_output)  # (a, b) or None when the format was not followed: never guessed
    record = dpo_record(prompt.messages, (answer_a, answer_b), scores)  # None for ties

Ids are SHA-256 prefixes of what defines a prompt (template, persona, seed text, language), so the
same inputs give the same ids on every machine and planning twice never duplicates work. Which
combinations are used when there are more than `max_prompts` is decided by a seeded hash order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .filters import FilterConfig, detect_language, normalize, quality_reason

LANGUAGES = ("ja", "en")
# Templates per task type and language. {text} is the seed document; the persona goes in the system turn.
TEMPLATES: dict[str, dict[str, str]] = {
    "qa": {
        "ja": "次の文章を読み、内容に関する質問を一つ作って、その質問に詳しく答えてください。\n\n{text}",
        "en": "Read the text below, write one question about its content, then answer it in detail.\n\n{text}",
    },
    "summary": {
        "ja": "次の文章を三文程度で要約してください。\n\n{text}",
        "en": "Summarise the text below in about three sentences.\n\n{text}",
    },
    "rephrase": {
        "ja": "次の文章を、意味を変えずに別の言葉で書き直してください。\n\n{text}",
        "en": "Rewrite the text below in your own words without changing its meaning.\n\n{text}",
    },
    "dialogue": {
        "ja": "次の文章の話題について、ユーザーとアシスタントの自然な会話を四往復で書いてください。\n\n{text}",
        "en": "Write a natural four-turn conversation between a user and an assistant about the topic of the "
              "text below.\n\n{text}",
    },
    "instruction": {
        "ja": "次の文章に関係する指示を一つ考え、その指示に丁寧に従った回答を書いてください。\n\n{text}",
        "en": "Invent one instruction related to the text below, then write a careful answer that follows it."
              "\n\n{text}",
    },
}
PERSONA_SYSTEM = {"ja": "あなたは{description}です。その立場から日本語で答えてください。",
                  "en": "You are {description}. Answer in English from that point of view."}

JUDGE_RUBRIC = {
    "ja": ("以下の指示に対する二つの回答を、正確さ、有用性、指示への従い方、日本語の自然さで評価してください。"
           "各回答に1から10の整数で点数を付け、最後に次の形式だけで答えてください。\n"
           "Score A: <点数>\nScore B: <点数>"),
    "en": ("Rate the two answers to the instruction below for accuracy, helpfulness, instruction following and "
           "fluency. Give each answer a whole score from 1 to 10 and end with exactly these two lines:\n"
           "Score A: <score>\nScore B: <score>"),
}
_SCORE = re.compile(r"^\s*\**\s*score\s*([ab])\s*\**\s*[:：]\s*\**\s*(\d{1,2})\s*(?:/\s*10)?\s*\**\s*$",
                    re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Persona:
    id: str
    lang: str
    description: str


@dataclass(frozen=True)
class Prompt:
    id: str
    lang: str
    template: str
    persona: str
    seed: str
    messages: tuple[tuple[str, str], ...]   # (role, content) pairs

    def to_dict(self) -> dict:
        return {"id": self.id, "lang": self.lang, "template": self.template, "persona": self.persona,
                "seed": self.seed, "messages": [{"role": r, "content": c} for r, c in self.messages]}


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def load_personas(path: str | os.PathLike) -> list[Persona]:
    """A YAML list (or JSON lines) of {id, lang, description}; ValueError naming the bad entry."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ValueError(f"personas file {path} not found; see configs/personas.ja.yaml for the format")
    text = path.read_text(encoding="utf-8")
    items = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
             else yaml.safe_load(text))
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of {{id, lang, description}}")
    out, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"id", "lang", "description"}:
            raise ValueError(f"{path}: entry {i} must have exactly the keys id, lang, description; got {item!r}")
        if item["lang"] not in LANGUAGES or not str(item["description"]).strip():
            raise ValueError(f"{path}: entry {i}: lang must be one of {LANGUAGES} and description non-empty")
        if item["id"] in seen:
            raise ValueError(f"{path}: persona id {item['id']!r} appears twice")
        seen.add(item["id"])
        out.append(Persona(str(item["id"]), item["lang"], str(item["description"]).strip()))
    return out


def build_prompts(personas: list[Persona], seeds: list[tuple[str, str]], templates: list[str],
                  max_prompts: int, *, seed: int = 0, max_seed_chars: int = 2000,
                  languages: tuple[str, ...] = LANGUAGES) -> list[Prompt]:
    """Every (template, persona, seed text) of the same language, as prompts with stable ids; when there
    are more than `max_prompts`, the first `max_prompts` in an order seeded by `seed`. Sorted by id."""
    unknown = [t for t in templates if t not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown templates {unknown}; known: {', '.join(TEMPLATES)}")
    by_lang: dict[str, list[tuple[str, str]]] = {}
    for lang, text in seeds:
        text = normalize(text)[:max_seed_chars]
        if text:
            by_lang.setdefault(lang, []).append((_digest(text)[:16], text))
    combos = []
    for p in personas:
        if p.lang not in languages:
            continue
        for seed_id, text in by_lang.get(p.lang, []):
            for t in templates:
                pid = _digest("prompt", t, p.id, seed_id, p.lang)[:24]
                combos.append((_digest(seed, pid), pid, p, t, seed_id, text))
    combos.sort()
    out = []
    for _, pid, p, t, seed_id, text in combos[:max_prompts]:
        system = PERSONA_SYSTEM[p.lang].format(description=p.description)
        user = TEMPLATES[t][p.lang].format(text=text)
        out.append(Prompt(pid, p.lang, t, p.id, seed_id, (("system", system), ("user", user))))
    return sorted(out, key=lambda q: q.id)


def check_output(text: str, lang: str, *, min_chars: int, max_chars: int) -> str | None:
    """None if a generated answer is acceptable, else the reason: empty, too_short, too_long, language
    (not the template's), or one of data_shards.filters' quality reasons (repetition, symbols...)."""
    text = normalize(text)
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    if detect_language(text) != lang:
        return "language"
    return quality_reason(text, lang, FilterConfig(min_chars=min_chars, max_chars=max_chars, languages=(lang,)))


def judge_messages(prompt_messages: list[dict], answer_a: str, answer_b: str, lang: str) -> list[dict]:
    """The rubric prompt for one pair: the instruction (its last user turn) and both answers."""
    instruction = next((m["content"] for m in reversed(prompt_messages) if m["role"] == "user"), "")
    body = f"{JUDGE_RUBRIC[lang]}\n\n[Instruction]\n{instruction}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}"
    return [{"role": "user", "content": body}]


def parse_judgement(text: str) -> tuple[int, int] | None:
    """(score A, score B) when the output holds exactly one `Score A: n` and one `Score B: n` line with
    1 <= n <= 10 (markdown bold, full-width colon and '/10' tolerated); None otherwise."""
    found: dict[str, list[int]] = {"a": [], "b": []}
    for label, value in _SCORE.findall(text or ""):
        found[label.lower()].append(int(value))
    if len(found["a"]) != 1 or len(found["b"]) != 1:
        return None
    a, b = found["a"][0], found["b"][0]
    return (a, b) if 1 <= a <= 10 and 1 <= b <= 10 else None


def dpo_record(prompt_messages: list[dict], answers: tuple[str, str], scores: tuple[int, int] | None,
               **extra) -> dict | None:
    """{"prompt": messages, "chosen": higher-scored answer, "rejected": the other, "scores"}; None for a tie
    or an unparseable judgement."""
    if scores is None or scores[0] == scores[1]:
        return None
    hi = 0 if scores[0] > scores[1] else 1
    return {"prompt": prompt_messages, "chosen": answers[hi], "rejected": answers[1 - hi],
            "scores": {"chosen": scores[hi], "rejected": scores[1 - hi]}, **extra}


def model_files_hash(directory: str | os.PathLike) -> str:
    """SHA-256 over (relative path, SHA-256 of contents) of every file of a model directory (hidden
    files and folders excluded): the identity of a teacher model, compared between worker and task."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            f = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    f.update(block)
            h.update(f"{rel.as_posix()}\0{f.hexdigest()}\n".encode())
    return h.hexdigest()
