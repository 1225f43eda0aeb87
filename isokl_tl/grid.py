"""A study: a grid of cells, each an ordinary run directory, that differ along named axes.

A grid file (TOML) gives the settings every cell shares and the axes to cross; the grid is their
product, less any cell an `[[exclude]]` table matches (all of its keys equal):

    [shared]                  # any RunConfig key, spelled as in `isokl-tl run --config`
    model = "tiny-random"
    window = 16
    [axes]                    # each a list
    method = ["mean_diff", "pca"]
    layer = [1, 2]
    [[exclude]]
    method = "pca"
    layer = 2

Every cell is checked (a full `RunConfig`) before anything runs. A cell lives in
`STUDY_DIR/cells/<name>/`, named by its axis values (`method-pca__layer-1`); `STUDY_DIR/grid.json`
holds each cell's state (pending, running, done, failed with its one-line error). An executor
(`isokl_tl.executors`) runs the cells; the study's table is `isokl_tl.study`.
"""

import itertools
import json
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from isokl_tl.config import ALIASES, STAGES, RunConfig, settle
from isokl_tl.manifest import write_json

GRID = "grid.json"
CELLS = "cells"
STATES = ("pending", "running", "done", "failed")


@dataclass(frozen=True)
class Cell:
    name: str
    axes: dict            # this cell's value on every axis
    config: RunConfig

    def dir(self, study: str | Path) -> Path:
        return Path(study) / CELLS / self.name


@dataclass
class Grid:
    shared: dict
    axes: dict[str, list]
    exclude: list[dict] = field(default_factory=list)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Grid":
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read grid file {str(path)!r}: {e}") from None
        unknown = sorted(set(data) - {"shared", "axes", "exclude"})
        if unknown:
            raise ValueError(f"grid file {str(path)!r}: unknown table(s) {unknown}; use [shared], [axes], [[exclude]]")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "Grid":
        names = set(RunConfig().to_dict())

        def key(k: str) -> str:
            k = ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
            if k not in names:
                raise ValueError(f"unknown setting {k!r} in the grid; allowed: any RunConfig key "
                                 f"({', '.join(sorted(names))})")
            return k

        shared = {key(k): v for k, v in data.get("shared", {}).items()}
        axes = {}
        for k, values in data.get("axes", {}).items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"axis {k!r} must be a non-empty list, got {values!r}")
            if len({json.dumps(v) for v in values}) != len(values):
                raise ValueError(f"axis {k!r} repeats a value: {values}")
            axes[key(k)] = values
        if not axes:
            raise ValueError("the grid has no [axes]: give at least one setting with a list of values")
        both = sorted(set(shared) & set(axes))
        if both:
            raise ValueError(f"{both[0]!r} is both shared and an axis; give it in one place")
        exclude = [{key(k): v for k, v in e.items()} for e in data.get("exclude", [])]
        grid = cls(shared, axes, exclude)
        grid.cells()                       # every cell a valid RunConfig, or one line naming it
        return grid

    def cells(self) -> list[Cell]:
        out, seen = [], set()
        for values in itertools.product(*self.axes.values()):
            axes = dict(zip(self.axes, values))
            if any(all(axes.get(k, self.shared.get(k)) == v for k, v in e.items()) for e in self.exclude):
                continue
            try:
                config = RunConfig.from_dict(settle({**self.shared, **axes}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"cell {cell_name(axes)}: {e}") from None
            name = cell_name(axes)
            if name in seen:                # values that read the same once made filesystem-safe
                name = f"{name}_{len(out)}"
            seen.add(name)
            out.append(Cell(name, axes, config))
        if not out:
            raise ValueError("every cell of the grid is excluded")
        return out


def cell_name(axes: dict) -> str:
    """`method-pca__layer-1`: each axis and its value (a path's last part), safe in a path."""
    def safe(v) -> str:
        text = Path(v).name if isinstance(v, str) and "/" in v else v if isinstance(v, str) else json.dumps(v)
        return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-")
    return "__".join(f"{k}-{safe(v)}" for k, v in axes.items())


def finished(cell: Cell, study: str | Path) -> bool:
    """Whether every stage of the cell's run directory is current (no model needed)."""
    from isokl_tl.run import Run

    d = cell.dir(study)
    if not (d / "manifest.json").exists():
        return False
    try:
        run = Run(d, cell.config, progress=False, log=lambda m: None)
    except ValueError:                      # made with other settings: not this cell's result
        return False
    return all(run.current(s) for s in STAGES)


class GridState:
    """`grid.json`: every cell's state, its error, its axes and when it changed (written by the
    executor's parent process only)."""

    def __init__(self, study: str | Path, cells: list[Cell]):
        self.path = Path(study) / GRID
        old = json.loads(self.path.read_text()).get("cells", {}) if self.path.exists() else {}
        self.cells = {c.name: {"axes": c.axes, "state": old.get(c.name, {}).get("state", "pending"),
                               "error": old.get(c.name, {}).get("error")} for c in cells}

    def set(self, name: str, state: str, error: str | None = None) -> None:
        assert state in STATES
        self.cells[name].update(state=state, error=error)
        self.save()

    def count(self, state: str) -> int:
        return sum(1 for c in self.cells.values() if c["state"] == state)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"cells": self.cells, "counts": {s: self.count(s) for s in STATES}})


class GridProgress:
    """The grid's progress bar: cells done, running, failed, and the time left at this pace."""

    def __init__(self, total: int, state: GridState, progress: bool):
        self.bar = tqdm(total=total, desc="grid", unit="cell", disable=not progress)
        self.state, self.left, self.start, self.total = state, total, time.perf_counter(), total

    def finished(self, running: int) -> None:
        self.left -= 1
        self.bar.update(1)
        self.show(running)

    def show(self, running: int) -> None:
        done_now = self.total - self.left
        eta = (time.perf_counter() - self.start) / done_now * self.left if done_now else None
        self.bar.set_postfix_str(f"done {self.state.count('done')}, running {running}, failed "
                                 f"{self.state.count('failed')}" + (f", ~{eta:.0f}s left" if eta is not None else ""))

    def close(self) -> None:
        self.bar.close()
