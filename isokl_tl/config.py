"""`RunConfig`: every setting of a run, validated, with the settings each stage depends on."""

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from isokl_tl.calibrate import CalibrationSettings
from isokl_tl.coherence import DEATH_SIGNALS, SIGNALS_VERSION, THRESHOLDS
from isokl_tl.directions import check_method
from isokl_tl.engine import Sampling
from isokl_tl.models import EMBEDDED
from isokl_tl.pmass import fork_schedule
from isokl_tl.splice import FALSE_WORDS, TRUE_WORDS, Splice
from isokl_tl.survival import BASELINE_CHECK_VERSION, DeathRule

_TUPLES = ("alphas", "answer_true", "answer_false")   # saved as JSON lists
SIGNS = ("positive", "negative", "both")
STAGES = ("direction", "calibrate", "rollout", "pmass", "survival", "plot")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Defaults are the embedded model's CPU run (< 10 min on 2 cores)."""

    model: str = EMBEDDED
    device: str = "cpu"
    dtype: str = "float32"
    method: str = "mean_diff"
    hook: str | None = None
    layer: int | None = None
    pairs: str = "pairs"
    seed: int = 0
    resample_pairs: bool = False
    gate: bool = False
    sign: str = "positive"
    direction_file: str | None = None
    direction_key: str | None = None
    sae: str | None = None
    feature: int | None = None
    calib_prompts: str = "calibration"
    n_calib: int = 8
    calib_window: int = 32
    target: float = 1.0
    quantile: float = 0.95
    statistic: str = "quantile"
    corpus: str = "corpus"
    tol: float = 0.02
    bootstrap: int = 200
    prompts: str = "longform"
    n_prompts: int = 12
    window: int = 96
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)   # DESIGN: around the transition near 2
    generated_only: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    record_acts: bool = False
    fork_every: int | None = 16
    fork_log: int | None = None
    splice: str = "interrupt"
    splice_question: str | None = None
    splice_close: str | None = None     # None: the model's default close; "": none
    splice_prefill: str | None = None
    answer_true: tuple[str, ...] = TRUE_WORDS
    answer_false: tuple[str, ...] = FALSE_WORDS
    threshold: float | None = None
    relative_threshold: float | None = 0.5
    death_run: int = 1
    min_base_pmass: float = 0.3
    keep_weak: bool = False
    death_signal: str = "pmass"
    repetition_threshold: float = THRESHOLDS["repetition"]
    compression_threshold: float = THRESHOLDS["compression"]
    surprisal_threshold: float = THRESHOLDS["surprisal"]
    rows_per_batch: int | str = "auto"     # or a number; "auto": the engine picks (`engine.batch_rows`)
    inline_forks: bool = True

    def __post_init__(self):
        check_method(self.method)
        if self.rows_per_batch != "auto" and not (type(self.rows_per_batch) is int and self.rows_per_batch > 0):
            raise ValueError(f"rows-per-batch must be a positive number or auto, got {self.rows_per_batch!r}")
        for name in ("window", "calib_window", "n_prompts", "n_calib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.alphas:
            raise ValueError("give at least one alpha")
        if self.method == "directional_ablation" and min(self.alphas) < 0:
            raise ValueError(f"directional ablation needs alphas >= 0, got {min(self.alphas)} "
                             "(negative alphas only make sense for additive methods)")
        if self.gate and self.method == "directional_ablation":
            raise ValueError("--gate scales an added direction; directional ablation projects one out")
        if self.sign not in SIGNS:
            raise ValueError(f"sign {self.sign!r} is not one of {', '.join(SIGNS)}")
        if self.sign != "positive":
            if self.method == "directional_ablation" or self.gate:
                raise ValueError(f"--sign {self.sign} adds -v; directional ablation projects v out whatever its sign, "
                                 "and the cosine gate reads the sign of v: use --sign positive")
        if not all(a >= 0 for a in self.alphas):    # -c* of +v is no iso-KL dose of -v; NaN is no dose
            raise ValueError(f"alphas are multiples of c* and must be >= 0 (got {next(a for a in self.alphas if not a >= 0)}): steer along -v "
                             "with --sign negative or --sign both, which calibrate each sign on its own")
        if self.death_signal not in DEATH_SIGNALS:
            raise ValueError(f"death signal {self.death_signal!r} is not one of {', '.join(DEATH_SIGNALS)}")
        if not 0 < self.repetition_threshold <= 1:
            raise ValueError(f"repetition-threshold is a share of tokens, in (0, 1]; got {self.repetition_threshold}")
        if self.compression_threshold <= 1:
            raise ValueError(f"compression-threshold is a ratio of bytes, > 1; got {self.compression_threshold}")
        if not self.surprisal_threshold > 0:
            raise ValueError(f"surprisal-threshold is a mean surprisal in nats, > 0; got {self.surprisal_threshold}")
        if self.direction_file is not None and self.sae is not None:
            raise ValueError("give a direction file or an SAE feature, not both")
        if (self.sae is None) != (self.feature is None):
            raise ValueError("an SAE direction needs both --sae DIR and --feature N")
        if self.resample_pairs and (self.external or self.method == "random"):
            raise ValueError("--resample-pairs draws the contrastive pairs a direction is built from; "
                             "this direction is not built from pairs")
        if self.external and self.method not in ("mean_diff", "directional_ablation"):
            raise ValueError(f"--method {self.method} builds a direction from the pairs; with a direction "
                             "file or an SAE feature give no method (added) or directional_ablation")
        if self.fork_every is not None and self.fork_log is not None:
            raise ValueError(f"give one of fork-every ({self.fork_every}) and fork-log ({self.fork_log}), not both")
        if self.fork_every is None and self.fork_log is None:
            raise ValueError("give one of fork-every and fork-log")
        self.forks()
        self.death_rule()
        self.splice_spec()
        self.calibration_settings()
        Sampling(self.temperature, self.top_p, self.seed)

    # --- derived settings -----------------------------------------------------------------
    @property
    def external(self) -> bool:
        """The direction is a vector made elsewhere (a file or an SAE feature), not built from pairs."""
        return self.direction_file is not None or self.sae is not None

    def death_rule(self) -> DeathRule:
        rel = None if self.threshold is not None else self.relative_threshold
        return DeathRule(threshold=self.threshold, relative_threshold=rel, death_run=self.death_run,
                         min_base_pmass=self.min_base_pmass, keep_weak=self.keep_weak)

    def coherence_thresholds(self) -> dict[str, float]:
        return {"repetition": self.repetition_threshold, "compression": self.compression_threshold,
                "surprisal": self.surprisal_threshold}

    def splice_spec(self) -> Splice:
        kw = {"question": self.splice_question} if self.splice_question else {}
        return Splice(mode=self.splice, close=self.splice_close, prefill=self.splice_prefill,
                      true_words=tuple(self.answer_true), false_words=tuple(self.answer_false), **kw)

    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(target=self.target, quantile=self.quantile, statistic=self.statistic,
                                   window=self.calib_window, tol=self.tol, bootstrap=self.bootstrap,
                                   generated_only=self.generated_only, seed=self.seed)

    def signs(self) -> tuple[int, ...]:
        """The signs of the direction this run calibrates and sweeps, the first one's calibration
        in `calibration.json` (+1 and -1 with `sign` both)."""
        return {"positive": (1,), "negative": (-1,), "both": (1, -1)}[self.sign]

    def sweep_alphas(self) -> list[float]:
        """The alphas to roll out: alpha 0 is always included (the baseline check needs it). A
        negative alpha steers along -v, at that multiple of -v's own c* (`sign`)."""
        return sorted({0.0 if a == 0 else s * a for a in self.alphas for s in self.signs()} | {0.0})   # never -0.0

    def forks(self) -> list[int]:
        return fork_schedule(self.window, every=self.fork_every, n_log=self.fork_log)

    _STAGE_KEYS = {
        "direction": ("model", "dtype", "method", "hook", "layer", "pairs", "seed", "resample_pairs", "gate",
                      "direction_file",
                      "direction_key", "sae", "feature"),
        "calibrate": ("calib_prompts", "n_calib", "calib_window", "target", "quantile", "statistic",
                      "tol", "bootstrap", "generated_only", "corpus", "sign"),
        "rollout": ("prompts", "n_prompts", "window", "alphas", "temperature", "top_p", "record_acts"),
        "pmass": ("fork_every", "fork_log", "splice", "splice_question", "splice_close",
                  "splice_prefill", "answer_true", "answer_false"),
        "survival": ("threshold", "relative_threshold", "death_run", "min_base_pmass", "keep_weak", "death_signal",
                     "repetition_threshold", "compression_threshold", "surprisal_threshold"),
        "plot": (),
    }
    # Settings added after runs were made, keyed only when not at these defaults, so that older run
    # directories stay current
    _LATER_KEYS = {"gate": False, "corpus": "corpus", "sign": "positive", "resample_pairs": False, "direction_file": None, "direction_key": None, "sae": None, "feature": None,
                   # the values those older runs used (not today's defaults: a run at a new default is not theirs)
                   "death_signal": "pmass", "repetition_threshold": 0.9, "compression_threshold": 2.5,
                   "surprisal_threshold": 2.0}
    # Versions of what a stage computes, keyed with its settings: when a definition changes, the
    # stage of a run made under the older one runs again
    _DEFINITIONS = {"survival": {"coherence_signals": SIGNALS_VERSION, "baseline_check": BASELINE_CHECK_VERSION}}
    # The inline splice's definition: 2 since it closes open thinking blocks (on models with the
    # markers) with `</think>\n` by default; inline runs made before then have no such key. The
    # interrupt splice has not changed, so its runs (and their `splice_close`, "" then) keep their key.
    INLINE_SPLICE_VERSION = 2
    # Settings that decide how the work is executed, not what it computes: greedy results agree
    # up to floating-point rounding whatever their values, so they key no stage. They do key the
    # saved parts of a stage in progress (`Run`), which are cut along them. (Sampled rollouts draw
    # their random numbers per part, so they repeat only with the same values.)
    # `inline_forks`, how fork pmass is computed (read while the sweep decodes, or afterwards from
    # the saved rollouts: `Run.pmass`), gives the same numbers within 1e-5: an execution setting too.
    EXECUTION = ("device", "rows_per_batch", "inline_forks")

    @property
    def batch_rows(self) -> int | None:
        """Rollout rows per batch as the library takes them: None where the engine picks."""
        return None if self.rows_per_batch == "auto" else self.rows_per_batch

    def stage_settings(self, stage: str) -> dict:
        """This stage's settings plus every upstream stage's (so a change invalidates downstream)."""
        out = {}
        for s in STAGES[: STAGES.index(stage) + 1]:
            out.update({k: getattr(self, k) for k in self._STAGE_KEYS[s]
                        if not (k in self._LATER_KEYS and getattr(self, k) == self._LATER_KEYS[k])})
            out.update(self._DEFINITIONS.get(s, {}))
            if s == "pmass":
                out.update(self._splice_key())
        return out

    def _splice_key(self) -> dict:
        """The pmass stage's key for the splice's close: inline, the close as given (None, the
        model's default, is not ""), with the definition's version; interrupt, as older runs keyed it."""
        if self.splice == "inline":
            return {"splice_close": self.splice_close, "inline_splice": self.INLINE_SPLICE_VERSION}
        return {"splice_close": self.splice_close or ""}

    def direction_source(self) -> Path | None:
        """The file an external direction is read from (the SAE's weights), if any."""
        source = self.direction_file or (self.sae and f"{self.sae}/sae_weights.safetensors")
        return Path(source).expanduser() if source else None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _TUPLES:
            d[k] = list(getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = {ALIASES.get(k, k): v for k, v in d.items()}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {', '.join(sorted(names))}")
        d = dict(d)
        if "alphas" in d:
            d["alphas"] = tuple(float(a) for a in d["alphas"])
        for k in ("answer_true", "answer_false"):
            if k in d:
                d[k] = tuple(str(w) for w in d[k])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "RunConfig":
        return cls.from_dict({**read_toml(path), **overrides})


ALIASES = {"target_kl": "target"}          # option names whose RunConfig field is spelled otherwise
# Settings that exclude each other: giving one turns the other off.
EXCLUSIVE = (("threshold", "relative_threshold"), ("fork_every", "fork_log"), ("direction_file", "sae"))
# ... and what else giving one of them turns off
CLEARS = {"direction_file": ("feature",), "sae": ("direction_key",)}


def settle(given: dict) -> dict:
    """`given` settings (a config file's keys, the options on a command line) with the partner of
    each exclusive setting they name turned off; naming both of a pair is an error."""
    out = {ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in given.items()}
    for a, b in EXCLUSIVE:
        if out.get(a) is not None and out.get(b) is not None:
            raise ValueError(f"give one of {a.replace('_', '-')} ({out[a]}) and {b.replace('_', '-')} "
                             f"({out[b]}), not both")
        for mine, other in ((a, b), (b, a)):
            if out.get(mine) is not None:
                out[other] = None
                for extra in CLEARS.get(mine, ()):
                    out.setdefault(extra, None)
    return out


def read_toml(path: str | Path) -> dict:
    """The settings a TOML config file gives (only those: the rest stays as it would be), checked."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read config {str(path)!r}: {e}") from None
    given = settle(data)
    RunConfig.from_dict(given)                  # unknown keys and bad values fail here, naming them
    return given
