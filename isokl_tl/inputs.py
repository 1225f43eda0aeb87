"""Checking a run's inputs before any stage runs: everything a command will read, with one line
of error naming the bad value and what is allowed, and nothing written when one is bad."""

import torch

from isokl_tl.corpus import MAX_TOKENS, corpus_ids
from isokl_tl.hooks import check_direction, resolve_hook
from isokl_tl.manifest import check_writable
from isokl_tl.models import check_spec
from isokl_tl.splice import answer_token_sets
from isokl_tl.prompts import load_corpus, load_pairs, load_prompts
from isokl_tl.search import CORPUS_STATISTICS
from isokl_tl.tokens import prompt_ids
from isokl_tl.vectors import run_vector


def check_inputs(run, stages: tuple[str, ...]) -> None:
    """Read every input the given stages of `run` (an `isokl_tl.run.Run`) will need, and raise
    ValueError on the first bad one: the output directory, the model spec, the device, the prompt
    and pair files, how many prompts they hold; then (loading the model) the hook or the external
    vector, whether each prompt fits the context, and the answer words."""
    check_writable(run.dir)
    c = run.cfg
    check_spec(c.model)
    check_device(c.device)
    todo = [s for s in stages if not run.current(s)]     # stages already done need no input
    if "direction" in todo and len(load_pairs(c.pairs)) < 2:
        raise ValueError(f"{c.pairs!r} holds {len(load_pairs(c.pairs))} contrastive pair(s); a direction "
                         "needs at least 2")
    corpus = c.statistic in CORPUS_STATISTICS
    if "calibrate" in todo:
        if corpus:
            _enough(load_corpus(c.corpus), c.n_calib, c.corpus, "--n-calib")
        else:
            _enough(load_prompts(c.calib_prompts), c.n_calib, c.calib_prompts, "--n-calib")
    if "rollout" in todo:
        _enough(load_prompts(c.prompts), c.n_prompts, c.prompts, "--n-prompts")
    model = run.model if todo else None
    if "direction" in todo:
        if c.external:       # read the file or SAE and check it against the model, before any write
            check_direction(model, run_vector(model, c)[0])
        else:
            resolve_hook(model, c.hook, c.layer)
    if "calibrate" in todo and corpus:    # passages are cut to the context, and need 2 tokens
        calibration_ids(model, c)
    elif "calibrate" in todo:
        _fits(model, load_prompts(c.calib_prompts)[:c.n_calib], c.calib_window, c.calib_prompts)
    if "rollout" in todo:          # forks add the splice after the rollout
        splice = len(c.splice_spec().token_ids(model.tokenizer))
        _fits(model, load_prompts(c.prompts)[:c.n_prompts], c.window + splice, c.prompts)
    if "pmass" in todo:
        splice = c.splice_spec()
        answer_token_sets(model.tokenizer, splice.true_words, splice.false_words)
        splice.to_dict(model.tokenizer)


def calibration_ids(model, c) -> list[list[int]]:
    """The token ids a run's calibration reads: the corpus's first `n_calib` passages, cut to the
    context, for a teacher-forced statistic (`--statistic delta_ce`), else its calibration prompts."""
    if c.statistic in CORPUS_STATISTICS:
        return corpus_ids(model.tokenizer, load_corpus(c.corpus)[:c.n_calib],
                          max_tokens=min(MAX_TOKENS, model.cfg.n_ctx))
    return [prompt_ids(model.tokenizer, p) for p in load_prompts(c.calib_prompts)[:c.n_calib]]


def check_device(device: str) -> None:
    """A torch device this machine has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _enough(prompts: list[str], n: int, source: str, option: str) -> None:
    if n > len(prompts):
        raise ValueError(f"{source!r} holds {len(prompts)} prompts but {option} {n} asks for more; "
                         f"use {option} {len(prompts)} or fewer")


def _fits(model, prompts: list[str], window: int, source: str) -> None:
    """Every prompt plus `window` generated tokens fits the model's context."""
    n_ctx = model.cfg.n_ctx
    for i, p in enumerate(prompts):
        n = len(prompt_ids(model.tokenizer, p))
        if n + window > n_ctx:
            raise ValueError(f"prompt {i} of {source!r} has {n} tokens; with {window} more (the window, "
                             f"and the fork splice after a sweep) that exceeds the model's context of {n_ctx}")
