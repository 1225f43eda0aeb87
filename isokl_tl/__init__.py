"""isokl-tl: iso-KL calibrated activation steering on TransformerLens models.

Everything a notebook needs is importable from here:

>>> from isokl_tl import load_model, load_pairs, compute_direction, calibrate, rollout, plot_survival

The stages and their results: `compute_direction` -> `Direction`, `calibrate` -> `Calibration`,
`rollout` -> `Rollouts`, `fork_pmass` -> `ForkPMass`, `deaths` + `survival_table` ->
`SurvivalTable`, `layer_study` -> `LayerStudy`; each result saves to and loads from a run
directory, and `Run` drives them all over one. The decode engine behind `rollout` is
`isokl_tl.engine`; model loading is `isokl_tl.models`. See README.md and docs/.
"""

import gc as _gc
from importlib import metadata as _metadata

# Importing torch, transformers and TransformerLens makes about a million objects that live as long
# as the process. The cyclic collector would scan them again and again while they are made (eight
# full passes, a fifth of the import on a 2-core CPU), and none of them is garbage: it pauses until
# the import is done, then runs as before.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from isokl_tl.activations import Activations, Record
    from isokl_tl.calibrate import Calibration, CalibrationError, CalibrationSettings, calibrate, calibrate_many
    from isokl_tl.config import RunConfig
    from isokl_tl.directions import Direction, compute_direction
    from isokl_tl.engine import Sampling, release
    from isokl_tl.hooks import Site, hook_name, resolve_hook, steer, steer_sites
    from isokl_tl.kl import teacher_forced_kl, token_kl
    from isokl_tl.layers import LayerStudy, layer_study
    from isokl_tl.models import EMBEDDED, TINY, load_model
    from isokl_tl.pmass import ForkPMass, fork_pmass, fork_schedule
    from isokl_tl.prompts import load_pairs, load_prompts, load_questions
    from isokl_tl.rollout import Rollouts, rollout
    from isokl_tl.run import Run
    from isokl_tl.splice import Splice, answer_token_sets
    from isokl_tl.survival import DeathRule, SurvivalCurve, SurvivalTable, deaths, kaplan_meier, survival_table
    from isokl_tl.tokens import prompt_ids
finally:
    if _collecting:
        _gc.enable()

# The figures (matplotlib, seaborn) load on first use: a run that draws nothing, or draws at its
# end, does not wait for them at import.
_PLOTS = ("plot_aggregate", "plot_calibration", "plot_dose_response", "plot_kl_bands", "plot_layers", "plot_methods",
          "plot_methods_dose_response", "plot_spaghetti", "plot_survival", "save_figure")


def __getattr__(name: str):
    if name in _PLOTS:
        from isokl_tl import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'isokl_tl' has no attribute {name!r}")


try:
    __version__ = _metadata.version("isokl-tl")
except _metadata.PackageNotFoundError:    # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Activations", "Calibration", "CalibrationError", "CalibrationSettings", "DeathRule", "Direction",
    "EMBEDDED", "ForkPMass", "LayerStudy", "Record", "Rollouts", "Run", "RunConfig", "Sampling", "Site",
    "Splice", "SurvivalCurve", "SurvivalTable", "TINY", "answer_token_sets", "calibrate", "calibrate_many",
    "compute_direction", "deaths", "fork_pmass", "fork_schedule", "hook_name", "kaplan_meier", "layer_study",
    "load_model", "load_pairs", "load_prompts", "load_questions", "plot_aggregate", "plot_calibration",
    "plot_dose_response", "plot_kl_bands", "plot_layers", "plot_methods", "plot_methods_dose_response", "plot_spaghetti", "plot_survival",
    "prompt_ids", "release", "resolve_hook", "rollout", "save_figure", "steer", "steer_sites",
    "survival_table", "teacher_forced_kl", "token_kl",
]
