"""Fork pmass: can the steered model still answer a forced true/false prefill at token t?

At each fork t of a rollout, the *steered* model (same coefficient) reads
`prompt + rollout[:t] + splice` and we record the probability mass on the answer tokens (`pmass`),
the share of it on the true set (`p_true`), and the argmax token. The splice
(`isokl_tl.splice`) asks for the answer, ending the assistant turn or going on inside it.

Two ways to the same numbers. `ForkReader` reads the forks *while the rollout decodes*
(`rollout(forks=...)`): at each fork token the splice runs on top of the row's own KV cache as a
side branch (`engine.Decoder.fork`), so no prefix is ever run twice; the run's sweep does this.
`fork_pmass` is the reference, for finished rollouts (and other splices later): the prefix
`prompt + rollout` of each row is run once into a KV cache, and the forks of that row are one
batch whose rows all read that cache (an expanded view, never a stored copy) with the columns past
their fork masked out, so every fork tail gets its true rotary positions. Either way, a fork past a
row's end (EOS) is censored: not evaluated. A fork at exactly the generated length sees every
generated token (the EOS token itself is not part of the content a splice follows).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from isokl_tl.engine import Forks
from isokl_tl.hooks import steer
from isokl_tl.manifest import PMASS, SPLICE, write_csv, write_json
from isokl_tl.rollout import Rollouts
from isokl_tl.splice import Splice, answer_token_sets
from isokl_tl.thinking import open_at, thinking_report
from isokl_tl.tokens import chunks, pad_id

COLUMNS = ["row", "prompt", "alpha", "coeff", "fork", "pmass", "p_true", "argmax"]


def fork_schedule(window: int, every: int | None = None, n_log: int | None = None) -> list[int]:
    """Fork tokens: every `every` tokens (0, k, 2k, ..., window) or `n_log` log-spaced ones;
    both always include 0 and the window end."""
    if window <= 0:
        raise ValueError(f"window must be a positive number of tokens, got {window}")
    if (every is None) == (n_log is None):
        raise ValueError("give exactly one of fork-every and fork-log")
    if every is not None:
        if every <= 0:
            raise ValueError(f"fork-every must be a positive number of tokens, got {every}")
        forks = set(range(0, window + 1, every))
    else:
        if n_log < 2:
            raise ValueError(f"fork-log needs at least 2 forks, got {n_log}")
        def log_spaced(n: int) -> set[int]:
            return {int(round(x)) for x in np.geomspace(1, window, n - 1)} | {0, window}
        forks = log_spaced(n_log)
        if len(forks) < n_log:          # the first ones round to the same token: say so, never fewer silently
            most = max(n for n in range(2, n_log) if len(log_spaced(n)) == n)
            raise ValueError(f"fork-log {n_log} over a {window}-token window rounds some forks onto the same "
                             f"token ({len(forks)} distinct); ask for at most {most}, or use fork-every")
    return sorted(forks | {0, window})


@dataclass
class ForkPMass:
    """Fork pmass in long format (`frame`: one row per evaluated fork: row, prompt, alpha, coeff,
    fork, pmass, p_true, argmax), the fork schedule, and the splice as run (with its rendered text
    and answer token ids)."""

    frame: pd.DataFrame
    forks: list[int]
    splice: dict = field(default_factory=dict)

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / SPLICE, {**self.splice, "forks": list(self.forks)})
        write_csv(run_dir / PMASS, self.frame)

    @classmethod
    def load(cls, run_dir: str | Path) -> "ForkPMass":
        run_dir = Path(run_dir)
        if not (run_dir / PMASS).exists():
            raise ValueError(f"{run_dir} has no {PMASS}; run `isokl-tl pmass` first")
        splice = json.loads((run_dir / SPLICE).read_text())
        frame = pd.read_csv(run_dir / PMASS, float_precision="round_trip")
        forks = splice.pop("forks") if "forks" in splice else sorted(set(frame.fork))
        return cls(frame, forks, splice)

    def noting_thinking(self, rollouts: Rollouts, tokenizer) -> "ForkPMass":
        """These forks with the count of those inside an open thinking block in their splice
        (`thinking.thinking_report`; nothing added for a model without the markers)."""
        report = thinking_report(self.frame, rollouts, tokenizer, self.splice)
        return ForkPMass(self.frame, self.forks, {**self.splice, "thinking": report} if report else self.splice)

    @staticmethod
    def concat(parts: list["ForkPMass"]) -> "ForkPMass":
        return ForkPMass(pd.concat([p.frame for p in parts], ignore_index=True), parts[0].forks, parts[0].splice)


@torch.no_grad()
def fork_pmass(model: HookedTransformer, rollouts: Rollouts, direction: Float[Tensor, " d_model"],
               forks: list[int], splice: Splice = Splice(), *, rows: list[int] | None = None,
               rows_per_prefill: int = 8, progress: bool = False) -> ForkPMass:
    """Fork pmass of every rollout row (or of `rows` only; the frame keeps the global row ids)."""
    tok = model.tokenizer
    true_ids, false_ids = answer_token_sets(tok, splice.true_words, splice.false_words)
    tails = [torch.tensor(ids, dtype=torch.long, device=model.cfg.device) for ids in splice.tails(tok)]
    markers = splice.markers(tok)
    answer = torch.tensor(true_ids + false_ids, device=model.cfg.device)
    n_true = len(true_ids)
    content = rollouts.gen_len - rollouts.eos.long()   # the EOS token is not content
    width = rollouts.prompt.shape[1]
    records = []
    todo = list(range(rollouts.n_rows)) if rows is None else list(rows)
    bar = tqdm(total=len(todo), desc="pmass", unit="rollout", disable=not progress, leave=False)
    try:
        for sl in chunks(len(todo), rows_per_prefill):
            batch = todo[sl]
            sl = torch.tensor(batch)
            g = max(1, int(content[sl].max()))
            gen = rollouts.tokens[sl, :g].clamp(min=0)
            gen_mask = (torch.arange(g)[None, :] < content[sl][:, None]).long()
            tokens = torch.cat([rollouts.prompt[sl], gen], 1).to(model.cfg.device)
            tokens[:, width:][gen_mask == 0] = pad_id(tok)
            mask = torch.cat([rollouts.prompt_mask[sl], gen_mask], 1).to(model.cfg.device)
            coeff = rollouts.coeff[sl]
            start = width if rollouts.start == "generated" else 0
            cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(batch))
            with steer(model, rollouts.hook, direction, coeff, method=rollouts.method, start=start):
                model(tokens, attention_mask=mask, past_kv_cache=cache)
            for j, r in enumerate(batch):
                ts = [t for t in forks if t <= int(content[r])]
                k = len(ts)
                fork_cache = TransformerLensKeyValueCache(
                    entries=[type(e)(past_keys=e.past_keys[j:j + 1].expand(k, -1, -1, -1),
                                     past_values=e.past_values[j:j + 1].expand(k, -1, -1, -1),
                                     frozen=True) for e in cache.entries],
                    previous_attention_mask=mask[j:j + 1].repeat(k, 1), frozen=True)
                for i, t in enumerate(ts):
                    fork_cache.previous_attention_mask[i, width + t:] = 0
                reads = []                 # per splice (the cache is frozen: each reads it as it was)
                for tail in tails:
                    with steer(model, rollouts.hook, direction, coeff[j].repeat(k), method=rollouts.method,
                               start=start) as s:
                        s.offset = tokens.shape[1]
                        logits = model(tail.expand(k, -1), attention_mask=torch.ones(k, len(tail), dtype=torch.long,
                                       device=model.cfg.device), past_kv_cache=fork_cache)[:, -1]
                    reads.append(answer_mass(logits, answer, n_true))
                pick = (open_at(rollouts.prompt[r:r + 1], rollouts.prompt_mask[r:r + 1], rollouts.tokens[r:r + 1],
                                ts, markers)[0].astype(int) if markers is not None else np.zeros(k, dtype=int))
                for i, t in enumerate(ts):
                    pm, pt, top = reads[pick[i]]
                    records.append({"row": r, "prompt": int(rollouts.prompt_index[r]),
                                    "alpha": float(rollouts.alpha[r]), "coeff": float(rollouts.coeff[r]),
                                    "fork": t, "pmass": float(pm[i]), "p_true": float(pt[i]),
                                    "argmax": int(top[i])})
                bar.update(1)
    finally:
        bar.close()
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    return ForkPMass(frame=frame, forks=list(forks), splice=splice.to_dict(tok))


def answer_mass(logits: Float[Tensor, "batch d_vocab"], answer: Int[Tensor, " answer"], n_true: int
                ) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """pmass (probability on the answer tokens `answer`, the first `n_true` of them the true
    set), p_true (the true set's share of it) and the argmax, in float32."""
    probs = torch.softmax(logits.float(), dim=-1)
    mass = probs[:, answer]
    pm = mass.sum(-1)
    return pm, mass[:, :n_true].sum(-1) / pm, probs.argmax(-1)


class ForkReader:
    """Fork pmass read while a rollout decodes: pass it as `rollout(..., forks=reader)`, then
    `reader.result(rollouts)` gives the same `ForkPMass` as `fork_pmass` on those rollouts (tests
    hold them to 1e-5 in float32), without running any prefix again."""

    def __init__(self, model: HookedTransformer, forks: list[int], splice: Splice = Splice()):
        tok = model.tokenizer
        true_ids, false_ids = answer_token_sets(tok, splice.true_words, splice.false_words)
        self.forks, self.splice = list(forks), splice.to_dict(tok)
        self.tails = tuple(torch.tensor(ids, dtype=torch.long, device=model.cfg.device) for ids in splice.tails(tok))
        self.markers = splice.markers(tok)
        self.answer = torch.tensor(true_ids + false_ids, device=model.cfg.device)
        self.n_true = len(true_ids)
        self.reads: list[tuple[int, int, Tensor, Tensor, Tensor, Tensor]] = []

    def at_rows(self, offset: int) -> Forks:
        """The engine's fork settings for a batch whose row 0 is rollout row `offset`."""
        def read(t: int, rows: Tensor, which: int, logits: Tensor) -> None:   # kept on the device: no wait
            pm, pt, top = answer_mass(logits, self.answer, self.n_true)
            self.reads.append((t, which, rows.cpu() + offset, pm, pt, top))
        return Forks(tuple(self.forks), self.tails, read)

    def result(self, rollouts: Rollouts) -> ForkPMass:
        """The forks read for these rollouts, censored past each row's content, in `fork_pmass`'s
        order; where two splices were read, each fork keeps the one its rollout needs."""
        content = (rollouts.gen_len - rollouts.eos.long()).tolist()
        inside = (open_at(rollouts.prompt, rollouts.prompt_mask, rollouts.tokens, self.forks, self.markers)
                  if self.markers is not None else np.zeros((rollouts.n_rows, len(self.forks)), dtype=bool))
        col = {t: i for i, t in enumerate(self.forks)}
        self.reads = [(t, w, rows, pm.cpu(), pt.cpu(), top.cpu()) for t, w, rows, pm, pt, top in self.reads]
        records = [{"row": int(r), "prompt": int(rollouts.prompt_index[r]), "alpha": float(rollouts.alpha[r]),
                    "coeff": float(rollouts.coeff[r]), "fork": t, "pmass": float(pm[i]), "p_true": float(pt[i]),
                    "argmax": int(top[i])}
                   for t, w, rows, pm, pt, top in self.reads for i, r in enumerate(rows.tolist())
                   if t <= content[r] and w == int(inside[r, col[t]])]
        frame = pd.DataFrame.from_records(records, columns=COLUMNS)
        frame = frame.sort_values(["row", "fork"], kind="stable", ignore_index=True)
        return ForkPMass(frame=frame, forks=list(self.forks), splice=self.splice)


READ_UNDER = "read_under.json"   # beside fork reads saved during a sweep: the pmass settings they were read under


def save_reads(reads: ForkPMass, where: str | Path, key: str) -> None:
    """Fork pmass read during a sweep, saved with the hash of the pmass settings it was read under."""
    reads.save(where)
    write_json(Path(where) / READ_UNDER, {"pmass": key})


def load_reads(where: str | Path, key: str, row_offset: int = 0) -> ForkPMass | None:
    """The fork reads saved in `where` if they were read under the pmass settings `key` (their
    rows shifted by `row_offset`), else None."""
    where = Path(where)
    if not (where / READ_UNDER).exists() or json.loads((where / READ_UNDER).read_text()).get("pmass") != key:
        return None
    pm = ForkPMass.load(where)
    return ForkPMass(pm.frame.assign(row=pm.frame.row + row_offset), pm.forks, pm.splice) if row_offset else pm
