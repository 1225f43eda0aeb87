"""The converted-weights cache: a GGUF file is dequantised and converted to TransformerLens
weights once, and every later load reads the result.

Each GGUF file gets a directory under `cache_dir()`, named by the file's stem, a cheap identity of
its bytes (`_file_key`) and the cache's format version: `weights.safetensors` (float32),
`config.json` (the `HookedTransformerConfig` fields) and `tokenizer/`. A load in another dtype
reads a copy cast to it, written beside the float32 weights at its first load. Both weights
files are written under a temporary name and renamed into place, the float32 ones after the config
and tokenizer: a directory that holds them is complete.
"""

import hashlib
import json
import os
from pathlib import Path

import platformdirs
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformer_lens import HookedTransformerConfig

from isokl_tl.models.gguf import read_gguf
from isokl_tl.models.hf_dir import load_hf_dir


def cache_dir() -> Path:
    """Where converted weights live: $ISOKL_TL_CACHE, else the user cache dir."""
    return Path(os.environ.get("ISOKL_TL_CACHE") or platformdirs.user_cache_dir("isokl-tl"))


def _file_key(path: Path) -> str:
    """A cheap identity for a weights file: size, and hashes of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


_CACHE_FORMAT = 2      # bump when the conversion changes what the cache holds


def load_gguf(path: Path, n_ctx: int, dtype: torch.dtype, device: str = "cpu"
              ) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor], object]:
    """A GGUF file's model: converted once (`_convert`) into the cache, then read from there
    straight onto `device` and cast there."""
    from transformers import AutoTokenizer

    root = cache_dir() / f"{path.stem}-{_file_key(path)}-v{_CACHE_FORMAT}"
    weights, config, tok_dir = root / "weights.safetensors", root / "config.json", root / "tokenizer"
    if not (weights.exists() and config.exists() and tok_dir.exists()):
        _convert(path, root)
    cfg_dict = json.loads(config.read_text())
    cfg_dict.update(n_ctx=min(n_ctx, cfg_dict["n_ctx"]), dtype=dtype)
    cfg = HookedTransformerConfig(**cfg_dict)
    with safe_open(str(_weights_in(weights, dtype)), framework="pt", device=str(torch.device(device))) as f:
        sd = {k: f.get_tensor(k).to(dtype) for k in f.keys()}      # one tensor at a time, on the device
    return cfg, sd, AutoTokenizer.from_pretrained(tok_dir)


def _weights_in(weights: Path, dtype: torch.dtype) -> Path:
    """The cached float32 `weights`, or for another dtype their copy cast to it beside them
    (written at the first load in that dtype): a bfloat16 load then reads half the bytes and
    casts nothing. A cast is exact and deterministic (round to nearest even), so the copy holds
    the values casting at load time would give."""
    if dtype == torch.float32:
        return weights
    copy = weights.with_name(f"weights.{str(dtype).removeprefix('torch.')}.safetensors")
    if not copy.exists():
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            cast = {k: f.get_tensor(k).to(dtype).contiguous() for k in f.keys()}
        tmp = copy.with_name(copy.name + f".{os.getpid()}.tmp")
        save_file(cast, str(tmp))
        tmp.replace(copy)                   # whole or absent, whoever else loads meanwhile
    return copy


def _convert(path: Path, root: Path) -> None:
    """Dequantise `path` into a Hugging Face checkpoint (`models.gguf`), load that as any local
    checkpoint is loaded, and keep the TransformerLens weights (float32), config and tokenizer."""
    import tempfile

    from transformers import AutoTokenizer

    hf_cfg, hf_sd = read_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with tempfile.TemporaryDirectory(prefix="isokl-gguf-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_cfg))
        save_file(hf_sd, str(Path(tmp) / "model.safetensors"))
        del hf_sd
        tokenizer.save_pretrained(tmp)
        cfg, sd, _ = load_hf_dir(Path(tmp), torch.float32)
    root.mkdir(parents=True, exist_ok=True)
    tmp_weights = root / "weights.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_weights))
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "config.json").write_text(json.dumps(_config_fields(cfg), indent=1))
    tmp_weights.replace(root / "weights.safetensors")


def _config_fields(cfg: HookedTransformerConfig) -> dict:
    """The fields that rebuild `cfg` (dtype, device and the temporary tokenizer path aside)."""
    import dataclasses

    skip = {"dtype", "device", "tokenizer_name", "n_params"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.init and f.name not in skip and _jsonable(getattr(cfg, f.name))}


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False
