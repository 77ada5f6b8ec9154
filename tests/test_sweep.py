"""Sweeps and the ablation on a tiny generated cache: folds, grids, leaderboards, run folders, determinism."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MAX_TOKENS, write_data_dir
from typer.testing import CliRunner

import cli
from extract.dataset import LABELS, read_split
from extract.registry import create_text_encoder
from extract.run import extract_features
from fusion.calibration import LogitAdjustment, log_prior, tune_tau
from fusion.features import load_pair_features
from fusion.predict import predict_submission
from fusion.run import load_head, load_labelled, predict_run, read_config, read_metrics
from fusion.split import stratified_folds
from fusion.sweep import (
    ABLATION_ROWS,
    FoldResult,
    SweepOptions,
    build_grids,
    cross_fitted,
    parse_grid_file,
    parse_set,
    parse_value,
    plan_trials,
    sweep_from_cache,
)
from fusion.train import predict_proba

# A tiny head and few epochs: each fit takes a fraction of a second.
TINY = {"hidden": [8], "epochs": [3], "batch_size": [8]}
GRID_2X2 = TINY | {"head": ["concat", "gated"], "text_pool": ["last", "mean"]}
SCORE_COLUMNS = ("rank", "config", "macro_f1_mean", "macro_f1_std", "accuracy_mean", "weighted_f1_mean",
                 "neutral_recall_mean", "parameters", "best_epoch", "tau")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_text_encoder_dir, _tiny_image_encoder_template):
    """The generated data folder with both caches extracted by the tiny encoders (once for the module)."""
    root = tmp_path_factory.mktemp("sweep")
    data_dir = write_data_dir(root / "data")
    names = {}
    for encoder in (create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS),
                    copy.deepcopy(_tiny_image_encoder_template)):
        extract_features(encoder, data_dir, root / "cache", batch_size=8, num_workers=0, progress=False)
        names[encoder.kind] = encoder.name
    return {"data_dir": data_dir, "cache_root": root / "cache", "text_encoder": names["text"],
            "image_encoder": names["image"]}


def run(tiny_cache, out: Path, grids, folds: int = 1, jobs: int = 1, **kwargs):
    return sweep_from_cache(
        tiny_cache["data_dir"], tiny_cache["cache_root"], out, grids, SweepOptions(folds, jobs),
        text_encoder=tiny_cache["text_encoder"], image_encoder=tiny_cache["image_encoder"],
        **{"echo": lambda _: None} | kwargs,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def scores(path: Path) -> list[tuple[str, ...]]:
    """The leaderboard without the timing column, which no seed fixes."""
    return [tuple(row[column] for column in SCORE_COLUMNS) for row in read_csv(path / "leaderboard.csv")]


# ---- folds -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folds", [2, 5])
def test_folds_are_disjoint_cover_every_row_and_are_stratified(folds):
    labels = np.random.default_rng(0).permutation(np.array([0] * 60 + [1] * 11 + [2] * 29))
    splits = stratified_folds(labels, folds, seed=0)
    assert len(splits) == folds
    validation = [val for _, val in splits]
    assert sorted(np.concatenate(validation).tolist()) == list(range(len(labels)))  # each row validates once
    for train, val in splits:
        assert not set(train) & set(val) and len(train) + len(val) == len(labels)
        expected = np.bincount(labels) / folds
        assert (np.abs(np.bincount(labels[val], minlength=3) - expected) <= 1).all()  # every class, in proportion
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, stratified_folds(labels, folds, seed=0)))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(splits, stratified_folds(labels, folds, seed=1)))


# ---- grids -----------------------------------------------------------------------------------------------------


def test_parse_values_by_the_option_type():
    assert parse_set("text_pool=last,mean") == ("text_pool", ["last", "mean"])
    assert parse_set("lr=1e-3, 3e-4") == ("lr", [1e-3, 3e-4])
    assert parse_set("class_weights=true,false") == ("class_weights", [True, False])
    assert parse_set("hidden=64") == ("hidden", [64])
    assert parse_value("dropout", 0) == 0.0 and isinstance(parse_value("dropout", 0), float)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("text_pooling=last", "unknown sweep key 'text_pooling'; choose from .*text_pool"),
        ("text_dim=8", "text_dim is set from the cache"),
        ("hidden=big", "hidden='big' is not a valid int"),
        ("hidden=1.5", "hidden='1.5' is not a valid int"),
        ("class_weights=maybe", "class_weights='maybe' is not a valid bool"),
        ("hidden", "expected key=value"),
    ],
)
def test_bad_set_options_fail_clearly(option, message):
    with pytest.raises(ValueError, match=message):
        parse_set(option)


def test_grid_files_yaml_json_and_a_list_of_grids(tmp_path):
    (tmp_path / "grid.yaml").write_text("head: [concat, gated]\nlr: 0.001\n")
    assert parse_grid_file(tmp_path / "grid.yaml") == [{"head": ["concat", "gated"], "lr": [0.001]}]
    (tmp_path / "grid.json").write_text(json.dumps([{"head": "concat", "text_pool": ["last", "mean"]},
                                                    {"head": "cross-attention", "norm": ["layer", "batch"]}]))
    grids = build_grids(tmp_path / "grid.json", ["epochs=2"])
    assert grids == [{"head": ["concat"], "text_pool": ["last", "mean"], "epochs": [2]},
                     {"head": ["cross-attention"], "norm": ["layer", "batch"], "epochs": [2]}]
    trials = plan_trials(grids)
    assert [t.name for t in trials] == [
        "head=concat text_pool=last", "head=concat text_pool=mean", "head=cross-attention norm=layer",
        "head=cross-attention norm=batch",
    ]
    assert all(t.fit_config.epochs == 2 for t in trials)
    # One option at a time around a shared base: the base is fitted once, whatever sub-grid repeats it.
    around = plan_trials([{"head": ["gated", "concat"]}, {"head": ["gated"], "image_positions": ["none", "learned"]},
                          {"head": ["gated"], "class_weights": [False, True]}])
    assert [t.name for t in around] == [
        "head=gated", "head=concat", "head=gated image_positions=learned", "head=gated class_weights=True",
    ]
    (tmp_path / "bad.yaml").write_text("head: [concat]\nmystery: [1]\n")
    with pytest.raises(ValueError, match="unknown sweep key 'mystery'"):
        parse_grid_file(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="no-grid.yaml"):
        parse_grid_file(tmp_path / "no-grid.yaml")


def test_invalid_combinations_fail_before_any_fit():
    with pytest.raises(ValueError, match="hidden=8 is not divisible by num_heads=3"):
        plan_trials([{"head": ["cross-attention"], "hidden": [8], "num_heads": [2, 3]}])
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        plan_trials([{"head": ["concat", "nope"]}])


# ---- sweeps ----------------------------------------------------------------------------------------------------


def test_2x2_grid_writes_4_runs_and_a_leaderboard(tiny_cache, tmp_path):
    out = tmp_path / "sweep"
    trials, rows = run(tiny_cache, out, [GRID_2X2 | {"val_fraction": [0.25]}])
    assert len(trials) == len(rows) == 4
    runs = sorted(p for p in (out / "runs").iterdir())
    assert len(runs) == 4 and all((p / "model.pt").is_file() and (p / "metrics.json").is_file() for p in runs)
    table = read_csv(out / "leaderboard.csv")
    assert [row["config"] for row in table] == [row["config"] for row in rows]
    assert {row["config"] for row in table} == {f"head={h} text_pool={p}" for h in ("concat", "gated")
                                                for p in ("last", "mean")}
    f1s = [float(row["macro_f1_mean"]) for row in table]
    assert f1s == sorted(f1s, reverse=True) and [row["rank"] for row in table] == ["1", "2", "3", "4"]
    for column in ("accuracy_mean", "weighted_f1_mean", "neutral_recall_mean", "fit_seconds", "parameters", "run"):
        assert all(row[column] for row in table), column
    for row in table:  # each row's numbers are its run folder's
        metrics = read_metrics(row["run"])
        assert float(row["macro_f1_mean"]) == pytest.approx(metrics["validation"]["macro_f1"], abs=1e-6)
        assert int(row["parameters"]) == metrics["parameters"]
        assert float(row["neutral_recall_mean"]) == pytest.approx(
            metrics["validation"]["per_class"]["neutral"]["recall"], abs=1e-6)
    markdown = (out / "leaderboard.md").read_text()
    assert markdown.count("\n") == 2 + 4 and "neutral recall" in markdown
    report = (out / "report.md").read_text()
    assert "leaderboard.png" in report and rows[0]["config"] in report
    for image in ("leaderboard.png", *(line[line.index("(") + 1:-1] for line in report.splitlines()
                                        if line.startswith("![") and "leaderboard" not in line)):
        assert (out / image).is_file(), image
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["folds"] == 1 and len(saved["fits"]) == 4 and saved["leaderboard"] == json.loads(json.dumps(rows))

    best = Path(rows[0]["run"])  # a normal run folder: predict accepts it
    probabilities = predict_submission([best], tiny_cache["data_dir"], tiny_cache["cache_root"], tmp_path / "sub.csv")
    assert probabilities.shape == (6, 3) and (tmp_path / "sub.csv").is_file()


def test_k_folds_same_seed_same_leaderboard_also_in_parallel(tiny_cache, tmp_path):
    grid = [TINY | {"head": ["concat", "late"]}]
    _, rows = run(tiny_cache, tmp_path / "a", grid, folds=3)
    run(tiny_cache, tmp_path / "b", grid, folds=3)
    run(tiny_cache, tmp_path / "c", grid, folds=3, jobs=2)
    assert scores(tmp_path / "a") == scores(tmp_path / "b") == scores(tmp_path / "c")
    assert all(row["macro_f1_std"] >= 0 for row in rows)
    assert rows[0]["delta_vs_best_mean"] == rows[0]["delta_vs_best_std"] == 0.0
    assert rows[1]["delta_vs_best_mean"] == pytest.approx(rows[1]["macro_f1_mean"] - rows[0]["macro_f1_mean"])
    folder = Path(rows[0]["run"]).parent
    assert sorted(p.name for p in folder.iterdir()) == ["fold-0", "fold-1", "fold-2"]
    assert (folder / "fold-0" / "curves.png").is_file() and (folder / "fold-0" / "confusion_matrix.png").is_file()
    assert not (Path(rows[1]["run"]) / "curves.png").exists()  # only the best run, the report's, is drawn
    configs = [read_config(folder / f"fold-{k}") for k in range(3)]
    assert [c["split"] for c in configs] == [{"folds": 3, "fold": k, "seed": 0} for k in range(3)]
    val_sets = [set(c["val_guids"]) for c in configs]
    assert sum(map(len, val_sets)) == len(set().union(*val_sets)) == 24  # disjoint folds covering train.txt
    mean = np.mean([read_metrics(folder / f"fold-{k}")["validation"]["macro_f1"] for k in range(3)])
    assert rows[0]["macro_f1_mean"] == pytest.approx(mean)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(tiny_cache, tmp_path / "a", grid, folds=3)


def test_logit_adjustment_is_stored_applied_by_predict_and_cross_fitted(tiny_cache, tmp_path):
    _, rows = run(tiny_cache, tmp_path / "s", [TINY | {"logit_adjustment": [True], "head": ["text-only"]}], folds=3)
    fold = Path(rows[0]["run"])
    metrics, config = read_metrics(fold), read_config(fold)
    assert config["fit"]["logit_adjustment"] is True
    stored = metrics["logit_adjustment"]
    assert stored["tau"] in [float(t) for t in stored["scores"]] and len(stored["log_prior"]) == 3
    assert metrics["validation"]["macro_f1"] == pytest.approx(max(stored["scores"].values()))

    # predict applies the stored τ: force a strong one and compare with adjusting the raw probabilities.
    metrics["logit_adjustment"] |= {"tau": 2.0, "log_prior": [-0.1, -3.0, -1.0]}
    (fold / "metrics.json").write_text(json.dumps(metrics))
    data_dir, cache_root = tiny_cache["data_dir"], tiny_cache["cache_root"]
    model, run_config = load_head(fold)
    test, _ = load_pair_features(cache_root, data_dir, [row.guid for row in read_split(data_dir, "test")],
                                 tiny_cache["text_encoder"], tiny_cache["image_encoder"])
    raw = predict_proba(model, test)  # (N_test, C)
    adjusted = predict_submission([fold], data_dir, cache_root, tmp_path / "sub.csv")
    np.testing.assert_allclose(adjusted, LogitAdjustment(**metrics["logit_adjustment"]).apply(raw), atol=1e-6)
    np.testing.assert_allclose(adjusted, predict_run(fold, model, run_config, test), atol=1e-6)
    assert adjusted[:, 1].mean() > raw[:, 1].mean()  # towards the class of the smallest prior


def test_cross_fitted_tau_comes_from_the_other_folds():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 6 + [2] * 12)
    splits = stratified_folds(labels, 3, seed=0)
    results = []
    for fold, (_, val) in enumerate(splits):
        probabilities = rng.dirichlet(np.ones(3), size=len(val)).astype(np.float32)
        results.append(FoldResult(0, fold, "", {}, probabilities, 0.0, 0, 1, 0.0))
    reports = cross_fitted(results, labels, [v for _, v in splits], [t for t, _ in splits], 3)
    for fold in range(3):
        others = [j for j in range(3) if j != fold]
        expected = tune_tau(
            np.concatenate([results[j].val_probabilities for j in others]),
            np.concatenate([labels[splits[j][1]] for j in others]), log_prior(labels[splits[fold][0]], 3),
        )
        assert reports[fold]["tau"] == expected.tau


# ---- command line ----------------------------------------------------------------------------------------------


def cli_args(tiny_cache) -> list[str]:
    return ["--data", str(tiny_cache["data_dir"]), "--cache", str(tiny_cache["cache_root"]),
            "--text-encoder", tiny_cache["text_encoder"], "--image-encoder", tiny_cache["image_encoder"]]


def tiny_sets() -> list[str]:
    return [arg for key, values in TINY.items() for arg in ("--set", f"{key}={values[0]}")]


def test_sweep_command_with_set_options(tiny_cache, tmp_path):
    result = CliRunner().invoke(cli.app, [
        "sweep", *cli_args(tiny_cache), "--out", str(tmp_path / "s"), *tiny_sets(), "--set", "head=concat,late",
        "--folds", "2",
    ])
    assert result.exit_code == 0, result.output
    assert "| 1 | head=" in result.output and "| 2 | head=" in result.output and "±" in result.output
    assert len(read_csv(tmp_path / "s" / "leaderboard.csv")) == 2
    bad = CliRunner().invoke(cli.app, ["sweep", *cli_args(tiny_cache), "--out", str(tmp_path / "t"),
                                       "--set", "poolz=last"])
    assert bad.exit_code == 1 and "error: unknown sweep key 'poolz'" in bad.output
    assert not (tmp_path / "t").exists()


def test_ablate_prints_three_rows(tiny_cache, tmp_path):
    result = CliRunner().invoke(cli.app, [
        "ablate", *cli_args(tiny_cache), "--out", str(tmp_path / "a"), "--head", "gated", *tiny_sets(),
        "--folds", "2",
    ])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| ") and "±" in line]
    assert [line.split(" | ")[1] for line in lines] == list(ABLATION_ROWS.values())
    configs = [read_config(row["run"])["fit"] for row in read_csv(tmp_path / "a" / "leaderboard.csv")]
    assert sorted(c["modalities"] for c in configs) == ["both", "image", "text"]
    assert {c["head"] for c in configs} == {"gated"}
    bad = CliRunner().invoke(cli.app, ["ablate", *cli_args(tiny_cache), "--out", str(tmp_path / "b"),
                                       "--set", "head=concat"])
    assert bad.exit_code == 1 and "choose the head with --head" in bad.output


def test_fold_ensemble_predict_averages_the_fold_runs_probabilities(tiny_cache, tmp_path):
    from fusion.api import Run, expand_runs

    run(tiny_cache, tmp_path / "sweep", [TINY | {"head": ["gated"]}], folds=3)
    trial = next((tmp_path / "sweep" / "runs").iterdir())
    folds = expand_runs([trial])
    assert [f.name for f in folds] == ["fold-0", "fold-1", "fold-2"]
    data_dir, cache_root = tiny_cache["data_dir"], tiny_cache["cache_root"]
    guids = [row.guid for row in read_split(data_dir, "test")]
    each = [Run.load(fold).predict_cached(data_dir, guids, cache_root) for fold in folds]  # 3 × (N_test, C)
    assert not np.allclose(each[0], each[1])  # the folds are different models
    ensemble = predict_submission([trial], data_dir, cache_root, tmp_path / "sub.csv")
    np.testing.assert_allclose(ensemble, np.mean(each, axis=0), atol=1e-7)
    written = read_csv(tmp_path / "sub.csv")
    assert [row["guid"] for row in written] == guids
    assert [row["tag"] for row in written] == [LABELS[i] for i in ensemble.argmax(1)]
    # Naming the folds one by one is the same ensemble.
    np.testing.assert_allclose(predict_submission(folds, data_dir, cache_root, tmp_path / "sub2.csv"), ensemble)


def _norm_variant(tiny_cache) -> str:
    """The tiny text encoder with tweet normalisation, its cache extracted (a no-op once done)."""
    variant = tiny_cache["text_encoder"] + "+norm"
    encoder = create_text_encoder(variant, max_tokens=TINY_MAX_TOKENS)
    extract_features(encoder, tiny_cache["data_dir"], tiny_cache["cache_root"], batch_size=8, num_workers=0,
                     progress=False)
    return variant


def test_grid_over_text_encoders_loads_each_cache_and_fits_on_it(tiny_cache, tmp_path):
    variant = _norm_variant(tiny_cache)
    both = f"{tiny_cache['text_encoder']},{variant}"  # the two caches side by side
    names = [tiny_cache["text_encoder"], variant, both]
    grid = [TINY | {"head": ["gated"], "text_encoder": names}]
    trials, rows = run(tiny_cache, tmp_path / "sweep", grid)
    assert [t.encoders[0] for t in trials] == names
    assert {row["config"] for row in rows} == {f"text_encoder={name}" for name in names}
    for trial in trials:
        config = read_config(tmp_path / "sweep" / "runs" / trial.folder)
        assert config["encoders"]["text"]["encoder"] == trial.encoders[0]
    with pytest.raises(ValueError, match="not a valid encoder name"):
        parse_value("text_encoder", " ")


def test_pairs_sharing_a_cache_share_its_loaded_features(tiny_cache):
    loaded = {}
    shared = {"data_dir": tiny_cache["data_dir"], "cache_root": tiny_cache["cache_root"], "loaded": loaded}
    first = load_labelled(**shared, text_encoder=tiny_cache["text_encoder"], image_encoder=tiny_cache["image_encoder"])
    both = f"{tiny_cache['text_encoder']},{_norm_variant(tiny_cache)}"
    second = load_labelled(**shared, text_encoder=both, image_encoder=tiny_cache["image_encoder"])
    assert second.features.image is first.features.image  # read and normalised once
    assert second.features.text.shape[1] == 2 * first.features.text.shape[1]
    assert second.descriptions["text"]["dim"] == 2 * first.descriptions["text"]["dim"]


def test_a_reused_memo_answers_only_the_rows_it_was_filled_with(tiny_cache):
    """A memo filled for some guids must not hand its rows to a call for other guids (or another order)."""
    data_dir, cache_root = tiny_cache["data_dir"], tiny_cache["cache_root"]
    encoders = (tiny_cache["text_encoder"], tiny_cache["image_encoder"])
    train = [row.guid for row in read_split(data_dir, "train")]
    test = [row.guid for row in read_split(data_dir, "test")]
    memo = {}
    load_pair_features(cache_root, data_dir, train, *encoders, loaded=memo)
    for guids in (test, train[::-1]):
        reused, _ = load_pair_features(cache_root, data_dir, guids, *encoders, loaded=memo)
        fresh, _ = load_pair_features(cache_root, data_dir, guids, *encoders)
        assert reused.guids == guids and torch.equal(reused.text, fresh.text) and torch.equal(reused.image, fresh.image)
    same, _ = load_pair_features(cache_root, data_dir, train, *encoders, loaded=memo)
    assert len(memo) == 6 and same.text.shape[0] == len(train)  # the first call's entries were reused, not reread


def test_fit_and_sweep_with_one_split_seed_fit_the_same_folds_to_the_same_scores(tiny_cache, tmp_path):
    """One K-fold layer: fit --folds 5 --seed 1 --split-seed 0 fits sweep --set seed=1 --split-seed 0's folds.

    Without --split-seed, fit splits with its --seed, as every fit did before the split had a seed of its own.
    """
    tiny = {key: values[0] for key, values in TINY.items() if key != "num_heads"}  # the gated head has no num_heads
    fit_options = [arg for key, value in tiny.items() for arg in (f"--{key.replace('_', '-')}", str(value))]

    def fit(out: Path, *seeds: str) -> Path:
        result = CliRunner().invoke(cli.app, [
            "fit", *cli_args(tiny_cache), "--out", str(out), "--folds", "5", *seeds, *fit_options,
        ])
        assert result.exit_code == 0, result.output
        return out

    fitted = fit(tmp_path / "fit", "--seed", "1", "--split-seed", "0")
    swept = CliRunner().invoke(cli.app, [
        "sweep", *cli_args(tiny_cache), "--out", str(tmp_path / "sweep"), "--folds", "5", "--set", "seed=1",
        "--split-seed", "0", *(arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")),
    ])
    assert swept.exit_code == 0, swept.output
    (trial,) = (tmp_path / "sweep" / "runs").iterdir()
    folds = [f"fold-{k}" for k in range(5)]
    for fold in folds:
        assert read_config(fitted / fold)["val_guids"] == read_config(trial / fold)["val_guids"], fold
        assert read_config(fitted / fold)["split"] == read_config(trial / fold)["split"]
        assert read_metrics(fitted / fold)["validation"]["macro_f1"] == read_metrics(trial / fold)["validation"][
            "macro_f1"], fold
    cv = json.loads((fitted / "cv.json").read_text())
    assert (cv["seed"], cv["split_seed"]) == (1, 0)

    default = fit(tmp_path / "default", "--seed", "1")  # split seed = seed = 1: other folds
    assert read_config(default / "fold-0")["split"] == {"folds": 5, "fold": 0, "seed": 1}
    assert [read_config(default / fold)["val_guids"] for fold in folds] != [
        read_config(fitted / fold)["val_guids"] for fold in folds
    ]


# ---- resuming an interrupted sweep -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_folds", [False, True], ids=["one-by-one", "batched"])
def test_a_resumed_sweep_keeps_its_complete_fits_and_ranks_as_the_whole_sweep(tiny_cache, tmp_path, batch_folds):
    grid = [GRID_2X2 | {"dropout": [0.0], "batch_folds": [batch_folds]}]  # no dropout: batching changes no number
    run(tiny_cache, tmp_path / "whole", grid, folds=2)
    interrupted = tmp_path / "interrupted"
    trials, _ = run(tiny_cache, interrupted, grid, folds=2)
    runs = sorted((interrupted / "runs").iterdir())
    # as an interruption leaves it: no leaderboard yet, one fold half-written, one configuration not started
    for name in ("leaderboard.csv", "leaderboard.md", "report.md", "sweep.json"):
        (interrupted / name).unlink()
    (runs[1] / "fold-1" / "report.txt").unlink()
    (runs[1] / "fold-1" / "metrics.json").unlink()
    shutil.rmtree(runs[3])
    kept = {path: path.stat().st_mtime_ns for path in interrupted.glob("runs/*/fold-*/model.pt")
            if path.parent != runs[1] / "fold-1"}  # the complete fits
    assert len(kept) == 5
    lines: list[str] = []
    run(tiny_cache, interrupted, grid, folds=2, resume=True, echo=lines.append)
    assert any(line.startswith("resuming: 5 of 8 fits were complete") for line in lines), lines
    assert scores(interrupted) == scores(tmp_path / "whole")
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())  # complete fits not fitted again
    assert (runs[1] / "fold-1" / "report.txt").is_file() and (runs[3] / "fold-1" / "model.pt").is_file()
    assert len(trials) == 4
    lines.clear()  # interrupted after its last fit (while ranking): nothing left to fit, the same leaderboard
    run(tiny_cache, interrupted, grid, folds=2, resume=True, echo=lines.append)
    assert any(line.startswith("resuming: 8 of 8 fits were complete") for line in lines), lines
    assert scores(interrupted) == scores(tmp_path / "whole")


def test_resume_refuses_another_sweep_or_no_sweep_and_a_rerun_is_told_about_it(tiny_cache, tmp_path):
    out = tmp_path / "s"
    run(tiny_cache, out, [GRID_2X2], folds=2)
    with pytest.raises(ValueError, match=r"holds another sweep \(its trials differ\)"):
        run(tiny_cache, out, [GRID_2X2 | {"lr": [1e-3]}], folds=2, resume=True)
    with pytest.raises(ValueError, match=r"holds another sweep \(its folds differ\)"):
        run(tiny_cache, out, [GRID_2X2], folds=3, resume=True)
    with pytest.raises(FileExistsError, match="holds a sweep already: pass --resume"):
        run(tiny_cache, out, [GRID_2X2], folds=2)
    with pytest.raises(FileNotFoundError, match="no plan.json"):
        run(tiny_cache, tmp_path / "empty", [GRID_2X2], folds=2, resume=True)
    sets = [arg for key, values in GRID_2X2.items() for arg in ("--set", f"{key}={','.join(map(str, values))}")]
    result = CliRunner().invoke(cli.app, ["sweep", *cli_args(tiny_cache), "--out", str(out), "--folds", "2",
                                          "--resume", "--overwrite", *sets])
    assert result.exit_code == 1 and "give one of them" in result.output
