"""One decode step's choice and scoring of steered rows against their base partners.

At every decode step the rollout engine needs, for each steered row, the next token (the steered
argmax, or a sample under `Sampling`), KL(P_steered || P_base), the steered log-probability of
that token, whether the base model's argmax agrees, and the base model's log-probability of the
token (its surprisal, negated); it records them into the rollout's result
buffers (`Scores`). For greedy decoding on CUDA (with Triton) that is one kernel that reads each
row's logits once, in their own dtype, never writes a float32 copy of the [batch, d_vocab]
logits, and writes the records itself (`engine.kernels.score`); elsewhere it is the plain PyTorch
arithmetic, which is also the reference the kernel is tested against.

KL is computed in float32 as  sum_i p_i (x_i - y_i) - logsumexp(x) + logsumexp(y)  for steered
logits x and base logits y; a row scored against itself gets exactly 0.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def first_max(x: Float[Tensor, "*batch d_vocab"]) -> Int[Tensor, " *batch"]:
    """The index of each row's largest value, the first one where several tie: `argmax(-1)`, in
    about a third of its time on the CPU (torch's `max` over a dimension is vectorised there).
    A NaN counts as the largest value, as in `argmax`."""
    return x.max(-1).indices


def kl_from_logprobs(steered: Float[Tensor, "*batch d_vocab"], base: Float[Tensor, "*batch d_vocab"]
                     ) -> Float[Tensor, "*batch"]:
    """KL between two normalised log-distributions over the last axis."""
    return (steered.exp() * (steered - base)).sum(-1)


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def choose(logp: Float[Tensor, "batch d_vocab"], sampling: Sampling,
           u: Float[Tensor, " batch"] | None) -> Int[Tensor, " batch"]:
    """The next token of each row: the argmax, or a sample (temperature, nucleus) by inverting
    each row's cumulative distribution at its own uniform number `u` (so a row's token depends on
    its own draw only, not on which other rows are still in the batch)."""
    if sampling.greedy:
        return first_max(logp)
    probs = torch.softmax(logp.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    cdf = probs.cumsum(-1)
    at = (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, at, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def row_scores(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"],
               choose: Callable[[Tensor], Tensor] | None = None
               ) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"],
                          Bool[Tensor, " batch"], Float[Tensor, " batch"]]:
    """(next token, KL, log-probability of the next token, base argmax agrees, the base model's
    log-probability of the next token) per steered row.

    Rows 0..batch-1 of `logits` are the steered rows; row i is scored against row `base_row[i]`
    (its base partner, or i itself for a row that is its own base). `choose` maps the steered
    log-probabilities to the next tokens (default: argmax)."""
    b = len(base_row)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ls, lb = logp[:b], logp[base_row]
    nxt = first_max(ls) if choose is None else choose(ls)
    return (nxt, kl_from_logprobs(ls, lb), ls.gather(-1, nxt[:, None])[:, 0], first_max(lb) == nxt,
            lb.gather(-1, nxt[:, None])[:, 0])


def greedy_scores_torch(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"]
                        ) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"],
                                   Bool[Tensor, " batch"], Float[Tensor, " batch"]]:
    """`row_scores` with the argmax as next token: the reference for the Triton kernel."""
    return row_scores(logits, base_row)


def greedy_scores(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"]
                  ) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"],
                             Bool[Tensor, " batch"], Float[Tensor, " batch"]]:
    """`greedy_scores_torch`, as one Triton kernel on CUDA when Triton is installed."""
    if logits.is_cuda and triton_available():
        from isokl_tl.engine.kernels.score import greedy_scores_triton

        return greedy_scores_triton(logits, base_row)
    return greedy_scores_torch(logits, base_row)


def record_torch(nxt: Int[Tensor, " batch"], kl: Float[Tensor, " batch"], lp: Float[Tensor, " batch"],
                 agree: Bool[Tensor, " batch"], base_lp: Float[Tensor, " batch"], st: dict) -> Int[Tensor, " rows"]:
    """Record one step's scores at column `st["col"]` of a rollout's result buffers (`st["out"]`:
    tokens, kl, logprob, base_agree, base_logprob [batch, window]; gen_len, eos [batch]): rows already finished
    get -1 / NaN / False and stop counting; rows whose token is an EOS id (`st["eos_ids"]`) are
    finished from now on. Returns the next token of every row of the forward batch, the base
    partners' included (`st["next"]`: the steered rows, then the partners of rows `st["has"]`)."""
    out, col = st["out"], st["col"]
    alive = ~out["eos"]
    out["tokens"].index_copy_(1, col, torch.where(alive, nxt, -1)[:, None])
    out["kl"].index_copy_(1, col, torch.where(alive, kl, float("nan"))[:, None])
    out["logprob"].index_copy_(1, col, torch.where(alive, lp, float("nan"))[:, None])
    out["base_agree"].index_copy_(1, col, (alive & agree)[:, None])
    out["base_logprob"].index_copy_(1, col, torch.where(alive, base_lp, float("nan"))[:, None])
    out["gen_len"].add_(alive.long())
    out["eos"].logical_or_(torch.isin(nxt, st["eos_ids"]))
    st["next"][:len(nxt)] = nxt
    st["next"][len(nxt):] = nxt[st["has"]]
    return st["next"]


def greedy_record(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"], st: dict
                  ) -> Int[Tensor, " rows"]:
    """`record_torch` of `greedy_scores`; on CUDA with Triton the scoring kernel writes the
    records itself (no launch per buffer)."""
    if logits.is_cuda and triton_available():
        from isokl_tl.engine.kernels.score import greedy_record_triton

        return greedy_record_triton(logits, base_row, st)
    return record_torch(*greedy_scores_torch(logits, base_row), st)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def base_rows(paired: Bool[Tensor, " batch"], device) -> Int[Tensor, " batch"]:
    """Where each row's base distribution is: its partner (after all rows, in order) or itself."""
    rows = torch.arange(len(paired))
    rows[paired] = len(paired) + torch.arange(int(paired.sum()))
    return rows.to(device)


class Scores:
    """The records of one batch being decoded, in device buffers that the scoring writes at a
    device-side column index (so a captured step can write them): per row and generated token the
    token, KL, log-probability and base agreement; per row the generated length and whether it
    ended at EOS. Also what the scoring reads: which rows have a partner (`has`), where each row's
    base distribution is (`base_row`, `partner_at`), the EOS ids, the next tokens of the whole
    forward batch (`next`). `buffers` is the dict the Triton kernel takes."""

    def __init__(self, buffers: dict):
        self.buffers = buffers

    @property
    def col(self) -> Tensor:
        return self.buffers["col"]

    @property
    def has(self) -> Tensor:
        return self.buffers["has"]

    @property
    def base_row(self) -> Tensor:
        return self.buffers["base_row"]

    @classmethod
    def ready(cls, kept: "Scores | None", paired: Bool[Tensor, " batch"], window: int,
              eos: Int[Tensor, " eos"]) -> "Scores":
        """Cleared buffers for a batch: `kept`'s, in place, when their shapes match (a kept
        decoder's captured graph writes into the very tensors it was captured with), else new."""
        b, dev = len(paired), eos.device
        pairing = _pairing(paired, dev)
        st = None if kept is None else kept.buffers
        if st is None or st["out"]["kl"].shape != (b, window) or st["has"].shape != pairing["has"].shape \
                or st["eos_ids"].shape != eos.shape or st["out"]["kl"].device != dev:
            st = {"out": _records(b, window, dev), "eos_ids": eos.clone(),
                  "col": torch.empty(1, dtype=torch.long, device=dev),      # the column t being written
                  **{k: v.clone() for k, v in pairing.items()}}
        _clear(st["out"])
        st["col"].zero_()
        st["eos_ids"].copy_(eos)
        for k, v in pairing.items():             # in place: a captured graph reads these tensors
            st[k].copy_(v)
        return cls(st)

    def empty_records(self) -> dict[str, Tensor]:
        """CPU records for the whole batch, as padding (token -1, KL and log-prob NaN): per row and
        generated token `tokens`, `kl`, `logprob`, `base_agree`, `base_logprob`; per row `gen_len`, `eos`."""
        b, window = self.buffers["out"]["kl"].shape
        return _clear(_records(b, window, "cpu"))

    def all_done(self) -> bool:
        return bool(self.buffers["out"]["eos"].all())

    def move_out(self, which: Bool[Tensor, " batch"], rows: Int[Tensor, " batch"], final: dict) -> None:
        """Copy the records of the batch rows `which` to `final`, at their rows `rows[which]`."""
        for name, v in self.buffers["out"].items():
            final[name][rows[which]] = v[which.to(v.device)].cpu()

    def narrow(self, keep: Int[Tensor, " keep"], paired: Bool[Tensor, " keep"]) -> None:
        """Keep the records of these batch rows only (`paired`: which of them have partners)."""
        st, dev = self.buffers, self.col.device
        st["out"] = {name: v[keep.to(dev)] for name, v in st["out"].items()}
        st.update(_pairing(paired, dev))

    def collect(self, final: dict[str, Tensor], rows: Int[Tensor, " batch"]) -> dict[str, Tensor]:
        """`final` with the records of the rows still in the batch added: every row's records."""
        self.move_out(torch.ones(len(rows), dtype=torch.bool), rows, final)
        return final


def _pairing(paired: Bool[Tensor, " batch"], device) -> dict[str, Tensor]:
    """What the scoring reads about partners: which rows have one (`has`), where each row's base
    distribution is (`base_row`: its partner's batch row, or itself), each row's partner or -1
    (`partner_at`), and room for the next tokens of the whole forward batch (`next`)."""
    b = len(paired)
    has = paired.nonzero()[:, 0].to(device)
    partner_at = torch.full((b,), -1, dtype=torch.long, device=device).index_copy_(
        0, has, b + torch.arange(len(has), device=device))
    return {"has": has, "base_row": base_rows(paired, device), "partner_at": partner_at,
            "next": torch.empty(b + len(has), dtype=torch.long, device=device)}


def _records(b: int, window: int, device) -> dict[str, Tensor]:
    return {"tokens": torch.empty((b, window), dtype=torch.long, device=device),
            "kl": torch.empty((b, window), device=device), "logprob": torch.empty((b, window), device=device),
            "base_agree": torch.empty((b, window), dtype=torch.bool, device=device),
            "base_logprob": torch.empty((b, window), device=device),
            "gen_len": torch.empty(b, dtype=torch.long, device=device),
            "eos": torch.empty(b, dtype=torch.bool, device=device)}


def _clear(out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Padding everywhere: token -1, KL and log-prob NaN (never 0), nothing generated."""
    out["tokens"].fill_(-1)
    out["kl"].fill_(float("nan"))
    out["logprob"].fill_(float("nan"))
    out["base_logprob"].fill_(float("nan"))
    for name in ("base_agree", "gen_len", "eos"):
        out[name].zero_()
    return out
