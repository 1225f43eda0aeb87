"""The splice a fork reads after `prompt + rollout[:t]`: how it asks for the answer, and the
answer token sets its next-token distribution is read on (`isokl_tl.pmass`).

Two modes, rendered through the model's chat template:
- `interrupt`: end the assistant turn, add a user turn asking for the final answer as JSON, open a
  new assistant turn with the prefill `{"choice": `.
- `inline`: stay in the assistant turn; append `close` (e.g. "\\nI should answer now.</think>" for
  a model inside a thinking block) and the prefill `\\n{"choice": `. On a model whose vocabulary
  has the thinking markers (`<think>`, `</think>`) as tokens, the close goes only to forks inside
  an open block (`isokl_tl.thinking`), and is `</think>\\n` unless given (with the prefill's own
  newline, the two a reasoning model writes after its block); `close=""` turns it off. `tails`
  gives both splices, and fork pmass keeps, per fork, the one its rollout needs.
"""

from dataclasses import asdict, dataclass

from isokl_tl.thinking import CLOSE, OPEN, marker_ids
from isokl_tl.tokens import require_tokenizer, text_ids

TRUE_WORDS = ("true", "True", " true", " True", "1", " 1")
FALSE_WORDS = ("false", "False", " false", " False", "0", " 0")
_MARKER = "\u2063SPLICE\u2063"


@dataclass(frozen=True)
class Splice:
    mode: str = "interrupt"
    question: str = ('Stop here. Give your final answer now as JSON: {"choice": true} or '
                     '{"choice": false}.')
    close: str | None = None          # None: the model's default (see above); "": no close
    prefill: str | None = None
    true_words: tuple[str, ...] = TRUE_WORDS
    false_words: tuple[str, ...] = FALSE_WORDS
    think_open: str = OPEN
    think_close: str = CLOSE

    def __post_init__(self):
        if self.mode not in ("interrupt", "inline"):
            raise ValueError(f"splice mode {self.mode!r} is not one of interrupt, inline")
        if self.mode == "interrupt" and self.close:
            raise ValueError(f"splice close {self.close!r} given, but a close applies to the inline splice only "
                             "(the interrupt splice ends the assistant turn): give --splice inline, or no --splice-close")

    @property
    def prefill_text(self) -> str:
        if self.prefill is not None:
            return self.prefill
        return '{"choice": ' if self.mode == "interrupt" else '\n{"choice": '

    def markers(self, tokenizer) -> tuple[int, int] | None:
        """Inline mode on a model whose vocabulary has both thinking markers as single tokens,
        with the close not turned off: their ids (the close then goes only to forks inside an
        open block); else None."""
        if self.mode != "inline" or self.close == "":
            return None
        return marker_ids(tokenizer, self.think_open, self.think_close)

    def close_text(self, tokenizer) -> str:
        """The text that closes a thinking block: "" in interrupt mode and wherever there is none."""
        if self.mode != "inline":
            return ""
        if self.close is not None:
            return self.close
        return self.think_close + "\n" if self.markers(tokenizer) is not None else ""

    def tail_texts(self, tokenizer) -> list[str]:
        """The splice as text: one, or, where thinking blocks are marked (`markers`), two: without
        the close (forks outside a block) and with it (forks inside one)."""
        if self.markers(tokenizer) is None:
            return [self.text(tokenizer)]
        return [self.prefill_text, self.text(tokenizer)]

    def tails(self, tokenizer) -> list[list[int]]:
        """The token ids of each of `tail_texts`."""
        return [text_ids(tokenizer, t) for t in self.tail_texts(tokenizer)]

    def text(self, tokenizer) -> str:
        """The splice as text, rendered through the chat template (inline mode: with its close)."""
        if self.mode == "inline":
            return self.close_text(tokenizer) + self.prefill_text
        tok = require_tokenizer(tokenizer, chat=True)
        msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _MARKER},
                {"role": "user", "content": self.question}]
        rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if _MARKER not in rendered:
            raise ValueError("the chat template dropped the assistant turn; use --splice inline")
        return rendered.split(_MARKER, 1)[1] + self.prefill_text

    def token_ids(self, tokenizer) -> list[int]:
        return text_ids(tokenizer, self.text(tokenizer))

    def to_dict(self, tokenizer=None) -> dict:
        d = asdict(self)
        if tokenizer is not None:
            d["rendered"] = self.text(tokenizer)
            d["close_text"] = self.close_text(tokenizer)
            d["close_at"] = ("forks inside an open thinking block" if self.markers(tokenizer) is not None
                             else "every fork" if d["close_text"] else "no fork")
            d["tail_texts"] = self.tail_texts(tokenizer)
            t, f = answer_token_sets(tokenizer, self.true_words, self.false_words)
            d["true_ids"], d["false_ids"] = t, f
        return d


def answer_token_sets(tokenizer, true_words, false_words) -> tuple[list[int], list[int]]:
    """The last token of each word's encoding, deduplicated; the two sets must be disjoint."""
    sets = []
    for words in (true_words, false_words):
        ids = set()
        for w in words:
            enc = text_ids(tokenizer, w)
            if not enc:
                raise ValueError(f"answer word {w!r} does not tokenize to any token")
            ids.add(enc[-1])
        if not ids:
            raise ValueError("an answer set is empty: give at least one word for true and for false")
        sets.append(sorted(ids))
    overlap = set(sets[0]) & set(sets[1])
    if overlap:
        shown = [tokenizer.convert_ids_to_tokens(i) for i in sorted(overlap)]
        raise ValueError(f"true and false answer sets overlap on tokens {shown}; choose other words")
    return sets[0], sets[1]
