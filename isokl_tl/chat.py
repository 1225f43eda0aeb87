"""Render turns through the model's own chat template, as token ids."""

from transformers import PreTrainedTokenizerBase


def require_tokenizer(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; load it with a spec that has one")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template")
    return tokenizer


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, user: str) -> list[int]:
    """A single user turn, followed by the opening of the assistant turn."""
    tokenizer = require_tokenizer(tokenizer)
    msgs = [{"role": "user", "content": user}]
    return _ids(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return _ids(tokenizer(text, add_special_tokens=False))


def eos_ids(tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """Token ids that end an assistant turn (the tokenizer's EOS and the template's end marker)."""
    if tokenizer is None:
        return []
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= {vocab[m] for m in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>") if m in vocab}
    return sorted(ids)
