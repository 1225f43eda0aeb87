"""Run directories: the names of their files, the manifest (settings, versions, model identity,
timings, command line), stage bookkeeping, and atomic writes."""

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

# --- file names inside a run directory (one place, so every stage agrees) --------------------
MANIFEST = "manifest.json"
DIRECTION_VECTOR = "direction.safetensors"
DIRECTION_META = "direction.json"
CALIBRATION = "calibration.json"
CALIBRATION_NEGATIVE = "calibration_negative.json"   # -v's, when a run calibrates both signs
CALIBRATION_FIG = "calibration.png"
ROLLOUTS = "rollouts.safetensors"       # every tensor of a sweep, for torch
ROLLOUTS_META = "rollouts.json"
ROLLOUTS_CSV = "rollouts.csv"           # long format: one row per generated token, for pandas
TEXTS = "texts.jsonl"                   # decoded text of every rollout
ACTIVATIONS = "activations.safetensors"  # --record-acts: per-hook summaries (+ whole residuals)
ACTIVATIONS_META = "activations.json"
PMASS = "pmass.csv"                     # long format: one row per (rollout, fork)
SPLICE = "splice.json"
SURVIVAL = "survival.csv"               # one row per rollout: time, event, alpha, ...
SURVIVAL_TABLE = "survival_table.csv"
SURVIVAL_META = "survival.json"          # the window and whether weak prompts were kept
KM_CURVES = "km_curves.csv"
COHERENCE = "coherence.csv"             # per generated token: repetition and compression (`isokl_tl.coherence`)
SIGNALS = "signals.csv"                 # per rollout and death signal: time, event
THRESHOLD_SWEEP = "threshold_sweep.csv"  # `isokl-tl survival --threshold-sweep`: the table under other death rules
THRESHOLD_SWEEP_MD = "threshold_sweep.md"
THRESHOLD_SWEEP_FIG = "threshold_sweep.png"
SUMMARY = "summary.md"
ANSWERS = "answers.csv"                 # per alpha: is the preferred answer right (known answers only)
TRANSFER = "calibration_transfer.json"  # the calibration statistic on the held-out rollouts at alpha 1
LAYERS_TABLE = "layers.csv"             # `isokl-tl layers`: one row per layer
LAYERS_PROPAGATION = "layers_propagation.csv"
LAYERS_MARKDOWN = "layers.md"
LAYERS_FIGURE = "layers.png"
FIGURES = {
    "spaghetti": "kl_spaghetti.png",
    "normalised": "kl_spaghetti_normalised.png",
    "survival": "survival.png",
    "dose_response": "dose_response.png",
    "aggregate": "aggregate.png",
    "calibration": CALIBRATION_FIG,
}
# what each stage of a run writes (a stage is current only when all of them are there)
STAGE_OUTPUTS = {"direction": [DIRECTION_VECTOR, DIRECTION_META],
                 "calibrate": [CALIBRATION, CALIBRATION_FIG],
                 "rollout": [ROLLOUTS, ROLLOUTS_CSV, TEXTS],
                 "pmass": [PMASS, SPLICE],
                 "survival": [SURVIVAL, SURVIVAL_TABLE, KM_CURVES, SURVIVAL_META, COHERENCE, SIGNALS],
                 "plot": list(FIGURES.values()) + [SUMMARY]}


def check_writable(directory: str | Path) -> Path:
    """Raise ValueError (one line) unless `directory` is, or can be made, a writable directory;
    creates nothing."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"cannot use {str(d)!r} as a run directory: it is a file")
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot create {str(d)!r}: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(probe) else "permission denied"
        raise ValueError(f"cannot write to {str(probe)!r}: {why}")
    return d


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
    for pkg in ("isokl-tl", "torch", "transformer-lens", "numpy", "transformers"):
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


IDENTITY_SAMPLE = 1 << 16       # entries hashed per weight matrix, on an even grid through all of it


@torch.no_grad()
def model_identity(model: HookedTransformer) -> dict:
    """Spec, shape, dtype/device and a hash of the weights: of the embeddings, unembedding, MLP
    matrices and norm weights, about `IDENTITY_SAMPLE` entries of each on an even grid through
    it (another checkpoint or a fine-tune of the whole model moves nearly every entry; a change to a
    few rows, such as a handful of added token embeddings, can fall between the grid's rows; hashing
    every byte takes a second per 100M parameters). Runs made before session 12 hashed every entry,
    so their `weights_sha256` differs for the same weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if name.endswith(("W_E", "W_U", "W_in", "W_out", "w")):
            per_dim = math.ceil(IDENTITY_SAMPLE ** (1 / max(p.dim(), 1)))
            grid = p.detach()[tuple(slice(None, None, max(1, -(-n // per_dim))) for n in p.shape)]
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(grid.float().cpu().contiguous().numpy().tobytes())     # a view: whatever the layout
    cfg = model.cfg
    return {"spec": cfg.model_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "d_vocab": cfg.d_vocab, "n_heads": cfg.n_heads, "dtype": str(cfg.dtype),
            "device": str(cfg.device), "weights_sha256": h.hexdigest()[:16],
            "weights_hashed": f"an even grid of about {IDENTITY_SAMPLE} entries of each matrix"}


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

    def made_with_other(self, config, force: bool) -> bool:
        """Whether the config saved here differs from `config` (a `RunConfig`) in a direction-stage
        setting, so that the run starts over. Unless `force`, raises ValueError where it differs, or
        where this version refuses the saved config (negative alphas, ...)."""
        saved = self.data.get("config")
        if not saved:
            return False
        try:
            old = type(config).from_dict(saved).stage_settings("direction")
        except ValueError as e:
            if not force:
                raise ValueError(f"run directory {str(self.dir)!r} was made with settings this version "
                                 f"refuses ({e}); pass --force to overwrite it, or use another --out") from None
            return True
        new = config.stage_settings("direction")
        diff = [k for k in new if old.get(k) != new[k]]
        if diff and not force:
            k = diff[0]
            raise ValueError(f"run directory {str(self.dir)!r} was made with a different config "
                             f"({k}: {old[k]!r} there, {new[k]!r} here); pass --force to overwrite "
                             "it or choose another directory")
        return bool(diff)

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data["command"] = " ".join(sys.argv)   # the latest; each stage keeps its own
        write_json(self.path, self.data)
