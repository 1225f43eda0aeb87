"""Batched, KV-cached steered rollouts with per-token KL, where every row has its own coefficient.

One call covers prompts x coefficients. Each steered row is decoded next to a *base partner*: the
same prompt at coefficient 0, teacher-forced on the steered row's tokens, in the same batched
forward pass. At every step the engine thus holds both next-token distributions, records
KL(P_steered || P_base) in float32, the steered log-probability of the chosen token, and whether
the base model's argmax agrees with it — the rollout is generated once and never re-scored, and no
[batch, pos, d_vocab] tensor is ever materialised.

On the GPU path a rollout keeps its decoder (KV caches, CUDA graph, result buffers) for the next
rollout of the same shape, which then skips the warm-up step and the capture
(`isokl_tl.graph_decode.release(model)` frees them); nothing is kept while other hooks are
registered on the model.
"""

from collections.abc import Callable
from itertools import chain

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from isokl_tl import graph_decode
from isokl_tl.activations import Record, Recorder
from isokl_tl.batching import chunks, left_pad, pad_id
from isokl_tl.chat import eos_ids
from isokl_tl.decode import Decoder
from isokl_tl.decode_loop import GREEDY, Sampling, base_rows, check_finite, decode_fixed, score_rows
from isokl_tl.fast_decode import make_decoder
from isokl_tl.fusion import has_hook
from isokl_tl.hooks import Site, Steering, SteeringGroup, hook_layer, steer_sites
from isokl_tl.rollouts import Rollouts


def _first_block(sites: list[Site]) -> int:
    """The first block any site steers in (0 when a site sits before the blocks)."""
    layers = [hook_layer(s.hook) for s in sites]
    return 0 if any(layer is None for layer in layers) else min(layers)


def _reuse_key(model: HookedTransformer, decoder, sites: list[Site], paired: Tensor, width: int, window: int,
               generated_only: bool, sampling: Sampling, eos: Tensor) -> tuple | None:
    """Everything a kept decoder's captured graph depends on besides the values `adopt` and
    `prefill` refresh (coefficients, directions, prompts): the shapes, which rows have partners,
    the sites, the EOS ids, where every weight and buffer lives. None (keep nothing) while any
    other hook is registered on the model: its Python would run once, at capture, and its state
    could change between rollouts unseen."""
    if any(has_hook(hp) for hp in model.hook_dict.values()):
        return None
    weights = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in chain(model.parameters(), model.buffers()))
    return (decoder, tuple(paired.tolist()), width, window, generated_only, sampling.temperature == 0,
            tuple(eos.tolist()), tuple((s.hook, s.method) for s in sites), weights)


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
    key = None if rec is not None else _reuse_key(model, decoder, sites, paired, width, window, generated_only,
                                                  sampling, eos)
    with steer_sites(model, sites, per_site, start=width if generated_only else 0) as steering, \
            model.hooks(fwd_hooks=[] if rec is None else rec.fwd_hooks()):
        dec = None if key is None else graph_decode.take(model, key)
        if dec is not None:                 # kept from a rollout of this shape: graph and buffers reused
            dec.adopt(steering)
        else:
            dec = decoder(model, steering, width + window)
            if hasattr(dec, "share_prefix"):    # base partners repeat their rows below the first site
                dec.share_prefix(b, partners, _first_block(sites))
        if rec is not None:
            dec.use_graph = False           # recording hooks have Python side effects every step
            rec.at(0, torch.arange(b), partners)
        logits = dec.prefill(torch.cat([tokens, tokens[paired.to(dev)]]),
                             torch.cat([mask, mask[paired.to(dev)]]))
        if getattr(dec, "static", False):   # fixed-shape decoder: no compaction, few host syncs
            res = decode_fixed(dec, logits, paired, coeff, window=window, sampling=sampling,
                                eos=eos, gen=gen, bar=bar, rec=rec)
            if key is not None and getattr(dec, "reusable", False):
                graph_decode.keep(model, key, dec)
            return {"prompt": tokens.cpu(), "prompt_mask": mask.cpu(), **res,
                    "acts": None if rec is None else rec.result(res["gen_len"])}
        active = torch.arange(b)            # chunk rows still decoding, in batch order
        for t in range(window):
            n = len(active)
            has = paired[active].nonzero()[:, 0].to(dev)   # positions (among active) with a partner
            check_finite(logits, t, active, coeff)
            nxt, kl, lp, agree = score_rows(logits, base_rows(paired[active], dev), sampling, gen)
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
