"""Sweeps: fit every combination of a grid of ``fit`` options on features loaded once, ranked on validation.

A grid maps option names (fields of ``FitConfig`` and of the heads' configs) to lists of values;
a grid file may also hold a list of such mappings, whose combinations are joined. A head option
is given only to the heads that take it: a grid crossing ``head`` with ``num_heads`` fits gated
once and cross-attention once per value, and each trial's name shows only what its head took. Each
combination is fitted on every fold of a seeded stratified K-fold split of train.txt
(or on one stratified hold-out split when K = 1), and the leaderboard ranks the
configurations by mean validation macro-F1. Every fit writes a normal run folder
(``runs/<config>/``, one ``fold-<k>/`` per fold with K ≥ 2; the leaderboard's run column
names fold 0's), so any row's run can be passed to ``predict``; only the best row's run has its curves
and confusion matrix drawn (``fusion.run.plot_run`` draws any other's). Every configuration is scored on
the same folds, so the leaderboard also gives each row's macro-F1 minus the best row's, paired fold by fold.

Honesty of the scores: everything is selected on validation folds only (early stopping
included, as in ``fit``). With ``logit_adjustment`` and K ≥ 2 folds, the τ behind a fold's
score is tuned on the *other* folds' validation predictions (cross-fitted), so no fold
scores a τ tuned on itself; its run folder keeps the τ tuned on its own validation rows,
which is what ``predict`` applies.

The sweep folder holds ``leaderboard.csv``, ``leaderboard.md``, ``leaderboard.png``,
``report.md``, ``sweep.json`` (options, trials, every fit's scores, the leaderboard) and ``runs/``.

Backends differ only in how the tasks are executed (a (configuration, fold) fit, or with
``batch_folds`` a share of the (configuration, fold) fits that batch as one model): ``local`` fits
them in this process or a fork-based pool (``--jobs``); ``ray`` makes each one a Ray Tune trial on
a Ray cluster (``fusion/sweep_ray.py``, imported only then). Both call ``fit_task`` and hand back the same
``FoldResult``s, from which the same code writes the leaderboard and report.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import torch
import yaml

from fusion.batched import batch_key, fit_folds_batched
from fusion.calibration import log_prior, tune_tau
from fusion.config import CACHE_SIZES, FitConfig
from fusion.features import LoadedFeatures
from fusion.metrics import METRICS, cv_summary, evaluate, mean_std, metric_of
from fusion.plots import CONFUSION_FILE, CURVES_FILE, LEADERBOARD_FILE, plot_leaderboard
from fusion.registry import head_class, head_config_from_dict, head_names, head_options
from fusion.run import (
    LabelledFeatures,
    RunResult,
    finished_fold,
    fit_fold,
    fold_dir,
    load_labelled,
    plot_run,
    prepare_run_dir,
    write_json,
)
from fusion.split import fold_splits
from fusion.train import HeadTrainer

FIT_KEYS = tuple(f.name for f in fields(FitConfig))
HEAD_CONFIGS = tuple(dict.fromkeys(head_class(name).config_class for name in head_names()))  # each class once
HEAD_KEYS = tuple(dict.fromkeys(f.name for cls in HEAD_CONFIGS for f in fields(cls) if f.name not in CACHE_SIZES))
ENCODER_KEYS = ("text_encoder", "image_encoder")  # which caches a trial reads; each distinct pair is loaded once
FIELD_TYPES: dict[str, type] = get_type_hints(FitConfig) | {  # int, float, bool or str
    key: kind for cls in HEAD_CONFIGS for key, kind in get_type_hints(cls).items()
}
BACKENDS = ("local", "ray")  # how the fits are executed; the results are the same
SEARCHES = ("grid", "random", "optuna")  # grid: every combination; random/optuna: --trials samples of the ranges
RANGE_KINDS = ("uniform", "loguniform", "choice")  # a range in a grid file: lr: {loguniform: [1e-4, 3e-3]}
BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
ABLATION_ROWS = {"text": "text only", "image": "image only", "both": "text + image"}


@dataclass(frozen=True)
class Range:
    """A search range of one option, ``key: {kind: [values]}`` in a grid file, sampled by ``--search``.

    ``uniform`` and ``loguniform`` draw between two bounds (rounded to an int for int options, to 3
    significant digits for floats, so trials have readable names); ``choice`` picks one of the values.
    """

    kind: str
    values: tuple[Any, ...]


Grid = dict[str, list[Any]]  # option → its values; in a search, one value may be a Range


@dataclass
class SweepOptions:
    folds: int = 1  # 1 = one stratified hold-out split (val_fraction of each config); K ≥ 2 = stratified K-fold
    jobs: int = 1  # local: worker processes fitting in parallel; each gets cpu_count // jobs torch threads
    split_seed: int = 0  # seeds the split (fusion.run.fit_fold): every configuration is scored on the same rows,
    # those of `fit --folds K --split-seed S`
    backend: str = "local"  # local: this process or a fork pool; ray: every (configuration, fold) fit a Tune trial
    address: str | None = None  # ray: the cluster to join ("auto": the one `ray start` runs); None: that one if any,
    # else a Ray started here for the sweep
    cpus_per_trial: int = 1  # ray: CPUs each trial requests, and the torch threads it trains with
    search: str = "grid"  # random | optuna (ray): sample the grid's ranges, ASHA-stop weak fits, K-fold the rest
    trials: int = 20  # random | optuna: configurations sampled (split_seed seeds the sampler)

    def validate(self) -> SweepOptions:
        if self.folds < 1:
            raise ValueError(f"folds must be at least 1, got {self.folds}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {list(BACKENDS)}")
        if self.backend != "ray" and (self.address is not None or self.cpus_per_trial != 1):
            raise ValueError("address and cpus_per_trial are options of the ray backend: add --backend ray")
        if self.backend == "ray" and self.jobs != 1:
            raise ValueError("jobs is an option of the local backend; with ray, the cluster's CPUs / cpus_per_trial "
                             "trials run at once")
        if self.cpus_per_trial < 1:
            raise ValueError(f"cpus_per_trial must be at least 1, got {self.cpus_per_trial}")
        if self.search not in SEARCHES:
            raise ValueError(f"search={self.search!r} is not one of {list(SEARCHES)}")
        if self.search != "grid" and self.backend != "ray":
            raise ValueError(f"search={self.search} runs on Ray Tune: add --backend ray")
        if self.search == "grid" and self.trials != SweepOptions.trials:
            raise ValueError("trials is an option of --search random|optuna; a grid fits every combination")
        if self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")
        return self


@dataclass
class Trial:
    """One configuration of the grid."""

    index: int  # position in grid order (ties in the leaderboard keep it)
    name: str  # the options that vary across the grid, "key=value …" ("defaults" when none does)
    options: dict[str, Any]  # every option the grid sets
    fit_config: FitConfig = field(repr=False)
    head_options: dict[str, Any] = field(repr=False)
    encoders: tuple[str, str] = field(default=("", ""), repr=False)  # (text, image) caches; "" = the sweep's own

    @property
    def folder(self) -> str:
        slug = "".join(c if c.isalnum() or c in "-=._" else "_" for c in self.name.replace(" ", "__"))
        return f"{self.index:02d}-{slug}"


@dataclass
class FoldResult:
    index: int  # the trial's
    fold: int
    run: str  # the run folder
    validation: dict[str, Any]  # the run's validation report (its own τ when logit adjustment is on)
    val_probabilities: np.ndarray  # (N_val, C) before any logit adjustment
    fit_seconds: float
    parameters: int
    best_epoch: int
    tau: float


# ---------------------------------------------------------------- grids


def parse_value(key: str, value: Any) -> Any:
    """``value`` (a YAML/JSON value or a command-line string) as the type of option ``key``."""
    if key in CACHE_SIZES:
        raise ValueError(f"{key} is set from the cache and cannot be swept")
    if key not in FIELD_TYPES and key not in ENCODER_KEYS:
        raise ValueError(f"unknown sweep key {key!r}; choose from {sorted(FIT_KEYS + HEAD_KEYS + ENCODER_KEYS)}")
    kind = FIELD_TYPES.get(key, str)
    if isinstance(value, str) and kind is bool and value.strip().lower() in BOOLEANS:
        return BOOLEANS[value.strip().lower()]
    if isinstance(value, str) and kind in (int, float):
        try:
            value = kind(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a valid {kind.__name__}") from None
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind or (key in ENCODER_KEYS and not value.strip()):
        raise ValueError(f"{key}={value!r} is not a valid {'encoder name' if key in ENCODER_KEYS else kind.__name__}")
    return value


def parse_grid_file(path: Path) -> list[Grid]:
    """Sub-grids of a YAML or JSON file: a mapping ``option: [values]`` or a list of such mappings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: grid file not found")
    try:
        loaded = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        where = getattr(error, "problem_mark", None)  # YAML's position and problem; JSON's are in its message
        line = f":{where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}{line}: not a valid grid file ({problem})") from None
    grids = loaded if isinstance(loaded, list) else [loaded]
    if not grids or not all(isinstance(grid, dict) and grid for grid in grids):
        raise ValueError(f"{path}: expected a mapping option → list of values, or a list of such mappings")
    return [{key: _as_list(path, key, values) for key, values in grid.items()} for grid in grids]


def _as_list(source: Path | str, key: str, values: Any) -> list[Any]:
    if isinstance(values, dict):
        return [parse_range(source, key, values)]
    values = values if isinstance(values, list) else [values]
    if not values:
        raise ValueError(f"{source}: option {key!r} has no values")
    return [parse_value(key, value) for value in values]


def parse_range(source: Path | str, key: str, spec: dict[str, Any]) -> Range:
    """``{kind: [values]}`` of a grid file as a ``Range`` of option ``key``, its values typed and checked."""
    if len(spec) != 1 or next(iter(spec)) not in RANGE_KINDS:
        raise ValueError(f"{source}: {key}: expected a range {{kind: [values]}} with kind one of {list(RANGE_KINDS)}, "
                         f"got {spec}")
    ((kind, values),) = spec.items()
    values = [parse_value(key, value) for value in (values if isinstance(values, list) else [values])]
    if kind == "choice" and not values:
        raise ValueError(f"{source}: {key}: choice has no values")
    bounds = FIELD_TYPES.get(key) in (int, float) and len(values) == 2
    if kind != "choice" and not (bounds and values[0] < values[1] and (kind == "uniform" or values[0] > 0)):
        raise ValueError(f"{source}: {key}: {kind} takes two numeric bounds, low < high"
                         + (" and low > 0" if kind == "loguniform" else "") + f", got {values}")
    return Range(kind, tuple(values))


def parse_set(option: str) -> tuple[str, list[Any]]:
    """``key=v1,v2`` → (key, typed values)."""
    key, sep, values = option.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ValueError(f"--set {option!r}: expected key=value[,value…], e.g. --set text_pool=last,mean")
    return key.strip(), _as_list("--set", key.strip(), values.split(","))


def build_grids(grid_file: Path | None, sets: list[str]) -> list[Grid]:
    """The grid file's sub-grids (one empty grid without a file), each with the ``--set`` options applied."""
    grids = parse_grid_file(grid_file) if grid_file is not None else [{}]
    overrides = dict(parse_set(option) for option in sets)
    return [grid | overrides for grid in grids]


def plan_trials(grids: list[Grid], encoders: tuple[str, str] = ("", "")) -> list[Trial]:
    """Every combination of every sub-grid, in order, each config validated now.

    A combination equal to an earlier one once the defaults are filled in is dropped, so sub-grids that
    vary one option each around a shared base fit that base once. A head option the combination's head
    does not take is dropped from it first (``num_heads`` for gated), so such values fit that head once.
    A trial is named by the options it sets that vary across the grid. ``encoders`` are the sweep's
    (text, image) encoders, the default of the grid keys ``text_encoder`` and ``image_encoder``.
    """
    for grid in grids:
        for key, values in grid.items():
            if any(isinstance(value, Range) for value in values):
                raise ValueError(f"{key} is a search range: sample it with --search random|optuna --backend ray")
    head_defaults = {key: value for cls in HEAD_CONFIGS for key, value in asdict(cls()).items()}
    defaults = asdict(FitConfig()) | head_defaults | dict(zip(ENCODER_KEYS, encoders))
    combos: dict[str, dict[str, Any]] = {}  # resolved options (as JSON) → the first combination giving them
    for grid in grids:
        for values in itertools.product(*grid.values()):
            combo = dict(zip(grid, values))
            taken = head_options(combo.get("head", FitConfig.head))
            combo = {key: value for key, value in combo.items() if key not in HEAD_KEYS or key in taken}
            combos.setdefault(json.dumps(defaults | combo, sort_keys=True), combo)
    keys = list(dict.fromkeys(key for combo in combos.values() for key in combo))
    varying = [key for key in keys if len({repr(combo.get(key, defaults[key])) for combo in combos.values()}) > 1]
    trials = []
    for index, combo in enumerate(combos.values()):
        fit_config = FitConfig(**{k: v for k, v in combo.items() if k in FIT_KEYS}).validate()
        options = {k: v for k, v in combo.items() if k in HEAD_KEYS}
        head_config_from_dict(fit_config.head, options)  # validated now, at the default sizes
        name = " ".join(f"{key}={combo[key]}" for key in varying if key in combo) or "defaults"
        pair = tuple(combo.get(key, defaults[key]) for key in ENCODER_KEYS)
        trials.append(Trial(index, name, combo, fit_config, options, pair))
    return trials


def search_space(grids: list[Grid]) -> dict[str, Any]:
    """What a search samples: each option's ``Range`` (several plain values are a choice) or its one fixed value."""
    if len(grids) != 1:
        raise ValueError("a search takes one mapping of options and ranges, not a list of sub-grids")
    space = {key: Range("choice", tuple(values)) if len(values) > 1 else values[0] for key, values in grids[0].items()}
    if not any(isinstance(value, Range) for value in space.values()):
        raise ValueError("nothing to search: give ranges (lr: {loguniform: [1e-4, 3e-3]}) or several values")
    return space


def choice_grid(space: dict[str, Any]) -> Grid:
    """The categorical part of a search space as a grid: every encoder pair and pooling a sample can ask for."""
    return {
        key: list(value.values) if isinstance(value, Range) else [value]
        for key, value in space.items() if not isinstance(value, Range) or value.kind == "choice"
    }


def sampled_options(config: dict[str, Any]) -> dict[str, Any]:
    """A sampled configuration as typed options: floats to 3 significant digits, int options rounded."""
    rounded = {
        key: float(f"{value:.3g}") if FIELD_TYPES.get(key) is float
        else round(value) if FIELD_TYPES.get(key) is int and isinstance(value, float) else value
        for key, value in config.items()
    }
    return {key: parse_value(key, value) for key, value in rounded.items()}


# ---------------------------------------------------------------- fitting

@dataclass
class SweepInputs:
    """What every fit of a sweep reads, read-only once fitting starts: handed to fits without copying it
    (inherited by forked workers, or one object in Ray's object store)."""

    labelled: dict[tuple[str, str], LabelledFeatures]  # loaded features of each trial's (text, image) encoders
    out: Path  # the sweep folder
    options: SweepOptions


# (configuration, fold) fits made together: one alone, or (batch_folds) several that share one batched model.
Task = tuple[tuple[Trial, int], ...]
Done = Callable[[int, list[FoldResult]], None]  # called with a task's position in the task list and its results
Executor = Callable[[SweepInputs, list[Task], Done], None]  # fits every task, calling ``Done`` as each one ends
MAX_BATCHED_FITS = 100  # fits in one batched model: 100 default gated heads hold ~0.6 GB (weights, gradients,
# AdamW moments, best-epoch copies)


def trial_splits(labels: np.ndarray, trial: Trial, options: SweepOptions) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of every fold, as ``fit_task`` fits them: the same for every trial, except
    hold-outs of other sizes."""
    return fold_splits(labels, options.folds, trial.fit_config.val_fraction, options.split_seed)


def trial_tasks(labelled: dict[tuple[str, str], LabelledFeatures], trials: list[Trial], options: SweepOptions
                ) -> list[Task]:
    """The sweep's units of work, in trial order: each (configuration, fold) alone; with ``batch_folds`` (K ≥ 2),
    the K folds of every configuration that shares one batched model (``fusion.batched.batch_key``: the same
    training options and head weights, fixed poolings aside) fitted as one, in ``options.jobs`` parts so that each
    worker has one, of at most ``MAX_BATCHED_FITS`` fits.

    The parts deal the fits out in turn (fit i to part i mod parts), not in runs of neighbours: how long a batched
    model trains is set by its members' early stopping, which follows the grid's values (in the 16 fixed poolings,
    text mean and max pooling train longer than first and last), so each part gets a share of every value and
    the workers end together."""
    def batched(trial: Trial) -> bool:
        return trial.fit_config.batch_folds and options.folds > 1

    groups: dict[tuple[Any, ...], list[Trial]] = {}  # trials that batch together, in the order of their first
    for trial in trials:
        key: tuple[Any, ...] = (trial.index,)  # a trial fitted fold by fold is a group of its own
        if batched(trial):
            head_config = labelled[trial.encoders].head_config(trial.fit_config.head, trial.head_options)
            key = (trial.encoders, batch_key(trial.fit_config, head_config))
        groups.setdefault(key, []).append(trial)
    tasks: list[Task] = []
    for group in groups.values():
        fits = [(trial, fold) for trial in group for fold in range(options.folds)]
        if not batched(group[0]):
            tasks += [(fit,) for fit in fits]
            continue
        parts = -(-len(fits) // min(-(-len(fits) // options.jobs), MAX_BATCHED_FITS))
        tasks += [tuple(fits[part::parts]) for part in range(parts)]
    return tasks


def fit_task(inputs: SweepInputs, task: Task) -> list[FoldResult]:
    """Fit each (trial, fold) of ``task`` into ``runs/<trial>/``: the one fit every backend executes.

    The split and the fit are ``fusion.run.fit_fold``'s (several fits batched as ``fusion.run.fit_folds`` batches
    one configuration's folds), as for ``fit --folds K --split-seed S``.
    """
    options = inputs.options
    labelled = inputs.labelled[task[0][0].encoders]  # a batch of several trials reads one pair of caches
    fitted: list[HeadTrainer | None] = [None]  # None: fit_fold fits the fold itself
    if len(task) > 1:
        fitted = fit_folds_batched(
            labelled, [(trial.fit_config, trial.head_options, fold) for trial, fold in task], folds=options.folds,
            split_seed=options.split_seed,
        )
    results = []
    for (trial, fold), trainer in zip(task, fitted):
        trial_dir = inputs.out / "runs" / trial.folder
        result = fit_fold(
            labelled, trial_dir, trial.fit_config, trial.head_options, fold, folds=options.folds,
            split_seed=options.split_seed, progress=False, fitted=trainer, plots=False,
        )
        results.append(fold_result(trial, fold, fold_dir(trial_dir, fold, options.folds), result))
    return results


# The sweep's inputs as the local pool's workers see them: set before the pool forks, read-only afterwards,
# so the cached features are loaded once and never pickled.
_SHARED: dict[str, SweepInputs] = {}


def _fit_shared(task: Task) -> list[FoldResult]:
    return fit_task(_SHARED["inputs"], task)


def fit_locally(inputs: SweepInputs, tasks: list[Task], done: Done) -> None:
    """The local backend: the tasks in order, in this process or in ``options.jobs`` forked processes."""
    if inputs.options.jobs == 1:
        for position, task in enumerate(tasks):
            done(position, fit_task(inputs, task))
        return
    threads = max(1, (os.cpu_count() or 1) // inputs.options.jobs)
    for task in tasks:  # every fit splits: each split made (or read) once here, before forking, not in each worker
        for trial, _ in task:
            trial_splits(inputs.labelled[trial.encoders].labels, trial, inputs.options)
    _SHARED["inputs"] = inputs
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_SHARED.clear)
        pool = ProcessPoolExecutor(
            inputs.options.jobs, mp_context=multiprocessing.get_context("fork"), initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        cleanup.callback(pool.shutdown, cancel_futures=True)
        for position, result in enumerate(pool.map(_fit_shared, tasks)):
            done(position, result)


def executor(backend: str) -> Executor:
    """The function that executes a sweep's fits on ``backend``; Ray is imported only when asked for."""
    if backend == "ray":
        from fusion.sweep_ray import fit_on_ray

        return fit_on_ray
    return fit_locally


def fit_trials(
    labelled: dict[tuple[str, str], LabelledFeatures],
    out: Path,
    trials: list[Trial],
    options: SweepOptions,
    echo: Callable[[str], None] = print,
    *,
    resume: bool = False,
) -> list[FoldResult]:
    """Fit every trial on every fold on ``options.backend``; results in (trial, fold) order.

    ``labelled`` holds the loaded features of each trial's (text, image) encoders. ``resume``: a (trial, fold)
    whose run folder is complete is read back (``finished_fit``); an unfinished one is removed and fitted again.
    """
    inputs = SweepInputs(labelled, Path(out), options)
    tasks = trial_tasks(labelled, trials, options)
    fits = sum(map(len, tasks))
    names = {trial.index: trial.name for trial in trials}
    results: list[FoldResult] = []
    if resume:
        found = {(trial.index, fold): finished_fit(inputs, trial, fold) for task in tasks for trial, fold in task}
        results = [result for result in found.values() if result is not None]
        left = (tuple((trial, fold) for trial, fold in task if found[trial.index, fold] is None) for task in tasks)
        tasks = [task for task in left if task]
        echo(f"resuming: {len(results)} of {fits} fits were complete in {out}; fitting the other {fits - len(results)}")

    def done(position: int, fitted: list[FoldResult]) -> None:
        for result in fitted:
            results.append(result)
            echo(
                f"[{len(results)}/{fits}] {names[result.index]} fold {result.fold}: macro-F1 "
                f"{result.validation['macro_f1']:.4f}, neutral recall "
                f"{metric_of(result.validation, 'neutral_recall'):.3f} ({result.fit_seconds:.1f} s)"
            )

    if tasks:  # a resumed sweep may have none left (Ray refuses an empty grid)
        executor(options.backend)(inputs, tasks, done)
    return sorted(results, key=lambda result: (result.index, result.fold))


PLAN_FILE = "plan.json"  # a sweep's configurations and split, written before its first fit: what --resume checks


def sweep_plan(
    trials: list[Trial], options: SweepOptions, data_dir: Path, text_encoder: str, image_encoder: str
) -> dict[str, Any]:
    """What makes a sweep's results what they are: its configurations, folds, split seed, encoders and data.
    (Jobs and backend only change where the fits run.)"""
    return {
        "trials": [{"index": t.index, "name": t.name, "options": t.options, "folder": t.folder} for t in trials],
        "folds": options.folds, "split_seed": options.split_seed, "search": options.search,
        "text_encoder": text_encoder, "image_encoder": image_encoder, "data_dir": str(Path(data_dir).resolve()),
    }


def check_resumable(out: Path, plan: dict[str, Any], options: SweepOptions, overwrite: bool) -> None:
    """Refuse, in one line, to resume anything but this sweep's own unfinished folder."""
    if overwrite:
        raise ValueError("--resume continues a sweep and --overwrite starts one afresh: give one of them")
    if options.search != "grid":
        raise ValueError(f"--resume continues grid sweeps; a {options.search} search samples anew: start it again")
    if not (out / PLAN_FILE).is_file():
        raise FileNotFoundError(f"{out}: no {PLAN_FILE}: not a sweep folder to resume (or one from before --resume)")
    stored, plan = json.loads((out / PLAN_FILE).read_text()), json.loads(json.dumps(plan))  # as JSON stores it
    changed = sorted(key for key in plan if stored.get(key) != plan[key])
    if changed:
        raise ValueError(f"{out} holds another sweep (its {', '.join(changed)} differ): rerun with the same grid "
                         "and options, or start a new --out")


def finished_fit(inputs: SweepInputs, trial: Trial, fold: int) -> FoldResult | None:
    """The result of a (trial, fold) an earlier run of the sweep completed (``fusion.run.finished_fold``); None when
    its run folder is not complete (a half-written one is removed, to be fitted again)."""
    options, trial_dir = inputs.options, inputs.out / "runs" / trial.folder
    result = finished_fold(inputs.labelled[trial.encoders], trial_dir, trial.fit_config, trial.head_options, fold,
                           folds=options.folds, split_seed=options.split_seed)
    return None if result is None else fold_result(trial, fold, fold_dir(trial_dir, fold, options.folds), result)


def fold_result(trial: Trial, fold: int, run_dir: Path, result: RunResult) -> FoldResult:
    """What the leaderboard needs of one (trial, fold) fit."""
    return FoldResult(
        trial.index, fold, str(run_dir), result.validation, result.val_probabilities, result.trainer.fit_seconds_,
        result.parameters, result.trainer.best_epoch_, result.adjustment.tau,
    )


def cross_fitted(results: list[FoldResult], labels: np.ndarray, val_rows: list[np.ndarray],
                 train_rows: list[np.ndarray], num_classes: int) -> list[dict[str, Any]]:
    """Validation reports of one trial's folds, each with τ tuned on the other folds' validation predictions."""
    reports = []
    for fold, result in enumerate(results):
        others = [j for j in range(len(results)) if j != fold]
        probabilities = np.concatenate([results[j].val_probabilities for j in others])  # (N_other, C)
        adjustment = tune_tau(
            probabilities, np.concatenate([labels[val_rows[j]] for j in others]),
            log_prior(labels[train_rows[fold]], num_classes),
        )
        adjusted = adjustment.apply(result.val_probabilities)  # (N_val, C)
        reports.append(evaluate(labels[val_rows[fold]], adjusted.argmax(1)) | {"tau": adjustment.tau})
    return reports


# ---------------------------------------------------------------- leaderboard


def leaderboard(
    trials: list[Trial], results: list[FoldResult], labels: np.ndarray, options: SweepOptions
) -> list[dict[str, Any]]:
    """One row per trial, ranked by mean validation macro-F1 (ties keep grid order).

    Every trial is scored on the same folds, so ``delta_vs_best`` compares each row with the first fold
    by fold (paired): its std is the noise of the comparison, smaller than the std of either score.
    """
    rows, fold_f1 = [], {}
    for trial in trials:
        folds = [r for r in results if r.index == trial.index]
        reports = [r.validation for r in folds]
        taus = [r.tau for r in folds]
        if trial.fit_config.logit_adjustment and options.folds > 1:
            splits = trial_splits(labels, trial, options)
            reports = cross_fitted(
                folds, labels, [val for _, val in splits], [train for train, _ in splits], len(reports[0]["labels"])
            )
            taus = [report["tau"] for report in reports]
        fold_f1[trial.index] = np.asarray([metric_of(report, "macro_f1") for report in reports])
        row: dict[str, Any] = {"config": trial.name} | cv_summary(reports)
        row |= {
            "fit_seconds": float(np.mean([r.fit_seconds for r in folds])),
            "parameters": folds[0].parameters,
            "best_epoch": float(np.mean([r.best_epoch for r in folds])),
            "tau": float(np.mean(taus)) if trial.fit_config.logit_adjustment else None,  # None: no adjustment
            "run": folds[0].run,
            "index": trial.index,
        }
        rows.append(row)
    rows.sort(key=lambda row: (-row["macro_f1_mean"], row["index"]))
    best = fold_f1[rows[0]["index"]]
    return [
        {"rank": rank, **row, **mean_std("delta_vs_best", fold_f1[row["index"]] - best)}
        for rank, row in enumerate(rows, start=1)
    ]


def _score(row: dict[str, Any], metric: str, folds: int, sign: str = "") -> str:
    mean = f"{row[f'{metric}_mean']:{sign}.4f}"
    return f"{mean} ± {row[f'{metric}_std']:.4f}" if folds > 1 else mean


def markdown_table(rows: list[dict[str, Any]], folds: int, first: str = "config") -> str:
    """The leaderboard as a Markdown table (scores as mean ± std over the folds)."""
    header = [first, "macro-F1", "accuracy", "weighted-F1", "neutral recall", "Δ macro-F1 vs #1 (paired)", "fit s",
              "params", "τ", "run"]
    lines = ["| # | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for row in rows:
        cells = [
            str(row["rank"]), row["config"], *(_score(row, metric, folds) for metric in METRICS),
            _score(row, "delta_vs_best", folds, sign="+"), f"{row['fit_seconds']:.1f}", f"{row['parameters']:,}",
            "—" if row["tau"] is None else f"{row['tau']:.2f}", f"`{row['run']}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_leaderboard(out: Path, rows: list[dict[str, Any]], folds: int) -> None:
    columns = [key for key in rows[0] if key != "index"]
    with (out / "leaderboard.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            {key: f"{value:.6f}" if isinstance(value, float) else value for key, value in row.items()} for row in rows
        )
    (out / "leaderboard.md").write_text(markdown_table(rows, folds) + "\n")
    plot_leaderboard(rows, out / LEADERBOARD_FILE)


def write_report(out: Path, rows: list[dict[str, Any]], trials: list[Trial], summary: dict[str, Any]) -> Path:
    """report.md: what was swept, the leaderboard and its chart, the best run's curves and confusion matrix."""
    best = rows[0]
    best_trial = next(trial for trial in trials if trial.index == best["index"])
    best_run = Path(best["run"]).relative_to(out)
    folds = summary["folds"]
    scheme = f"{folds}-fold stratified cross-validation" if folds > 1 else "one stratified hold-out split"
    lines = [
        "# Sweep report",
        "",
        f"{len(trials)} configurations × {folds} fold(s) fitted in {summary['seconds']:.0f} s on the cached "
        f"features of `{summary['text_encoder']}` (text) and `{summary['image_encoder']}` (image) "
        + ("(rows that name a `text_encoder` or `image_encoder` read those caches instead) "
           if any(set(ENCODER_KEYS) & set(t.options) for t in trials) else "")
        + f"from `{summary['data_dir']}`; {scheme} of train.txt (split seed {summary['split_seed']}). "
        "Scores are validation scores (mean ± sample std over the folds); nothing here saw the test file."
        + (" Δ is the row's macro-F1 minus #1's on the same fold (mean ± std over the folds): a gap smaller "
           f"than about 2·std/√{folds} is within the noise of these folds." if folds > 1 else ""),
        "",
        "## Leaderboard",
        "",
        markdown_table(rows, folds),
        "",
        f"![leaderboard]({LEADERBOARD_FILE})",
        "",
        f"## Best configuration: `{best['config']}`",
        "",
        "Options set by the grid (all others are the defaults of `fit`):",
        "",
        "```json",
        json.dumps(best_trial.options, indent=2),
        "```",
        "",
        f"{'Fold 0' if folds > 1 else 'Its'} run folder `{best_run}` is a normal run: "
        f"`python cli.py predict --run {best['run']} --out submission.csv` (with the sweep's --data and --cache) "
        "labels the test file with it.",
        "",
        f"![training curves]({best_run / CURVES_FILE})",
        f"![confusion matrix]({best_run / CONFUSION_FILE})",
    ]
    if any(trial.fit_config.logit_adjustment for trial in trials):
        lines += [
            "",
            "Logit adjustment: τ is tuned on validation predictions only. "
            + ("With K folds, each fold's score uses τ tuned on the other folds' validation predictions "
               "(column τ: their mean), so no fold is scored with a τ tuned on itself."
               if folds > 1 else "With one split, τ is tuned on the same validation rows it is scored on, "
               "so those rows are slightly optimistic."),
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_from_cache(
    data_dir: Path,
    cache_root: Path,
    out: Path,
    grids: list[Grid],
    options: SweepOptions,
    *,
    text_encoder: str,
    image_encoder: str,
    overwrite: bool = False,
    resume: bool = False,
    echo: Callable[[str], None] = print,
) -> tuple[list[Trial], list[dict[str, Any]]]:
    """Validate every configuration, create ``out``, load the cached features once, fit and rank them.

    With ``options.search`` random or optuna, the configurations are first sampled from the grid's ranges
    and screened on fold 0 (``fusion.sweep_ray.search``); those ASHA keeps are fitted and ranked on every
    fold like a grid's. Returns the trials and the leaderboard rows (best first).

    ``resume``: ``out`` holds this very sweep, interrupted (its ``PLAN_FILE``, written before any fit, must name
    the same configurations, folds, split seed, encoders and data); the fits whose run folders are complete are
    read back, the others fitted again, and the leaderboard is the one the whole sweep would have written.
    """
    options.validate()
    space = None if options.search == "grid" else search_space(grids)
    trials = plan_trials(grids if space is None else [choice_grid(space)], (text_encoder, image_encoder))
    plan = sweep_plan(trials, options, data_dir, text_encoder, image_encoder)
    if resume:
        check_resumable(Path(out), plan, options, overwrite)
    else:
        if (Path(out) / PLAN_FILE).is_file() and not overwrite:
            raise FileExistsError(f"{out}: holds a sweep already: pass --resume to finish it (the same grid and "
                                  "options), --overwrite to start it again, or choose another --out")
        out = prepare_run_dir(out, overwrite)
        write_json(Path(out) / PLAN_FILE, plan)
    out = Path(out)
    echo(
        (f"{len(trials)} configurations" if space is None else f"{options.search} search of {options.trials} "
         "configurations, ASHA-screened on fold 0; those it keeps")
        + f" × {options.folds} fold(s); loading the cached features once"
    )
    labelled: dict[tuple[str, str], LabelledFeatures] = {}
    loaded: LoadedFeatures = {}  # each modality's features, shared by every pair that reads them
    for trial in trials:  # every cache, auxiliary texts and fixed pooling computed once, before any worker forks
        if trial.encoders not in labelled:
            text, image = trial.encoders
            labelled[trial.encoders] = load_labelled(
                data_dir, cache_root, text_encoder=text, image_encoder=image, loaded=loaded
            )
        pairs = labelled[trial.encoders]
        pairs.head_inputs(trial.fit_config, pairs.head_config(trial.fit_config.head, trial.head_options))
    with contextlib.ExitStack() as session:
        if space is not None:  # one Ray session for the search and the K-fold fits of the configurations it keeps
            from fusion.sweep_ray import connected, search

            session.enter_context(connected(options.address))
            trials = search(SweepInputs(labelled, out, options), space, (text_encoder, image_encoder), echo)
        rows = run_sweep(
            labelled, out, trials, options, text_encoder=text_encoder, image_encoder=image_encoder, echo=echo,
            resume=resume,
        )
    return trials, rows


def run_sweep(
    labelled: dict[tuple[str, str], LabelledFeatures],
    out: Path,
    trials: list[Trial],
    options: SweepOptions,
    *,
    text_encoder: str,
    image_encoder: str,
    echo: Callable[[str], None] = print,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Fit the trials on loaded features, then write the leaderboard, report and sweep.json into the folder ``out``
    (``resume``: the fits already complete in ``out`` are read back, not fitted again)."""
    started = time.perf_counter()
    results = fit_trials(labelled, out, trials, options, echo, resume=resume)
    first = next(iter(labelled.values()))  # every cache holds the same labelled rows of the same data folder
    rows = leaderboard(trials, results, first.labels, options)
    summary = asdict(options) | {
        "seconds": time.perf_counter() - started, "text_encoder": text_encoder, "image_encoder": image_encoder,
        "data_dir": str(first.data_dir),
    }
    write_json(out / "sweep.json", summary | {
        "trials": [{"index": t.index, "name": t.name, "options": t.options, "folder": t.folder} for t in trials],
        "fits": [
            {"index": r.index, "fold": r.fold, "run": r.run, "fit_seconds": r.fit_seconds, "tau": r.tau,
             "best_epoch": r.best_epoch, **{metric: metric_of(r.validation, metric) for metric in METRICS}}
            for r in results
        ],
        "leaderboard": rows,
    })
    write_leaderboard(out, rows, options.folds)
    plot_run(Path(rows[0]["run"]))  # the report shows the best run's curves; drawing all of them cost seconds
    write_report(out, rows, trials, summary)
    return rows


# ---------------------------------------------------------------- ablation


def ablation_grid(head: str, fixed: Grid) -> list[Grid]:
    """The seed's ablation for ``head``: the same head retrained on text only, image only, and both.

    The left-out modality is masked (``modalities``), so the rows differ in their input only: same
    architecture, same options, same folds and seeds. ``fixed`` holds one value per option.
    """
    if set(head_class(head).modalities) != {"text", "image"}:
        raise ValueError(f"{head} reads {' and '.join(head_class(head).modalities)} only: ablate a head that reads "
                         "both modalities (its text-only and image-only rows are what the ablation compares)")
    for key, values in fixed.items():
        if key in ("head", "modalities"):
            raise ValueError(f"the ablation sets {key} itself; choose the head with --head")
        if len(values) != 1:
            raise ValueError(f"the ablation takes one value per option, got {key}={values}")
    return [fixed | {"head": [head], "modalities": list(ABLATION_ROWS)}]


def ablation_table(rows: list[dict[str, Any]], trials: list[Trial], folds: int) -> str:
    """The leaderboard rows in the seed's order (text, image, both), labelled by their input."""
    inputs = {trial.index: ABLATION_ROWS[trial.fit_config.modalities] for trial in trials}
    ordered = sorted(rows, key=lambda row: list(ABLATION_ROWS.values()).index(inputs[row["index"]]))
    return markdown_table([row | {"config": inputs[row["index"]]} for row in ordered], folds, first="input")
