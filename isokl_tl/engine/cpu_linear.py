"""Float32 matrix multiplies of the CPU decode path through oneDNN, with each weight packed once.

On CPU, `F.linear` runs MKL's sgemm, which packs the weight matrix on every call; for the few rows
of a decode step that dominates, and on this project's machines (AMD EPYC, AVX-512) it streams the
weights at 4.5-7 GB/s of a measured 32 GB/s. oneDNN's linear over a weight reordered once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, the pair
PyTorch's own compiler emits for frozen CPU models) does the same float32 products 2-5x faster
(`benchmarks/bench_cpu_step.py`). Results agree with `F.linear` to float32 rounding, not bit for bit.

Packed copies live on the model (`packer(model)`), one per weight (a second copy of the weights in
memory), so a weight is packed once and not per rollout. A copy is keyed by the weight's storage,
offset, shape and strides and checked against its version counter: an in-place edit of a parameter
(or of the block it is a view of) packs it again. An edit through `.data` bypasses that counter:
after one, call `packer(model).packed.clear()`. Only weights stored in the model's own parameters
are packed; anything else (a weight computed on the fly) goes through `F.linear`.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

BATCH_HINT = 16          # the row count oneDNN lays the packed weights out for (any count works)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Packer:
    """oneDNN-packed copies of a model's float32 CPU weights, made on first use."""

    def __init__(self):
        self.storages: set[int] = set()
        self.packed: dict[tuple, tuple[int, Tensor, object]] = {}

    def refresh(self, model: torch.nn.Module) -> None:
        """Note the model's parameter storages now; drop packed copies of storages it no longer
        uses. (Each entry holds its storage, so an address cannot be reused under a live key.)"""
        self.storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.packed = {k: v for k, v in self.packed.items() if k[0] in self.storages}

    def linear(self, x: Float[Tensor, "*batch d_in"], w: Float[Tensor, "d_out d_in"],
               b: Float[Tensor, " d_out"] | None = None) -> Float[Tensor, "*batch d_out"]:
        """F.linear(x, w, b)."""
        if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
                or w.untyped_storage().data_ptr() not in self.storages):
            return F.linear(x, w, b)
        key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
        hit = self.packed.get(key)
        if hit is None or hit[0] != w._version:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), BATCH_HINT)
            hit = (w._version, packed, w.untyped_storage())
            self.packed[key] = hit
        return torch.ops.mkldnn._linear_pointwise(x, hit[1], None if b is None else b.detach(), "none", [], "")


def packer(model: torch.nn.Module) -> Packer | None:
    """The model's `Packer` (created on first call, refreshed on every call), or None where oneDNN
    is unavailable or the model is not a float32 CPU model."""
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu" or not available():
        return None
    if getattr(model, "_isokl_packer", None) is None:
        object.__setattr__(model, "_isokl_packer", Packer())
    model._isokl_packer.refresh(model)
    return model._isokl_packer
