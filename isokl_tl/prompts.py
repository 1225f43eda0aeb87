"""Shipped prompt sets, loadable by name or from a user's JSONL file.

Schemas (one JSON object per line):
- contrastive pairs (`pairs`): {"user": str, "positive": str, "negative": str}
  The shipped set contrasts a casual, enthusiastic register (positive) with a formal one (negative).
- calibration prompts (`calibration`): {"prompt": str}, open-ended requests.
- evaluation questions (`eval`, `longform`): {"question": str, "answer": bool, "instruction": str
  (optional)}, each with a known answer. `eval_prompt()` appends the row's instruction (default
  `EVAL_INSTRUCTION`: reason in a few sentences) so that the reply reasons first and then ends in
  a JSON boolean: {"choice": true} or {"choice": false}. `longform` (64 questions) asks for at
  least four paragraphs first, so that unsteered replies run long; `eval` (48) for a few
  sentences. Both alternate true and false questions, so any even prefix is balanced.
- a text corpus (`corpus`): {"text": str}, passages of plain expository prose (16 shipped, about
  70 words each, on everyday topics, written for this project) that the `delta_ce` calibration
  statistic scores teacher-forced (`isokl_tl.corpus`).
The calibration and evaluation sets are disjoint (a test checks it).
"""

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SETS = {"pairs": "pairs.jsonl", "calibration": "calibration.jsonl", "eval": "eval.jsonl",
        "longform": "longform.jsonl", "corpus": "corpus.jsonl"}
EVAL_INSTRUCTION = (
    "Explain step by step why, in a few sentences, and only at the very end write your answer as "
    'JSON: {"choice": true} or {"choice": false}.'
)


@dataclass(frozen=True)
class ContrastPair:
    user: str
    positive: str
    negative: str


@dataclass(frozen=True)
class Question:
    question: str
    answer: bool
    instruction: str = EVAL_INSTRUCTION


def _read_jsonl(source: str | Path, keys: dict[str, type]) -> list[dict]:
    if isinstance(source, str) and source in SETS:
        text, where = (resources.files("isokl_tl.data") / SETS[source]).read_text(), source
    else:
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"prompt file {str(source)!r} is a directory, not a file")
        if not path.is_file():
            raise ValueError(f"prompt file {str(source)!r} does not exist; shipped sets: "
                             f"{', '.join(SETS)}")
        try:
            text, where = path.read_text(), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {str(source)!r}: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where} line {n}: expected a JSON object, got {type(row).__name__}")
        for key, typ in keys.items():
            if not isinstance(row.get(key), typ) or (typ is str and not row[key].strip()):
                raise ValueError(f"{where} line {n}: needs a non-empty {typ.__name__} field {key!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"prompt file {where} is empty")
    return rows


def load_pairs(source: str | Path = "pairs") -> list[ContrastPair]:
    rows = _read_jsonl(source, {"user": str, "positive": str, "negative": str})
    return [ContrastPair(r["user"], r["positive"], r["negative"]) for r in rows]


def load_corpus(source: str | Path = "corpus") -> list[str]:
    """Passages of a text corpus (`text` rows)."""
    return [r["text"] for r in _read_jsonl(source, {"text": str})]


def load_questions(source: str | Path = "eval") -> list[Question]:
    rows = _read_jsonl(source, {"question": str, "answer": bool})
    return [Question(r["question"], r["answer"], r.get("instruction") or EVAL_INSTRUCTION) for r in rows]


def eval_prompt(question: Question) -> str:
    return f"{question.question} {question.instruction}"


def known_answers(source: str | Path = "eval") -> list[bool | None]:
    """Per row of a set, in `load_prompts`'s order: the question's known answer, or None (a plain
    `prompt` row, or a question without a boolean `answer`)."""
    rows = _read_jsonl(source, {})
    def plain(r):        # load_prompts reads a `prompt` field first
        return isinstance(r.get("prompt"), str) and bool(r["prompt"].strip())
    return [r["answer"] if not plain(r) and isinstance(r.get("answer"), bool) else None for r in rows]


def load_prompts(source: str | Path = "calibration") -> list[str]:
    """User turns from a set: `prompt` rows as they are, `question` rows with the eval instruction."""
    if source in ("eval", "longform"):
        return [eval_prompt(q) for q in load_questions(source)]
    rows = _read_jsonl(source, {})
    out = []
    for n, r in enumerate(rows, start=1):
        if isinstance(r.get("prompt"), str) and r["prompt"].strip():
            out.append(r["prompt"])
        elif isinstance(r.get("question"), str) and r["question"].strip():
            if r.get("answer") is not None and not isinstance(r["answer"], bool):
                raise ValueError(f"{source} row {n}: 'answer' must be true or false (a JSON boolean) or left "
                                 f"out, got {r['answer']!r}")
            out.append(eval_prompt(Question(r["question"], bool(r.get("answer")),
                                            r.get("instruction") or EVAL_INSTRUCTION)))
        else:
            raise ValueError(f"{source} row {n}: needs a non-empty 'prompt' or 'question' field")
    return out
