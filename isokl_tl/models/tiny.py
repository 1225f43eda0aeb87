"""A tiny, seeded, random Llama-like model (rotary, RMSNorm, gated MLP, grouped-query attention)
with a small byte-level BPE tokenizer trained on the shipped prompt sets, for fast tests.

The tokenizer uses the same ChatML chat template as the embedded SmolLM2 model, so every stage of
the pipeline (chat rendering, splices, answer-token sets) runs on it unchanged.
"""

import json
from functools import lru_cache
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_ANSWER_WORDS = ["true", "false", "True", "False", " true", " false", " True", " False"]


def _corpus() -> list[str]:
    texts = list(_ANSWER_WORDS) * 50
    # a fixed set of files: a new shipped set must not change the tiny model's tokens (and every
    # number the tests pinned with it)
    for path in sorted(resources.files("isokl_tl.data").iterdir(), key=lambda p: p.name):
        if path.name in ("calibration.jsonl", "eval.jsonl", "pairs.jsonl"):
            for line in path.read_text().splitlines():
                if line.strip():
                    texts.extend(str(v) for v in json.loads(line).values())
    return texts


@lru_cache(maxsize=1)
def tiny_tokenizer(vocab_size: int = 640) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_config(*, d_vocab: int, n_ctx: int = 512, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        d_model=64,
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=128,
        n_layers=4,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        initializer_range=0.25,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        seed=seed,
        dtype=dtype,
    )


def tiny_model(*, dtype: torch.dtype = torch.float32, seed: int = 0) -> HookedTransformer:
    tokenizer = tiny_tokenizer()
    cfg = tiny_config(d_vocab=len(tokenizer), dtype=dtype, seed=seed)
    model = HookedTransformer(cfg, move_to_device=False)
    model.tokenizer = tokenizer
    return model
