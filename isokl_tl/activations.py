"""Activations recorded along rollouts: `rollout(..., record=Record())`.

While a rollout decodes, TransformerLens hooks read chosen residual-stream hook points (a names
filter, as in `run_with_cache`) at the position that predicts each generated token, the same
position whose next-token distribution gives that token's KL. For every recorded hook and token:

- `proj`:  <h, v>, the steered row's activation projected on the steering direction;
- `norm`:  ||h||;
- `delta`: ||h_steered - h_base||, where the base activation comes from the row's base partner,
  which is fed the same tokens in the same batch (rows at coefficient 0 are their own base: 0).

Hooks named in `Record.full` are also kept whole ([row, window, d_model], float16 by default).
At a hook *before* the steering site `delta` is 0 (up to the rounding of a matmul in another batch
row); at the steering site of an additive method it is |c|, and after it, it shows how the perturbation grows or decays with depth.
The recorder hooks are registered after the steering hook, so at the steering site they read the
residual the steering hook produced.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.hooks import check_residual_hook, hook_layer
from isokl_tl.manifest import ACTIVATIONS, ACTIVATIONS_META, write_atomic, write_json

NamesFilter = str | list[str] | tuple[str, ...] | Callable[[str], bool]


def every_resid_post(name: str) -> bool:
    return name.endswith("hook_resid_post")


@dataclass(frozen=True)
class Record:
    """What to record. `names`: hook names (a name, a list, or a predicate; default every
    `blocks.L.hook_resid_post`). `full`: hooks to keep whole, in `dtype` ("steering" stands for
    the steering hook)."""

    names: NamesFilter = every_resid_post
    full: tuple[str, ...] = ("steering",)
    dtype: torch.dtype = torch.float16

    def hooks(self, model: HookedTransformer, steering_hooks: list[str]) -> tuple[list[str], list[str]]:
        f = self.names
        if isinstance(f, str):
            chosen = [f]
        elif isinstance(f, (list, tuple)):
            chosen = list(f)
        else:
            chosen = [n for n in model.hook_dict if f(n)]
        full = list(dict.fromkeys(h for n in self.full for h in (steering_hooks if n == "steering" else [n])))
        chosen = [check_residual_hook(model, n) for n in dict.fromkeys(chosen + full)]
        if not chosen:
            raise ValueError("the names filter matches no hook point of this model")
        order = list(model.hook_dict)
        return sorted(chosen, key=order.index), full


@dataclass
class Activations:
    """Recorded activations of a batch of rows (NaN past each row's end, like `Rollouts.kl`)."""

    hooks: list[str]
    proj: Float[Tensor, "row hook window"]
    norm: Float[Tensor, "row hook window"]
    delta: Float[Tensor, "row hook window"]
    full: dict[str, Float[Tensor, "row window d_model"]]

    @staticmethod
    def concat(parts: list["Activations"]) -> "Activations":
        return Activations(parts[0].hooks, *(torch.cat([getattr(p, k) for p in parts])
                                             for k in ("proj", "norm", "delta")),
                           {h: torch.cat([p.full[h] for p in parts]) for h in parts[0].full})

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        tensors = {"proj": self.proj, "norm": self.norm, "delta": self.delta}
        tensors.update({f"full.{h}": t.contiguous() for h, t in self.full.items()})
        write_atomic(run_dir / ACTIVATIONS, lambda p: save_file(tensors, str(p)))
        write_json(run_dir / ACTIVATIONS_META, {"hooks": self.hooks, "full": list(self.full)})

    @classmethod
    def load(cls, run_dir: str | Path) -> "Activations":
        run_dir = Path(run_dir)
        if not (run_dir / ACTIVATIONS).exists():
            raise ValueError(f"{run_dir} has no {ACTIVATIONS}; roll out with --record-acts first")
        t = load_file(str(run_dir / ACTIVATIONS))
        meta = json.loads((run_dir / ACTIVATIONS_META).read_text())
        return cls(meta["hooks"], t["proj"], t["norm"], t["delta"],
                   {h: t[f"full.{h}"] for h in meta["full"]})

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (rollout row, hook, generated token)."""
        ok = ~torch.isnan(self.norm)
        r, h, t = (a.numpy() for a in ok.nonzero(as_tuple=True))
        hooks = np.array(self.hooks)
        layers = np.array([hook_layer(n) if hook_layer(n) is not None else -1 for n in self.hooks])
        return pd.DataFrame({"row": r, "hook": hooks[h], "layer": layers[h], "t": t,
                             "proj": self.proj.numpy()[r, h, t], "norm": self.norm.numpy()[r, h, t],
                             "delta": self.delta.numpy()[r, h, t]})


class Recorder:
    """The hooks that fill an `Activations` for one chunk of rows. The decode loop calls `at()`
    before each forward pass to say which rows are in the batch and which have a base partner."""

    def __init__(self, model: HookedTransformer, spec: Record, sites: list, site: Tensor, window: int):
        rows = len(site)
        self.hooks, full = spec.hooks(model, [s.hook for s in sites])
        # each row's own steering direction, for the projection
        self.v = torch.stack([s.direction.float() for s in sites])[site].to(model.cfg.device)
        nan = torch.full((rows, len(self.hooks), window), float("nan"))
        self.proj, self.norm, self.delta = nan, nan.clone(), nan.clone()
        self.full = {h: torch.full((rows, window, model.cfg.d_model), float("nan"), dtype=spec.dtype)
                     for h in full}
        self.t, self.active, self.has = 0, torch.arange(rows), torch.arange(0)

    def at(self, t: int, active: Tensor, has: Tensor) -> None:
        self.t, self.active, self.has = t, active.cpu(), has

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        return [(name, self._hook(i, name)) for i, name in enumerate(self.hooks)]

    def _hook(self, i: int, name: str):
        def read(act: Tensor, hook) -> None:
            h = act[:, -1].float()
            n = len(self.active)
            steered = h[:n]
            delta = torch.zeros(n, device=h.device)
            if len(self.has) and h.shape[0] > n:    # below a shared prefix partners are not apart
                delta[self.has] = (steered[self.has] - h[n:]).norm(dim=-1)
            rows, t = self.active, self.t
            self.proj[rows, i, t] = (steered * self.v[rows.to(h.device)]).sum(-1).cpu()
            self.norm[rows, i, t] = steered.norm(dim=-1).cpu()
            self.delta[rows, i, t] = delta.cpu()
            if name in self.full:
                self.full[name][rows, t] = act[:n, -1].to(self.full[name].dtype).cpu()
        return read

    def result(self, gen_len: Tensor) -> Activations:
        past = torch.arange(self.proj.shape[-1])[None, :] >= gen_len[:, None]   # [row, window]
        for t in (self.proj, self.norm, self.delta):
            t.masked_fill_(past[:, None, :], float("nan"))
        for t in self.full.values():
            t.masked_fill_(past[:, :, None], float("nan"))
        return Activations(self.hooks, self.proj, self.norm, self.delta, self.full)
