"""Steering vectors made elsewhere: read from a file, or a feature of a sparse autoencoder.

- `.safetensors`, `.pt`/`.pth`, `.npy`: one vector (a 1-D tensor, or a 2-D one with a single row);
  a file holding several tensors needs `key`.
- `.gguf`: a llama.cpp control vector (tensors `direction.N`: llama.cpp adds `direction.N` to
  the output of block N, counted from 0, and never has one for block 0), so the vector is the
  one for the hook's block (`blocks.N.hook_resid_post`).
- an SAE directory in SAELens's format (`cfg.json` + `sae_weights.safetensors`): row `feature` of
  the decoder `W_dec` (`d_sae x d_in`), at the hook its config names.

Every reader returns the vector as float32 and a description of where it came from, with the
file's SHA-256, which `Direction.from_vector` keeps.
"""

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from isokl_tl.manifest import DIRECTION_META

FORMATS = (".safetensors", ".pt", ".pth", ".npy", ".gguf")
SAE_FILES = ("cfg.json", "sae_weights.safetensors")


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (remembered per path, size and modification time: runs ask often)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one(tensors: dict, path: Path, key: str | None) -> tuple[Tensor, str]:
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{path} has no tensor {key!r}; it holds {', '.join(sorted(tensors)) or 'none'}")
        return tensors[key], key
    if len(tensors) != 1:
        raise ValueError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:8])}); "
                         "name one with --direction-key")
    (name, t), = tensors.items()
    return t, name


def _control_vector(path: Path, layer: int | None) -> tuple[Tensor, str]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    if field is None or field.contents() != "controlvector":
        raise ValueError(f"{path} is not a llama.cpp control vector (general.architecture "
                         f"{field.contents() if field else None!r})")
    tensors = {t.name: t for t in reader.tensors}
    if layer is None:
        raise ValueError(f"{path} is a control vector: steer at a block's output (--layer or a "
                         "blocks.L.hook_resid_post hook) to choose its layer")
    name = f"direction.{layer}"
    if name not in tensors:
        held = sorted(int(n.split(".")[1]) for n in tensors if n.startswith("direction."))
        raise ValueError(f"{path} has no vector for block {layer} ({name}); it has blocks {held}")
    return torch.from_numpy(np.array(tensors[name].data, dtype=np.float32)), name


def read_vector(path: str | Path, *, key: str | None = None,
                layer: int | None = None) -> tuple[Float[Tensor, " d"], dict]:
    """The vector in `path` (see the module docstring); `layer` picks a control vector's block."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"direction file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"direction file {path.name!r}: unknown format; give one of {', '.join(FORMATS)}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            t, name = _one(load_file(str(path)), path, key)
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            t, name = _one(obj, path, key) if isinstance(obj, dict) else (obj, None)
        elif suffix == ".npy":
            t, name = torch.from_numpy(np.load(path, allow_pickle=False)), None
        else:
            t, name = _control_vector(path, layer)
    except ValueError:
        raise
    except Exception as e:           # a corrupt or foreign file: one line, not a traceback
        raise ValueError(f"direction file {path.name!r} could not be read as {suffix}: "
                         f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(t, Tensor):
        raise ValueError(f"direction file {path.name!r} holds a {type(t).__name__}, not a tensor")
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise ValueError(f"direction file {path.name!r}: expected one vector, got a tensor of shape {tuple(t.shape)}")
    return t.float(), {"source": str(path), "key": name, "sha256": file_sha256(path)}


def read_sae_feature(sae_dir: str | Path, feature: int) -> tuple[Float[Tensor, " d"], str, dict]:
    """Decoder row `feature` of a SAELens-format SAE, its hook, and where it came from."""
    from safetensors import safe_open

    sae_dir = Path(sae_dir).expanduser()
    missing = [f for f in SAE_FILES if not (sae_dir / f).is_file()]
    if missing:
        raise ValueError(f"{str(sae_dir)!r} is not a SAELens SAE directory: no {' or '.join(missing)}")
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    if not hook:
        raise ValueError(f"{sae_dir / 'cfg.json'} names no hook_name")
    weights = sae_dir / "sae_weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        if "W_dec" not in f.keys():
            raise ValueError(f"{weights} has no W_dec (the decoder); it holds {', '.join(f.keys())}")
        w_dec = f.get_slice("W_dec")
        n_features = w_dec.get_shape()[0]
        if not 0 <= feature < n_features:
            raise ValueError(f"feature {feature} is out of range: the SAE has {n_features} features")
        row = w_dec[feature:feature + 1][0].float()
    return row, hook, {"source": str(sae_dir), "feature": feature, "sha256": file_sha256(weights),
                       "sae_d_sae": n_features, "sae_d_in": int(cfg.get("d_in", row.shape[0]))}


def run_vector(model, cfg) -> tuple[Float[Tensor, " d"], str, dict]:
    """The vector a run's settings name (`cfg`: a `RunConfig` with `direction_file` or `sae`), its
    hook (the SAE's, or `--hook`/`--layer` resolved on `model`), and where it came from."""
    from isokl_tl.hooks import hook_layer, resolve_hook

    if cfg.sae is not None:
        vector, hook, source = read_sae_feature(cfg.sae, cfg.feature)
        if (cfg.hook or cfg.layer is not None) and resolve_hook(model, cfg.hook, cfg.layer) != hook:
            raise ValueError(f"the SAE reads {hook}; drop --hook/--layer or give that hook")
        return vector, hook, source
    hook = resolve_hook(model, cfg.hook, cfg.layer)
    layer = hook_layer(hook) if hook.endswith("hook_resid_post") else None
    vector, source = read_vector(cfg.direction_file, key=cfg.direction_key, layer=layer)
    return vector, hook, source



def source_changed(source: Path | None, run_dir: str | Path) -> bool:
    """Whether the file a run's direction was read from (`RunConfig.direction_source`) is still
    there but is no longer the file whose hash the run saved."""
    meta = Path(run_dir) / DIRECTION_META
    if source is None or not source.is_file() or not meta.exists():
        return False
    saved = json.loads(meta.read_text()).get("extra", {}).get("sha256")
    return saved is not None and saved != file_sha256(source)
