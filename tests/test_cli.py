"""The command line through typer's CliRunner on the generated data folder with the tiny encoders.

extract → fit (every registered head) → predict end to end, resumable extraction, single-post
prediction, seeding and run-folder protection, the one-line errors, and ``--help`` of every command.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner, Result

import cli
from extract.cache import cache_path
from extract.dataset import LABELS, TEST_FILE, TRAIN_FILE, image_path
from fusion.predict import predict_submission
from fusion.registry import head_names

runner = CliRunner()
MAX_TOKENS = 16
RUN_FILES = ("config.json", "model.pt", "metrics.json", "confusion_matrix.csv", "report.txt")
# A tiny head, so that a fit takes a fraction of a second.
FIT_OPTIONS = ("--epochs", 3, "--hidden", 8, "--batch-size", 8)
POST = re.compile(r"(\w+)  positive=([\d.]+)  neutral=([\d.]+)  negative=([\d.]+)")


def invoke(*args: object) -> Result:
    return runner.invoke(cli.app, [str(arg) for arg in args])


def succeeded(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Result, *fragments: str) -> str:
    """Exit code 1, no traceback, exactly one ``error:`` line, holding every fragment."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def encoders(tiny_text_encoder_dir: Path, tiny_image_encoder_name: str) -> list[str]:
    """Encoder options of every command, naming the tiny encoders."""
    return ["--text-encoder", str(tiny_text_encoder_dir), "--image-encoder", tiny_image_encoder_name]


@pytest.fixture
def cached(data_dir: Path, tmp_path: Path, encoders: list[str]) -> list[str]:
    """Both caches extracted; returns the ``--data --cache`` and encoder options for fit and predict."""
    shared = ["--data", data_dir, "--cache", tmp_path / "cache"]
    succeeded(invoke("extract", *shared, *encoders, "--max-tokens", MAX_TOKENS, "--workers", 0))
    return [*shared, *encoders]


def shuffle_test_file(data_dir: Path, guids: list[str]) -> list[str]:
    """Rewrite test_without_label.txt in an order that is neither the original nor sorted; returns it."""
    shuffled = [*guids[1::2], *guids[::2]][::-1]
    assert shuffled not in (guids, sorted(guids))
    (data_dir / TEST_FILE).write_text("guid,tag\n" + "".join(f"{guid},null\n" for guid in shuffled))
    return shuffled


def read_submission(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("head", head_names())
def test_extract_fit_predict_end_to_end(head, cached, data_dir, data_spec, tmp_path):
    run, submission = tmp_path / "run", tmp_path / "sub.csv"
    fitted = succeeded(invoke("fit", *cached, "--out", run, "--head", head, *FIT_OPTIONS))

    assert all((run / name).is_file() for name in RUN_FILES), sorted(p.name for p in run.iterdir())
    config, metrics = json.loads((run / "config.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert config["fit"]["head"] == head and config["head"]["hidden"] == 8
    # The printed report is the validation report of metrics.json: macro-F1 and every class's recall.
    validation = metrics["validation"]
    assert f"macro-F1 {validation['macro_f1']:.4f}" in fitted.output
    assert re.search(r"class\s+precision\s+recall", fitted.output)
    for label in LABELS:
        row = validation["per_class"][label]
        assert re.search(rf"^{label}\s+{row['precision']:.4f}\s+{row['recall']:.4f}\s", fitted.output, re.M)
    assert (run / "report.txt").read_text().startswith(f"accuracy {validation['accuracy']:.4f}")

    test_guids = shuffle_test_file(data_dir, data_spec.test)
    predicted = succeeded(invoke("predict", *cached[:4], "--run", run, "--out", submission))
    rows = read_submission(submission)
    assert rows[0] == ["guid", "tag"]
    assert [guid for guid, _ in rows[1:]] == test_guids  # every test row, in file order
    assert {tag for _, tag in rows[1:]} <= set(LABELS)
    assert f"wrote {len(data_spec.test)} predictions to {submission}" in predicted.output


def test_extract_twice_encodes_nothing_new(data_dir, data_spec, tmp_path, encoders):
    args = ("extract", "--data", data_dir, "--cache", tmp_path / "cache", *encoders, "--max-tokens", MAX_TOKENS,
            "--workers", 0)
    total = len(data_spec.guids)
    first = succeeded(invoke(*args))
    assert first.output.count(f"{total} new of {total} pairs") == 2  # text and image
    second = succeeded(invoke(*args))
    assert second.output.count(f"0 new of {total} pairs") == 2
    assert f"{total} new" not in second.output


def test_predict_one_post(cached, data_dir, tmp_path):
    run = tmp_path / "run"
    succeeded(invoke("fit", *cached, "--out", run, *FIT_OPTIONS))
    result = succeeded(invoke("predict", "--run", run, "--text", "so happy  today", "--image",
                              image_path(data_dir, "1")))
    match = POST.search(result.output)
    assert match, result.output
    probabilities = dict(zip(LABELS, map(float, match.groups()[1:])))
    assert match.group(1) == max(probabilities, key=probabilities.get)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=2e-3)  # three values rounded to 3 places


def test_same_seed_same_metrics_and_no_silent_overwrite(cached, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for run in (first, second):
        succeeded(invoke("fit", *cached, "--out", run, "--seed", 3, *FIT_OPTIONS))
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (first, second)]
    assert metrics[0]["validation"] == metrics[1]["validation"]
    assert [h["val_macro_f1"] for h in metrics[0]["history"]] == [h["val_macro_f1"] for h in metrics[1]["history"]]
    assert (first / "model.pt").read_bytes() == (second / "model.pt").read_bytes()

    weights = (first / "model.pt").read_bytes()
    one_line_error(invoke("fit", *cached, "--out", first, "--seed", 4, *FIT_OPTIONS), str(first), "--overwrite")
    assert (first / "model.pt").read_bytes() == weights
    assert json.loads((first / "config.json").read_text())["fit"]["seed"] == 3
    succeeded(invoke("fit", *cached, "--out", first, "--seed", 4, *FIT_OPTIONS, "--overwrite"))
    assert json.loads((first / "config.json").read_text())["fit"]["seed"] == 4


# ---- one-line errors -------------------------------------------------------------------------------------------


def test_missing_data_folder(tmp_path, encoders):
    missing = tmp_path / "no-such-data"
    result = invoke("extract", "--data", missing, "--cache", tmp_path / "cache", *encoders)
    one_line_error(result, str(missing / TRAIN_FILE), "not found")


def test_missing_train_file(data_dir, tmp_path, encoders):
    (data_dir / TRAIN_FILE).unlink()
    result = invoke("fit", "--data", data_dir, "--cache", tmp_path / "cache", "--out", tmp_path / "run", *encoders)
    one_line_error(result, str(data_dir / TRAIN_FILE), "not found")
    assert not (tmp_path / "run").exists()


def test_wrong_header(data_dir, tmp_path, encoders):
    train = data_dir / TRAIN_FILE
    train.write_text(train.read_text().replace("guid,tag", "id,label", 1))
    result = invoke("extract", "--data", data_dir, "--cache", tmp_path / "cache", *encoders)
    one_line_error(result, f"{train}:1", "guid,tag", "id,label")


def test_unknown_tag(data_dir, data_spec, tmp_path, encoders):
    train = data_dir / TRAIN_FILE
    guid = next(iter(data_spec.train))
    lines = train.read_text().splitlines()
    assert lines[1].startswith(f"{guid},")
    lines[1] = f"{guid},happy"
    train.write_text("\n".join(lines) + "\n")
    result = invoke("extract", "--data", data_dir, "--cache", tmp_path / "cache", *encoders)
    one_line_error(result, f"{train}:2", f"guid {guid}", "'happy'", "positive")


def test_unknown_head(cached, tmp_path):
    error = one_line_error(invoke("fit", *cached, "--out", tmp_path / "run", "--head", "no-such-head"), "no-such-head")
    assert all(name in error for name in head_names())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["text", "image"])
def test_unknown_encoder(kind, data_dir, tmp_path):
    result = invoke("extract", "--data", data_dir, "--cache", tmp_path / "cache", "--only", kind,
                    f"--{kind}-encoder", "no-such-encoder")
    one_line_error(result, f"unknown {kind} encoder 'no-such-encoder'")


def test_unreadable_image(data_dir, data_spec, tmp_path, encoders):
    guid = data_spec.test[0]
    image_path(data_dir, guid).write_bytes(b"not a jpeg at all")
    args = ("extract", "--data", data_dir, "--cache", tmp_path / "cache", *encoders, "--only", "image", "--workers", 0)
    one_line_error(invoke(*args), f"guid {guid}", str(image_path(data_dir, guid)))

    result = succeeded(invoke(*args, "--skip-bad"))
    assert f"1 skipped: ['{guid}']" in result.output
    total = len(data_spec.guids)
    assert f"{total} new of {total} pairs" in result.output


def test_predict_refuses_a_cache_of_other_encoders(cached, data_dir, tmp_path, encoders):
    run, other_cache = tmp_path / "run", tmp_path / "cache-8-tokens"
    succeeded(invoke("fit", *cached, "--out", run, *FIT_OPTIONS))
    succeeded(invoke("extract", "--data", data_dir, "--cache", other_cache, *encoders, "--only", "text",
                     "--max-tokens", 8, "--workers", 0))
    result = invoke("predict", "--run", run, "--data", data_dir, "--cache", other_cache, "--out", tmp_path / "s.csv")
    one_line_error(result, str(cache_path(other_cache, data_dir, "text", encoders[1])), "cache was built with")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["extract", "finetune"])
def test_device_cuda_without_a_gpu(command, data_dir, tmp_path, encoders):
    out = ["--out", tmp_path / "run"] if command == "finetune" else ["--cache", tmp_path / "cache"]
    one_line_error(invoke(command, "--data", data_dir, *out, *encoders, "--device", "cuda"), "--device cuda")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# ---- help ------------------------------------------------------------------------------------------------------

COMMANDS = typer.main.get_command(cli.app).commands


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_option(name):
    result = succeeded(invoke(name, "--help"))
    options = [max(param.opts, key=len) for param in COMMANDS[name].params if param.opts[0].startswith("--")]
    assert options, name
    missing = [option for option in options if not re.search(rf"{re.escape(option)}\b", result.output)]
    assert not missing, result.output
    assert "Usage:" in result.output


def test_help_of_the_app_lists_every_command():
    result = succeeded(invoke("--help"))
    assert all(name in result.output for name in COMMANDS)


def test_pipeline_runs_extract_fit_predict_with_the_given_encoders(data_dir, data_spec, tmp_path, encoders):
    run_dir, submission = tmp_path / "runs" / "default", tmp_path / "submission.csv"
    result = succeeded(invoke(
        "pipeline", "--data", data_dir, "--cache", tmp_path / "cache", "--run", run_dir, "--out", submission,
        *encoders,
    ))
    for stage in ("$ python cli.py extract", "$ python cli.py fit", "$ python cli.py predict"):
        assert stage in result.output
    rows = list(csv.DictReader(submission.open()))
    assert [row["guid"] for row in rows] == data_spec.test and {row["tag"] for row in rows} <= set(LABELS)
    assert sorted(p.name for p in run_dir.glob("fold-*")) == [f"fold-{k}" for k in range(5)]  # 5 folds by default
    config = json.loads((run_dir / "fold-0" / "config.json").read_text())
    assert config["encoders"]["text"]["encoder"] == encoders[1]
    assert config["encoders"]["image"]["encoder"] == encoders[3]
    assert "5-fold cross-validation of gated" in result.output


def test_fit_folds_writes_a_run_per_fold_and_predict_averages_them(cached, data_dir, data_spec, tmp_path):
    run, submission = tmp_path / "cv", tmp_path / "sub.csv"
    fitted = succeeded(invoke("fit", *cached, "--out", run, "--folds", 3, *FIT_OPTIONS))
    assert sorted(p.name for p in run.glob("fold-*")) == ["fold-0", "fold-1", "fold-2"]
    validated = [json.loads((run / f"fold-{k}" / "config.json").read_text())["val_guids"] for k in range(3)]
    assert sorted(sum(validated, [])) == sorted(data_spec.train)  # every labelled pair validated exactly once
    cv = json.loads((run / "cv.json").read_text())
    f1 = [json.loads((run / f"fold-{k}" / "metrics.json").read_text())["validation"]["macro_f1"] for k in range(3)]
    assert cv["summary"]["macro_f1_mean"] == pytest.approx(sum(f1) / 3)
    assert f"3-fold cross-validation of gated (mean ± std): accuracy {cv['summary']['accuracy_mean']:.4f}" in (
        fitted.output
    )
    succeeded(invoke("predict", *cached[:4], "--run", run, "--out", submission))
    folds = [predict_submission([run / f"fold-{k}"], data_dir, cached[3], tmp_path / f"{k}.csv") for k in range(3)]
    ensemble = np.mean(folds, axis=0)  # (N_test, C): the three heads' probabilities, averaged
    expected = [LABELS[int(i)] for i in ensemble.argmax(1)]
    assert [tag for _, tag in read_submission(submission)[1:]] == expected


def test_overwrite_replaces_a_single_run_by_folds_and_back(cached, tmp_path):
    run = tmp_path / "run"
    succeeded(invoke("fit", *cached, "--out", run, *FIT_OPTIONS))
    succeeded(invoke("fit", *cached, "--out", run, "--folds", 2, "--overwrite", *FIT_OPTIONS))
    # A stale top-level run would be read by predict instead of the folds: it must be gone.
    assert not (run / "config.json").exists() and not (run / "model.pt").exists()
    assert (run / "fold-1" / "model.pt").is_file()
    succeeded(invoke("fit", *cached, "--out", run, "--overwrite", *FIT_OPTIONS))
    assert not list(run.glob("fold-*")) and not (run / "cv.json").exists()
    assert (run / "model.pt").is_file()


def test_a_damaged_cache_or_weights_file_is_one_line_with_the_fix(cached, data_dir, tmp_path):
    """A truncated HDF5 cache and a model.pt that is not a state dict stop fit and predict in one line."""
    run, submission = tmp_path / "run", tmp_path / "sub.csv"
    succeeded(invoke("fit", *cached, "--out", run, *FIT_OPTIONS))
    weights = run / "model.pt"
    weights.write_bytes(b"not a checkpoint at all")
    one_line_error(invoke("predict", *cached[:4], "--run", run, "--out", submission), str(weights), "fit --overwrite")
    torch.save({"something": torch.zeros(2)}, weights)  # a readable file, but not this head's weights
    one_line_error(invoke("predict", *cached[:4], "--run", run, "--out", submission), "not the weights of this run")
    image_cache = cache_path(cached[3], data_dir, "image", cached[7])
    image_cache.write_bytes(image_cache.read_bytes()[:4096])  # an interrupted copy
    one_line_error(invoke("fit", *cached, "--out", tmp_path / "again", *FIT_OPTIONS), str(image_cache), "extract")
    assert not submission.exists()


def test_pipeline_extracts_with_the_extract_command_defaults():
    """pipeline calls extract_data with its defaults: they must be the extract command's."""
    import inspect

    from extract.run import extract_data

    options = {param.name: param.default for param in COMMANDS["extract"].params}
    defaults = {
        name: param.default for name, param in inspect.signature(extract_data).parameters.items()
        if param.default is not inspect.Parameter.empty and name != "echo"
    }
    assert defaults and {name: options[name] for name in defaults} == defaults


def test_bad_numbers_and_paths_are_one_line_and_write_nothing(cached, data_dir, tmp_path):
    run = tmp_path / "run"
    one_line_error(invoke("fit", *cached, "--out", run, "--lr", "nan"), "lr must be a finite number above 0, got nan")
    one_line_error(invoke("fit", *cached, "--out", run, "--seed", -5), "seed must be at least 0, got -5")
    one_line_error(invoke("fit", *cached, "--out", run, "--weight-decay", -1), "weight_decay", "of at least 0")
    assert not run.exists()
    one_line_error(invoke("finetune", "--data", data_dir, "--out", run, "--head-lr", 0, "--text-encoder", "x"),
                   "head_lr must be a finite number above 0")
    assert not run.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    one_line_error(invoke("fit", *cached, "--out", a_file / "run"), str(a_file))  # a file where a folder must be
    folder = tmp_path / "folder"
    folder.mkdir()
    fitted = tmp_path / "fitted"
    succeeded(invoke("fit", *cached, "--out", fitted, *FIT_OPTIONS))
    refused = invoke("predict", *cached[:4], "--run", fitted, "--out", folder)
    said = "".join(refused.output.replace("│", "").split())  # typer's box wraps the message, inside words too
    assert refused.exit_code == 2 and "isafolder" in said and "submission.csv" in said
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("folder.*"))  # no part file beside it
    (fitted / "config.json").write_text((fitted / "config.json").read_text()[:50])
    one_line_error(invoke("predict", *cached[:4], "--run", fitted, "--out", tmp_path / "s.csv"),
                   str(fitted / "config.json"), "not valid JSON")


def test_labels_and_grids_that_cannot_be_read_name_their_file(cached, data_dir, tmp_path):
    train = data_dir / TRAIN_FILE
    lines = train.read_text().splitlines()
    grid = tmp_path / "grid.yaml"
    grid.write_text("lr: [1e-3\nbad\n")
    one_line_error(invoke("sweep", *cached, "--out", tmp_path / "sweep", "--grid", grid),
                   f"{grid}:3: not a valid grid file", "expected ','")
    assert not (tmp_path / "sweep").exists()
    train.write_bytes(("\n".join(lines[:3]) + "\n1,pos\u00e9itive\n").encode("gbk"))
    one_line_error(invoke("fit", *cached, "--out", tmp_path / "run"), str(train), "not UTF-8 text")
    train.write_text("\n".join(lines[:8]) + "\n")  # 7 labelled pairs: a 10 % hold-out is 1 pair, not one per class
    one_line_error(invoke("fit", *cached, "--out", tmp_path / "run"),
                   "val_fraction=0.1 of 7 labelled pairs holds out 1", "--val-fraction")
    one_line_error(invoke("sweep", *cached, "--out", tmp_path / "sweep", "--set", "lr=1e-3", "--folds", 9),
                   "folds=9 but only 7 labelled pairs")


def test_ablate_refuses_a_head_that_reads_one_modality(cached, tmp_path):
    one_line_error(invoke("ablate", *cached, "--out", tmp_path / "ablation", "--head", "text-only"),
                   "text-only reads text only")
    assert not (tmp_path / "ablation").exists()


def test_finetune_from_an_unfinished_fit_run_writes_nothing(cached, data_dir, tmp_path):
    fitted = tmp_path / "fitted"
    succeeded(invoke("fit", *cached, "--out", fitted, *FIT_OPTIONS))
    (fitted / "model.pt").unlink()
    one_line_error(invoke("finetune", "--data", data_dir, "--from-run", fitted, "--out", tmp_path / "ft"),
                   str(fitted), "no model.pt")
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
def test_an_interrupted_k_fold_fit_resumes_to_the_whole_fits_folder(cached, tmp_path, batched):
    options = (*cached, *FIT_OPTIONS, "--folds", 3, "--dropout", 0.0, *(("--batch-folds",) if batched else ()))
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    succeeded(invoke("fit", *options, "--out", whole))
    succeeded(invoke("fit", *options, "--out", interrupted))
    # as an interruption leaves it: fold 0 complete, fold 1 half-written, fold 2 not started, no cv.json yet
    for name in ("cv.json", "decision.json"):
        (interrupted / name).unlink()
    (interrupted / "fold-1" / "report.txt").unlink()
    shutil.rmtree(interrupted / "fold-2")
    kept = (interrupted / "fold-0" / "model.pt").stat().st_mtime_ns
    one_line_error(invoke("fit", *options, "--out", interrupted, "--resume", "--lr", 1e-3),
                   str(interrupted / "fold-0"), "fitted with other training options")
    resumed = succeeded(invoke("fit", *options, "--out", interrupted, "--resume"))
    assert (interrupted / "fold-0" / "model.pt").stat().st_mtime_ns == kept  # not fitted again
    for name in ("cv.json", "decision.json"):
        assert json.loads((interrupted / name).read_text()) == json.loads((whole / name).read_text()), name
    assert "3-fold cross-validation" in resumed.output
    refused = invoke("fit", *cached, "--out", interrupted, "--resume")
    assert refused.exit_code == 2 and "--resume" in refused.output  # one fit has nothing to resume
    # folds of another split are not this fit's: their heads trained on rows the new folds validate on
    shutil.rmtree(interrupted / "fold-2")
    one_line_error(invoke("fit", *options, "--out", interrupted, "--resume", "--split-seed", 5),
                   str(interrupted / "fold-0"), "fitted with other split")
    one_line_error(invoke("fit", *options, "--folds", 2, "--out", whole, "--resume"),  # the last --folds counts
                   "no K-fold fit of 2 folds to resume", "fold-2")
    single = tmp_path / "single"
    succeeded(invoke("fit", *cached, *FIT_OPTIONS, "--out", single))
    one_line_error(invoke("fit", *options, "--out", single, "--resume"), "no K-fold fit of 3 folds to resume",
                   "config.json")


@pytest.mark.parametrize(("command", "hint"), [("sweep", "--resume"), ("extract", "encodes only the pairs not cached")])
def test_ctrl_c_says_how_to_continue(command, hint, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("extract.run.extract_data", mock.Mock(side_effect=KeyboardInterrupt))
    monkeypatch.setattr("fusion.sweep.sweep_from_cache", mock.Mock(side_effect=KeyboardInterrupt))
    args = ["--out", tmp_path / "s", "--set", "lr=1e-3"] if command == "sweep" else ["--cache", tmp_path / "c"]
    result = invoke(command, "--data", data_dir, *args)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.output.startswith("interrupted; to continue, ") and hint in result.output


def test_finetune_resume_refuses_training_options_that_differ_from_the_run(tmp_path):
    # --resume continues a run as it was started: a changed option typed with it would be ignored, so it is refused
    run = tmp_path / "ft"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "finetune", "finetune": {"epochs": 3, "batch_size": 16}}))
    refused = invoke("finetune", "--out", run, "--resume", "--epochs", 5, "--batch-size", 16)
    said = "".join(refused.output.replace("│", "").split())  # typer's box wraps the message
    assert refused.exit_code == 2 and "--epochs5(therun's:3)" in said and "batch-size" not in said
    # an option the command line lacks (set from the Python API) is never "typed": no refusal, no crash
    (run / "config.json").write_text(json.dumps({"kind": "finetune", "finetune": {"focal_gamma": 1.0}}))
    assert "AttributeError" not in repr(invoke("finetune", "--out", run, "--resume").exception)
