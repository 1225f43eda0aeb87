"""One decode step's choice and scoring, and the decode loop of fixed-batch decoders.

`score_rows` picks each steered row's next token (argmax, or sampled under `Sampling`) and scores
it against the row's base partner: KL(P_steered || P_base), the token's log-probability, and
whether the base argmax agrees (`isokl_tl.score`). `decode_fixed` runs a whole rollout window on a
decoder whose batch never changes shape (`isokl_tl.graph_decode`), with its results kept on the
device and, for greedy decoding, each step's scoring captured into the decoder's CUDA graph.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from isokl_tl.activations import Recorder
from isokl_tl.score import greedy_record, greedy_scores, record_torch, row_scores


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


def choose(logp: Float[Tensor, "batch d_vocab"], sampling: Sampling,
            gen: torch.Generator | None) -> Int[Tensor, " batch"]:
    if sampling.temperature == 0:
        return logp.argmax(-1)
    probs = torch.softmax(logp / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def score_rows(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"], sampling: Sampling,
           gen: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(next token, KL, log-probability of the next token, base argmax agrees) for the steered rows
    0..batch-1 of `logits`, each against row `base_row[i]` (its partner, or itself)."""
    if sampling.temperature == 0:
        return greedy_scores(logits, base_row)
    return row_scores(logits, base_row, lambda logp: choose(logp, sampling, gen))


def base_rows(paired: Tensor, dev) -> Tensor:
    """Where each row's base distribution is: its partner (after all rows, in order) or itself."""
    rows = torch.arange(len(paired))
    rows[paired] = len(paired) + torch.arange(int(paired.sum()))
    return rows.to(dev)


def check_finite(logits: Tensor, t: int, active: Tensor, coeff: Tensor) -> None:
    bad = ~torch.isfinite(logits).all(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        row = int(active[i % len(active)])
        who = "steered" if i < len(active) else "base"
        raise ValueError(f"NaN or inf logits at generated token {t} of row {row} ({who} model, "
                         f"coefficient {float(coeff[row]):.4g}); the coefficient is probably too large")


def _scoring_buffers(dec, b: int, window: int, paired: Tensor, eos: Tensor) -> dict:
    """The device tensors a fixed-batch rollout's scoring reads and writes (its results, the
    column being written, partner rows, EOS ids, the next tokens; `isokl_tl.score.record_torch`),
    cleared. A kept decoder's captured graph writes
    into the ones it was captured with, so those are reused, in place, when the shapes match."""
    dev = eos.device
    st = getattr(dec, "scoring", None)
    has, base_row = paired.nonzero()[:, 0].to(dev), base_rows(paired, dev)
    if st is None or st["out"]["kl"].shape != (b, window) or st["has"].shape != has.shape \
            or st["eos_ids"].shape != eos.shape or st["out"]["kl"].device != dev:
        st = {"out": {"tokens": torch.empty((b, window), dtype=torch.long, device=dev),
                      "kl": torch.empty((b, window), device=dev),
                      "logprob": torch.empty((b, window), device=dev),
                      "base_agree": torch.empty((b, window), dtype=torch.bool, device=dev),
                      "gen_len": torch.empty(b, dtype=torch.long, device=dev),
                      "eos": torch.empty(b, dtype=torch.bool, device=dev)},
              "col": torch.empty(1, dtype=torch.long, device=dev),      # the column t being written
              "has": has, "base_row": base_row, "eos_ids": eos.clone(),
              "partner_at": torch.empty(b, dtype=torch.long, device=dev),
              "next": torch.empty(b + len(has), dtype=torch.long, device=dev)}
        if hasattr(dec, "scoring"):
            dec.scoring = st
    out = st["out"]
    out["tokens"].fill_(-1)
    out["kl"].fill_(float("nan"))
    out["logprob"].fill_(float("nan"))
    for name in ("base_agree", "gen_len", "eos"):
        out[name].zero_()
    st["col"].zero_()
    st["has"].copy_(has)
    st["base_row"].copy_(base_row)
    st["eos_ids"].copy_(eos)
    st["partner_at"].fill_(-1).index_copy_(0, has, b + torch.arange(len(has), device=dev))
    return st


def decode_fixed(dec, logits: Tensor, paired: Tensor, coeff: Tensor, *, window: int,
                 sampling: Sampling, eos: Tensor, gen, bar, rec: Recorder | None = None,
                 check_every: int = 16) -> dict[str, Tensor]:
    """The decode loop for a fixed-batch decoder: every row stays in the batch (finished rows are
    masked), results stay on the device, and EOS is checked every `check_every` steps only. The
    scoring of a step writes into device buffers at a device-side column index, so for greedy
    decoding it is captured into the decoder's CUDA graph together with the next forward step."""
    b = len(paired)
    st = _scoring_buffers(dec, b, window, paired, eos)
    out, has = st["out"], st["has"]

    def score(logits: Tensor) -> Tensor:
        if sampling.temperature == 0:
            nxt = greedy_record(logits, st["base_row"], st)
        else:
            nxt = record_torch(*score_rows(logits, st["base_row"], sampling, gen), st)
        st["col"].add_(1)
        return nxt

    in_graph = sampling.temperature == 0 and hasattr(dec, "scored_step")
    for t in range(window):
        if t % check_every == 0:
            check_finite(logits, t, torch.arange(b), coeff)
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
    return {k: v.to("cpu", copy=True) for k, v in out.items()}   # a copy: the buffers serve later rollouts


