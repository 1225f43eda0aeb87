"""`Rollouts`: the result of a batch of steered rollouts, and its files in a run directory."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from isokl_tl.activations import Activations
from isokl_tl.files import ACTIVATIONS, ROLLOUTS, ROLLOUTS_CSV, ROLLOUTS_META, TEXTS
from isokl_tl.runs import write_atomic, write_csv, write_json


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
    def save(self, run_dir: str | Path, tokenizer=None) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.__dict__.items() if torch.is_tensor(v)}
        tensors["base_agree"] = tensors["base_agree"].to(torch.uint8)
        tensors["eos"] = tensors["eos"].to(torch.uint8)
        write_atomic(run_dir / ROLLOUTS, lambda p: save_file(tensors, str(p)))
        meta = {"hook": self.hook, "method": self.method, "start": self.start}
        write_json(run_dir / ROLLOUTS_META, meta)
        write_csv(run_dir / ROLLOUTS_CSV, self.to_frame())
        if self.acts is not None:
            self.acts.save(run_dir)
        else:                                    # no stale recording from an earlier run
            (run_dir / ACTIVATIONS).unlink(missing_ok=True)
        if tokenizer is not None:
            lines = [json.dumps(r) for r in self.texts(tokenizer)]
            write_atomic(run_dir / TEXTS, lambda p: p.write_text("\n".join(lines) + "\n"))

    @classmethod
    def load(cls, run_dir: str | Path) -> "Rollouts":
        run_dir = Path(run_dir)
        if not (run_dir / ROLLOUTS).exists():
            raise ValueError(f"{run_dir} has no {ROLLOUTS}; run `isokl-tl rollout` first")
        t = load_file(str(run_dir / ROLLOUTS))
        t["base_agree"], t["eos"] = t["base_agree"].bool(), t["eos"].bool()
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
        })

    def texts(self, tokenizer) -> list[dict]:
        out = []
        for i in range(self.n_rows):
            _, gen = self.row_ids(i)
            out.append({"row": i, "prompt": int(self.prompt_index[i]), "alpha": float(self.alpha[i]),
                        "coeff": float(self.coeff[i]), "eos": bool(self.eos[i]),
                        "gen_len": int(self.gen_len[i]), "text": tokenizer.decode(gen)})
        return out
