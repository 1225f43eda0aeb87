"""`Run`: the whole cell in a run directory: direction -> calibration -> alpha sweep -> pmass ->
survival -> figures -> summary.

Each stage records a hash of its settings (which include every upstream stage's) in the manifest;
a stage whose hash and outputs are already there is skipped, so a rerun resumes and changing, say,
the death threshold reruns only survival and figures. Long stages save their work in parts under
`.partial/` as they go; the parts are keyed by the stage's settings and by the execution settings
that cut them (`RunConfig.EXECUTION`, `isokl_tl.parts`), so a resumed stage reuses only parts cut
the same way.
`check()` reads every input a run will need before any stage runs.
"""

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
from transformer_lens import HookedTransformer

from isokl_tl import manifest as files  # the run directory's file names
from isokl_tl.activations import Record
from isokl_tl.answers import flip_deaths
from isokl_tl.calibrate import Calibration, CalibrationError, calibrate_many, load_calibrations
from isokl_tl.coherence import deaths_by_signal, dying_by, rollout_signals, unsteered_levels, unsteered_warnings
from isokl_tl.config import RunConfig
from isokl_tl.directions import Direction, compute_direction
from isokl_tl.engine import Sampling, batch_rows
from isokl_tl.hooks import check_direction, resolve_hook
from isokl_tl.inputs import calibration_ids, check_inputs
from isokl_tl.manifest import Manifest, model_identity, settings_hash, versions, write_csv
from isokl_tl.models import load_model
from isokl_tl.parts import fault_point, parts_folder
from isokl_tl.pmass import ForkPMass, ForkReader, fork_pmass, load_reads, save_reads
from isokl_tl.prompts import known_answers, load_pairs, load_prompts
from isokl_tl.rollout import Rollouts, rollout
from isokl_tl.sweep import sweep_rows
from isokl_tl.survival import SurvivalTable, deaths, survival_table, threshold_sweep
from isokl_tl.tokens import batch_decoder, chunks, prompt_ids
from isokl_tl.vectors import run_vector, source_changed

PMASS_ROWS_PER_PART = 16
FORKS = ".forks"     # fork pmass read while the sweep decoded, with the pmass settings it was read under


class Run:
    """A run directory with its config, the loaded model, and the stage functions.

    A directory made with other direction-stage settings (model, dtype, method, hook, layer, pairs,
    seed) is refused unless `force=True`, which discards every recorded stage."""

    def __init__(self, run_dir: str | Path, config: RunConfig, *, model: HookedTransformer | None = None,
                 progress: bool = True, log=print, force: bool = False):
        self.dir, self.cfg, self.progress, self.log = Path(run_dir), config, progress, log
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"run directory {str(self.dir)!r} is a file, not a directory")
        self.manifest = Manifest(self.dir)
        self._model = model
        self._checked: set[str] = set()
        self._force = False
        if self.manifest.made_with_other(config, force):   # forget the recorded stages; their files go at `begin`
            self.manifest.data = {"stages": {}}
            self._force = True

    @property
    def model(self) -> HookedTransformer:
        if self._model is None:
            self._model = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype)
        return self._model

    # --- before any work ---------------------------------------------------------------------
    def check(self, stages: tuple[str, ...] = ("direction", "calibrate", "rollout", "pmass")) -> None:
        """Every input the given stages will need, before anything is written (`inputs.check_inputs`)."""
        check_inputs(self, stages)

    def begin(self) -> None:
        """Record the run (model identity, config, versions); a forced rerun starts afresh."""
        if self._force:
            shutil.rmtree(self.dir / ".partial", ignore_errors=True)
            self._force = False
        if "model" not in self.manifest.data:
            self.manifest.set(model=model_identity(self.model))
        self.manifest.set(config=self.cfg.to_dict(), versions=versions(), seeds={"seed": self.cfg.seed})

    # --- bookkeeping -------------------------------------------------------------------------
    def current(self, stage: str) -> bool:
        """Whether `stage` finished with these settings and its files are all there (and, for a
        direction read from a file that is still there, the file is the one it was read from)."""
        outputs = files.STAGE_OUTPUTS[stage] + ([files.CALIBRATION_NEGATIVE] if stage == "calibrate" and self.cfg.sign == "both"
                                         else [])
        return self.manifest.stage_current(stage, settings_hash(self.cfg.stage_settings(stage)),
                                           outputs) and not source_changed(self.cfg.direction_source(), self.dir)

    def _stage(self, stage: str, fn, force: bool = False) -> bool:
        settings = self.cfg.stage_settings(stage)
        key = settings_hash(settings)
        if not force and self.current(stage):
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

    def _vector(self, d: Direction):
        """The saved direction, checked against the model (size, dtype, finite)."""
        return check_direction(self.model, d.vector)

    def _external_direction(self) -> Direction:
        """The direction of `--direction FILE` or `--sae DIR --feature N`."""
        vector, hook, source = run_vector(self.model, self.cfg)
        return Direction.from_vector(vector, hook, self.model, pairs=load_pairs(self.cfg.pairs),
                                     ablate=self.cfg.method == "directional_ablation", source=source)

    # --- stages ------------------------------------------------------------------------------
    def direction(self, force: bool = False) -> Direction:
        def go(key):
            if self.cfg.external:
                d = self._external_direction()
            else:
                hook = resolve_hook(self.model, self.cfg.hook, self.cfg.layer)
                d = compute_direction(self.model, load_pairs(self.cfg.pairs), hook, self.cfg.method, seed=self.cfg.seed,
                                      resample=self.cfg.resample_pairs)
            (d.gated() if self.cfg.gate else d).save(self.dir)
        self._stage("direction", go, force)
        return Direction.load(self.dir)

    def calibrate(self, force: bool = False) -> Calibration:
        """The calibration of the run's first sign (`calibrations()` gives every sign's)."""
        d = self.direction()

        def go(key):
            self._vector(d)
            prompts = calibration_ids(self.model, self.cfg)
            signed = [d if sign == 1 else d.negated() for sign in self.cfg.signs()]
            cals = calibrate_many(self.model, signed, prompts, self.cfg.calibration_settings(),
                                  rows_per_batch=self.cfg.batch_rows, progress=self.progress)
            for cal in cals:
                if isinstance(cal, CalibrationError):
                    raise cal
            cals[0].save(self.dir)
            if len(cals) > 1:
                cals[1].save(self.dir, files.CALIBRATION_NEGATIVE)
            else:
                (self.dir / files.CALIBRATION_NEGATIVE).unlink(missing_ok=True)
            from isokl_tl.plots import plot_calibration, save_figure
            save_figure(plot_calibration(cals[0]), self.dir / files.CALIBRATION_FIG)
        self._stage("calibrate", go, force)
        return Calibration.load(self.dir)

    def calibrations(self) -> dict[int, Calibration]:
        """Every calibrated sign's calibration: {+1: v's, -1: -v's}."""
        self.calibrate()
        return load_calibrations(self.dir)

    def rollout(self, force: bool = False) -> Rollouts:
        d, cals = self.direction(), self.calibrations()

        def go(key):
            # One batch of rows at a time, each saved as it finishes: a killed sweep loses at most
            # the batch in flight, and a rerun picks up the saved ones (part i is seeded seed + i).
            vector = self._vector(d)
            texts = load_prompts(self.cfg.prompts)[: self.cfg.n_prompts]
            ids = [prompt_ids(self.model.tokenizer, p) for p in texts]
            sweep = sweep_rows(ids, self.cfg.sweep_alphas(), cals)
            rows = sweep.prompts
            # fork pmass is read as the sweep decodes (`pmass.ForkReader`), for the pmass stage to
            # take if its settings are still these then (not while recording activations)
            inline = self.cfg.inline_forks and not self.cfg.record_acts
            pmass_key = settings_hash(self.cfg.stage_settings("pmass"))
            tail = len(self.cfg.splice_spec().token_ids(self.model.tokenizer)) if inline else 0
            per_batch = self.cfg.batch_rows or batch_rows(self.model, rows, self.cfg.window, tail)   # cuts the parts
            cut = replace(self.cfg, rows_per_batch=per_batch)
            parts_dir, parts, forked = parts_folder(self.dir, cut, "rollout", key, self.log), [], []
            for i, sl in enumerate(chunks(len(rows), per_batch)):
                part = parts_dir / f"{i:04d}"
                if not (part / files.ROLLOUTS_META).exists():
                    reader = ForkReader(self.model, self.cfg.forks(), self.cfg.splice_spec()) if inline else None
                    done = rollout(self.model, rows[sl], sweep.coeff[sl], direction=vector,
                                   hook=d.hook, method=d.intervention, window=self.cfg.window,
                                   generated_only=self.cfg.generated_only,
                                   sampling=Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.seed + i),
                                   rows_per_batch=per_batch, prompt_index=sweep.index[sl],
                                   alpha=sweep.alpha[sl], record=Record() if self.cfg.record_acts else None,
                                   forks=reader, progress=self.progress)
                    if reader is not None:
                        save_reads(reader.result(done), part, pmass_key)
                    # its metadata marks the part complete; the CSV waits for the whole sweep
                    done.save(part, long_format=False)
                    fault_point("rollout", i)
                parts.append(Rollouts.load(part))
                forked.append(load_reads(part, pmass_key, sl.start))     # None: read under other settings
            whole = Rollouts.concat(parts) if len(parts) > 1 else parts[0]
            whole.save(self.dir, self.model.tokenizer)
            shutil.rmtree(self.dir / FORKS, ignore_errors=True)
            if all(f is not None for f in forked):
                save_reads(ForkPMass.concat(forked), self.dir / FORKS, pmass_key)
            shutil.rmtree(parts_dir)
        self._stage("rollout", go, force)
        return Rollouts.load(self.dir)

    def pmass(self, force: bool = False) -> ForkPMass:
        d, r = self.direction(), self.rollout()

        def go(key):
            read = load_reads(self.dir / FORKS, key) if self.cfg.inline_forks and not force else None
            if read is not None:
                self.log("[pmass] read while the sweep decoded")
                return read.noting_thinking(r, self.model.tokenizer).save(self.dir)
            vector, splice = self._vector(d), self.cfg.splice_spec()
            parts_dir, parts = parts_folder(self.dir, self.cfg, "pmass", key, self.log), []
            for i, sl in enumerate(chunks(r.n_rows, PMASS_ROWS_PER_PART)):
                part = parts_dir / f"{i:04d}"
                if not (part / files.PMASS).exists():
                    fork_pmass(self.model, r, vector, self.cfg.forks(), splice,
                               rows=list(range(r.n_rows))[sl], progress=self.progress).save(part)
                    fault_point("pmass", i)
                parts.append(ForkPMass.load(part))
            ForkPMass.concat(parts).noting_thinking(r, self.model.tokenizer).save(self.dir)
            shutil.rmtree(parts_dir)
        self._stage("pmass", go, force)
        return ForkPMass.load(self.dir)

    def survival(self, force: bool = False) -> SurvivalTable:
        pm = self.pmass()

        def go(key):
            rule = self.cfg.death_rule()
            by_pmass = deaths(pm.frame, rule)
            r = self.rollout()
            signals, recorded = rollout_signals(r, batch_decoder(self.model.tokenizer))
            flips = flip_deaths(pm.frame, known_answers(self.cfg.prompts)[: self.cfg.n_prompts])
            by_signal = deaths_by_signal(signals, by_pmass, self.cfg.coherence_thresholds(), flips,
                                         text_signals=recorded)
            per_row = dying_by(by_signal, by_pmass, self.cfg.death_signal)
            # the table first: where it raises (every prompt weak under this rule), nothing is written,
            # so the files of the stage's last success stay those of its key in the manifest
            table = survival_table(per_row, self.cfg.window, keep_weak=rule.keep_weak, rule=rule)
            write_csv(self.dir / files.COHERENCE, signals)
            write_csv(self.dir / files.SIGNALS, by_signal)
            for warning in unsteered_warnings(unsteered_levels(signals, by_signal, recorded),
                                              self.cfg.coherence_thresholds()):
                self.log(f"[survival] warning: {warning}")
            table.save(self.dir)
        self._stage("survival", go, force)
        return SurvivalTable.load(self.dir)

    def threshold_sweep(self) -> pd.DataFrame:
        """The survival table under other death rules (`survival.threshold_sweep`), from the saved
        pmass; written as a CSV, a Markdown table and a figure."""
        from isokl_tl.summary import write_threshold_sweep

        sweep = threshold_sweep(self.pmass().frame, self.cfg.window, min_base_pmass=self.cfg.min_base_pmass,
                                keep_weak=self.cfg.keep_weak)
        write_threshold_sweep(self.dir, sweep)
        return sweep

    def plot(self, force: bool = False) -> None:
        self.survival()

        def go(key):
            from isokl_tl.summary import write_figures, write_summary
            write_figures(self.dir, self.cfg, meanwhile=lambda: write_summary(self.dir, self.cfg))
        self._stage("plot", go, force)

    def run_all(self) -> None:
        """Check every input, then every stage in order; finished stages with matching settings
        are reused. The figures' libraries load in the background meanwhile (matplotlib takes a
        second or so to import; the stages mostly wait on the model)."""
        if not self.current("plot"):
            threading.Thread(target=_load_plots, daemon=True, name="isokl-tl plots import").start()
        self.check()
        self.begin()
        self.plot()


def _load_plots() -> None:
    import isokl_tl.plots  # noqa: F401


