"""File names inside a run directory (one place, so every stage agrees)."""

MANIFEST = "manifest.json"
DIRECTION_VECTOR = "direction.safetensors"
DIRECTION_META = "direction.json"
CALIBRATION = "calibration.json"
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
KM_CURVES = "km_curves.csv"
SUMMARY = "summary.md"
FIGURES = {
    "spaghetti": "kl_spaghetti.png",
    "normalised": "kl_spaghetti_normalised.png",
    "survival": "survival.png",
    "aggregate": "aggregate.png",
    "calibration": CALIBRATION_FIG,
}
