"""Batched, KV-cached steered rollouts with per-token KL, where every row has its own coefficient.

One call covers prompts x coefficients. Each steered row is decoded next to a *base partner*: the
same prompt at coefficient 0, teacher-forced on the steered row's tokens, in the same batched
forward pass. At every step the engine thus holds both next-token distributions, records
KL(P_steered || P_base) in float32, the steered log-probability of the chosen token, and whether
the base model's argmax agrees with it — the rollout is generated once and never re-scored, and no
[batch, pos, d_vocab] tensor is ever materialised.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from isokl_tl.activations import Record, Recorder
from isokl_tl.batching import chunks, left_pad, pad_id
from isokl_tl.chat import eos_ids
from isokl_tl.decode import Decoder
from isokl_tl.fast_decode import make_decoder
from isokl_tl.hooks import Site, Steering, SteeringGroup, hook_layer, steer_sites
from isokl_tl.rollouts import Rollouts
from isokl_tl.score import greedy_scores, row_scores


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding; greedy when `temperature == 0`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def _choose(logp: Float[Tensor, "batch d_vocab"], sampling: Sampling,
            gen: torch.Generator | None) -> Int[Tensor, " batch"]:
    if sampling.temperature == 0:
        return logp.argmax(-1)
    probs = torch.softmax(logp / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _score(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"], sampling: Sampling,
           gen: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(next token, KL, log-probability of the next token, base argmax agrees) for the steered rows
    0..batch-1 of `logits`, each against row `base_row[i]` (its partner, or itself)."""
    if sampling.temperature == 0:
        return greedy_scores(logits, base_row)
    return row_scores(logits, base_row, lambda logp: _choose(logp, sampling, gen))


def _base_rows(paired: Tensor, dev) -> Tensor:
    """Where each row's base distribution is: its partner (after all rows, in order) or itself."""
    rows = torch.arange(len(paired))
    rows[paired] = len(paired) + torch.arange(int(paired.sum()))
    return rows.to(dev)


def _check_finite(logits: Tensor, t: int, active: Tensor, coeff: Tensor) -> None:
    bad = ~torch.isfinite(logits).all(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        row = int(active[i % len(active)])
        who = "steered" if i < len(active) else "base"
        raise ValueError(f"NaN or inf logits at generated token {t} of row {row} ({who} model, "
                         f"coefficient {float(coeff[row]):.4g}); the coefficient is probably too large")


def _first_block(sites: list[Site]) -> int:
    """The first block any site steers in (0 when a site sits before the blocks)."""
    layers = [hook_layer(s.hook) for s in sites]
    return 0 if any(layer is None for layer in layers) else min(layers)


DecoderFactory = Callable[[HookedTransformer, Steering | SteeringGroup, int], Decoder]   # (model, steering, capacity)


@torch.no_grad()
def _rollout_chunk(model: HookedTransformer, prompts: list[list[int]], coeff: Tensor, *,
                   sites: list[Site], site: Tensor, window: int, generated_only: bool,
                   sampling: Sampling, eos: Tensor, gen: torch.Generator | None,
                   decoder: DecoderFactory, bar, record: Record | None) -> dict:
    dev = model.cfg.device
    b = len(prompts)
    tokens, mask = left_pad(prompts, pad_id(model.tokenizer), dev)
    width = tokens.shape[1]
    # A row at coefficient 0 *is* the base model (steer() is the identity there), so only rows
    # with c != 0 get a base partner; the partners sit after the steered rows in the batch.
    paired = coeff != 0
    partners = paired.nonzero()[:, 0].to(dev)     # positions of the rows that have a partner
    both = torch.cat([coeff, torch.zeros(int(paired.sum()))])
    out_tok = torch.full((b, window), -1, dtype=torch.long)
    out_kl = torch.full((b, window), float("nan"))
    out_lp = torch.full((b, window), float("nan"))
    out_agree = torch.zeros((b, window), dtype=torch.bool)
    gen_len = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    # one coefficient vector per site: a row carries its coefficient at its own site and 0 (the
    # identity) at every other; base partners carry 0 everywhere
    site_both = torch.cat([site, site[paired]])
    per_site = [torch.where(site_both == j, both, 0.0).to(dev) for j in range(len(sites))]
    rec = None if record is None else Recorder(model, record, sites, site, window)
    with steer_sites(model, sites, per_site, start=width if generated_only else 0) as steering, \
            model.hooks(fwd_hooks=[] if rec is None else rec.fwd_hooks()):
        dec = decoder(model, steering, width + window)
        if hasattr(dec, "share_prefix"):    # base partners repeat their rows below the first site
            dec.share_prefix(b, partners, _first_block(sites))
        if rec is not None:
            dec.use_graph = False           # recording hooks have Python side effects every step
            rec.at(0, torch.arange(b), partners)
        logits = dec.prefill(torch.cat([tokens, tokens[paired.to(dev)]]),
                             torch.cat([mask, mask[paired.to(dev)]]))
        if getattr(dec, "static", False):   # fixed-shape decoder: no compaction, few host syncs
            res = _decode_fixed(dec, logits, paired, coeff, window=window, sampling=sampling,
                                eos=eos, gen=gen, bar=bar, rec=rec)
            return {"prompt": tokens.cpu(), "prompt_mask": mask.cpu(), **res,
                    "acts": None if rec is None else rec.result(res["gen_len"])}
        active = torch.arange(b)            # chunk rows still decoding, in batch order
        for t in range(window):
            n = len(active)
            has = paired[active].nonzero()[:, 0].to(dev)   # positions (among active) with a partner
            _check_finite(logits, t, active, coeff)
            nxt, kl, lp, agree = _score(logits, _base_rows(paired[active], dev), sampling, gen)
            out_tok[active, t] = nxt.cpu()
            out_kl[active, t] = kl.cpu()
            out_lp[active, t] = lp.cpu()
            out_agree[active, t] = agree.cpu()
            gen_len[active] += 1
            finished = torch.isin(nxt, eos).cpu()
            done[active[finished]] = True
            if bar is not None:
                bar.update(1)
            if bool(done.all()) or t == window - 1:
                if bar is not None:
                    bar.update(window - 1 - t)
                break
            if finished.any():              # finished rows (and their partners) leave the batch
                keep = (~finished).nonzero()[:, 0].to(dev)
                partner_kept = (~finished.to(dev))[has].nonzero()[:, 0]
                dec.select(torch.cat([keep, n + partner_kept]))
                active, nxt = active[~finished], nxt[keep]
                has = paired[active].nonzero()[:, 0].to(dev)
            if rec is not None:
                rec.at(t + 1, active, has)
            logits = dec.step(torch.cat([nxt, nxt[has]]))
    return {"prompt": tokens.cpu(), "prompt_mask": mask.cpu(), "tokens": out_tok, "kl": out_kl,
            "logprob": out_lp, "base_agree": out_agree, "gen_len": gen_len, "eos": done,
            "acts": None if rec is None else rec.result(gen_len)}


def _decode_fixed(dec, logits: Tensor, paired: Tensor, coeff: Tensor, *, window: int,
                  sampling: Sampling, eos: Tensor, gen, bar, rec: Recorder | None = None,
                  check_every: int = 16) -> dict[str, Tensor]:
    """The decode loop for a fixed-batch decoder: every row stays in the batch (finished rows are
    masked), results stay on the device, and EOS is checked every `check_every` steps only. The
    scoring of a step writes into device buffers at a device-side column index, so for greedy
    decoding it is captured into the decoder's CUDA graph together with the next forward step."""
    dev = logits.device
    b = len(paired)
    has = paired.nonzero()[:, 0].to(dev)
    base_row = _base_rows(paired, dev)
    out = {"tokens": torch.full((b, window), -1, dtype=torch.long, device=dev),
           "kl": torch.full((b, window), float("nan"), device=dev),
           "logprob": torch.full((b, window), float("nan"), device=dev),
           "base_agree": torch.zeros((b, window), dtype=torch.bool, device=dev),
           "gen_len": torch.zeros(b, dtype=torch.long, device=dev),
           "eos": torch.zeros(b, dtype=torch.bool, device=dev)}
    col = torch.zeros(1, dtype=torch.long, device=dev)      # the column t being written
    nan = torch.tensor(float("nan"), device=dev)

    def score(logits: Tensor) -> Tensor:
        nxt, kl, lp, agree = _score(logits, base_row, sampling, gen)
        alive = ~out["eos"]
        out["tokens"].index_copy_(1, col, torch.where(alive, nxt, -1)[:, None])
        out["kl"].index_copy_(1, col, torch.where(alive, kl, nan)[:, None])
        out["logprob"].index_copy_(1, col, torch.where(alive, lp, nan)[:, None])
        out["base_agree"].index_copy_(1, col, (alive & agree)[:, None])
        out["gen_len"].add_(alive.long())
        out["eos"].logical_or_(torch.isin(nxt, eos))
        col.add_(1)
        return torch.cat([nxt, nxt[has]])

    in_graph = sampling.temperature == 0 and hasattr(dec, "scored_step")
    for t in range(window):
        if t % check_every == 0:
            _check_finite(logits, t, torch.arange(b), coeff)
        last = t == window - 1
        if rec is not None:
            rec.at(t + 1, torch.arange(b), has)
        if in_graph and not last:          # score t and step to t + 1 in one (captured) call
            logits = dec.scored_step(score)
        else:
            nxt = score(logits)
            if not last:
                logits = dec.step(nxt)
        if bar is not None:
            bar.update(1)
        if last or (t % check_every == check_every - 1 and bool(out["eos"].all())):
            if bar is not None:
                bar.update(window - 1 - t)
            break
    return {k: v.cpu() for k, v in out.items()}


def rollout(model: HookedTransformer, prompts: list[list[int]], coeffs: Float[Tensor, " row"], *,
            direction: Float[Tensor, " d_model"] | None = None, hook: str | None = None,
            method: str = "add", sites: list[Site] | None = None, site: Int[Tensor, " row"] | None = None,
            window: int = 64, generated_only: bool = False, sampling: Sampling = GREEDY,
            eos: list[int] | None = None, rows_per_batch: int = 64,
            decoder: DecoderFactory = make_decoder, prompt_index: Int[Tensor, " row"] | None = None,
            alpha: Float[Tensor, " row"] | None = None, record: Record | None = None,
            progress: bool = False) -> Rollouts:
    """Decode `window` tokens for every row (prompt ids, coefficient) and score them as it goes.

    Rows are processed `rows_per_batch` at a time (each with its base partner, so the forward
    batch is twice that). EOS ids default to the tokenizer's end-of-turn tokens. `record` also
    records activations along the way (`isokl_tl.activations`; `Rollouts.acts`).

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
    if rows_per_batch <= 0:
        raise ValueError(f"rows_per_batch must be positive, got {rows_per_batch}")
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
            res = _rollout_chunk(model, prompts[sl], coeffs[sl], sites=sites, site=site[sl],
                                 window=window, generated_only=generated_only, sampling=sampling,
                                 eos=eos_t, gen=gen, decoder=decoder, bar=bar, record=record)
            parts.append(Rollouts(**res, coeff=coeffs[sl], prompt_index=index[sl], alpha=alphas[sl],
                                  hook=sites[0].hook if len(sites) == 1 else "",
                                  method=sites[0].method if len(sites) == 1 else "", start=start))
    finally:
        bar.close()
    return Rollouts.concat(parts) if len(parts) > 1 else parts[0]
