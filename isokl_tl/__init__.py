"""isokl-tl: iso-KL calibrated activation steering on TransformerLens models.

Everything a notebook needs is importable from here (`from isokl_tl import steer, calibrate, ...`);
submodules are imported on first use, so `import isokl_tl` stays cheap. See README.md.
"""

import importlib

_EXPORTS = {
    "calibrate": ["Calibration", "CalibrationError", "CalibrationSettings", "calibrate", "calibrate_many"],
    "activations": ["Activations", "Record"],
    "chat": ["prompt_ids"],
    "diagnostics": ["LayerStudy", "layer_study"],
    "directions": ["Direction", "compute_direction"],
    "hooks": ["Site", "hook_name", "resolve_hook", "steer", "steer_sites"],
    "kl": ["teacher_forced_kl", "token_kl"],
    "models": ["EMBEDDED", "TINY", "load_model"],
    "config": ["RunConfig"],
    "pipeline": ["Run"],
    "pmass": ["Splice", "answer_token_sets", "fork_pmass", "fork_schedule"],
    "prompts": ["load_pairs", "load_prompts", "load_questions"],
    "rollout": ["Sampling", "rollout"],
    "rollouts": ["Rollouts"],
    "survival": ["DeathRule", "SurvivalCurve", "deaths", "kaplan_meier", "survival_table"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'isokl_tl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"isokl_tl.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
