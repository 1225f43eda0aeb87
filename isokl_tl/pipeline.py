"""The whole cell in a run directory: direction -> calibration -> alpha sweep -> pmass -> survival
-> figures -> summary. Each stage records a hash of its settings (which include every upstream
stage's) in the manifest; a stage whose hash and outputs are already there is skipped, so a rerun
resumes and changing, say, the death threshold reruns only survival and figures."""

import os
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from isokl_tl import files
from isokl_tl.activations import Record
from isokl_tl.calibrate import Calibration, calibrate
from isokl_tl.chat import prompt_ids
from isokl_tl.config import RunConfig
from isokl_tl.directions import Direction, compute_direction
from isokl_tl.batching import chunks
from isokl_tl.hooks import check_direction, resolve_hook
from isokl_tl.models import load_model
from isokl_tl.pmass import fork_pmass
from isokl_tl.prompts import load_pairs, load_prompts
from isokl_tl.rollout import Rollouts, Sampling, rollout
from isokl_tl.runs import Manifest, model_identity, settings_hash, versions, write_csv, write_json
from isokl_tl.survival import curves_frame, deaths, survival_table

KILL_ENV = "ISOKL_TL_KILL_AFTER"   # test hook: "stage:part" makes the process SIGKILL itself there
PMASS_ROWS_PER_PART = 16


def _fault_point(stage: str, part: int) -> None:
    if os.environ.get(KILL_ENV) == f"{stage}:{part}":
        os.kill(os.getpid(), signal.SIGKILL)


class Run:
    """A run directory with its config, the loaded model, and the stage functions.

    A directory made with other direction-stage settings (model, dtype, method, hook, layer, pairs,
    seed) is refused unless `force=True`, which discards every recorded stage."""

    def __init__(self, run_dir: str | Path, config: RunConfig, *, model: HookedTransformer | None = None,
                 progress: bool = True, log=print, force: bool = False):
        self.dir, self.cfg, self.progress, self.log = Path(run_dir), config, progress, log
        self.manifest = Manifest(self.dir)
        self._model = model
        self._checked: set[str] = set()
        saved = self.manifest.data.get("config")
        if saved:
            old = RunConfig.from_dict(saved).stage_settings("direction")
            new = config.stage_settings("direction")
            diff = [k for k in new if old.get(k) != new[k]]
            if diff and not force:
                k = diff[0]
                raise ValueError(f"run directory {str(self.dir)!r} was made with a different config "
                                 f"({k}: {old[k]!r} there, {new[k]!r} here); pass --force to overwrite "
                                 "it or choose another directory")
            if diff:
                self.manifest.data = {"stages": {}}
                shutil.rmtree(self.dir / ".partial", ignore_errors=True)

    @property
    def model(self) -> HookedTransformer:
        if self._model is None:
            self._model = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype)
        return self._model

    def _stage(self, stage: str, outputs: list[str], fn, force: bool = False) -> bool:
        settings = self.cfg.stage_settings(stage)
        key = settings_hash(settings)
        if not force and self.manifest.stage_current(stage, key, outputs):
            if stage not in self._checked:
                self.log(f"[{stage}] up to date, skipped")
            self._checked.add(stage)
            return False
        self.log(f"[{stage}] running ...")
        start = time.perf_counter()
        fn(key)
        secs = time.perf_counter() - start
        self.manifest.data["config"] = self.cfg.to_dict()
        self.manifest.record(stage, key, settings, secs)
        self.log(f"[{stage}] done in {secs:.1f}s")
        self._checked.add(stage)
        return True

    def begin(self) -> None:
        """Check what can be checked before any work (model, hook, answer words), then record
        the run."""
        resolve_hook(self.model, self.cfg.hook, self.cfg.layer)
        self.cfg.splice_spec().to_dict(self.model.tokenizer)
        if "model" not in self.manifest.data:
            self.manifest.set(model=model_identity(self.model))
        self.manifest.set(config=self.cfg.to_dict(), versions=versions(), seeds={"seed": self.cfg.seed})

    # --- stages ------------------------------------------------------------------------------
    def _vector(self, d: Direction):
        """The saved direction, checked against the model (size, dtype, finite)."""
        return check_direction(self.model, d.vector)

    def _partials(self, stage: str, key: str) -> Path:
        path = self.dir / ".partial" / f"{stage}-{key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def direction(self, force: bool = False) -> Direction:
        def go(key):
            hook = resolve_hook(self.model, self.cfg.hook, self.cfg.layer)
            compute_direction(self.model, load_pairs(self.cfg.pairs), hook, self.cfg.method,
                              seed=self.cfg.seed).save(self.dir)
        self._stage("direction", [files.DIRECTION_VECTOR, files.DIRECTION_META], go, force)
        return Direction.load(self.dir)

    def calibrate(self, force: bool = False) -> Calibration:
        d = self.direction()

        def go(key):
            self._vector(d)
            prompts = [prompt_ids(self.model.tokenizer, p)
                       for p in load_prompts(self.cfg.calib_prompts)[: self.cfg.n_calib]]
            cal = calibrate(self.model, d, prompts, self.cfg.calibration_settings(),
                            rows_per_batch=self.cfg.rows_per_batch, progress=self.progress)
            cal.save(self.dir)
            from isokl_tl.plots import plot_calibration, save_figure
            save_figure(plot_calibration(cal), self.dir / files.CALIBRATION_FIG)
        self._stage("calibrate", [files.CALIBRATION, files.CALIBRATION_FIG], go, force)
        return Calibration.load(self.dir)

    def rollout(self, force: bool = False) -> Rollouts:
        d, cal = self.direction(), self.calibrate()

        def go(key):
            # One batch of rows at a time, each saved as it finishes: a killed sweep loses at most
            # the batch in flight, and a rerun picks up the saved ones (part i is seeded seed + i).
            vector = self._vector(d)
            texts = load_prompts(self.cfg.prompts)[: self.cfg.n_prompts]
            ids = [prompt_ids(self.model.tokenizer, p) for p in texts]
            alphas = self.cfg.sweep_alphas()
            rows = [p for _ in alphas for p in ids]
            alpha = torch.tensor([a for a in alphas for _ in ids])
            index = torch.tensor([i for _ in alphas for i in range(len(ids))])
            parts_dir, parts = self._partials("rollout", key), []
            for i, sl in enumerate(chunks(len(rows), self.cfg.rows_per_batch)):
                part = parts_dir / f"{i:04d}"
                if not (part / files.ROLLOUTS_META).exists():
                    rollout(self.model, rows[sl], alpha[sl] * cal.c_star, direction=vector,
                            hook=d.hook, method=d.intervention, window=self.cfg.window,
                            generated_only=self.cfg.generated_only,
                            sampling=Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.seed + i),
                            rows_per_batch=self.cfg.rows_per_batch, prompt_index=index[sl],
                            alpha=alpha[sl], record=Record() if self.cfg.record_acts else None,
                            progress=self.progress).save(part)
                    _fault_point("rollout", i)
                parts.append(Rollouts.load(part))
            whole = Rollouts.concat(parts) if len(parts) > 1 else parts[0]
            whole.save(self.dir, self.model.tokenizer)
            shutil.rmtree(parts_dir)
        self._stage("rollout", [files.ROLLOUTS, files.ROLLOUTS_CSV, files.TEXTS], go, force)
        return Rollouts.load(self.dir)

    def pmass(self, force: bool = False) -> pd.DataFrame:
        d, r = self.direction(), self.rollout()

        def go(key):
            vector, splice = self._vector(d), self.cfg.splice_spec()
            parts_dir, frames = self._partials("pmass", key), []
            for i, sl in enumerate(chunks(r.n_rows, PMASS_ROWS_PER_PART)):
                part = parts_dir / f"{i:04d}.csv"
                if not part.exists():
                    pm = fork_pmass(self.model, r, vector, self.cfg.forks(), splice,
                                    rows=list(range(r.n_rows))[sl], progress=self.progress)
                    write_csv(part, pm.frame)
                    _fault_point("pmass", i)
                frames.append(pd.read_csv(part, float_precision="round_trip"))
            write_json(self.dir / files.SPLICE, splice.to_dict(self.model.tokenizer))
            write_csv(self.dir / files.PMASS, pd.concat(frames, ignore_index=True))
            shutil.rmtree(parts_dir)
        self._stage("pmass", [files.PMASS, files.SPLICE], go, force)
        return pd.read_csv(self.dir / files.PMASS, float_precision="round_trip")

    def survival(self, force: bool = False) -> pd.DataFrame:
        pm = self.pmass()

        def go(key):
            rule = self.cfg.death_rule()
            per_row = deaths(pm, rule)
            table, curves = survival_table(per_row, self.cfg.window, keep_weak=rule.keep_weak)
            for name, frame in ((files.SURVIVAL, per_row), (files.SURVIVAL_TABLE, table),
                                (files.KM_CURVES, curves_frame(curves))):
                write_csv(self.dir / name, frame)
        self._stage("survival", [files.SURVIVAL, files.SURVIVAL_TABLE, files.KM_CURVES], go, force)
        return pd.read_csv(self.dir / files.SURVIVAL_TABLE)

    def plot(self, force: bool = False) -> None:
        self.survival()

        def go(key):
            from isokl_tl.report import write_figures, write_summary
            write_figures(self.dir, self.cfg)
            write_summary(self.dir, self.cfg)
        self._stage("plot", list(files.FIGURES.values()) + [files.SUMMARY], go, force)

    def run_all(self) -> None:
        """Every stage in order; finished stages with matching settings are reused."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.begin()
        self.plot()
