"""isokl-tl: iso-KL calibrated activation steering on TransformerLens models.

Everything a notebook needs is importable from here; see README.md and DESIGN.md for the science.
"""

from isokl_tl.calibrate import Calibration, CalibrationError, CalibrationSettings, calibrate
from isokl_tl.chat import prompt_ids
from isokl_tl.directions import Direction, compute_direction
from isokl_tl.hooks import hook_name, resolve_hook, steer
from isokl_tl.kl import teacher_forced_kl, token_kl
from isokl_tl.models import EMBEDDED, TINY, load_model
from isokl_tl.pipeline import Run, RunConfig
from isokl_tl.pmass import Splice, answer_token_sets, fork_pmass, fork_schedule
from isokl_tl.prompts import load_pairs, load_prompts, load_questions
from isokl_tl.rollout import Rollouts, Sampling, rollout
from isokl_tl.survival import DeathRule, SurvivalCurve, deaths, kaplan_meier, survival_table

__all__ = [
    "Calibration", "CalibrationError", "CalibrationSettings", "DeathRule", "Direction", "EMBEDDED",
    "Rollouts", "Run", "RunConfig", "Sampling", "Splice", "SurvivalCurve", "TINY",
    "answer_token_sets", "calibrate", "compute_direction", "deaths", "fork_pmass", "fork_schedule",
    "hook_name", "kaplan_meier", "load_model", "load_pairs", "load_prompts", "load_questions",
    "prompt_ids", "resolve_hook", "rollout", "steer", "survival_table", "teacher_forced_kl",
    "token_kl",
]
