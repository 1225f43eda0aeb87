"""What a user needs to know about a model before a long run: `check_model(spec)` loads it and
reports its architecture, its hook points, the default steering hook, the decode path it gets
(and why, when that is TransformerLens's own forward), and how exactly that path reproduces
TransformerLens's forward on a short steered sequence."""

from dataclasses import asdict, dataclass

import torch
from transformer_lens import HookedTransformer

from isokl_tl.engine import Decoder, decode_path
from isokl_tl.hooks import RESIDUAL_HOOKS, resolve_hook, steer


@dataclass(frozen=True)
class ModelCheck:
    spec: str
    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    dtype: str
    device: str
    hook_points: int                     # every TransformerLens hook point of the model
    residual_hooks: int                  # those where a d_model direction can act
    default_hook: str
    decode_path: str                     # "reference", or the fast decoder's name
    reason: str | None                   # why the reference path, or None
    parity_max_abs_logit_diff: float     # the decode path against one full forward, steered

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return "\n".join([
            f"model         {self.spec}",
            f"architecture  {self.architecture}: {self.n_layers} layers, d_model {self.d_model}, "
            f"d_vocab {self.d_vocab}, {self.dtype} on {self.device}",
            f"hook points   {self.hook_points} ({self.residual_hooks} residual-stream sites a direction can "
            "steer; `--hook NAME`)",
            f"default hook  {self.default_hook}",
            f"decode path   {self.decode_path}{why}",
            f"parity        max |logit difference| {self.parity_max_abs_logit_diff:.3g} against "
            "TransformerLens's forward on a steered 16-token sequence",
        ])


@torch.no_grad()
def decode_parity(model: HookedTransformer, hook: str, *, decoder: type[Decoder] | None = None, length: int = 16,
                  seed: int = 0) -> float:
    """Max |logit difference| between the model's decode path (or `decoder`: prefill half a random
    sequence, then one token per step) and one full forward of TransformerLens over it, both
    steered at `hook` by a random direction at a tenth of the hook's typical residual norm."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), generator=g).to(model.cfg.device)
    v = torch.randn(model.cfg.d_model, generator=g)
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    coeff = 0.1 * float(cache[hook].float().norm(dim=-1).median())
    half = length // 2
    with steer(model, hook, v / v.norm(), coeff) as s:
        full = model(tokens)[0, half - 1:length - 1].float()
        dec = (decoder or decode_path(model).decoder)(model, s, length)
        # copies: a fixed-shape decoder returns the same logits buffer at every step
        got = [dec.prefill(tokens[:, :half], torch.ones_like(tokens[:, :half]))[0].float().clone()]
        for t in range(half, length - 1):
            got.append(dec.step(tokens[:, t])[0].float().clone())
    return float((torch.stack(got) - full).abs().max())


def check_model(spec: str, *, device: str = "cpu", dtype: str = "float32") -> ModelCheck:
    from isokl_tl.models import load_model

    model = load_model(spec, device=device, dtype=dtype)
    path = decode_path(model)
    hook = resolve_hook(model)
    cfg = model.cfg
    return ModelCheck(
        spec=spec, architecture=str(cfg.original_architecture or "HookedTransformer"), n_layers=cfg.n_layers,
        d_model=cfg.d_model, d_vocab=cfg.d_vocab, dtype=str(cfg.dtype).removeprefix("torch."), device=device,
        hook_points=len(model.hook_dict), residual_hooks=sum(n.endswith(RESIDUAL_HOOKS) for n in model.hook_dict),
        default_hook=hook, decode_path=path.name, reason=path.reason,
        parity_max_abs_logit_diff=decode_parity(model, hook))
