"""Steering directions from contrastive pairs, read at any hook point.

Each pair is (user turn, positive completion, negative completion). A completion is rendered as
the chat prompt (user turn + the opening of the assistant turn) followed by the completion's own
tokens, and the activation is read at the **last token of the completion text** — never at an
end-of-turn marker, which would carry the template rather than the contrast.

Methods:
- `mean_diff`: mean(pos) - mean(neg), normalised.
- `pca`: first principal axis of the paired differences pos_i - neg_i, **not centred** (centring
  would remove the mean contrast, the signal we want), oriented so that <v, mean_diff> > 0.
- `directional_ablation`: the mean_diff vector, applied by projection (`h - c (h.v) v`).
- `random`: a seeded random unit vector: the matched-dose control ("same KL, no meaning").

A vector made elsewhere (a file, an SAE feature: `isokl_tl.vectors`) becomes a direction through
`Direction.from_vector`, with method `external` (added) or `external_ablation`.
"""

import json
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.hooks import Steering, check_residual_hook, hook_layer, steer
from isokl_tl.manifest import DIRECTION_META as META_FILE
from isokl_tl.manifest import DIRECTION_VECTOR as VECTOR_FILE
from isokl_tl.manifest import write_atomic, write_json
from isokl_tl.prompts import ContrastPair
from isokl_tl.tokens import chunks, left_pad, pad_id, prompt_ids, text_ids

METHODS = ("mean_diff", "pca", "directional_ablation", "random")
# a vector made elsewhere (`Direction.from_vector`), added or ablated along
EXTERNAL = {"external": "add", "external_ablation": "ablate"}


def intervention(method: str) -> str:
    """How a direction method acts on the residual: `ablate` or `add`."""
    if method in EXTERNAL:
        return EXTERNAL[method]
    check_method(method)
    return "ablate" if method == "directional_ablation" else "add"


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown direction method {method!r}; choose one of {', '.join(METHODS)}")
    return method


@dataclass(frozen=True)
class Direction:
    """A unit steering vector with how it was made. `raw_norm` is the norm of the unnormalised
    vector (mean_diff: |mean(pos) - mean(neg)|; pca: RMS projection of the differences);
    `projection_gap` is (mean pos proj - mean neg proj) / pooled std; `resid_norm` is the median
    residual norm at the hook over the pairs' read positions (a natural scale for coefficients)."""

    vector: Float[Tensor, " d_model"]
    method: str
    hook: str
    raw_norm: float
    projection_gap: float
    resid_norm: float
    n_pairs: int
    model: str
    extra: dict = field(default_factory=dict)

    @property
    def intervention(self) -> str:
        """`add`, `ablate`, or `gated` (an additive direction added through the cosine gate,
        `isokl_tl.hooks.gate`: chosen per run, kept in `extra`)."""
        return self.extra.get("intervention") or intervention(self.method)

    @property
    def label(self) -> str:
        """The method as results name it: `mean_diff`, or `mean_diff (cosine-gated)` under the gate."""
        return self.method + (" (cosine-gated)" if self.intervention == "gated" else "")

    def gated(self) -> "Direction":
        """This additive direction, applied through the cosine gate (`h + c max(cos(h, v), 0) v`)."""
        if intervention(self.method) != "add":
            raise ValueError(f"the cosine gate scales an added direction; {self.method} is "
                             f"{intervention(self.method)}ed")
        return replace(self, extra={**self.extra, "intervention": "gated"})

    def negated(self) -> "Direction":
        """The opposite direction, -v (recorded as `extra["sign"]` = -1)."""
        return replace(self, vector=-self.vector, extra={**self.extra, "sign": -self.extra.get("sign", 1)})

    def steer(self, model: HookedTransformer, coeff: float | Float[Tensor, " batch"], *, start: int = 0
              ) -> AbstractContextManager[Steering]:
        """Steer `model` with this direction inside a `with` block (`isokl_tl.hooks.steer`):

        >>> with d.steer(model, 40.0):
        ...     logits = model(tokens)
        """
        return steer(model, self.hook, self.vector, coeff, method=self.intervention, start=start)

    @classmethod
    def from_vector(cls, vector: Float[Tensor, " d_model"], hook: str, model: HookedTransformer, *,
                    pairs: list[ContrastPair] | None = None, ablate: bool = False,
                    source: dict | None = None) -> "Direction":
        """A direction from a vector made elsewhere (an SAE feature, a probe, another library's
        control vector): checked against `model` (size, finite, non-zero), normalised, and
        measured like a built-in one over the contrastive `pairs` (default: the shipped set):
        the median residual norm at the hook (the search's first coefficient is a tenth of it)
        and how far the vector separates the pairs' positive and negative completions.
        `ablate`: project it out (`h - c (h.v) v`) instead of adding it. `source` (for example
        the file and its SHA-256, `isokl_tl.vectors`) is kept in `extra`."""
        from isokl_tl.hooks import check_direction
        from isokl_tl.prompts import load_pairs

        hook = check_residual_hook(model, hook)
        v = check_direction(model, vector).float().cpu()
        norm = float(v.norm())
        if norm == 0.0:
            raise ValueError("direction is the zero vector")
        v = v / norm
        pos, neg = pair_activations(model, pairs or load_pairs(), hook)
        resid_norm = float(torch.cat([pos, neg]).norm(dim=-1).median())
        return cls(vector=v, method="external_ablation" if ablate else "external", hook=hook, raw_norm=norm,
                   projection_gap=_gap(pos, neg, v), resid_norm=resid_norm, n_pairs=len(pos),
                   model=str(model.cfg.model_name), extra=dict(source or {}))

    def meta(self) -> dict:
        d = asdict(self)
        del d["vector"]
        return d

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        vector = {"vector": self.vector.detach().float().cpu().contiguous()}
        write_atomic(run_dir / VECTOR_FILE, lambda p: save_file(vector, str(p)))
        write_json(run_dir / META_FILE, self.meta())

    @classmethod
    def load(cls, run_dir: str | Path) -> "Direction":
        run_dir = Path(run_dir)
        if not (run_dir / VECTOR_FILE).exists():
            raise ValueError(f"{run_dir} has no {VECTOR_FILE}; run `isokl-tl direction` first")
        meta = json.loads((run_dir / META_FILE).read_text())
        return cls(vector=load_file(str(run_dir / VECTOR_FILE))["vector"], **meta)


@torch.no_grad()
def pair_activations(model: HookedTransformer, pairs: list[ContrastPair], hook: str, *,
                     batch_size: int = 16) -> tuple[Float[Tensor, "pair d_model"], Float[Tensor, "pair d_model"]]:
    """Residuals at `hook` at the last completion token, for positives and negatives."""
    hook = check_residual_hook(model, hook)
    tok = model.tokenizer
    seqs = []
    for p in pairs:
        head = prompt_ids(tok, p.user)
        seqs += [head + text_ids(tok, p.positive), head + text_ids(tok, p.negative)]
    layer = hook_layer(hook)
    stop = layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None
    acts = []
    for sl in chunks(len(seqs), batch_size):
        tokens, mask = left_pad(seqs[sl], pad_id(tok), model.cfg.device)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=hook,
                                        stop_at_layer=stop)
        acts.append(cache[hook][:, -1].float())  # left padding: the last column is the last token
    a = torch.cat(acts)
    return a[0::2], a[1::2]


def _gap(pos: Tensor, neg: Tensor, v: Tensor) -> float:
    pp, pn = pos @ v, neg @ v
    pooled = ((pp.var() + pn.var()) / 2).sqrt() if len(pp) > 1 else torch.tensor(float("nan"))
    return float((pp.mean() - pn.mean()) / pooled)


def compute_direction(model: HookedTransformer, pairs: list[ContrastPair], hook: str,
                      method: str = "mean_diff", *, seed: int = 0, resample: bool = False) -> Direction:
    """The direction of `method` at `hook` from the contrastive `pairs`. With `resample`, from a
    bootstrap resample of the pairs (as many, drawn with replacement, seeded by `seed`): directions
    of several seeds then show how much the direction owes to the particular pairs (a study's
    across-seed intervals). `seed` also seeds the random method."""
    check_method(method)
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 contrastive pairs, got {len(pairs)}")
    drawn = None
    if resample:
        drawn = np.random.default_rng(seed).integers(0, len(pairs), len(pairs)).tolist()
        pairs = [pairs[i] for i in drawn]
    pos, neg = pair_activations(model, pairs, hook)
    diffs = pos - neg
    mean_diff = diffs.mean(0)
    md_unit = mean_diff / mean_diff.norm()
    extra: dict = {}
    if method in ("mean_diff", "directional_ablation"):
        v, raw = md_unit, float(mean_diff.norm())
    elif method == "pca":
        _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
        v = vh[0] if vh[0] @ mean_diff > 0 else -vh[0]
        raw = float(s[0] / len(diffs) ** 0.5)
        extra = {"explained_fraction": float(s[0] ** 2 / (s ** 2).sum()),
                 "cos_with_mean_diff": float(v @ md_unit)}
    else:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(model.cfg.d_model, generator=g)
        v, raw = v / v.norm(), 1.0
        extra = {"seed": seed}
    if drawn is not None:
        extra = {**extra, "resampled_pairs": drawn, "resample_seed": seed}
    resid_norm = float(torch.cat([pos, neg]).norm(dim=-1).median())
    return Direction(vector=v.float().cpu(), method=method, hook=hook, raw_norm=raw,
                     projection_gap=_gap(pos, neg, v), resid_norm=resid_norm, n_pairs=len(pairs),
                     model=str(model.cfg.model_name), extra=extra)
