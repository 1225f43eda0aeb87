"""Hook names, and `steer()`: a scoped intervention at one TransformerLens hook point.

Two interventions, both exactly the identity at coefficient 0 (bit-identical logits):
- `add`:    h <- h + c * v
- `ablate`: h <- h - c * (h . v) v     (c = 1 removes the component along v; c > 1 reflects it)
"""

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

INTERVENTIONS = ("add", "ablate", "gated")
RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
# Hook points whose activation is [batch, pos, d_model]: where a d_model direction can act.
RESIDUAL_HOOKS = ("hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                  "hook_attn_out", "hook_mlp_out")


def hook_name(layer: int, site: str = "resid_post") -> str:
    """The TransformerLens name of a per-block hook, e.g. `blocks.8.hook_resid_post`."""
    return f"blocks.{layer}.hook_{site}"


def hook_layer(name: str) -> int | None:
    """The block index in a hook name, or None for hooks outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def default_layer(model: HookedTransformer) -> int:
    return int(0.6 * model.cfg.n_layers)


def resolve_hook(model: HookedTransformer, hook: str | None = None, layer: int | None = None) -> str:
    """Turn `--hook`/`--layer` into a checked hook name (default: the 60%-depth residual)."""
    if hook is not None and layer is not None:
        raise ValueError(f"give a hook ({hook!r}) or a layer ({layer}), not both")
    if hook is None:
        n = model.cfg.n_layers
        layer = default_layer(model) if layer is None else layer
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
        hook = hook_name(layer)
    return check_residual_hook(model, hook)


def check_residual_hook(model: HookedTransformer, hook: str) -> str:
    """A valid hook name whose activation is d_model wide (a residual-stream site)."""
    hook = check_hook_name(model, hook)
    if not hook.endswith(RESIDUAL_HOOKS):
        raise ValueError(f"hook {hook!r} is not a residual-stream site (its activation is not d_model "
                         f"wide); use a name ending in one of: {', '.join(RESIDUAL_HOOKS)}")
    return hook


def check_hook_name(model: HookedTransformer, hook: str) -> str:
    if hook in model.hook_dict:
        return hook
    layer = hook_layer(hook)
    if layer is not None and not 0 <= layer < model.cfg.n_layers:
        raise ValueError(
            f"hook {hook!r} names layer {layer}, out of range: this model has layers "
            f"0..{model.cfg.n_layers - 1}"
        )
    close = difflib.get_close_matches(hook, list(model.hook_dict), n=4, cutoff=0.6)
    hint = f"closest valid names: {', '.join(close)}" if close else "e.g. blocks.0.hook_resid_post"
    raise ValueError(f"unknown hook name {hook!r}; {hint}")


def check_direction(model: HookedTransformer, direction: Tensor) -> Float[Tensor, " d_model"]:
    """A finite floating vector of length d_model, returned in the model's dtype and device."""
    d = model.cfg.d_model
    if direction.ndim != 1 or direction.shape[0] != d:
        raise ValueError(f"direction has shape {tuple(direction.shape)}; expected ({d},) = (d_model,)")
    if not direction.is_floating_point():
        raise ValueError(f"direction has dtype {direction.dtype}; expected a floating-point tensor")
    if not torch.isfinite(direction).all():
        raise ValueError("direction contains NaN or inf")
    return direction.to(device=model.cfg.device, dtype=model.cfg.dtype)


def gate(resid: Float[Tensor, "batch pos d_model"], v: Float[Tensor, " d_model"]) -> Float[Tensor, "batch pos 1"]:
    """The cosine-gated intervention's gate: `max(cos(h, v), 0)` per position (0 for a zero
    residual), so `h + c g v` pushes along v only where h already leans that way, and more the
    more it does; `v` is a unit vector."""
    cos = (resid @ v)[..., None] / resid.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(resid.dtype).tiny)
    return cos.clamp_min(0)


class Steering:
    """The live state of one `steer()` block; the hook function itself.

    `coeff` may be replaced between forward passes (a float or one value per batch row).
    Positions are steered from absolute position `start` on (0: every position, prompt included).
    Callers that feed a KV cache set `offset` to the absolute position of the first column of the
    next forward pass; a plain full forward leaves it at 0.
    """

    def __init__(self, hook: str, direction: Tensor, coeff: float | Tensor, method: str, start: int):
        if method not in INTERVENTIONS:
            raise ValueError(f"intervention {method!r} is not one of {', '.join(INTERVENTIONS)}")
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        self.hook, self.direction, self.method, self.start = hook, direction, method, start
        self.coeff = coeff
        self.offset = 0
        self.calls = 0

    def _coeff(self, resid: Tensor) -> Tensor:
        c = self.coeff
        if not torch.is_tensor(c):
            return torch.full((resid.shape[0], 1, 1), float(c), dtype=resid.dtype, device=resid.device)
        if c.ndim != 1 or c.shape[0] != resid.shape[0]:
            raise ValueError(
                f"coefficient has shape {tuple(c.shape)} but the batch has {resid.shape[0]} rows"
            )
        return c.to(dtype=resid.dtype, device=resid.device)[:, None, None]

    def __call__(self, resid: Float[Tensor, "batch pos d_model"], hook: HookPoint
                 ) -> Float[Tensor, "batch pos d_model"]:
        self.calls += 1
        c = self._coeff(resid)
        if self.start > self.offset:
            positions = self.offset + torch.arange(resid.shape[1], device=resid.device)
            c = c * (positions >= self.start).to(resid.dtype)[None, :, None]
        v = self.direction
        if self.method == "add":
            return resid + c * v
        if self.method == "gated":          # add where the residual already points along v, as much as it does
            return resid + c * gate(resid, v) * v
        return resid - c * (resid @ v)[..., None] * v

    def select(self, rows: Tensor) -> None:
        """Keep the per-row coefficients of the rows that stay in the batch."""
        if torch.is_tensor(self.coeff):
            self.coeff = self.coeff[rows]


@contextmanager
def steer(model: HookedTransformer, hook: str, direction: Float[Tensor, " d_model"],
          coeff: float | Float[Tensor, " batch"], *, method: str = "add", start: int = 0
          ) -> Iterator[Steering]:
    """Steer `model` at `hook` inside the block; the hook is removed on exit, also on error.

    >>> with steer(model, "blocks.18.hook_resid_post", v, coeff=4.0) as s:
    ...     logits = model(tokens)
    """
    hook = check_residual_hook(model, hook)
    handle = Steering(hook, check_direction(model, direction), coeff, method, start)
    with model.hooks(fwd_hooks=[(hook, handle)]):
        yield handle


@dataclass(frozen=True)
class Site:
    """Where and how one direction acts: a hook point, a unit direction, an intervention."""

    hook: str
    direction: Tensor
    method: str = "add"


class SteeringGroup:
    """Several `Steering`s active in the same forward passes (one per site); callers that set
    `offset` or drop rows treat it like a single one."""

    def __init__(self, handles: list[Steering]):
        self.handles = handles

    @property
    def offset(self) -> int:
        return self.handles[0].offset

    @offset.setter
    def offset(self, value: int) -> None:
        for h in self.handles:
            h.offset = value

    def select(self, rows: Tensor) -> None:
        for h in self.handles:
            h.select(rows)


@contextmanager
def steer_sites(model: HookedTransformer, sites: list[Site], coeffs: list[Float[Tensor, " batch"]], *,
                start: int = 0) -> Iterator[SteeringGroup]:
    """Steer at several sites at once, site i with per-row coefficients `coeffs[i]`. A row meant for
    one site carries coefficient 0 at every other site, where steering is exactly the identity, so
    one batch can hold the rows of many sites (layers, directions, methods)."""
    if len(sites) != len(coeffs):
        raise ValueError(f"{len(sites)} sites but {len(coeffs)} coefficient vectors")
    handles = [Steering(check_residual_hook(model, s.hook), check_direction(model, s.direction), c,
                        s.method, start) for s, c in zip(sites, coeffs)]
    with model.hooks(fwd_hooks=[(h.hook, h) for h in handles]):
        yield SteeringGroup(handles)


def handles(steering: Steering | SteeringGroup | None) -> list[Steering]:
    """The `Steering`s of a steering block, one per site (none for None)."""
    if steering is None:
        return []
    return list(steering.handles) if isinstance(steering, SteeringGroup) else [steering]


@contextmanager
def rows_of(steering: Steering | SteeringGroup | None, rows: Int[Tensor, " keep"]) -> Iterator[None]:
    """Inside the block, per-row coefficients are those of these batch rows only (copies: for an
    eager pass, not a captured graph); the whole coefficients come back afterwards."""
    hs = handles(steering)
    kept = [h.coeff for h in hs]
    for h in hs:
        if torch.is_tensor(h.coeff):
            h.coeff = h.coeff[rows.to(h.coeff.device)]
    try:
        yield
    finally:
        for h, c in zip(hs, kept):
            h.coeff = c


@contextmanager
def first_rows(steering: Steering | SteeringGroup | None, n: int) -> Iterator[None]:
    """Inside the block, per-row coefficients are those of the batch's first `n` rows only: views
    of the same tensors (a captured CUDA graph reading them sees later in-place updates); the
    whole coefficients come back afterwards."""
    hs = handles(steering)
    kept = [h.coeff for h in hs]
    for h in hs:
        if torch.is_tensor(h.coeff):
            h.coeff = h.coeff[:n]
    try:
        yield
    finally:
        for h, c in zip(hs, kept):
            h.coeff = c
