"""Token ids: turns rendered through the model's own chat template (or, for a base model, a plain
question/answer text), end-of-turn ids, and left-padded batches of token sequences."""

from collections.abc import Callable

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

# A base model (no chat template) reads each prompt as this text, after its BOS token if it uses one.
PLAIN_PROMPT = "Question: {user}\nAnswer:"


def require_tokenizer(tokenizer: PreTrainedTokenizerBase | None, *, chat: bool = False) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; load it with a spec that has one")
    if chat and not has_chat_template(tokenizer):
        raise ValueError("this model's tokenizer has no chat template (a base model): use --splice inline")
    return tokenizer


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, user: str) -> list[int]:
    """A single user turn, followed by the opening of the assistant turn; for a base model (no
    chat template), `PLAIN_PROMPT` with the tokenizer's own special tokens (its BOS)."""
    tokenizer = require_tokenizer(tokenizer)
    if not has_chat_template(tokenizer):
        return _ids(tokenizer(PLAIN_PROMPT.format(user=user)))
    msgs = [{"role": "user", "content": user}]
    return _ids(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return _ids(tokenizer(text, add_special_tokens=False))


# where transformers itself defines the decoding methods: a tokenizer whose methods all come from
# these decodes nothing in Python of its own
_LIBRARY_DECODING = ("transformers.tokenization_utils_base", "transformers.tokenization_utils_tokenizers",
                     "transformers.tokenization_utils_fast")


def batch_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[list[int]]], list[str]]:
    """A function from lists of ids to their texts, the texts `tokenizer.batch_decode` gives
    (special tokens kept). Where that is all batch_decode does (a tokenizer backed by the Rust
    `tokenizers` library that does not clean up spaces and decodes nothing in Python of its own),
    the Rust tokenizer decodes the whole batch in one call: transformers first checks the type
    of every id in Python, which was most of the time the coherence signals spent decoding
    (the headline cell's 30,784 windows of 32 tokens: 0.57 s against 0.11 s on a 2-core CPU)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    methods = [getattr(type(tokenizer), name, None) for name in ("batch_decode", "decode", "_decode")]
    if (backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True)
            or any(getattr(m, "__module__", None) not in _LIBRARY_DECODING for m in methods)):
        return tokenizer.batch_decode
    return lambda seqs: backend.decode_batch(seqs, skip_special_tokens=False)


def eos_ids(tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """Token ids that end an assistant turn (the tokenizer's EOS and the template's end marker)."""
    if tokenizer is None:
        return []
    markers = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:                 # one lookup each (get_vocab builds the whole vocabulary)
        found = [backend.token_to_id(m) for m in markers]
    else:
        vocab = tokenizer.get_vocab()
        found = [vocab.get(m) for m in markers]
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(ids | {i for i in found if i is not None})

def left_pad(seqs: list[list[int]], pad_id: int, device: str | torch.device = "cpu"
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack sequences right-aligned: returns (tokens, attention_mask), mask 0 on padding."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return tokens.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
