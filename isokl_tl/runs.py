"""Run directories: the manifest (settings, versions, model identity, timings, command line),
stage bookkeeping, and atomic JSON writes."""

import hashlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from isokl_tl.files import MANIFEST


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def write_csv(path: Path, frame) -> None:
    write_atomic(path, lambda p: frame.to_csv(p, index=False))


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("isokl-tl", "torch", "transformer-lens", "numpy", "scikit-survival", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        here = Path(__file__).resolve().parent
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


@torch.no_grad()
def model_identity(model: HookedTransformer) -> dict:
    """Spec, shape, dtype/device and a hash of the weights (embeddings, unembedding, MLP matrices
    and norm weights: enough to tell checkpoints apart without hashing every byte)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if name.endswith(("W_E", "W_U", "W_in", "W_out", "w")):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    cfg = model.cfg
    return {"spec": cfg.model_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "d_vocab": cfg.d_vocab, "n_heads": cfg.n_heads, "dtype": str(cfg.dtype),
            "device": str(cfg.device), "weights_sha256": h.hexdigest()[:16]}


class Manifest:
    """`manifest.json` of a run directory; every stage records its settings hash and timing."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / MANIFEST
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def stage_current(self, stage: str, key: str, outputs: list[str]) -> bool:
        """True when `stage` finished with the same settings hash and its outputs exist."""
        rec = self.data["stages"].get(stage)
        return bool(rec and rec.get("key") == key and all((self.dir / o).exists() for o in outputs))

    def record(self, stage: str, key: str, settings: dict, seconds: float) -> None:
        self.data["stages"][stage] = {"key": key, "settings": settings, "seconds": round(seconds, 3),
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "command": " ".join(sys.argv)}
        self.save()

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data["command"] = " ".join(sys.argv)   # the latest; each stage keeps its own
        write_json(self.path, self.data)
