"""The Ray backend of sweeps: every (configuration, fold) fit is a Ray Tune trial on a Ray cluster.

``sweep --backend ray`` hands ``fit_on_ray`` the same tasks the local backend fits in order. The
sweep's inputs (the loaded, already pooled features of every encoder pair) go into Ray's object
store once, torch tensors as numpy buffers, so every trial on a node maps the same memory instead of
unpickling a copy or re-reading a cache. Each trial requests ``cpus_per_trial`` CPUs and no GPU (the
heads train on CPU), trains with as many torch threads, runs ``fusion.sweep.fit_task`` (the local
backend's fit: same run folder, same seeds, same numbers) and reports its ``FoldResult``, which
this process collects as trials end; ``fusion.sweep`` then ranks and reports them as it does
the local ones.

``search`` goes beyond grids (``sweep --search random|optuna --trials N``): Tune samples
configurations from the grid file's ranges (at random, or by Optuna's TPE), each one trains on
fold 0 and reports its validation macro-F1 after every epoch, and ASHA stops the fits that trail
the others at the same epoch. The configurations whose fold-0 fit ran to its own end are then
fitted on every fold as a grid is, so the leaderboard still ranks K-fold mean ± std. ASHA decides
on timing, so which configurations it keeps can change from run to run; the K-fold scores of a
given configuration cannot. ``SWEEP_DIR/search.json`` lists every sampled configuration.

On a cluster of several machines, each node needs this checkout and its virtual environment at the
same path, and the sweep folder on storage every node shares (trials write their run folders into
it, and Tune keeps its own state in ``SWEEP_DIR/tune``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import statistics
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch
from ray import tune

from fusion.config import FitConfig
from fusion.run import write_json
from fusion.sweep import (
    Done,
    FoldResult,
    Range,
    SweepInputs,
    Task,
    Trial,
    fit_task,
    plan_trials,
    sampled_options,
    trial_splits,
)
from fusion.train import HeadTrainer

RESULT_KEY = "fold_result"  # the trial's FoldResult in its final report
METRIC = "val_macro_f1"  # what trials report, and search trials maximise
EPOCH = "epoch"  # ASHA's clock in a search: only per-epoch reports carry it
SCREENED = "screened_epochs"  # in the final report of a search trial that ran to its own end
ASHA = {"grace_period": 3, "reduction_factor": 3}  # epochs before the first cut; a third of the fits go on at each


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Ray as the caller left it, else connected for the duration: to ``address``, or by Ray's default (the
    cluster `ray start` runs on this machine, else a Ray of its own started here and stopped after)."""
    if ray.is_initialized():  # a caller (a test, a notebook) already chose the cluster
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False)
    except ConnectionError as error:
        raise ValueError(
            f"--address {address}: no Ray cluster to join ({error}); start one with `ray start --head`"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def put_shared(value: Any) -> ray.ObjectRef:
    """``ray.put`` with torch tensors stored as numpy arrays, out of band: readers map the store's memory.

    Ray pickles a tensor's storage in band, so each trial would deserialise its own copy of every
    feature; a numpy buffer is zero-copy. Readers get tensors over read-only memory: nothing in the
    training loop writes into features (batches are gathered copies).
    """
    ray.util.register_serializer(torch.Tensor, serializer=torch.Tensor.numpy, deserializer=torch.from_numpy)
    try:
        return ray.put(value)
    finally:
        ray.util.deregister_serializer(torch.Tensor)


def get_shared(ref: ray.ObjectRef) -> Any:
    """The value ``put_shared`` stored; torch's warning about read-only numpy memory is expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ray.get(ref)


def _trial_setup(shared: ray.ObjectRef, cpus: int, cwd: str) -> Any:
    """Every trial's start: the driver's working directory, ``cpus`` torch threads, and the shared value.

    Tune starts a trial in a folder of its own, but the sweep's paths (its folder, the data and cache
    folders that run folders record) are relative to the driver's working directory.
    """
    os.chdir(cwd)
    torch.set_num_threads(cpus)
    return get_shared(shared)


def _fit_task(config: dict[str, Any], *, shared: ray.ObjectRef, cpus: int, cwd: str) -> None:
    """One Tune trial: fit task ``config["task"]`` of the shared task list and report its ``FoldResult``s."""
    inputs, tasks = _trial_setup(shared, cpus, cwd)
    results = fit_task(inputs, tasks[config["task"]])
    tune.report({METRIC: statistics.fmean(r.validation["macro_f1"] for r in results), RESULT_KEY: results})


class _Collect(tune.Callback):
    """Hands each finished trial's ``FoldResult``s to ``done`` in this process, as the trial ends."""

    def __init__(self, done: Done):
        self.done = done

    def on_trial_complete(self, iteration: int, trials: list[tune.experiment.Trial], trial: tune.experiment.Trial,
                          **info: Any) -> None:
        results: list[FoldResult] = trial.last_result[RESULT_KEY]
        self.done(trial.config["task"], results)


def fit_on_ray(inputs: SweepInputs, tasks: list[Task], done: Done) -> None:
    """The ray backend: one Tune trial per task, as many at once as the cluster has CPUs for."""
    options = inputs.options
    with connected(options.address):
        shared = put_shared((inputs, tasks))
        trainable = functools.partial(_fit_task, shared=shared, cpus=options.cpus_per_trial, cwd=os.getcwd())
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": options.cpus_per_trial, "gpu": 0}),
            param_space={"task": tune.grid_search(list(range(len(tasks))))},
            tune_config=tune.TuneConfig(reuse_actors=True),  # a trial process starts (imports torch) once, not per fit
            run_config=tune.RunConfig(
                name="tune", storage_path=str(inputs.out.resolve()), verbose=0, callbacks=[_Collect(done)]
            ),
        )
        failed = tuner.fit().errors
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(tasks)} Ray Tune trials failed; the first: {failed[0]}")


def _screen(config: dict[str, Any], *, shared: ray.ObjectRef, cpus: int, cwd: str) -> None:
    """One search trial: the sampled configuration on fold 0, reporting validation macro-F1 after each epoch.

    ASHA ends the trial at a report if the fit trails; a fit that ends on its own (all epochs, or early
    stopping) reports its selected epoch's score once more, marked ``SCREENED``. Nothing is written:
    the configurations kept are fitted again, with run folders, on every fold.
    """
    inputs, encoders = _trial_setup(shared, cpus, cwd)
    trial = plan_trials([{key: [value] for key, value in sampled_options(config).items()}], encoders)[0]
    labelled = inputs.labelled[trial.encoders]
    labels = labelled.labels
    train_rows, val_rows = trial_splits(labels, trial, inputs.options)[0]
    head_config = labelled.head_config(trial.fit_config.head, trial.head_options)
    features, aux = labelled.head_inputs(trial.fit_config, head_config)
    trainer = HeadTrainer(trial.fit_config, head_config).fit(
        features.subset(train_rows), labels[train_rows], features.subset(val_rows), labels[val_rows], aux=aux,
        progress=False, on_epoch=lambda epoch, row: tune.report({METRIC: row["val_macro_f1"], EPOCH: epoch}),
    )
    tune.report({METRIC: trainer.val_metrics_["macro_f1"], SCREENED: len(trainer.history_)})


def _domain(value: Any) -> Any:
    """A search-space entry as Tune samples it (a fixed value stays as it is)."""
    if not isinstance(value, Range):
        return value
    if value.kind == "choice":
        return tune.choice(list(value.values))
    return (tune.uniform if value.kind == "uniform" else tune.loguniform)(*value.values)


def _searcher(search: str, seed: int) -> Any:
    """Tune's search algorithm for ``search``, seeded."""
    if search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ValueError("--search optuna needs optuna (pip install optuna==5.0.0); or use --search random")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)


def search(inputs: SweepInputs, space: dict[str, Any], encoders: tuple[str, str], echo: Callable[[str], None]
           ) -> list[Trial]:
    """Sample ``options.trials`` configurations of ``space``, screen them on fold 0 under ASHA, and plan the kept.

    Writes ``search.json`` (every sample: options, fold-0 macro-F1, epochs, kept or stopped) into the sweep
    folder and returns the kept configurations as trials, named by the options that vary among them.
    """
    from ray.tune.schedulers import ASHAScheduler

    options = inputs.options
    epochs = space.get("epochs", FitConfig().epochs)
    shared = put_shared((inputs, encoders))
    tuner = tune.Tuner(
        tune.with_resources(
            functools.partial(_screen, shared=shared, cpus=options.cpus_per_trial, cwd=os.getcwd()),
            {"cpu": options.cpus_per_trial, "gpu": 0},
        ),
        param_space={key: _domain(value) for key, value in space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=options.trials,
            search_alg=_searcher(options.search, options.split_seed),
            scheduler=ASHAScheduler(
                time_attr=EPOCH, max_t=max(epochs.values) if isinstance(epochs, Range) else epochs,
                stop_last_trials=False, **ASHA,
            ),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name="search", storage_path=str(inputs.out.resolve()), verbose=0),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} of {options.trials} search trials failed; the first: "
                           f"{results.errors[0]}")
    sampled = [
        {"options": sampled_options(result.config), "fold0_macro_f1": result.metrics[METRIC],
         "epochs": result.metrics.get(SCREENED, result.metrics.get(EPOCH)), "kept": SCREENED in result.metrics}
        for result in results
    ]
    write_json(inputs.out / "search.json", {"search": options.search, "asha": ASHA, "sampled": sampled})
    kept = [sample["options"] for sample in sampled if sample["kept"]]
    echo(f"search: {len(kept)} of {len(sampled)} configurations kept by ASHA on fold 0")
    return plan_trials([{key: [value] for key, value in chosen.items()} for chosen in kept], encoders)
