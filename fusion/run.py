"""Run folders: ``fit`` writes one, ``predict`` rebuilds the head from it alone.

A run folder holds ``config.json`` (head, training options, encoders and their cache
descriptions, the split), ``model.pt`` (head weights), ``metrics.json`` (validation
report and per-epoch history; the tuned logit adjustment when asked for), ``confusion_matrix.csv``,
``report.txt``, and the figures ``curves.png`` and ``confusion_matrix.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.dataset import LABEL_TO_ID, LABELS, read_split
from fusion.batched import fit_folds_batched
from fusion.calibration import ADJUSTMENT_KEY, LogitAdjustment, log_prior, stored_adjustment, tune_tau
from fusion.config import MODALITIES, BaseHeadConfig, FitConfig, from_dict
from fusion.features import (
    LoadedFeatures,
    PairFeatures,
    Stream,
    describe_modality,
    load_modality,
    load_text_features,
    pool_stream,
)
from fusion.metrics import cv_summary, evaluate, format_report
from fusion.plots import CONFUSION_FILE, CURVES_FILE, plot_confusion, plot_curves
from fusion.pooled_cache import pooled_path, read_pooled, source_key, write_pooled
from fusion.registry import create_run_head, head_class, head_config_from_dict, input_poolings
from fusion.split import fold_splits
from fusion.train import HeadTrainer, predict_proba

CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE = "config.json", "model.pt", "metrics.json"
CV_FILE = "cv.json"  # fit --folds K: the folds' validation reports and their mean ± std
REPORT_FILE = "report.txt"  # a fit's validation report: the last file it writes
RUN_FILES = (
    CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, CV_FILE, "confusion_matrix.csv", REPORT_FILE, CURVES_FILE, CONFUSION_FILE
)


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    """Refuse to mix a new run into an existing one unless asked to; when asked, the old run's files go first.

    Only what a run writes is removed (its files, and ``fold-*`` runs): a stale top-level run or
    fold must never join the new run's predictions (``predict`` reads either one run or the folds).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out}: run folder exists and is not empty; choose another --out or pass --overwrite"
            )
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for fold in out.glob("fold-*"):
            if (fold / CONFIG_FILE).is_file():
                shutil.rmtree(fold)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: Any) -> None:
    """Write through a temporary file, so an interrupted write never leaves half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); train one with `python cli.py fit`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}): a damaged run folder") from None


def labelled_rows(data_dir: Path) -> tuple[list[str], np.ndarray]:
    rows = read_split(data_dir, "train")
    return [r.guid for r in rows], np.array([LABEL_TO_ID[r.tag] for r in rows], dtype=np.int64)


@dataclass
class LabelledFeatures:
    """Every labelled pair of train.txt and its cached features, each read once and only when a head needs it: a
    sweep fits many heads on it.

    A modality a head pools with a fixed pooling comes from ``fusion.pooled_cache`` (its sequences are read, and the
    vectors pooled and stored, only the first time), so a head pooling both that way never loads a sequence.
    """

    data_dir: Path
    guids: list[str]
    labels: np.ndarray  # (N,) class ids, in train.txt order
    encoders: dict[str, str]  # modality → its encoder name(s), as `fit --text-encoder/--image-encoder` take them
    descriptions: dict[str, dict[str, Any]]  # the text and image caches' descriptions
    cache_root: Path = Path("cache")
    loaded: LoadedFeatures = field(default_factory=dict)  # the modalities' sequences read so far (may be shared)
    # (modality, fixed pooling) → vectors (N, 1, D) and mask (N, 1); (modality, "unread"): a masked position per pair
    pooled: dict[tuple[str, str], Stream] = field(default_factory=dict)
    auxiliary: dict[str, tuple[PairFeatures, np.ndarray]] = field(default_factory=dict)  # loaded aux sets by folder

    def stream(self, modality: str) -> Stream:
        """``modality``'s normalised sequences (N, L, D) float16 and mask (N, L), read from the caches once."""
        stream, _ = load_modality(
            self.cache_root, self.data_dir, self.guids, modality, self.encoders[modality], loaded=self.loaded
        )
        return stream

    @property
    def features(self) -> PairFeatures:
        """Both modalities' sequences, every labelled row."""
        return PairFeatures(self.guids, *self.stream("text"), *self.stream("image"))

    def pooled_stream(self, modality: str, kind: str) -> Stream:
        """``modality`` pooled by the fixed pooling ``kind``: (N, 1, D) float32 vectors and (N, 1) mask."""
        if (modality, kind) not in self.pooled:
            encoder = self.encoders[modality]
            key = source_key(
                self.cache_root, self.data_dir, modality, encoder, self.guids, kind, self.descriptions[modality]
            )
            path = pooled_path(self.cache_root, self.data_dir, modality, encoder, kind)
            stream = read_pooled(path, key)
            if stream is None:
                stream = pool_stream(*self.stream(modality), kind)
                write_pooled(path, key, stream)
            self.pooled[modality, kind] = stream
        return self.pooled[modality, kind]

    def unread_stream(self, modality: str) -> Stream:
        """What a head that does not read ``modality`` is handed: one masked position per pair, (N, 1, D) zeros and
        (N, 1) False, made once so that every fold and configuration shares it (one stream in a batched fit)."""
        if (modality, "unread") not in self.pooled:
            rows, dim = len(self.guids), self.descriptions[modality]["dim"]
            self.pooled[modality, "unread"] = torch.zeros(rows, 1, dim), torch.zeros(rows, 1, dtype=torch.bool)
        return self.pooled[modality, "unread"]

    def aux(self, aux_data: str) -> tuple[PairFeatures, np.ndarray] | None:
        """The labelled texts of a text-only folder, encoded like this set's texts; loaded once, then kept."""
        if not aux_data:
            return None
        if aux_data not in self.auxiliary:
            guids, labels = labelled_rows(Path(aux_data))
            if Path(aux_data).resolve() == self.data_dir.resolve():
                raise ValueError(f"aux_data {aux_data} is the training data itself")
            text = self.descriptions["text"]
            features = load_text_features(
                self.cache_root, Path(aux_data), guids, text["encoder"], self.descriptions["image"]["dim"],
                expected=text,  # the same encoder, weights and preprocessing, or it refuses
            )
            self.auxiliary[aux_data] = features, labels
        return self.auxiliary[aux_data]

    def head_inputs(
        self, fit_config: FitConfig, head_config: BaseHeadConfig
    ) -> tuple[PairFeatures, tuple[PairFeatures, np.ndarray] | None]:
        """What a head of these configs trains on: every pair, and the auxiliary texts (or None).

        Branches with a fixed pooling get vectors pooled once per cache (``pooled_stream``), shared by every fold
        and configuration; a modality the head does not read is one masked position per pair, as
        ``PairFeatures.batch`` hands it to the head; the modality an ablation leaves out is masked.
        """
        poolings = input_poolings(fit_config.head, head_config)
        streams: list[torch.Tensor] = []
        for modality in ("text", "image"):
            if modality in poolings:
                streams += self.pooled_stream(modality, poolings[modality])
            elif modality in head_class(fit_config.head).modalities:
                streams += self.stream(modality)
            else:
                streams += self.unread_stream(modality)
        features = with_modalities(PairFeatures(self.guids, *streams), fit_config.modalities)
        aux = self.aux(fit_config.aux_data)
        return features, None if aux is None else (aux[0].pooled(poolings), aux[1])

    def head_config(self, head: str, head_options: dict[str, Any]) -> BaseHeadConfig:
        """Head ``head``'s config: sizes from the caches, the rest from ``head_options``, which holds only options
        it takes (``fusion.registry.head_options``): one it does not take fails rather than go unused."""
        sizes = {
            "text_dim": self.descriptions["text"]["dim"], "image_dim": self.descriptions["image"]["dim"],
            "image_length": self.descriptions["image"]["length"], "num_classes": len(LABELS),
        }
        return head_config_from_dict(head, sizes | head_options)


@dataclass
class RunResult:
    trainer: HeadTrainer  # the fitted trainer (model_, history_, best_epoch_, fit_seconds_)
    validation: dict[str, Any]  # validation report after the logit adjustment (= the trainer's without it)
    adjustment: LogitAdjustment  # τ = 0 unless the fit config asked for logit adjustment
    val_probabilities: np.ndarray  # (N_val, C) before the adjustment
    parameters: int  # number of head parameters


def load_labelled(
    data_dir: Path, cache_root: Path, *, text_encoder: str, image_encoder: str,
    loaded: LoadedFeatures | None = None,
) -> LabelledFeatures:
    """Every labelled pair, its features read when first needed; ``loaded`` shares modalities already read
    (``load_pair_features``) with other pairs of caches."""
    guids, labels = labelled_rows(data_dir)
    encoders = {"text": text_encoder, "image": image_encoder}
    descriptions = {modality: describe_modality(cache_root, data_dir, modality, encoder)
                    for modality, encoder in encoders.items()}
    return LabelledFeatures(
        Path(data_dir), guids, labels, encoders, descriptions, Path(cache_root), {} if loaded is None else loaded
    )


def with_modalities(features: PairFeatures, modalities: str) -> PairFeatures:
    """The features a head trained on ``modalities`` sees: the other modality's mask is all False.

    Heads ignore masked positions (tests/test_heads.py pins it), so the masked modality never reaches the logits.
    """
    if modalities not in MODALITIES:
        raise ValueError(f"modalities={modalities!r} is not one of {list(MODALITIES)}")
    if modalities == "text":
        return dataclasses.replace(features, image_mask=torch.zeros_like(features.image_mask))
    if modalities == "image":
        return dataclasses.replace(features, text_mask=torch.zeros_like(features.text_mask))
    return features


def fit_run(
    data_dir: Path,
    cache_root: Path,
    out: Path,
    fit_config: FitConfig,
    head_options: dict[str, Any],
    *,
    text_encoder: str,
    image_encoder: str,
    split_seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> HeadTrainer:
    """Split train.txt (one stratified hold-out), train the head on cached features, and write the run folder.

    ``split_seed`` seeds the split; None = ``fit_config.seed``, the one seed runs had before the split got its own.
    """
    fit_config.validate()
    labelled = load_labelled(data_dir, cache_root, text_encoder=text_encoder, image_encoder=image_encoder)
    split_seed = fit_config.seed if split_seed is None else split_seed
    return fit_fold(
        labelled, out, fit_config, head_options, split_seed=split_seed, overwrite=overwrite, progress=progress
    ).trainer


def fit_folds(
    data_dir: Path,
    cache_root: Path,
    out: Path,
    fit_config: FitConfig,
    head_options: dict[str, Any],
    *,
    folds: int,
    text_encoder: str,
    image_encoder: str,
    split_seed: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    decision: str | None = None,
    bias_members: int = 2,
) -> list[RunResult]:
    """K-fold cross-validation of train.txt: a run per fold in ``out/fold-k``, ``out/cv.json``, ``out/decision.json``.

    The folds are ``fit_fold``'s, as a sweep's: ``split_seed`` seeds them (None = ``fit_config.seed``, the one
    seed runs had before the split got its own), so ``sweep --split-seed S`` scores a config on these very rows.
    Each fold's head is selected on its own validation fold; ``predict --run out`` combines the K heads'
    probabilities (a fold ensemble, so every labelled pair trains K − 1 of them) by the rule ``decision``
    (``fusion/decision.py``; default ``mean``, the plain average). ``decision.json`` stores the rules fitted
    here: ``mean``, ``geometric``, ``temperature`` (τ from the folds' out-of-fold probabilities) and ``prior``
    (the labels' class shares); ``bias`` only when it is ``decision``, since it fits ``K · bias_members``
    more heads (``nested_ensemble_probabilities``).
    """
    from fusion.decision import (
        DEFAULT_RULE,
        BiasRule,
        GeometricRule,
        MeanRule,
        PriorRule,
        TemperatureRule,
        create_rule,
        nested_ensemble_probabilities,
        write_decision,
    )

    fit_config.validate()
    if folds < 2:
        raise ValueError(f"K-fold cross-validation needs folds ≥ 2, got {folds}; one hold-out split is fit_run")
    decision = create_rule(decision or DEFAULT_RULE).name  # an unknown name fails before any fit
    if decision == "bias" and fit_config.logit_adjustment:
        raise ValueError("decision rule 'bias' fits its own class offsets: do not combine it with logit_adjustment")
    split_seed = fit_config.seed if split_seed is None else split_seed
    labelled = load_labelled(data_dir, cache_root, text_encoder=text_encoder, image_encoder=image_encoder)
    labelled.head_inputs(fit_config, labelled.head_config(fit_config.head, head_options))  # read before any write
    done: list[RunResult | None] = [None] * folds  # None: the fold is still to fit
    if resume:
        if overwrite:
            raise ValueError("--resume continues a K-fold fit and --overwrite starts one afresh: give one of them")
        stray = sorted(str(d) for d in Path(out).glob("fold-*") if d.name not in {f"fold-{k}" for k in range(folds)})
        stray += [str(Path(out) / CONFIG_FILE)] if (Path(out) / CONFIG_FILE).is_file() else []  # a single fit's run
        if not Path(out).is_dir() or stray:
            raise ValueError(f"{out}: no K-fold fit of {folds} folds to resume" + (f" ({stray[0]})" if stray else ""))
        done = [finished_fold(labelled, out, fit_config, head_options, fold, folds=folds, split_seed=split_seed)
                for fold in range(folds)]
    else:
        out = prepare_run_dir(out, overwrite)
    left = [fold for fold in range(folds) if done[fold] is None]
    fitted: dict[int, HeadTrainer] = {}  # fold → its head, trained with the others (batch_folds); else fit_fold fits it
    if fit_config.batch_folds and len(left) > 1:
        fitted = dict(zip(left, fit_folds_batched(
            labelled, [(fit_config, head_options, fold) for fold in left], folds=folds, split_seed=split_seed,
            progress=progress,
        )))
    results = [
        done[fold] or fit_fold(labelled, out, fit_config, head_options, fold, folds=folds, split_seed=split_seed,
                               progress=progress, fitted=fitted.get(fold))
        for fold in range(folds)
    ]
    reports = [result.validation for result in results]
    write_json(out / CV_FILE, {
        "folds": folds, "seed": fit_config.seed, "split_seed": split_seed, "summary": cv_summary(reports),
        "validation": reports,
    })
    labels = labelled.labels
    splits = fold_splits(labels, folds, fit_config.val_fraction, split_seed)  # the rows fit_fold fitted each fold on
    out_of_fold = np.zeros((len(labels), len(LABELS)))  # (N, C): each row by the one head that never trained on it
    for result, (_, val_rows) in zip(results, splits):
        out_of_fold[val_rows] = result.adjustment.apply(result.val_probabilities)
    rules = {
        "mean": MeanRule(), "geometric": GeometricRule(), "temperature": TemperatureRule().fit(out_of_fold, labels),
        "prior": PriorRule().fit(None, labels, len(LABELS)),
    }
    if decision == "bias":
        head_config = labelled.head_config(fit_config.head, head_options)
        features, aux = labelled.head_inputs(fit_config, head_config)

        def fit_predict(train_rows: np.ndarray, val_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
            trainer = HeadTrainer(fit_config, head_config).fit(
                features.subset(train_rows), labels[train_rows], features.subset(val_rows), labels[val_rows],
                aux=aux, progress=False,
            )
            return predict_proba(trainer.model_, features.subset(rows))  # (N_rows, C)

        nested = nested_ensemble_probabilities(labels, splits, fit_predict, bias_members, split_seed)
        rules["bias"] = BiasRule().fit(nested, labels)
    write_decision(out, rules, decision)
    return results


def fit_fold(
    labelled: LabelledFeatures,
    out: Path,
    fit_config: FitConfig,
    head_options: dict[str, Any],
    fold: int = 0,
    *,
    folds: int = 1,
    split_seed: int,
    overwrite: bool = False,
    progress: bool = True,
    fitted: HeadTrainer | None = None,
    plots: bool = True,
) -> RunResult:
    """Fit fold ``fold`` of the labelled rows' split and write its run: ``out/fold-<fold>`` (K ≥ 2), else ``out``.

    The one place rows are split for a fit: ``folds`` stratified folds seeded by ``split_seed``, or one
    stratified hold-out of ``fit_config.val_fraction`` when ``folds`` is 1 (``fusion.split.fold_splits``).
    fit (``fit_run``, ``fit_folds``), pipeline, and sweep and ablate on every backend call it, so a config
    with the same folds and split seed gets the same rows, the same fit and the same scores in each command.
    ``fitted``: this fold's head already trained on these rows (``fusion.batched.fit_folds_batched``), to write.
    ``plots``: draw fold 0's curves and confusion matrix (``plot_run``); a sweep draws only its best run's.
    """
    train_rows, val_rows = fold_splits(labelled.labels, folds, fit_config.val_fraction, split_seed)[fold]
    return fit_rows(
        labelled, fold_dir(out, fold, folds), fit_config, head_options, train_rows, val_rows,
        split={"folds": folds, "fold": fold, "seed": split_seed}, overwrite=overwrite, progress=progress,
        plots=plots and fold == 0, fitted=fitted,
    )


def finished_fold(
    labelled: LabelledFeatures,
    out: Path,
    fit_config: FitConfig,
    head_options: dict[str, Any],
    fold: int,
    *,
    folds: int,
    split_seed: int,
) -> RunResult | None:
    """Fold ``fold`` as ``fit_fold`` wrote it in an earlier command that was interrupted after it, read back; None
    when its folder is not complete (a half-written one is removed, to be fitted again).

    Everything comes from the folder but the validation probabilities, which its saved head gives again on the
    fold's rows (a forward pass: the numbers its fit computed). A fold fitted with other options is refused.
    """
    run_dir = fold_dir(out, fold, folds)
    if not (run_dir / REPORT_FILE).is_file():  # the last file fit_rows writes
        if run_dir.exists():
            shutil.rmtree(run_dir)
        return None
    head_config = labelled.head_config(fit_config.head, head_options)
    _, val_rows = fold_splits(labelled.labels, folds, fit_config.val_fraction, split_seed)[fold]
    split = {"folds": folds, "fold": fold, "seed": split_seed}
    asked = json.loads(json.dumps(run_record(labelled, fit_config, head_config, val_rows, split)))  # as JSON stores it
    named = {"fit": "training options", "head": "head options", "encoders": "encoder caches", "data_dir": "data",
             "split": "split (folds or seed)"}  # the split names the validation pairs
    config = read_config(run_dir)
    differ = [named[key] for key in named if config.get(key) != asked[key]]
    if differ:
        raise ValueError(f"{run_dir} was fitted with other {', '.join(differ)}: resume with the command that "
                         "started it, or start afresh with --overwrite")
    head, _ = load_head(run_dir)
    metrics = read_metrics(run_dir)
    trainer = HeadTrainer.fitted(
        fit_config, head_config, head, best_epoch=metrics["best_epoch"], history=metrics["history"],
        val_metrics=metrics.get("validation_unadjusted", metrics["validation"]), fit_seconds=metrics["fit_seconds"],
        precision=metrics["precision"],
    )
    features, _ = labelled.head_inputs(fit_config, head_config)
    return RunResult(trainer, metrics["validation"], stored_adjustment(metrics),
                     predict_proba(head, features.subset(val_rows)), metrics["parameters"])


def fold_dir(out: Path, fold: int, folds: int) -> Path:
    """The run folder ``fit_fold`` writes fold ``fold`` into: ``out/fold-<fold>`` of K ≥ 2 folds, else ``out``."""
    return Path(out) / f"fold-{fold}" if folds > 1 else Path(out)


def run_record(
    labelled: LabelledFeatures, fit_config: FitConfig, head_config: BaseHeadConfig, val_rows: np.ndarray,
    split: dict[str, Any] | None,
) -> dict[str, Any]:
    """A fit's config.json: what it was trained with, on which caches and data, validated on which pairs."""
    return {
        "kind": "fit",
        "labels": list(LABELS),
        "fit": dataclasses.asdict(fit_config),
        "head": dataclasses.asdict(head_config),
        "encoders": labelled.descriptions,
        "data_dir": str(labelled.data_dir.resolve()),
        "val_guids": [labelled.guids[r] for r in val_rows],
    } | ({"split": split} if split else {})


def fit_rows(
    labelled: LabelledFeatures,
    out: Path,
    fit_config: FitConfig,
    head_options: dict[str, Any],
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    *,
    split: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
    fitted: HeadTrainer | None = None,
) -> RunResult:
    """Train the head on ``train_rows`` of loaded features, select on ``val_rows``, and write the run folder.

    ``split`` describes where the rows came from (e.g. a fold of a sweep) for config.json; ``fitted`` is the head
    already trained on these rows with these configs (a member of a batched fit), written instead of fitting again.
    """
    fit_config.validate()
    head_config = labelled.head_config(fit_config.head, head_options)
    features, aux = labelled.head_inputs(fit_config, head_config)  # a cache that fails does before any write
    out = prepare_run_dir(out, overwrite)
    labels = labelled.labels
    # first, so a crashed run still says what it was
    write_json(out / CONFIG_FILE, run_record(labelled, fit_config, head_config, val_rows, split))
    val = features.subset(val_rows)
    trainer = fitted or HeadTrainer(fit_config, head_config).fit(
        features.subset(train_rows), labels[train_rows], val, labels[val_rows], aux=aux, progress=progress,
    )
    val_probabilities = predict_proba(trainer.model_, val)  # (N_val, C)
    adjustment, validation = LogitAdjustment(), trainer.val_metrics_
    if fit_config.logit_adjustment:
        prior = log_prior(labels[train_rows], head_config.num_classes)
        adjustment = tune_tau(val_probabilities, labels[val_rows], prior)
        validation = evaluate(labels[val_rows], adjustment.apply(val_probabilities).argmax(1))
    result = RunResult(
        trainer, validation, adjustment, val_probabilities, sum(p.numel() for p in trainer.model_.parameters())
    )
    torch.save(trainer.model_.state_dict(), out / WEIGHTS_FILE)
    write_json(out / METRICS_FILE, {
        "validation": validation, "best_epoch": trainer.best_epoch_,
        "fit_seconds": trainer.fit_seconds_, "precision": trainer.precision_, "history": trainer.history_,
        "train_size": len(train_rows), "val_size": len(val_rows), "parameters": result.parameters,
    } | ({ADJUSTMENT_KEY: dataclasses.asdict(adjustment), "validation_unadjusted": trainer.val_metrics_}
         if fit_config.logit_adjustment else {}))
    matrix = validation["confusion_matrix"]
    (out / "confusion_matrix.csv").write_text(
        "true\\predicted," + ",".join(LABELS) + "\n"
        + "".join(f"{label}," + ",".join(map(str, row)) + "\n" for label, row in zip(LABELS, matrix))
    )
    if plots:
        plot_run(out)
    (out / REPORT_FILE).write_text(format_report(validation) + "\n")  # last: a run with it is complete (--resume)
    return result


def plot_run(run_dir: Path) -> None:
    """Draw a run's training curves and validation confusion matrix from its files (``CURVES_FILE``,
    ``CONFUSION_FILE``)."""
    config, metrics = read_config(run_dir), read_metrics(run_dir)
    plot_curves(metrics["history"], metrics["best_epoch"], Path(run_dir) / CURVES_FILE)
    plot_confusion(metrics["validation"]["confusion_matrix"], list(LABELS), Path(run_dir) / CONFUSION_FILE,
                   title=f"validation, {config['fit']['head']}")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE}; the fit did not finish")
    return json.loads(path.read_text())


def predict_run(run_dir: Path, model: torch.nn.Module, config: dict[str, Any], features: PairFeatures) -> np.ndarray:
    """Probabilities (N, C) as the fitted run predicts: its modalities only, its logit adjustment applied."""
    modalities = from_dict(FitConfig, config["fit"]).modalities
    probabilities = predict_proba(model, with_modalities(features, modalities))  # (N, C)
    return stored_adjustment(read_metrics(run_dir)).apply(probabilities)


def load_head(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a fitted head from its run folder alone."""
    config = read_config(run_dir)
    model = create_run_head(config)
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS_FILE}; the fit did not finish")
    load_weights(model, weights, fix="fit it again with `python cli.py fit --overwrite`")
    return model.eval(), config


def load_weights(model: torch.nn.Module, path: Path, *, fix: str) -> None:
    """Load a state dict saved by this project into ``model``; anything else is refused in one line naming ``fix``.

    ``weights_only=True``: a run folder may come from someone else, and only tensors are ever unpickled.
    """
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # a damaged, foreign or mismatched file: unpickling, type and shape errors alike
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{path}: not the weights of this run ({type(error).__name__}: {reason}); {fix}") from error
