"""Batched, KV-cached steered rollouts with per-token KL, where every row has its own coefficient,
and their result, `Rollouts`.

One `rollout` call covers prompts x coefficients. Each steered row is decoded next to a *base
partner*: the same prompt at coefficient 0, teacher-forced on the steered row's tokens, in the
same batched forward pass (`isokl_tl.engine`). At every step the engine thus holds both
next-token distributions, records KL(P_steered || P_base) in float32, the steered
log-probability of the chosen token, whether the base model's argmax agrees with it, and the base
model's log-probability of it (`base_logprob`; minus it is the base surprisal): the
rollout is generated once and never re-scored, and no [batch, pos, d_vocab] tensor is ever
materialised.

On the GPU a rollout keeps its decoder (KV caches, CUDA graph, result buffers) for the next
rollout of the same shape, which then skips the warm-up step and the capture
(`isokl_tl.engine.release(model)` frees them); nothing is kept while other hooks are registered.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from isokl_tl.activations import Activations, Record, Recorder
from isokl_tl.engine import GREEDY, DecoderFactory, Forks, Sampling, batch_rows, decode_batch, make_decoder
from isokl_tl.hooks import Site
from isokl_tl.manifest import (
    ACTIVATIONS,
    ROLLOUTS,
    ROLLOUTS_CSV,
    ROLLOUTS_META,
    TEXTS,
    write_atomic,
    write_csv,
    write_json,
)
from isokl_tl.tokens import chunks, eos_ids


@dataclass
class Rollouts:
    """Rollouts of a batch of rows. Generated positions past `gen_len` are padding: token -1,
    KL and log-prob NaN (never 0). `gen_len` counts the EOS token when a row stopped at one."""

    prompt: Int[Tensor, "row prompt_pos"]      # left-padded prompt ids (pad where prompt_mask is 0)
    prompt_mask: Int[Tensor, "row prompt_pos"]
    tokens: Int[Tensor, "row window"]
    kl: Float[Tensor, "row window"]
    logprob: Float[Tensor, "row window"]
    base_agree: Bool[Tensor, "row window"]
    base_logprob: Float[Tensor, "row window"]
    gen_len: Int[Tensor, " row"]
    eos: Bool[Tensor, " row"]
    coeff: Float[Tensor, " row"]
    prompt_index: Int[Tensor, " row"]
    alpha: Float[Tensor, " row"]
    hook: str = ""
    method: str = "add"
    start: str = "all"
    acts: Activations | None = None            # recorded activations (rollout(record=...))

    @property
    def window(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def mask(self) -> Bool[Tensor, "row window"]:
        return torch.arange(self.window)[None, :] < self.gen_len[:, None]

    def row_ids(self, i: int, upto: int | None = None) -> tuple[list[int], list[int]]:
        """(prompt ids, generated ids[:upto]) of row i, unpadded."""
        n = int(self.gen_len[i]) if upto is None else min(upto, int(self.gen_len[i]))
        prompt = self.prompt[i][self.prompt_mask[i].bool()].tolist()
        return prompt, self.tokens[i, :n].tolist()

    def take(self, rows: list[int], **fields) -> "Rollouts":
        """These rows only (recorded activations are dropped); `fields` replace hook, method, ..."""
        idx = torch.tensor(rows, dtype=torch.long)
        out = {k: v[idx] for k, v in self.__dict__.items() if torch.is_tensor(v)}
        meta = {"hook": self.hook, "method": self.method, "start": self.start, **fields}
        return Rollouts(**out, **meta)

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        width = max(p.prompt.shape[1] for p in parts)

        def widen(t: Tensor, fill: int) -> Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill)

        out = {k: torch.cat([getattr(p, k) for p in parts]) for k, v in parts[0].__dict__.items()
               if torch.is_tensor(v) and k not in ("prompt", "prompt_mask")}
        out["prompt"] = torch.cat([widen(p.prompt, 0) for p in parts])
        out["prompt_mask"] = torch.cat([widen(p.prompt_mask, 0) for p in parts])
        acts = Activations.concat([p.acts for p in parts]) if parts[0].acts is not None else None
        return Rollouts(**out, hook=parts[0].hook, method=parts[0].method, start=parts[0].start,
                        acts=acts)

    # --- persistence -------------------------------------------------------------------------
    def save(self, run_dir: str | Path, tokenizer=None, *, long_format: bool = True) -> None:
        """The tensors, any activations and, last, the metadata (a sweep's part counts as
        complete once that exists: `Run.rollout`); `long_format` also writes `rollouts.csv`, and
        a tokenizer each row's text (`texts.jsonl`)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.__dict__.items() if torch.is_tensor(v)}
        tensors["base_agree"] = tensors["base_agree"].to(torch.uint8)
        tensors["eos"] = tensors["eos"].to(torch.uint8)
        write_atomic(run_dir / ROLLOUTS, lambda p: save_file(tensors, str(p)))
        if self.acts is not None:
            self.acts.save(run_dir)
        else:                                    # no stale recording from an earlier run
            (run_dir / ACTIVATIONS).unlink(missing_ok=True)
        if long_format:
            write_csv(run_dir / ROLLOUTS_CSV, self.to_frame())
        if tokenizer is not None:
            lines = [json.dumps(r) for r in self.texts(tokenizer)]
            write_atomic(run_dir / TEXTS, lambda p: p.write_text("\n".join(lines) + "\n"))
        write_json(run_dir / ROLLOUTS_META, {"hook": self.hook, "method": self.method, "start": self.start})

    @classmethod
    def load(cls, run_dir: str | Path) -> "Rollouts":
        run_dir = Path(run_dir)
        if not (run_dir / ROLLOUTS).exists():
            raise ValueError(f"{run_dir} has no {ROLLOUTS}; run `isokl-tl rollout` first")
        t = load_file(str(run_dir / ROLLOUTS))
        t["base_agree"], t["eos"] = t["base_agree"].bool(), t["eos"].bool()
        if "base_logprob" not in t:              # saved before base log-probs were recorded
            t["base_logprob"] = torch.full_like(t["kl"], float("nan"))
        meta = json.loads((run_dir / ROLLOUTS_META).read_text())
        acts = Activations.load(run_dir) if (run_dir / ACTIVATIONS).exists() else None
        return cls(**t, **meta, acts=acts)

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per generated token."""
        m = self.mask.numpy()
        r, t = np.nonzero(m)
        return pd.DataFrame({
            "row": r, "prompt": self.prompt_index.numpy()[r], "alpha": self.alpha.numpy()[r],
            "coeff": self.coeff.numpy()[r], "t": t, "token": self.tokens.numpy()[r, t],
            "kl": self.kl.numpy()[r, t], "logprob": self.logprob.numpy()[r, t],
            "base_agree": self.base_agree.numpy()[r, t].astype(int),
            "base_logprob": self.base_logprob.numpy()[r, t],
        })

    def texts(self, tokenizer) -> list[dict]:
        out = []
        for i in range(self.n_rows):
            _, gen = self.row_ids(i)
            out.append({"row": i, "prompt": int(self.prompt_index[i]), "alpha": float(self.alpha[i]),
                        "coeff": float(self.coeff[i]), "eos": bool(self.eos[i]),
                        "gen_len": int(self.gen_len[i]), "text": tokenizer.decode(gen)})
        return out


@runtime_checkable
class ForkProbe(Protocol):
    """Reads forks while a rollout decodes (`pmass.ForkReader`): the engine's fork settings for the
    batch whose first row is rollout row `offset`."""

    def at_rows(self, offset: int) -> Forks: ...


def rollout(model: HookedTransformer, prompts: list[list[int]], coeffs: Float[Tensor, " row"], *,
            direction: Float[Tensor, " d_model"] | None = None, hook: str | None = None,
            method: str = "add", sites: list[Site] | None = None, site: Int[Tensor, " row"] | None = None,
            window: int = 64, generated_only: bool = False, sampling: Sampling = GREEDY,
            eos: list[int] | None = None, rows_per_batch: int | None = None,
            decoder: DecoderFactory = make_decoder, prompt_index: Int[Tensor, " row"] | None = None,
            alpha: Float[Tensor, " row"] | None = None, record: Record | None = None,
            forks: ForkProbe | None = None, progress: bool = False) -> Rollouts:
    """Decode `window` tokens for every row (prompt ids, coefficient) and score them as it goes.

    Rows are processed `rows_per_batch` at a time (each with its base partner, so the forward
    batch is twice that); None lets the engine pick (`engine.batch_rows`: at most 64 on the CPU, on
    a GPU as many as fit 30% of its memory beyond the weights, at most 512). EOS ids default to the
    tokenizer's end-of-turn tokens. `record` also records activations along the way
    (`isokl_tl.activations`; `Rollouts.acts`), and `forks` (a `pmass.ForkReader`) reads fork pmass
    along the way (not together with `record`: the fork tails would be recorded too).

    Steering acts at one site (`direction`, `hook`, `method`), or, to put the rows of several
    sites (layers, directions, methods) into the same batches, give `sites` and each row's index
    into them as `site`; such Rollouts have an empty `hook` and `method`.
    """
    if sites is None:
        if direction is None or hook is None:
            raise ValueError("give a direction and a hook, or sites and a site index per row")
        sites, site = [Site(hook, direction, method)], torch.zeros(len(prompts), dtype=torch.long)
    elif site is None or len(site) != len(prompts):
        raise ValueError("with sites, give `site`: one site index per row")
    site = site.long().cpu()
    if len(site) and not 0 <= int(site.min()) <= int(site.max()) < len(sites):
        raise ValueError(f"site indices must be in 0..{len(sites) - 1}")
    if window <= 0:
        raise ValueError(f"window must be a positive number of tokens, got {window}")
    if len(prompts) != len(coeffs):
        raise ValueError(f"{len(prompts)} prompts but {len(coeffs)} coefficients: give one per row")
    if rows_per_batch is None:
        rows_per_batch = batch_rows(model, prompts, window, 0 if forks is None else forks.at_rows(0).room - 1)
    if rows_per_batch <= 0:
        raise ValueError(f"rows_per_batch must be positive, got {rows_per_batch}")
    if forks is not None and record is not None:
        raise ValueError("read forks or record activations in one rollout, not both")
    n_ctx = model.cfg.n_ctx
    too_long = [i for i, p in enumerate(prompts) if len(p) + window > n_ctx]
    if too_long:
        i = too_long[0]
        raise ValueError(f"prompt {i} has {len(prompts[i])} tokens; with window {window} that exceeds "
                         f"the model's context of {n_ctx}")
    eos_t = torch.tensor(eos_ids(model.tokenizer) if eos is None else eos, dtype=torch.long,
                         device=model.cfg.device)
    gen = None
    if sampling.temperature > 0:
        gen = torch.Generator(device=model.cfg.device).manual_seed(sampling.seed)
    coeffs = coeffs.float().cpu()
    n = len(prompts)
    index = torch.arange(n) if prompt_index is None else prompt_index.long().cpu()
    alphas = torch.full((n,), float("nan")) if alpha is None else alpha.float().cpu()
    start = "generated" if generated_only else "all"
    bar = tqdm(total=window * len(chunks(len(prompts), rows_per_batch)), desc="rollout",
               unit="step", disable=not progress, leave=False)
    try:
        parts = []
        for sl in chunks(len(prompts), rows_per_batch):
            rec = None if record is None else Recorder(model, record, sites, site[sl], window)
            res = decode_batch(model, prompts[sl], coeffs[sl], sites=sites, site=site[sl], window=window,
                               generated_only=generated_only, sampling=sampling, eos=eos_t, gen=gen,
                               decoder=decoder, bar=bar, observer=rec,
                               forks=None if forks is None else forks.at_rows(sl.start))
            acts = None if rec is None else rec.result(res["gen_len"])
            parts.append(Rollouts(**res, acts=acts, coeff=coeffs[sl], prompt_index=index[sl], alpha=alphas[sl],
                                  hook=sites[0].hook if len(sites) == 1 else "",
                                  method=sites[0].method if len(sites) == 1 else "", start=start))
    finally:
        bar.close()
    return Rollouts.concat(parts) if len(parts) > 1 else parts[0]
