"""`Run`: the whole cell in a run directory: direction -> calibration -> alpha sweep -> pmass ->
survival -> figures -> summary.

Each stage records a hash of its settings (which include every upstream stage's) in the manifest;
a stage whose hash and outputs are already there is skipped, so a rerun resumes and changing, say,
the death threshold reruns only survival and figures. Long stages save their work in parts under
`.partial/` as they go; the parts are keyed by the stage's settings and by the execution settings
that cut them (`RunConfig.EXECUTION`), so a resumed stage reuses only parts cut the same way.
`check()` reads every input a run will need before any stage runs.
"""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from isokl_tl import manifest as files  # the run directory's file names
from isokl_tl.activations import Record
from isokl_tl.answers import flip_deaths
from isokl_tl.calibrate import CORPUS_STATISTICS, Calibration, CalibrationError, calibrate_many, load_calibrations
from isokl_tl.coherence import TEXT_SIGNALS, deaths_by_signal, signal_frame
from isokl_tl.config import RunConfig
from isokl_tl.corpus import MAX_TOKENS, corpus_ids
from isokl_tl.directions import Direction, compute_direction
from isokl_tl.engine import Sampling
from isokl_tl.hooks import check_direction, resolve_hook
from isokl_tl.inputs import check_inputs
from isokl_tl.manifest import Manifest, model_identity, settings_hash, versions, write_csv, write_json
from isokl_tl.models import load_model
from isokl_tl.pmass import ForkPMass, ForkReader, fork_pmass
from isokl_tl.prompts import known_answers, load_corpus, load_pairs, load_prompts
from isokl_tl.rollout import Rollouts, rollout
from isokl_tl.survival import SurvivalTable, deaths, survival_table, threshold_sweep
from isokl_tl.tokens import chunks, prompt_ids
from isokl_tl.vectors import file_sha256, run_vector

KILL_ENV = "ISOKL_TL_KILL_AFTER"   # test hook: "stage:part" makes the process SIGKILL itself there
PMASS_ROWS_PER_PART = 16
FORKS = ".forks"     # fork pmass read while the sweep decoded, with the pmass settings it was read under
FORKS_KEY = "forks.json"   # in a saved sweep part: the pmass settings its fork reads were made under


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
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"run directory {str(self.dir)!r} is a file, not a directory")
        self.manifest = Manifest(self.dir)
        self._model = model
        self._checked: set[str] = set()
        self._force = False
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
            if diff:                  # forget the recorded stages now; their files go at `begin`
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
    OUTPUTS = {"direction": [files.DIRECTION_VECTOR, files.DIRECTION_META],
               "calibrate": [files.CALIBRATION, files.CALIBRATION_FIG],
               "rollout": [files.ROLLOUTS, files.ROLLOUTS_CSV, files.TEXTS],
               "pmass": [files.PMASS, files.SPLICE],
               "survival": [files.SURVIVAL, files.SURVIVAL_TABLE, files.KM_CURVES, files.SURVIVAL_META,
                            files.COHERENCE, files.SIGNALS],
               "plot": list(files.FIGURES.values()) + [files.SUMMARY]}

    def current(self, stage: str) -> bool:
        """Whether `stage` finished with these settings and its files are all there (and, for a
        direction read from a file that is still there, the file is the one it was read from)."""
        outputs = self.OUTPUTS[stage] + ([files.CALIBRATION_NEGATIVE] if stage == "calibrate" and self.cfg.sign == "both"
                                         else [])
        return self.manifest.stage_current(stage, settings_hash(self.cfg.stage_settings(stage)),
                                           outputs) and not self._direction_file_changed()

    def _direction_file_changed(self) -> bool:
        source = self.cfg.direction_source()
        if source is None or not source.is_file() or not (self.dir / files.DIRECTION_META).exists():
            return False
        saved = json.loads((self.dir / files.DIRECTION_META).read_text()).get("extra", {}).get("sha256")
        return saved is not None and saved != file_sha256(source)

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

    def _partials(self, stage: str, key: str) -> Path:
        """The folder of a stage's saved parts, keyed by its settings and by the execution settings
        that cut the parts; parts of the same stage cut otherwise are dropped (with a line)."""
        cut = settings_hash({k: getattr(self.cfg, k) for k in RunConfig.EXECUTION})
        path = self.dir / ".partial" / f"{stage}-{key}-{cut}"
        for other in (self.dir / ".partial").glob(f"{stage}-*"):
            if other != path:
                n = sum(1 for _ in other.iterdir())
                if n:
                    self.log(f"[{stage}] {n} saved part(s) were cut with other settings "
                             f"({', '.join(RunConfig.EXECUTION)}, or the stage's own); starting afresh")
                shutil.rmtree(other)
        path.mkdir(parents=True, exist_ok=True)
        return path

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
            if self.cfg.statistic in CORPUS_STATISTICS:
                prompts = corpus_ids(self.model.tokenizer, load_corpus(self.cfg.corpus)[: self.cfg.n_calib],
                                     max_tokens=min(MAX_TOKENS, self.model.cfg.n_ctx))
            else:
                prompts = [prompt_ids(self.model.tokenizer, p)
                           for p in load_prompts(self.cfg.calib_prompts)[: self.cfg.n_calib]]
            signed = [d if sign == 1 else d.negated() for sign in self.cfg.signs()]
            cals = calibrate_many(self.model, signed, prompts, self.cfg.calibration_settings(),
                                  rows_per_batch=self.cfg.rows_per_batch, progress=self.progress)
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
            alphas = self.cfg.sweep_alphas()
            rows = [p for _ in alphas for p in ids]
            alpha = torch.tensor([a for a in alphas for _ in ids])
            # a negative alpha adds -v: at a multiple of -v's own c* where the run calibrated -v (`--sign`)
            c_star = torch.tensor([(cals[-1] if a < 0 and -1 in cals else cals.get(1, cals.get(-1))).c_star
                                   for a in alphas for _ in ids])
            coeff = alpha * c_star
            index = torch.tensor([i for _ in alphas for i in range(len(ids))])
            parts_dir, parts, forked = self._partials("rollout", key), [], []
            # fork pmass is read as the sweep decodes (`pmass.ForkReader`), for the pmass stage to
            # take if its settings are still these then (not while recording activations)
            inline = self.cfg.inline_forks and not self.cfg.record_acts
            for i, sl in enumerate(chunks(len(rows), self.cfg.rows_per_batch)):
                part = parts_dir / f"{i:04d}"
                if not (part / files.ROLLOUTS_META).exists():
                    reader = ForkReader(self.model, self.cfg.forks(), self.cfg.splice_spec()) if inline else None
                    done = rollout(self.model, rows[sl], coeff[sl], direction=vector,
                                   hook=d.hook, method=d.intervention, window=self.cfg.window,
                                   generated_only=self.cfg.generated_only,
                                   sampling=Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.seed + i),
                                   rows_per_batch=self.cfg.rows_per_batch, prompt_index=index[sl],
                                   alpha=alpha[sl], record=Record() if self.cfg.record_acts else None,
                                   forks=reader, progress=self.progress)
                    if reader is not None:
                        reader.result(done).save(part)
                        write_json(part / FORKS_KEY, {"pmass": settings_hash(self.cfg.stage_settings("pmass"))})
                    done.save(part)                       # its metadata last: the part is complete
                    _fault_point("rollout", i)
                parts.append(Rollouts.load(part))
                pmass_key = settings_hash(self.cfg.stage_settings("pmass"))
                if (part / files.PMASS).exists() and (part / FORKS_KEY).exists() and \
                        json.loads((part / FORKS_KEY).read_text()).get("pmass") == pmass_key:   # read as now
                    pm = ForkPMass.load(part)
                    forked.append(ForkPMass(pm.frame.assign(row=pm.frame.row + sl.start), pm.forks, pm.splice))
            whole = Rollouts.concat(parts) if len(parts) > 1 else parts[0]
            whole.save(self.dir, self.model.tokenizer)
            shutil.rmtree(self.dir / FORKS, ignore_errors=True)
            if forked and len(forked) == len(parts):
                ForkPMass.concat(forked).save(self.dir / FORKS)
                write_json(self.dir / FORKS / "settings.json",
                           {"pmass": settings_hash(self.cfg.stage_settings("pmass"))})
            shutil.rmtree(parts_dir)
        self._stage("rollout", go, force)
        return Rollouts.load(self.dir)

    def pmass(self, force: bool = False) -> ForkPMass:
        d, r = self.direction(), self.rollout()

        def go(key):
            read = self.dir / FORKS / "settings.json"
            if (self.cfg.inline_forks and not force and read.exists()
                    and json.loads(read.read_text()).get("pmass") == key):
                self.log("[pmass] read while the sweep decoded")
                ForkPMass.load(self.dir / FORKS).save(self.dir)
                return
            vector, splice = self._vector(d), self.cfg.splice_spec()
            parts_dir, parts = self._partials("pmass", key), []
            for i, sl in enumerate(chunks(r.n_rows, PMASS_ROWS_PER_PART)):
                part = parts_dir / f"{i:04d}"
                if not (part / files.PMASS).exists():
                    fork_pmass(self.model, r, vector, self.cfg.forks(), splice,
                               rows=list(range(r.n_rows))[sl], progress=self.progress).save(part)
                    _fault_point("pmass", i)
                parts.append(ForkPMass.load(part))
            ForkPMass.concat(parts).save(self.dir)
            shutil.rmtree(parts_dir)
        self._stage("pmass", go, force)
        return ForkPMass.load(self.dir)

    def survival(self, force: bool = False) -> SurvivalTable:
        pm = self.pmass()

        def go(key):
            rule = self.cfg.death_rule()
            by_pmass = deaths(pm.frame, rule)
            r = self.rollout()
            signals = signal_frame(r.tokens.numpy(), r.gen_len.numpy(), self.model.tokenizer.decode,
                                   r.base_logprob.numpy())
            flips = flip_deaths(pm.frame, known_answers(self.cfg.prompts)[: self.cfg.n_prompts])
            recorded = tuple(k for k in TEXT_SIGNALS       # rollouts saved before base log-probs were: no surprisal
                             if k != "surprisal" or not bool(r.base_logprob[r.mask].isnan().all()))
            by_signal = deaths_by_signal(signals, by_pmass, self.cfg.coherence_thresholds(), flips,
                                         text_signals=recorded)
            write_csv(self.dir / files.COHERENCE, signals)
            write_csv(self.dir / files.SIGNALS, by_signal)
            per_row = by_pmass
            if self.cfg.death_signal != "pmass":       # the same rollouts, dying by the chosen signal
                chosen = by_signal[by_signal.signal == self.cfg.death_signal].set_index("row")
                if chosen.empty:
                    raise ValueError(f"no rollout can die by {self.cfg.death_signal!r} here (no rollout was "
                                     "recorded with it, or, for flips, no question has a known answer the "
                                     "unsteered model gets right)")
                per_row = by_pmass[by_pmass.row.isin(chosen.index)]      # flips: rows that can flip
                per_row = per_row.assign(time=per_row.row.map(chosen.time), event=per_row.row.map(chosen.event))
            survival_table(per_row, self.cfg.window, keep_weak=rule.keep_weak, rule=rule).save(self.dir)
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
            write_figures(self.dir, self.cfg)
            write_summary(self.dir, self.cfg)
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


