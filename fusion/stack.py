"""Stacking: a logistic regression over the out-of-fold probabilities of diverse K-fold folders.

    python cli.py stack --run runs/gated --run runs/late --out runs/stack   # then predict --run runs/stack

A plain average of members trusts each equally for every class. The stack instead learns, from rows no
member trained on, how much each member's probabilities say about each class (``StackRule`` in
``fusion/decision.py``). The members are ``fit --folds K`` folders with the same folds: every fold head
predicts its own validation rows, so each labelled row gets one honest probability per member (N, C),
and F members give the regression's (N, F·C) input.

The stack is scored before it is kept, in nested CV over those rows: the outer folds are the members' own
folds; for each, the regression (its c chosen by an inner CV) is fitted on the other folds' rows and
scores the held-out ones, beside the plain average of the members and the single member that scored best
on the other folds. ``stack.json`` holds the rule fitted on every row (plain JSON: member folders, their
head counts and rules, coefficients, intercept) and that report.

Out-of-fold rows come from single heads, while a prediction averages each folder's K heads first: the
averages are a little less confident than the rows the regression was fitted on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion.api import Run, ensemble_decision, expand_runs
from fusion.decision import STACK_FEATURES, STACK_FILE, MeanRule, StackRule, macro_f1, to_dict
from fusion.metrics import cv_summary, evaluate, mean_std
from fusion.run import CV_FILE, labelled_rows, read_config

SHOWN = ("accuracy", "macro_f1", "neutral_recall")


@dataclass
class MemberFolder:
    """A K-fold folder as the stack reads it: its fold runs and the rows each one was validated on."""

    folder: Path
    runs: list[Path]  # fold-0 … fold-(K−1)
    val_guids: list[list[str]]  # validation guids of each fold, in fold order
    split: dict[str, Any]  # {"folds": K, "fold": k, "seed": split seed} of fold 0's config.json

    @classmethod
    def read(cls, folder: Path) -> MemberFolder:
        """Read a ``fit --folds K`` folder; anything else is refused: the stack needs out-of-fold rows."""
        folder = Path(folder)
        runs = expand_runs([folder])
        if not (folder / CV_FILE).is_file() or runs == [folder]:
            raise ValueError(f"{folder}: not a K-fold folder (no {CV_FILE} and fold-*/ runs); a stack member needs "
                             "out-of-fold probabilities: fit it with `python cli.py fit --folds K`")
        configs = [read_config(run) for run in runs]
        unknown = [run for run, config in zip(runs, configs) if "val_guids" not in config]
        if unknown:
            raise ValueError(f"{unknown[0]}: its config.json does not name its validation rows (val_guids); "
                             "refit the folder with `python cli.py fit --folds K`")
        return cls(folder, runs, [config["val_guids"] for config in configs], configs[0].get("split", {}))


def check_same_folds(members: Sequence[MemberFolder]) -> None:
    """Refuse members validated on other rows: every folder must be split as the first one is.

    With the same folds, each row's member probabilities come from heads trained on the same rows, so the
    columns differ by model only, and a folder fitted on another split seed or other data is caught.
    """
    first = members[0]
    for member in members[1:]:
        if [sorted(guids) for guids in member.val_guids] != [sorted(guids) for guids in first.val_guids]:
            raise ValueError(
                f"{member.folder}: its folds are not those of {first.folder} (split {member.split} vs {first.split}); "
                f"refit it with `python cli.py fit --folds {len(first.runs)} --split-seed {first.split.get('seed')}`"
            )


def out_of_fold(member: MemberFolder, guids: Sequence[str], data_dir: Path, cache_root: Path) -> np.ndarray:
    """Probabilities (N, C) of the rows ``guids``, each by the fold head validated on it, through the folder's rule.

    The folder's rule is applied to each head alone (the plain mean leaves it unchanged), so a member's
    columns are what its rule makes of its heads.
    """
    position = {guid: row for row, guid in enumerate(guids)}
    rule = ensemble_decision([member.folder])
    result: np.ndarray | None = None
    for run_dir, val_guids in zip(member.runs, member.val_guids):
        missing = sorted(set(val_guids) - set(position))
        if missing:
            raise ValueError(f"{run_dir}: validation guid {missing[0]} is not in the data's train.txt; "
                             "fit the members on this --data")
        head = Run.load(run_dir).predict_cached(data_dir, val_guids, cache_root)  # (N_val, C)
        if result is None:
            result = np.full((len(guids), head.shape[1]), np.nan)
        result[[position[guid] for guid in val_guids]] = rule.apply(head[None])
    assert result is not None
    if np.isnan(result).any():
        raise ValueError(f"{member.folder}: its folds do not cover every row of train.txt; fit it on this --data")
    return result


@dataclass
class StackInputs:
    """What the stack is fitted and scored on: every member folder's out-of-fold probabilities and the folds."""

    members: list[MemberFolder]
    folders: np.ndarray  # (F, N, C) out-of-fold probabilities of each member folder
    labels: np.ndarray  # (N,)
    folds: list[np.ndarray]  # validation rows of each of the members' folds

    @classmethod
    def gather(cls, runs: Sequence[Path], data_dir: Path, cache_root: Path) -> StackInputs:
        """Read the member folders and predict their out-of-fold rows from the caches of ``data_dir``."""
        if len(runs) < 2:
            raise ValueError(f"a stack combines at least 2 K-fold folders, got {len(runs)}")
        members = [MemberFolder.read(run) for run in runs]
        check_same_folds(members)
        guids, labels = labelled_rows(data_dir)
        position = {guid: row for row, guid in enumerate(guids)}
        folders = np.stack([out_of_fold(member, guids, data_dir, cache_root) for member in members])  # (F, N, C)
        folds = [np.array(sorted(position[guid] for guid in val)) for val in members[0].val_guids]
        return cls(members, folders, labels, folds)

    def rule(self, **params: Any) -> StackRule:
        """An unfitted stack of these members (``params``: StackRule's options)."""
        return StackRule(
            runs=[str(m.folder.resolve()) for m in self.members], heads=[len(m.runs) for m in self.members],
            rules=[to_dict(ensemble_decision([m.folder])) for m in self.members], **params,
        )


def nested_scores(
    inputs: StackInputs, stacks: dict[str, StackRule]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[Any]]]:
    """Each candidate's report (``fusion.metrics.evaluate``) on every outer fold, and what was chosen there.

    Candidates: each unfitted rule of ``stacks`` (fitted on the other folds' rows), ``mean of members`` (the
    plain average of the folders' probabilities) and ``best single member`` (the member with the best
    macro-F1 on the other folds' rows). Chosen: each stack's c, and the best member's index, per fold.
    """
    folders, labels = inputs.folders, inputs.labels
    num_classes = folders.shape[2]
    methods: dict[str, list[dict[str, Any]]] = {name: [] for name in (*stacks, "mean of members", "best single member")}
    chosen: dict[str, list[Any]] = {name: [] for name in (*stacks, "best single member")}
    for held_out in inputs.folds:
        rest = np.setdiff1d(np.arange(len(labels)), held_out)
        for name, template in stacks.items():
            rule = dataclasses.replace(template).fit(folders[:, rest], labels[rest])
            methods[name].append(evaluate(labels[held_out], rule.decide(folders[:, held_out]).argmax(1)))
            chosen[name].append(rule.c)
        methods["mean of members"].append(
            evaluate(labels[held_out], MeanRule().apply(folders[:, held_out]).argmax(1))
        )
        best = int(np.argmax([macro_f1(labels[rest], f[rest].argmax(1), num_classes) for f in folders]))
        methods["best single member"].append(evaluate(labels[held_out], folders[best, held_out].argmax(1)))
        chosen["best single member"].append(best)
    return methods, chosen


def markdown(methods: dict[str, list[dict[str, Any]]]) -> str:
    """Mean ± std over the outer folds of each candidate, and paired Δ from the best single member and the mean."""
    single, mean = ([r["macro_f1"] for r in methods[name]] for name in ("best single member", "mean of members"))
    single_accuracy = [r["accuracy"] for r in methods["best single member"]]
    lines = [
        "| candidate | accuracy | macro-F1 | neutral recall | Δ accuracy vs best single | Δ macro-F1 vs best single "
        "| Δ macro-F1 vs mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, reports in methods.items():
        summary = cv_summary(reports)
        cells = [f"{summary[f'{m}_mean']:.4f} ± {summary[f'{m}_std']:.4f}" for m in SHOWN]
        for base, metric, skip in ((single_accuracy, "accuracy", "best single member"),
                                   (single, "macro_f1", "best single member"), (mean, "macro_f1", "mean of members")):
            delta = mean_std("d", [r[metric] - b for r, b in zip(reports, base)])
            cells.append("—" if name == skip else f"{delta['d_mean']:+.4f} ± {delta['d_std']:.4f}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def fit_stack(
    runs: Sequence[Path],
    out: Path,
    data_dir: Path,
    cache_root: Path,
    *,
    features: str = "probability",
    class_weight: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[StackRule, dict[str, list[dict[str, Any]]]]:
    """Score the stack of ``runs`` in nested CV, fit it on every out-of-fold row, and write ``out/stack.json``.

    Returns the fitted rule and the nested-CV reports (``markdown`` prints them). ``out`` must be new or a
    stack folder; an existing ``stack.json`` is replaced only with ``overwrite``.
    """
    if features not in STACK_FEATURES:
        raise ValueError(f"unknown stack features {features!r}; choose one of {list(STACK_FEATURES)}")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    out = Path(out)
    path = out / STACK_FILE
    if out.exists() and any(p.name != STACK_FILE for p in out.iterdir()):
        raise FileExistsError(f"{out}: folder holds other files than {STACK_FILE}; choose another --out")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another --out or pass --overwrite")
    inputs = StackInputs.gather(runs, Path(data_dir), Path(cache_root))
    template = inputs.rule(features=features, class_weight=class_weight, seed=seed)
    methods, chosen = nested_scores(inputs, {"stack": template})
    rule = dataclasses.replace(template).fit(inputs.folders, inputs.labels)
    out.mkdir(parents=True, exist_ok=True)
    report = {"rows": len(inputs.labels), "folds": len(inputs.folds), "methods": methods, "chosen": chosen,
              "summary": {name: cv_summary(reports) for name, reports in methods.items()}}
    tmp = Path(f"{path}.tmp")
    # members relative to the stack folder: a tree of runs moved or copied as a whole keeps its stack
    stored = dataclasses.replace(rule, runs=[os.path.relpath(run, out.resolve()) for run in rule.runs])
    tmp.write_text(json.dumps({"rule": to_dict(stored), "report": report}, indent=2) + "\n")
    os.replace(tmp, path)
    return rule, methods
