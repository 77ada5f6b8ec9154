"""Decision rules of an ensemble: the members' probabilities (M, N, C) → final probabilities (N, C).

The K heads of ``fit --folds K`` each give class probabilities; ``predict --run`` turns the
(M, N, C) stack (M members, N rows, C classes) into one (N, C) array and takes its argmax.
Averaging makes the rare class rarer: a row that one member calls neutral with confidence
is outvoted by four that lean elsewhere, so the fold ensemble's submission held 22 neutral
rows of 511 while a tenth of train.txt is neutral. The rules here:

* ``mean`` (the identity rule, the default): the arithmetic mean, exactly as before;
* ``geometric``: the normalised geometric mean ``softmax(mean_m log p_m)``;
* ``temperature``: each member's logits (``log p``, equal to them up to a constant) divided by τ
  before averaging; τ minimises the log-loss of out-of-fold member probabilities. τ = 1 is
  ``mean``, τ → ∞ tends to ``geometric``, τ → 0 to a majority vote;
* ``bias``: a per-class offset b added to ``log mean p``, fitted to maximise macro-F1 on *nested
  ensemble* probabilities (``nested_ensemble_probabilities``: every row predicted by an average
  of heads that never saw it, as the ensemble predicts the test rows);
* ``prior``: label-free, on the rows being predicted: offsets o added to ``log mean p`` so that the
  predicted class shares match the training prior (``prior_offsets``);
* ``stack`` (``StackRule``, not chosen by name: a ``stack`` folder's ``stack.json`` holds it): a logistic regression
  over the probabilities of several K-fold folders (other heads, other encoders), fitted on their out-of-fold rows.

Each rule is a dataclass: ``fit(probabilities, labels)`` returns ``self`` (what the probabilities must
be is in each ``fit``'s docstring), ``apply(members)`` maps (M, N, C) to (N, C), and ``to_dict`` /
``rule_from_dict`` round-trip it through JSON. ``decision.json`` in a K-fold run folder holds the
fitted rules and the default one (``write_decision``, ``read_decision``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fusion.metrics import confusion, f1_scores
from fusion.split import stratified_folds

DECISION_FILE = "decision.json"  # in a `fit --folds K` folder: {"default": name, "rules": {name: rule}}
DEFAULT_RULE = "mean"  # no other rule beat it beyond the fold noise in nested CV (results/decision-rules.json)
TAUS = tuple(float(t) for t in np.round(np.exp(np.linspace(np.log(0.25), np.log(4.0), 81)), 4))  # 1.0 included
BIASES = tuple(round(0.05 * i, 2) for i in range(-60, 61))  # −3 … 3: the values tried for each class's offset
EPS = 1e-12  # floor of probabilities before their log
STACK_FILE = "stack.json"  # in a `stack` folder: {"rule": the StackRule, "report": its nested CV}
STACK_CS = tuple(float(c) for c in np.logspace(-3, 2, 6))  # the stack's inverse L2 strengths tried by its inner CV
STACK_FEATURES = ("probability", "log")  # what the stack reads of each member's probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum (no overflow)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """``log p`` in float64, floored at ``EPS`` so that a zero stays finite."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), EPS, None))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Macro-F1 from a confusion count: the same number as ``fusion.metrics.evaluate``, fast enough for a grid."""
    return float(f1_scores(confusion(labels, predicted, num_classes)).mean())


def check_members(members: np.ndarray) -> np.ndarray:
    """The (M, N, C) stack of member probabilities, or a ValueError quoting the shape."""
    members = np.asarray(members)
    if members.ndim != 3 or members.shape[0] < 1:
        raise ValueError(f"member probabilities must be (M, N, C) with M ≥ 1, got shape {members.shape}")
    return members


def check_fit_data(probabilities: np.ndarray | None, labels: np.ndarray) -> None:
    if probabilities is not None and len(probabilities) != len(labels):
        raise ValueError(f"{len(probabilities)} probability rows but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no labelled rows to fit the decision rule on")


@dataclass
class MeanRule:
    """The arithmetic mean of the members (the identity rule: what ``predict`` always did)."""

    name: ClassVar[str] = "mean"

    def fit(self, probabilities: np.ndarray | None = None, labels: np.ndarray | None = None) -> MeanRule:
        """Nothing to fit."""
        return self

    def apply(self, members: np.ndarray) -> np.ndarray:
        return np.mean(check_members(members), axis=0)  # (N, C), bit for bit the earlier np.mean of the list


@dataclass
class GeometricRule:
    """The normalised geometric mean ``softmax(mean_m log p_m)``: a member's doubt counts as much as its confidence."""

    name: ClassVar[str] = "geometric"

    def fit(self, probabilities: np.ndarray | None = None, labels: np.ndarray | None = None) -> GeometricRule:
        """Nothing to fit."""
        return self

    def apply(self, members: np.ndarray) -> np.ndarray:
        members = check_members(members)
        return softmax(log_probabilities(members).mean(axis=0)).astype(members.dtype)  # (N, C)


@dataclass
class TemperatureRule:
    """Each member's logits divided by τ, then averaged: τ > 1 softens overconfident members before the vote."""

    name: ClassVar[str] = "temperature"
    tau: float = 1.0  # 1 = the plain mean
    log_loss: dict[str, float] = field(default_factory=dict)  # out-of-fold log-loss of each τ tried

    def fit(self, probabilities: np.ndarray, labels: np.ndarray) -> TemperatureRule:
        """τ of ``TAUS`` with the lowest log-loss of ``probabilities`` (N, C): *out-of-fold* member probabilities,
        each row predicted by a member that did not train on it. On a tie, the τ closest to 1."""
        check_fit_data(probabilities, labels)
        logits = log_probabilities(probabilities)  # (N, C)
        rows = np.arange(len(labels))
        self.log_loss = {str(tau): float(-np.log(softmax(logits / tau)[rows, labels] + EPS).mean()) for tau in TAUS}
        self.tau = min(TAUS, key=lambda tau: (self.log_loss[str(tau)], abs(np.log(tau))))
        return self

    def apply(self, members: np.ndarray) -> np.ndarray:
        members = check_members(members)
        if self.tau == 1.0:
            return MeanRule().apply(members)
        return softmax(log_probabilities(members) / self.tau).mean(axis=0).astype(members.dtype)  # (N, C)


def shift_mean(members: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``softmax(log mean p + offsets)`` (N, C); all-zero offsets return the mean unchanged."""
    mean = MeanRule().apply(members)  # (N, C)
    if not np.any(offsets):
        return mean
    return softmax(log_probabilities(mean) + np.asarray(offsets, dtype=np.float64)).astype(mean.dtype)


@dataclass
class BiasRule:
    """A per-class offset added to the log of the averaged probabilities, fitted for macro-F1."""

    name: ClassVar[str] = "bias"
    bias: list[float] = field(default_factory=list)  # b (C,), b[0] = 0 (only differences matter); [] = none
    macro_f1: float | None = None  # macro-F1 of the fitting rows with b applied
    macro_f1_before: float | None = None  # ... and without it

    def fit(self, probabilities: np.ndarray, labels: np.ndarray, max_rounds: int = 10) -> BiasRule:
        """Coordinate search over ``BIASES`` for each class but the first, maximising macro-F1.

        ``probabilities`` (N, C) must be *nested ensemble* probabilities of rows no averaged member trained
        on (``nested_ensemble_probabilities``); single heads' out-of-fold probabilities are not rare-class
        shy the way an average is, so a bias fitted on them comes out near zero. Among grid values with the
        best score, the middle one is kept (a plateau's centre, not its edge).
        """
        check_fit_data(probabilities, labels)
        num_classes = probabilities.shape[1]
        logits = log_probabilities(probabilities)  # (N, C)
        bias, grid = np.zeros(num_classes), np.asarray(BIASES)

        def score(b: np.ndarray) -> float:
            return macro_f1(labels, (logits + b).argmax(1), num_classes)

        self.macro_f1_before = score(bias)
        for _ in range(max_rounds):
            before = bias.copy()
            for c in range(1, num_classes):
                trials = np.repeat(bias[None], len(grid), axis=0)  # (G, C)
                trials[:, c] = grid
                scores = np.array([score(b) for b in trials])  # (G,)
                best = grid[scores == scores.max()]
                bias[c] = best[np.argmin(np.abs(best - np.median(best)))]
            if np.array_equal(bias, before):
                break
        self.bias, self.macro_f1 = [float(b) for b in bias], score(bias)
        return self

    def apply(self, members: np.ndarray) -> np.ndarray:
        return shift_mean(members, np.asarray(self.bias or 0.0))


def target_counts(prior: np.ndarray, rows: int) -> np.ndarray:
    """Whole row counts (C,) closest to ``prior · rows`` that sum to ``rows`` (largest remainders round up)."""
    exact = np.asarray(prior, dtype=np.float64) / np.sum(prior) * rows
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: rows - counts.sum()]] += 1
    return counts


def prior_offsets(logits: np.ndarray, prior: np.ndarray, max_rounds: int = 200) -> np.ndarray:
    """Offsets o (C,) such that ``argmax(logits + o)`` gives each class its ``target_counts`` of the N rows.

    Two stages: Sinkhorn-style updates ``o_c += ε·(log n_c − log Σ_i softmax((logits_i + o) / ε)_c)`` with ε
    shrinking from 1 to 0.05 match the soft shares (at ε = 1 that is EM on the class shares), then a sorting
    step fixes the hard counts: for each class in turn, o_c is set halfway between the margins of its n_c-th
    and (n_c + 1)-th best rows. Stops when every count is hit (on ties of scores it may miss by a row).
    """
    logits = np.asarray(logits, dtype=np.float64)  # (N, C)
    rows, num_classes = logits.shape
    counts = target_counts(prior, rows)  # (C,)
    offsets = np.zeros(num_classes)
    log_targets = np.log(np.maximum(counts, 0.5))  # an empty class still gets a finite pull downwards
    for epsilon in (1.0, 0.5, 0.2, 0.1, 0.05):
        for _ in range(50):
            soft = softmax((logits + offsets) / epsilon).sum(axis=0)  # (C,) soft counts
            offsets += epsilon * (log_targets - np.log(np.maximum(soft, EPS)))
    for _ in range(max_rounds):
        if np.array_equal(np.bincount((logits + offsets).argmax(1), minlength=num_classes), counts):
            break
        for c in range(num_classes):
            scores = logits + offsets  # (N, C)
            others = np.delete(scores, c, axis=1).max(axis=1)  # (N,) best other class of each row
            margins = np.sort(logits[:, c] - others)[::-1]  # (N,) row i goes to c iff margin_i + o_c > 0
            n = counts[c]
            if n == 0:
                offsets[c] = -margins[0] - 1.0
            elif n == rows:
                offsets[c] = -margins[-1] + 1.0
            else:
                offsets[c] = -(margins[n - 1] + margins[n]) / 2
    return offsets - offsets[0]  # only differences matter


@dataclass
class PriorRule:
    """Offsets on ``log mean p`` fitted on the rows being predicted so that the predicted shares match a prior."""

    name: ClassVar[str] = "prior"
    prior: list[float] = field(default_factory=list)  # class shares to match (C,): those of the training labels
    min_rows: int = 50  # fewer rows than this (a single post) cannot carry shares: the plain mean is used

    def fit(self, probabilities: np.ndarray | None, labels: np.ndarray, num_classes: int | None = None) -> PriorRule:
        """The class shares of ``labels`` (the training rows); ``probabilities`` are not needed (None is fine)."""
        check_fit_data(probabilities, labels)
        num_classes = num_classes or (probabilities.shape[1] if probabilities is not None else int(labels.max()) + 1)
        self.prior = [float(share) for share in np.bincount(labels, minlength=num_classes) / len(labels)]
        return self

    def offsets(self, members: np.ndarray) -> np.ndarray:
        """The offsets (C,) this rule adds to ``log mean p`` for these rows (zeros below ``min_rows``)."""
        members = check_members(members)
        if not self.prior:
            raise ValueError("the prior rule is not fitted: it needs the training labels' class shares")
        if len(self.prior) != members.shape[2]:
            raise ValueError(f"prior has {len(self.prior)} classes but the members give {members.shape[2]}")
        if members.shape[1] < self.min_rows:
            return np.zeros(members.shape[2])
        return prior_offsets(log_probabilities(MeanRule().apply(members)), np.asarray(self.prior))

    def apply(self, members: np.ndarray) -> np.ndarray:
        return shift_mean(members, self.offsets(members))


def stack_features(folders: np.ndarray, features: str) -> np.ndarray:
    """The regression's input (N, F·C) from F member folders' probabilities (F, N, C): columns member by member."""
    folders = check_members(folders)
    if features not in STACK_FEATURES:
        raise ValueError(f"unknown stack features {features!r}; choose one of {list(STACK_FEATURES)}")
    values = log_probabilities(folders) if features == "log" else folders.astype(np.float64)
    return values.transpose(1, 0, 2).reshape(folders.shape[1], -1)  # (F, N, C) → (N, F, C) → (N, F·C)


@dataclass
class StackRule:
    """A logistic regression over member folders' probabilities: it learns how far to trust each member per class.

    A plain average trusts every member equally for every class; members of other heads and encoders
    differ in what they see (one is sure of negatives, another finds the rare neutral), and the regression
    weighs them by their out-of-fold record. Members are K-fold folders (``fit --folds K``); each folder's
    heads are first combined by the folder's own rule, then the regression decides. It is stored as plain
    numbers (``coef``, ``intercept``), so ``apply`` needs neither scikit-learn nor a pickle. ``fusion/stack.py``
    gathers the out-of-fold probabilities, scores the rule in nested CV and writes ``stack.json``.
    """

    name: ClassVar[str] = "stack"
    runs: list[str] = field(default_factory=list)  # member folders, in column order
    heads: list[int] = field(default_factory=list)  # fold heads of each folder: how apply's (M, N, C) splits
    rules: list[dict[str, Any]] = field(default_factory=list)  # each folder's own rule (to_dict): heads → (N, C)
    features: str = "probability"  # input per member: p | "log" p (floored at EPS; −1.5 points macro-F1 on MVSA)
    class_weight: str | None = None  # None | "balanced": rows weighted inversely to their class's share
    inner_folds: int = 5  # stratified folds of the training rows that choose c
    seed: int = 0  # shuffles those folds
    c: float | None = None  # the inverse L2 strength chosen (one of STACK_CS); None = not fitted
    coef: list[list[float]] = field(default_factory=list)  # (C, F·C)
    intercept: list[float] = field(default_factory=list)  # (C,)

    def fit(self, folders: np.ndarray, labels: np.ndarray) -> StackRule:
        """Fit the multinomial regression on ``folders`` (F, N, C): *out-of-fold* probabilities of each member
        folder, every row by a head that never trained on it. c of ``STACK_CS`` minimises the log-loss of
        ``inner_folds`` stratified folds (seeded by ``seed``); the regression is then refitted on every row."""
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
        from sklearn.model_selection import StratifiedKFold

        folders = check_members(folders)
        check_fit_data(folders[0], labels)
        num_classes = folders.shape[2]
        counts = np.bincount(labels, minlength=num_classes)
        if len(counts) != num_classes or counts.min() < 2:
            raise ValueError(f"the stack needs 2 or more rows of each of the {num_classes} classes, "
                             f"got {counts.tolist()}")
        inputs = stack_features(folders, self.features)  # (N, F·C)
        splits = StratifiedKFold(min(self.inner_folds, int(counts.min())), shuffle=True, random_state=self.seed)
        search = LogisticRegressionCV(
            Cs=list(STACK_CS), l1_ratios=(0.0,), cv=splits, scoring="neg_log_loss", class_weight=self.class_weight,
            max_iter=1000, refit=False, use_legacy_attributes=False,
        ).fit(inputs, labels)
        self.c = float(search.Cs_[np.argmax(search.scores_.mean(axis=0)[0])])  # scores_ (folds, l1 ratios, Cs)
        model = LogisticRegression(  # solved tightly: the stored numbers are the optimum, not a point near it
            C=self.c, class_weight=self.class_weight, tol=1e-8, max_iter=5000
        ).fit(inputs, labels)
        self.coef, self.intercept = model.coef_.tolist(), model.intercept_.tolist()
        return self

    def decide(self, folders: np.ndarray) -> np.ndarray:
        """Probabilities (N, C) from the member folders' (F, N, C): the regression's ``predict_proba``."""
        if not self.coef:
            raise ValueError("the stack rule is not fitted: build it with `python cli.py stack`")
        inputs = stack_features(folders, self.features)  # (N, F·C)
        coef = np.asarray(self.coef)  # (C, F·C)
        if inputs.shape[1] != coef.shape[1]:
            raise ValueError(f"the stack was fitted on {coef.shape[1]} columns (members × classes), "
                             f"got {folders.shape[0]} members × {folders.shape[2]} classes")
        return softmax(inputs @ coef.T + np.asarray(self.intercept)).astype(folders.dtype)  # (N, C)

    def apply(self, members: np.ndarray) -> np.ndarray:
        """(M, N, C) heads of every folder of ``runs``, ``heads`` of each in order → each folder's rule → ``decide``."""
        members = check_members(members)
        if sum(self.heads) != members.shape[0]:
            raise ValueError(f"the stack's folders hold {sum(self.heads)} heads ({self.heads}), "
                             f"got {members.shape[0]} members' probabilities")
        groups = np.split(members, np.cumsum(self.heads)[:-1])  # F arrays (K_f, N, C)
        return self.decide(np.stack([rule_from_dict(rule).apply(g) for rule, g in zip(self.rules, groups)]))


DecisionRule = MeanRule | GeometricRule | TemperatureRule | BiasRule | PriorRule | StackRule
RULES: dict[str, type] = {rule.name: rule for rule in (MeanRule, GeometricRule, TemperatureRule, BiasRule, PriorRule)}


def create_rule(name: str, **params: Any) -> DecisionRule:
    """An unfitted rule by name; a ValueError lists the names."""
    if name not in RULES:
        raise ValueError(f"unknown decision rule {name!r}; choose one of {sorted(RULES)}")
    return RULES[name](**params)


def to_dict(rule: DecisionRule) -> dict[str, Any]:
    """``{"rule": name, **fields}``: JSON-ready."""
    return {"rule": rule.name} | dataclasses.asdict(rule)


def rule_from_dict(values: dict[str, Any]) -> DecisionRule:
    """The rule ``to_dict`` wrote; unknown keys are refused so a typo never decides with defaults."""
    from fusion.config import from_dict

    values = dict(values)
    name = values.pop("rule", None)
    if name not in RULES:
        raise ValueError(f"unknown decision rule {name!r}; choose one of {sorted(RULES)}")
    return from_dict(RULES[name], values)


def write_decision(folder: Path, rules: dict[str, DecisionRule], default: str) -> Path:
    """Write ``folder/decision.json`` (through a temporary file): the fitted rules and the one predict applies."""
    if default not in rules:
        raise ValueError(f"default rule {default!r} is not among the fitted ones {sorted(rules)}")
    path = Path(folder) / DECISION_FILE
    tmp = Path(f"{path}.tmp")
    stored = {"default": default, "rules": {name: to_dict(rule) for name, rule in rules.items()}}
    tmp.write_text(json.dumps(stored, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_decision(folder: Path) -> tuple[str, dict[str, DecisionRule]] | None:
    """(default name, rules by name) of ``folder/decision.json``, or None when the folder has none."""
    path = Path(folder) / DECISION_FILE
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    try:
        rules = {name: rule_from_dict(values) for name, values in stored["rules"].items()}
        default = stored["default"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a decision file ({error!r}); refit the folds or delete it") from None
    if default not in rules:
        raise ValueError(f"{path}: default rule {default!r} is not among its rules {sorted(rules)}")
    return default, rules


def read_stack(folder: Path) -> StackRule | None:
    """The rule of ``folder/stack.json`` (a ``stack`` folder), or None when the folder has none."""
    path = Path(folder) / STACK_FILE
    if not path.is_file():
        return None
    from fusion.config import from_dict

    try:
        values = dict(json.loads(path.read_text())["rule"])
        if values.pop("rule") != StackRule.name:
            raise KeyError("rule")
        values["runs"] = [str(Path(folder) / run) for run in values["runs"]]  # relative to the stack (or absolute)
        return from_dict(StackRule, values)
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a stack file ({error!r}); rebuild it with `python cli.py stack`") from None


def nested_ensemble_probabilities(
    labels: np.ndarray,  # (N,) labels of every row the folds cover
    folds: list[tuple[np.ndarray, np.ndarray]],  # the ensemble's (train rows, validation rows), as fit_folds splits
    fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],  # (train, val, rows) → (N_rows, C)
    members: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Probabilities (N, C) of an ensemble of heads that never saw the row, for every row of the folds.

    For the ensemble's fold k (train rows T_k, validation rows V_k), the rows of T_k are split again into
    K = len(folds) stratified folds as ``fit --folds K`` would split them; the first ``members`` of those K
    heads are fitted (each trained on (K − 1)/K of T_k, selected on the rest) and their average predicts V_k. The
    label of a row of V_k reaches none of them, neither through training nor through early stopping.
    ``members`` < K keeps the cost at K · members extra fits: the sub-ensembles average fewer heads than
    the ensemble, so they dilute the rare class a little less than it does.
    """
    if not 1 <= members <= len(folds):
        raise ValueError(f"members must be in [1, {len(folds)}] (the number of folds), got {members}")
    covered = np.sort(np.concatenate([val for _, val in folds]))
    if not np.array_equal(covered, np.arange(len(labels))):
        raise ValueError(f"the folds' validation rows must cover each of the {len(labels)} rows exactly once")
    result = np.zeros((len(labels), 0))
    for train, val in folds:
        inner = stratified_folds(labels[train], len(folds), seed)[:members]
        averaged = np.mean([fit_predict(train[a], train[b], val) for a, b in inner], axis=0)  # (N_val, C)
        if result.shape[1] == 0:
            result = np.zeros((len(labels), averaged.shape[1]), dtype=averaged.dtype)
        result[val] = averaged
    return result
