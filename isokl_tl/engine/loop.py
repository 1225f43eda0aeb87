"""The decode loop: one batch of steered rows, each next to its base partner, decoded and scored.

`decode_batch` left-pads the prompts, gives every row with a coefficient != 0 a *base partner*
(the same prompt at coefficient 0, fed the steered row's tokens, after all steered rows in the
batch), steers every row at its own site, and decodes `window` tokens. Each step scores the
steered rows against their partners (`engine.scoring`) into result buffers (`Scores`), so the
rollout is generated once and never re-scored.

The loop reads what the decoder declares (`engine.decoder`): a decoder that `shrinks` loses its
finished rows (and their partners) after every step; one that does not keeps its shape, masks
finished rows and checks for EOS every `CHECK_EVERY` steps only (the host then rarely waits on the
device), and, when it `captures_scoring`, a greedy step's scoring and the next forward run as one
captured unit. A `reusable` decoder is kept for the next batch of the same shape (`engine.pool`).

With `forks`, the loop also reads each steered row's next-token distribution after a fixed tail
(a splice) at scheduled generated tokens t, on top of the row's own cache as it stands after t
tokens (`Decoder.fork`: a side branch that leaves the cache as it was), so no prefix is run twice;
a fork at the window's end runs the last token and the tail together.
"""

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.engine import pool
from isokl_tl.engine.decoder import Decoder
from isokl_tl.engine.fusion import has_hook
from isokl_tl.engine.scoring import Sampling, Scores, choose, greedy_record, record_torch, row_scores
from isokl_tl.hooks import Site, Steering, SteeringGroup, hook_layer, steer_sites
from isokl_tl.tokens import left_pad, pad_id

CHECK_EVERY = 16      # fixed-shape decoders: steps between EOS (and NaN) checks

DecoderFactory = Callable[[HookedTransformer, Steering | SteeringGroup, int], Decoder]   # (model, steering, capacity)


@runtime_checkable                           # beartype checks `observer` arguments against it
class Observer(Protocol):
    """Something that reads activations while the batch decodes (`isokl_tl.activations.Recorder`):
    its hooks run every step, and before each forward pass it learns which rows are in the batch
    (their index in the chunk) and which of them have a base partner (positions among them)."""

    def fwd_hooks(self) -> list[tuple[str, Callable]]: ...

    def at(self, t: int, rows: Int[Tensor, " active"], has: Int[Tensor, " paired"]) -> None: ...


@dataclass(frozen=True)
class Forks:
    """Where and how to fork: after `at` generated tokens (the schedule), run each of `tails`
    (token ids on the model's device; more than one where the splice depends on the rollout, as
    a thinking block to close does: the reader picks per row afterwards) and hand the steered
    rows' logits at its last column to `read(t, rows, which, logits)` (`rows`: each steered batch
    row's index among the decode's rows; `which`: the tail's index)."""

    at: tuple[int, ...]
    tails: tuple[Int[Tensor, " _tail"], ...]      # (each its own length)
    read: Callable[[int, Tensor, int, Tensor], None]

    @property
    def room(self) -> int:
        """Cache slots a fork needs beyond the window: the longest tail, and the last token."""
        return max(len(tail) for tail in self.tails) + 1

    def probe(self, dec: Decoder, t: int, rows: Tensor, last: Tensor | None = None) -> None:
        """Fork the steered rows (the batch's first `len(rows)`) after t tokens; `last`: the
        batch's last tokens, not yet run (a fork at the window's end)."""
        for which, tail in enumerate(self.tails):
            tail = tail.expand(len(rows), -1)
            if last is not None:
                tail = torch.cat([last[:len(rows), None].to(tail.device), tail], 1)
            self.read(t, rows, which, dec.fork(tail))


def _first_block(sites: list[Site]) -> int:
    """The first block any site steers in (0 when a site sits before the blocks)."""
    layers = [hook_layer(s.hook) for s in sites]
    return 0 if any(layer is None for layer in layers) else min(layers)


def _reuse_key(model: HookedTransformer, decoder: DecoderFactory, sites: list[Site], paired: Tensor, width: int,
               window: int, generated_only: bool, sampling: Sampling, eos: Tensor, room: int = 0) -> tuple | None:
    """Everything a kept decoder's captured graph depends on besides the values `adopt` and
    `prefill` refresh (coefficients, directions, prompts): the shapes, which rows have partners,
    the sites, the EOS ids, where every weight and buffer lives. None (keep nothing) while any
    other hook is registered on the model: its Python would run once, at capture, and its state
    could change between rollouts unseen."""
    if any(has_hook(hp) for hp in model.hook_dict.values()):
        return None
    weights = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in chain(model.parameters(), model.buffers()))
    return (decoder, tuple(paired.tolist()), width, window, room, generated_only, sampling.greedy,
            tuple(eos.tolist()), tuple((s.hook, s.method) for s in sites), weights)


def check_finite(logits: Tensor, t: int, rows: Tensor, has: Tensor, coeff: Tensor) -> None:
    """Raise (naming the row) if any steered row or base partner has NaN or inf logits: batch row
    i < n is chunk row `rows[i]`, batch row n + j the partner of `rows[has[j]]`.

    A row's float32 sum is finite when all its logits are (a NaN or inf makes it NaN or inf), and
    one pass of the sum costs a twentieth of `isfinite(...).all(-1)` on the CPU; only where a sum is
    not finite (or overflows) are the logits themselves looked at."""
    if bool(torch.isfinite(logits.sum(-1, dtype=torch.float32)).all()):
        return
    bad = ~torch.isfinite(logits).all(-1)
    if bool(bad.any()):
        i, n = int(bad.nonzero()[0, 0]), len(rows)
        if i < n:
            row = int(rows[i])
            raise ValueError(f"NaN or inf logits at generated token {t} of row {row} (steered, coefficient "
                             f"{float(coeff[row]):.4g}); the coefficient is probably too large")
        row = int(rows[int(has[i - n])])
        raise ValueError(f"NaN or inf logits at generated token {t} in the base partner of row {row} "
                         "(the unsteered model itself); check the model's weights and dtype")


@torch.no_grad()
def decode_batch(model: HookedTransformer, prompts: list[list[int]], coeff: Float[Tensor, " row"], *,
                 sites: list[Site], site: Int[Tensor, " row"], window: int, generated_only: bool,
                 sampling: Sampling, eos: Int[Tensor, " eos"], gen: torch.Generator | None,
                 decoder: DecoderFactory, bar=None, observer: Observer | None = None,
                 forks: Forks | None = None) -> dict[str, Tensor]:
    """Decode and score one batch of rows (prompt ids, coefficient, site index); returns the
    left-padded prompts and the per-token records (`Scores.empty_records` lists them), on the CPU.
    With `forks`, fork at the scheduled tokens as the batch decodes (see the module docstring)."""
    dev = model.cfg.device
    b = len(prompts)
    tokens, mask = left_pad(prompts, pad_id(model.tokenizer), dev)
    width = tokens.shape[1]
    # A row at coefficient 0 *is* the base model (steering is the identity there), so only rows
    # with c != 0 get a base partner; the partners sit after the steered rows in the batch.
    paired = coeff != 0
    partners = paired.nonzero()[:, 0].to(dev)     # positions of the rows that have a partner
    both = torch.cat([coeff, torch.zeros(int(paired.sum()))])
    # one coefficient vector per site: a row carries its coefficient at its own site and 0 (the
    # identity) at every other; base partners carry 0 everywhere
    site_both = torch.cat([site, site[paired]])
    per_site = [torch.where(site_both == j, both, 0.0).to(dev) for j in range(len(sites))]
    room = 0 if forks is None else forks.room
    key = None if observer is not None else _reuse_key(model, decoder, sites, paired, width, window,
                                                       generated_only, sampling, eos, room)
    with steer_sites(model, sites, per_site, start=width if generated_only else 0) as steering, \
            model.hooks(fwd_hooks=[] if observer is None else observer.fwd_hooks()):
        dec = None if key is None else pool.take(model, key)
        if dec is not None:                 # kept from a batch of this shape: graph and buffers reused
            dec.adopt(steering)
        else:
            dec = decoder(model, steering, width + window + room)
            if dec.shares_prefix:           # base partners repeat their rows below the first site
                dec.share_prefix(b, partners, _first_block(sites))
        if observer is not None:
            dec.run_hooks_every_step()
            observer.at(0, torch.arange(b), partners)
        logits = dec.prefill(torch.cat([tokens, tokens[paired.to(dev)]]),
                             torch.cat([mask, mask[paired.to(dev)]]))
        records = _decode(dec, logits, paired, coeff, window=window, sampling=sampling, eos=eos, gen=gen,
                          bar=bar, observer=observer, forks=forks)
        if key is not None and dec.reusable:
            pool.keep(model, key, dec)
    return {"prompt": tokens.cpu(), "prompt_mask": mask.cpu(), **records}


def _decode(dec: Decoder, logits: Tensor, paired: Tensor, coeff: Tensor, *, window: int, sampling: Sampling,
            eos: Tensor, gen: torch.Generator | None, bar, observer: Observer | None,
            forks: Forks | None = None) -> dict[str, Tensor]:
    """The steps of one batch after its prefill (see the module docstring)."""
    b = len(paired)
    scores = Scores.ready(dec.scoring if dec.reusable else None, paired, window, eos)
    if dec.reusable:
        dec.scoring = scores
    rows = torch.arange(b)                     # each batch row's index in the chunk
    final = scores.empty_records()             # records of the rows that left the batch
    in_graph = sampling.greedy and dec.captures_scoring
    check_every = 1 if dec.shrinks else CHECK_EVERY

    def score(logits: Tensor) -> Tensor:
        if sampling.greedy:
            nxt = greedy_record(logits, scores.base_row, scores.buffers)
        else:      # one uniform number per row of the chunk every step, whether or not it is still decoding
            u = torch.rand(b, generator=gen, device=gen.device if gen is not None else "cpu")[rows.to(
                gen.device if gen is not None else "cpu")]
            nxt = record_torch(*row_scores(logits, scores.base_row, lambda lp: choose(lp, sampling, u)),
                               scores.buffers)
        scores.col.add_(1)
        return nxt

    at = set(forks.at) if forks is not None else set()
    for t in range(window):
        last = t == window - 1
        if t % check_every == 0 or last:
            check_finite(logits, t, rows, scores.has, coeff)
        if t in at:
            forks.probe(dec, t, rows)
        if in_graph and not last:              # score t and step to t + 1 in one (captured) call
            if observer is not None:
                observer.at(t + 1, rows, scores.has)
            logits = dec.scored_step(score)
        else:
            nxt = score(logits)
            if not last:
                if dec.shrinks:                # finished rows (and their partners) leave the batch
                    rows, nxt = _drop_finished(dec, scores, rows, paired, final, nxt)
                if observer is not None:
                    observer.at(t + 1, rows, scores.has)
                if len(rows):
                    logits = dec.step(nxt)
        if bar is not None:
            bar.update(1)
        if last or not len(rows) or (t % check_every == check_every - 1 and scores.all_done()):
            if bar is not None:
                bar.update(window - 1 - t)
            if last and window in at and len(rows):
                forks.probe(dec, window, rows, last=nxt)
            break
    return scores.collect(final, rows)


def _drop_finished(dec: Decoder, scores: Scores, rows: Tensor, paired: Tensor, final: dict[str, Tensor],
                   nxt: Tensor) -> tuple[Tensor, Tensor]:
    """Move the rows that just finished out of the batch (their records into `final`); returns the
    rows left and the next tokens of the batch that remains (partners included)."""
    done = scores.buffers["out"]["eos"].cpu()
    if not bool(done.any()):
        return rows, nxt
    n = len(rows)
    keep = (~done).nonzero()[:, 0]
    if not len(keep):                        # every row has finished: nothing left to decode
        scores.move_out(done, rows, final)
        scores.narrow(keep, paired[rows[keep]])
        return rows[keep], nxt[:0]
    has = scores.has.cpu()
    partner_kept = (~done)[has].nonzero()[:, 0]
    scores.move_out(done, rows, final)
    dec.select(torch.cat([keep, n + partner_kept]).to(scores.col.device))
    rows = rows[keep]
    steered = nxt[:n][keep.to(nxt.device)]
    scores.narrow(keep, paired[rows])
    return rows, torch.cat([steered, steered[scores.has]])
