"""Decision rules of an ensemble (fusion/decision.py) on synthetic probabilities, and predict applying the stored rule.

Prior matching hits the prior's shares; a bias fitted for macro-F1 recovers a known shift; τ = 1, an empty bias
and the identity rule change nothing; every rule survives save/load; nested ensemble probabilities never come
from a head that saw the row; ``fit --folds K`` writes decision.json and ``predict`` applies its rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from extract.dataset import LABELS, image_path
from fusion.config import FitConfig
from fusion.decision import (
    DECISION_FILE,
    RULES,
    BiasRule,
    GeometricRule,
    MeanRule,
    PriorRule,
    TemperatureRule,
    create_rule,
    macro_f1,
    nested_ensemble_probabilities,
    prior_offsets,
    read_decision,
    rule_from_dict,
    softmax,
    target_counts,
    to_dict,
    write_decision,
)
from fusion.metrics import evaluate
from fusion.run import fit_folds
from tests.test_cli import FIT_OPTIONS, MAX_TOKENS, POST, invoke, one_line_error, read_submission, succeeded

PRIOR = np.array([0.6, 0.1, 0.3])  # a rare middle class, like neutral


def synthetic(rows: int, seed: int, *, prior: np.ndarray = PRIOR, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) drawn from ``prior`` and logits (N, C) with ``signal`` on the true class and unit noise."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(prior), size=rows, p=prior)
    logits = rng.normal(0.0, 1.0, size=(rows, len(prior)))
    logits[np.arange(rows), labels] += signal
    return labels, logits


def members_of(logits: np.ndarray, count: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """(M, N, C) float32 probabilities of ``count`` noisy members around ``logits``."""
    rng = np.random.default_rng(seed)
    return softmax(logits[None] + rng.normal(0.0, spread, size=(count, *logits.shape))).astype(np.float32)


@pytest.mark.parametrize("rows", [60, 511, 800, 4000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prior_offsets_hit_the_prior_shares(rows, seed):
    _, logits = synthetic(rows, seed)
    logits[:, 1] -= 1.5  # the rare class is under-predicted, as an average of heads does
    counts = target_counts(PRIOR, rows)
    assert counts.sum() == rows and np.abs(counts - PRIOR * rows).max() < 1
    assert not np.array_equal(np.bincount(logits.argmax(1), minlength=3), counts)
    offsets = prior_offsets(logits, PRIOR)
    np.testing.assert_array_equal(np.bincount((logits + offsets).argmax(1), minlength=3), counts)
    assert offsets[0] == 0.0 and offsets[1] > 0  # the rare class is pushed up


def test_prior_rule_matches_the_training_shares_on_the_predicted_rows():
    labels, logits = synthetic(4000, 3)
    rule = PriorRule().fit(None, labels, 3)
    np.testing.assert_allclose(rule.prior, np.bincount(labels) / len(labels))
    _, test_logits = synthetic(511, 4)
    members = members_of(test_logits - [0.0, 1.0, 0.0], 5, seed=5)  # (M, N, C), neutral-shy
    shares = np.bincount(rule.apply(members).argmax(1), minlength=3) / 511
    np.testing.assert_allclose(shares, rule.prior, atol=1 / 511)
    # Too few rows to carry shares (one post): the plain mean.
    np.testing.assert_array_equal(rule.apply(members[:, :1]), MeanRule().apply(members[:, :1]))


def test_fitted_bias_recovers_a_known_shift():
    # Balanced classes and symmetric noise: the best macro-F1 is the calibrated argmax, so the fit must undo the shift.
    labels, logits = synthetic(10_000, 0, prior=np.full(3, 1 / 3), signal=2.0)
    shift = np.array([0.0, 1.0, -0.5])
    shifted = softmax(logits - shift)  # (N, C) probabilities with a known bias against class 1, for class 2
    rule = BiasRule().fit(shifted, labels)
    np.testing.assert_allclose(rule.bias, shift, atol=0.2)  # the optimum is flat: ±0.15 over seeds at this size
    assert rule.macro_f1 > rule.macro_f1_before + 0.02
    # A bias fitted on calibrated probabilities stays near zero.
    np.testing.assert_allclose(BiasRule().fit(softmax(logits), labels).bias, 0.0, atol=0.2)


def test_identity_rules_change_nothing():
    _, logits = synthetic(200, 7)
    members = members_of(logits, 5, seed=8)
    mean = np.mean(list(members), axis=0)  # what predict did before decision rules: np.mean of the list
    for rule in (MeanRule(), TemperatureRule(), TemperatureRule(tau=1.0), BiasRule(), BiasRule(bias=[0.0, 0.0, 0.0])):
        out = rule.apply(members)
        assert out.dtype == mean.dtype
        np.testing.assert_array_equal(out, mean)  # bit for bit
    # τ ≠ 1 and the geometric mean decide by their formulas.
    np.testing.assert_allclose(
        TemperatureRule(tau=2.0).apply(members), softmax(np.log(members) / 2.0).mean(0), rtol=1e-5
    )
    np.testing.assert_allclose(GeometricRule().apply(members), softmax(np.log(members).mean(0)), rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_temperature_fit_undoes_a_known_overconfidence(scale):
    labels, logits = synthetic(4000, 9)
    fitted = TemperatureRule().fit(softmax(logits), labels).tau  # whatever τ suits these logits ...
    tau = TemperatureRule().fit(softmax(logits * scale), labels).tau  # ... logits s times as sharp need s times it
    assert tau == pytest.approx(fitted * scale, rel=0.1)


def test_every_rule_survives_save_and_load(tmp_path):
    labels, logits = synthetic(600, 10)
    probabilities = softmax(logits - [0.0, 1.0, 0.0])
    rules = {name: create_rule(name) for name in RULES}
    rules["temperature"].fit(probabilities, labels)
    rules["bias"].fit(probabilities, labels)
    rules["prior"].fit(None, labels, 3)
    members = members_of(logits, 4, seed=11)
    write_decision(tmp_path, rules, default="prior")
    default, loaded = read_decision(tmp_path)
    assert default == "prior" and set(loaded) == set(RULES)
    for name, rule in rules.items():
        assert loaded[name] == rule and type(loaded[name]) is type(rule)
        np.testing.assert_array_equal(loaded[name].apply(members), rule.apply(members))
        assert rule_from_dict(json.loads(json.dumps(to_dict(rule)))) == rule
    assert read_decision(tmp_path / "elsewhere") is None
    with pytest.raises(ValueError, match="unknown decision rule 'median'"):
        create_rule("median")
    with pytest.raises(ValueError, match="unknown TemperatureRule keys"):
        rule_from_dict({"rule": "temperature", "tau": 2.0, "taus": []})


def test_macro_f1_is_the_reports():
    rng = np.random.default_rng(12)
    labels, predicted = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    predicted[predicted == 1] = 0  # a class never predicted: zero F1, as sklearn's zero_division=0
    assert macro_f1(labels, predicted, 3) == pytest.approx(evaluate(labels, predicted)["macro_f1"])


def test_nested_ensemble_probabilities_never_come_from_a_head_that_saw_the_row():
    labels = np.repeat([0, 1, 2], 20)
    shuffled = np.random.default_rng(0).permutation(60)
    folds = [(np.setdiff1d(np.arange(60), val), np.sort(val)) for val in np.array_split(shuffled, 4)]
    calls = []

    def fit_predict(train, val, rows):
        calls.append((train, val, rows))
        assert not set(rows) & (set(train) | set(val))  # neither trained nor early-stopped on a predicted row
        return np.tile([len(calls), 0.0, 0.0], (len(rows), 1))

    nested = nested_ensemble_probabilities(labels, folds, fit_predict, members=2)
    assert len(calls) == 4 * 2 and nested.shape == (60, 3)
    for k, (_, val) in enumerate(folds):  # fold k is the average of its two heads (calls 2k + 1 and 2k + 2)
        np.testing.assert_array_equal(nested[val, 0], 2 * k + 1.5)
    with pytest.raises(ValueError, match="cover each of the 61 rows"):
        nested_ensemble_probabilities(np.append(labels, 0), folds, fit_predict)


@pytest.fixture
def cached(data_dir: Path, tmp_path: Path, tiny_text_encoder_dir: Path, tiny_image_encoder_name: str) -> list[str]:
    """Both caches of the tiny data folder extracted; the ``--data --cache`` and encoder options."""
    shared = ["--data", data_dir, "--cache", tmp_path / "cache"]
    encoders = ["--text-encoder", tiny_text_encoder_dir, "--image-encoder", tiny_image_encoder_name]
    succeeded(invoke("extract", *shared, *encoders, "--max-tokens", MAX_TOKENS, "--workers", 0))
    return [*shared, *encoders]


def tags(path: Path) -> list[str]:
    return [tag for _, tag in read_submission(path)[1:]]


def test_predict_applies_the_rule_stored_by_fit_folds(cached, data_dir, tmp_path):
    run, plain, stored = tmp_path / "cv", tmp_path / "plain.csv", tmp_path / "stored.csv"
    succeeded(invoke("fit", *cached, "--out", run, "--folds", 3, *FIT_OPTIONS))
    default, rules = read_decision(run)
    assert default == "mean" and set(rules) == {"mean", "geometric", "temperature", "prior"}
    assert rules["prior"].prior == pytest.approx([1 / 3] * 3)  # the tiny data: 8 rows of each class
    assert "(decision rule mean)" in succeeded(invoke("predict", *cached[:4], "--run", run, "--out", plain)).output

    # A stored bias that makes every row neutral: predict applies it to the submission and to one post.
    rules["bias"] = BiasRule(bias=[0.0, 50.0, 0.0])
    write_decision(run, rules, default="bias")
    result = succeeded(invoke("predict", *cached[:4], "--run", run, "--out", stored))
    assert "(decision rule bias)" in result.output and set(tags(stored)) == {"neutral"}
    post = succeeded(invoke("predict", "--run", run, "--text", "so happy", "--image", image_path(data_dir, "1")))
    assert POST.search(post.output).group(1) == "neutral"
    # --decision overrides the stored default; mean gives the plain average's submission byte for byte.
    succeeded(invoke("predict", *cached[:4], "--run", run, "--out", stored, "--decision", "mean"))
    assert stored.read_bytes() == plain.read_bytes()
    for name in ("geometric", "temperature", "prior"):
        succeeded(invoke("predict", *cached[:4], "--run", run, "--out", stored, "--decision", name))
        assert set(tags(stored)) <= set(LABELS)

    # One fold's run has no decision.json: the mean, and a fitted rule it lacks is refused in one line.
    fold = run / "fold-0"
    assert not (fold / DECISION_FILE).exists()
    succeeded(invoke("predict", *cached[:4], "--run", fold, "--out", stored, "--decision", "prior"))
    one_line_error(
        invoke("predict", *cached[:4], "--run", fold, "--out", stored, "--decision", "temperature"),
        "'temperature' is fitted by `fit --folds K`",
    )
    assert invoke("predict", *cached[:4], "--run", run, "--out", stored, "--decision", "median").exit_code == 2


def test_fit_folds_fits_the_bias_on_nested_ensembles(cached, data_dir, tmp_path):
    run = tmp_path / "cv"
    fit_config = FitConfig(epochs=3, batch_size=8)
    encoders = {"text_encoder": str(cached[5]), "image_encoder": str(cached[7])}
    fit_folds(data_dir, cached[3], run, fit_config, {"hidden": 8}, folds=3, decision="bias",
              progress=False, **encoders)
    default, rules = read_decision(run)
    assert default == "bias" and len(rules["bias"].bias) == 3 and rules["bias"].bias[0] == 0.0
    with pytest.raises(ValueError, match="unknown decision rule 'median'"):
        fit_folds(data_dir, cached[3], tmp_path / "other", fit_config, {}, folds=3, decision="median", **encoders)
    assert not (tmp_path / "other").exists()  # refused before any work
