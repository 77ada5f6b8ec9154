"""Stacking (fusion/stack.py, StackRule in fusion/decision.py): a logistic regression over members' probabilities.

On a synthetic task where each member knows a different class, the stack beats its worst input (and the
plain average); the rule survives save/load as plain JSON; ``stack`` then ``predict --run STACK_DIR`` works
end to end on the tiny generated data, a single post gets its cached row's probabilities, and a member with
other folds is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

import cli
from extract.dataset import LABELS, image_path, read_text
from fusion.api import Post, Run
from fusion.decision import STACK_CS, STACK_FILE, StackRule, macro_f1, read_stack, softmax, stack_features, to_dict
from fusion.metrics import cv_summary
from fusion.split import stratified_folds
from fusion.stack import StackInputs, nested_scores
from tests import test_api
from tests.test_api import fit_by_cli, unlabelled

cached = test_api.cached  # the fixture: the tiny data folder and its caches of the tiny encoders

PRIOR = np.array([0.6, 0.1, 0.3])  # a rare middle class, like neutral


def specialists(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and three members' probabilities (3, N, C): each member sees one class's signal only, and the
    third is overconfident (its logits ×4), so that equal trust (the average) and any single member fall short."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(PRIOR), size=rows, p=PRIOR)
    logits = rng.normal(0.0, 1.0, size=(3, rows, len(PRIOR)))  # (F, N, C)
    for member in range(3):
        logits[member, :, member] += 2.5 * (labels == member)
    logits[2] *= 4.0
    return labels, softmax(logits)


def synthetic_inputs(rows: int = 900, seed: int = 0) -> StackInputs:
    labels, folders = specialists(rows, seed)
    folds = [val for _, val in stratified_folds(labels, 5, seed)]
    return StackInputs(members=[], folders=folders, labels=labels, folds=folds)


def test_the_stack_beats_its_worst_input_and_the_average_on_a_synthetic_task():
    inputs = synthetic_inputs()
    methods, chosen = nested_scores(inputs, {"stack": StackRule()})
    summary = {name: cv_summary(reports) for name, reports in methods.items()}
    worst = min(np.mean([macro_f1(inputs.labels[val], member[val].argmax(1), 3) for val in inputs.folds])
                for member in inputs.folders)  # each member alone, on the same outer folds
    stack = summary["stack"]["macro_f1_mean"]
    assert stack > worst + 0.1
    assert stack > summary["mean of members"]["macro_f1_mean"] + 0.02
    assert stack > summary["best single member"]["macro_f1_mean"] + 0.02
    assert len(chosen["stack"]) == 5 and set(chosen["stack"]) <= set(STACK_CS)


def fitted_rule(**params) -> tuple[StackRule, np.ndarray, np.ndarray]:
    labels, folders = specialists(600, 1)
    rule = StackRule(runs=["a", "b", "c"], heads=[2, 1, 3], rules=[{"rule": "mean"}] * 3, **params)
    return rule.fit(folders, labels), folders, labels


@pytest.mark.parametrize("params", [{}, {"features": "log", "class_weight": "balanced"}])
def test_stack_rule_round_trips_through_json_with_identical_predictions(tmp_path, params):
    rule, _, _ = fitted_rule(**params)
    (tmp_path / STACK_FILE).write_text(json.dumps({"rule": to_dict(rule), "report": {}}))
    loaded = read_stack(tmp_path)
    assert loaded == dataclasses.replace(rule, runs=[str(tmp_path / run) for run in rule.runs])  # relative to it
    _, heads = specialists(40, 2)
    members = np.concatenate([heads[[0, 0]], heads[[1]], heads[[2, 2, 2]]]).astype(np.float32)  # (6, N, C)
    np.testing.assert_array_equal(loaded.apply(members), rule.apply(members))
    np.testing.assert_allclose(rule.apply(members), rule.decide(heads), atol=1e-6)  # mean of equal heads = the head


def test_the_stored_numbers_are_the_regressions_predict_proba():
    rule, folders, labels = fitted_rule()
    inputs = stack_features(folders, rule.features)
    model = LogisticRegression(C=rule.c, tol=1e-8, max_iter=5000).fit(inputs, labels)
    np.testing.assert_allclose(rule.decide(folders), model.predict_proba(inputs), atol=1e-4)


def test_stack_rule_refuses_wrong_shapes_and_missing_classes():
    rule, folders, labels = fitted_rule()
    with pytest.raises(ValueError, match=r"hold 6 heads \(\[2, 1, 3\]\), got 5"):
        rule.apply(np.ones((5, 4, 3)) / 3)
    with pytest.raises(ValueError, match="fitted on 9 columns"):
        rule.decide(folders[:2])
    with pytest.raises(ValueError, match="2 or more rows of each of the 3 classes"):
        StackRule().fit(folders, np.where(labels == 1, 0, labels))
    with pytest.raises(ValueError, match="not fitted"):
        StackRule().decide(folders)


def invoke(*args: object):
    return CliRunner().invoke(cli.app, [str(arg) for arg in args])


def test_stack_command_then_predict_end_to_end(cached, tmp_path):
    members = [fit_by_cli(cached, tmp_path / "gated", "--folds", 2),
               fit_by_cli(cached, tmp_path / "late", "--folds", 2, "--head", "late")]
    where = ("--data", cached["data"], "--cache", cached["cache"])
    stack_dir = tmp_path / "stack"
    result = invoke("stack", "--run", members[0], "--run", members[1], "--out", stack_dir, *where)
    assert result.exit_code == 0, result.output
    assert "best single member" in result.output and (stack_dir / STACK_FILE).is_file()
    stored = json.loads((stack_dir / STACK_FILE).read_text())
    assert stored["rule"]["heads"] == [2, 2] and len(stored["report"]["methods"]["stack"]) == 2

    submission = tmp_path / "sub.csv"
    result = invoke("predict", "--run", stack_dir, "--out", submission, *where)
    assert result.exit_code == 0, result.output
    assert "decision rule stack" in result.output
    run = Run.load(stack_dir)
    assert len(run.members) == 4 and run.rule.name == "stack"
    guids = unlabelled(cached)
    from_cache = run.predict_cached(cached["data"], guids, cached["cache"])  # (N, C)
    rows = submission.read_text().splitlines()
    assert rows[1:] == [f"{guid},{LABELS[i]}" for guid, i in zip(guids, from_cache.argmax(1))]

    post = Post(read_text(cached["data"], guids[0]), image_path(cached["data"], guids[0]))
    # the heads agree to 1e-5 (test_api); the regression's coefficients (up to c = 100 on 24 rows) scale that
    np.testing.assert_allclose(run.predict_proba([post])[0], from_cache[0], atol=1e-4)
    assert run.predict(post) == [LABELS[from_cache[0].argmax()]]

    refused = invoke("predict", "--run", stack_dir, "--decision", "mean", "--out", submission, *where)
    assert refused.exit_code == 1 and "decides for it" in refused.output
    again = invoke("stack", "--run", members[0], "--run", members[1], "--out", stack_dir, *where)
    assert again.exit_code == 1 and "--overwrite" in again.output

    # the stack names its members relative to itself: moved together, they still make the same stack
    assert not any(Path(run).is_absolute() for run in stored["rule"]["runs"])
    moved = tmp_path / "elsewhere"
    for folder in (*members, stack_dir):
        shutil.move(folder, moved / folder.name)
    np.testing.assert_allclose(
        Run.load(moved / "stack").predict_cached(cached["data"], guids, cached["cache"]), from_cache, atol=1e-7
    )


def test_a_member_with_other_folds_or_no_folds_is_refused_in_one_line(cached, tmp_path):
    where = ("--data", cached["data"], "--cache", cached["cache"])
    base = fit_by_cli(cached, tmp_path / "a", "--folds", 2)
    other = fit_by_cli(cached, tmp_path / "b", "--folds", 2, "--split-seed", 1)
    result = invoke("stack", "--run", base, "--run", other, "--out", tmp_path / "stack", *where)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "its folds are not those of" in result.output
    assert "--split-seed 0" in result.output
    single = fit_by_cli(cached, tmp_path / "single")
    result = invoke("stack", "--run", base, "--run", single, "--out", tmp_path / "stack", *where)
    assert result.exit_code == 1 and "not a K-fold folder" in result.output
    assert not (tmp_path / "stack").exists()
