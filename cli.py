"""mmsent command line: extract → fit → predict (and finetune) for image–text sentiment.

Run ``python cli.py --help`` or ``python cli.py COMMAND --help``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from extract import defaults
from fusion.config import AttentionHeadConfig, BaseHeadConfig, FitConfig, PooledHeadConfig
from fusion.losses import loss_names

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Image–text sentiment (positive / neutral / negative): cache encoder features once, "
    "then train light fusion heads on them in seconds.",
)


DataOption = typer.Option(
    defaults.DATA_DIR, "--data", help="Data folder (train.txt, test_without_label.txt, data/{guid}.txt|.jpg), or a "
    "manifest: .csv, .jsonl or .parquet with columns guid,text,image,label (images relative to it; no label = test)."
)
CacheOption = typer.Option(defaults.CACHE_ROOT, "--cache", help="Root folder of the HDF5 feature caches.")
TextEncoderOption = typer.Option(
    defaults.TEXT_ENCODER, "--text-encoder",
    help="Text encoder: minilm (embedded, offline), mpnet (offline, see README), bert-base-uncased (hub), "
    "hf:<model id>, clip:<model id>, or a local model folder; append +norm (every tweet normalisation rule), "
    "+ocr (the text found in each image) and/or +vader (lexicon scores): minilm+ocr+vader. Several, comma-separated "
    "(minilm+ocr,mpnet+ocr), for extract and fit: one cache each, side by side in the head.",
)
ImageEncoderOption = typer.Option(
    defaults.IMAGE_ENCODER, "--image-encoder",
    help="Image encoder: efficientnet-lite0 or efficientnet-lite2 (embedded, offline), resnet50 (hub), "
    "resnet152-resmem (offline after `pip install --no-deps resmem`; non-commercial licence), "
    "fer (face-emotion scores, one position per image, to list beside a patch encoder: "
    "efficientnet-lite0,fer; optional packages, see README), "
    "tv:<torchvision model>, or clip:<model id>. Several, comma-separated, for extract and fit.",
)
LossOption = typer.Option(
    FitConfig.loss, "--loss", help=f"{' | '.join(loss_names())}: a loss of the registry in fusion/losses.py."
)


# How each long command continues after Ctrl-C: what the interrupted line says.
RESUME_HINTS = {
    "extract": "run the same command again: it encodes only the pairs not cached yet",
    "predict": "run the same command again: it continues from OUT.part",
    "pipeline": "run the same command again: extraction continues where it stopped",
    "fit": "with --folds K, run the same command again with --resume",
    "sweep": "run the same command again with --resume",
    "ablate": "run the same command again with --resume",
    "finetune": "run the same command again with --resume",
}


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends the command with one readable line and exit code 1, not a traceback; Ctrl-C with one line
    that says how to continue, and exit code 130."""
    from extract.dataset import BadImageError
    from extract.encoders.hf_text import EncoderUnavailableError

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            hint = RESUME_HINTS.get(command.__name__)
            typer.secho("interrupted" + (f"; to continue, {hint}" if hint else ""), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None
        except (
            ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            EncoderUnavailableError, BadImageError,
        ) as error:  # a path that is a file where a folder is needed (or the reverse) or not writable: one line too
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@_one_line_errors
def extract(
    data: Path = DataOption,
    cache: Path = CacheOption,
    text_encoder: str = TextEncoderOption,
    image_encoder: str = ImageEncoderOption,
    batch_size: int = typer.Option(32, min=1, help="Pairs per encoder forward pass."),
    max_tokens: int = typer.Option(64, min=2, help="Cap on tokens per text (the text cache's sequence length)."),
    normalize: str = typer.Option(
        "none", help="Tweet normalisation: none | all | comma list of retweet,links,mentions,hashtags,lost-emoji."
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda."),
    decode: str = typer.Option(
        "auto", help="How JPEGs become pixels: auto (batched on the GPU when extracting on CUDA, else pil) | pil "
        "(in the data-loading workers) | tensor (torchvision's decoder on the extraction device).",
    ),
    workers: int | None = typer.Option(
        None, min=0, help="Data-loading processes (default: half the CPU cores; under torchrun, per process: half "
        "its share of the machine's cores)."
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images as skipped instead of stopping."),
    only: str | None = typer.Option(None, help="Extract only 'text' or 'image'."),
) -> None:
    """Stage one: encode every pair of train.txt and test_without_label.txt into the HDF5 cache.

    A text encoder named with "+ocr" (minilm+ocr) first reads the text inside each image
    (rapidocr, one process per core, ~0.25 s an image on 2 cores, cached in
    cache/<data>/ocr-rapidocr-<settings>.jsonl, resumable) and
    encodes it after the tweet. A text-only folder (texts.csv: guid,text,tag, e.g.
    mvsa-multiple-text) gets its texts encoded, for `fit --aux-data`. Resumable: a rerun
    encodes only the guids missing from the cache. Under torchrun (torchrun --nproc-per-node N
    cli.py extract …) every process encodes (and reads the image text of) a slice of the pairs on
    its own GPU or share of the cores, and rank 0 stitches their shard files into the same cache file.
    """
    from extract.run import extract_data

    if decode not in ("auto", "pil", "tensor"):
        raise typer.BadParameter(f"expected auto, pil or tensor, got {decode!r}", param_hint="--decode")
    if only is not None and only not in ("text", "image"):
        raise typer.BadParameter(f"expected 'text' or 'image', got {only!r}", param_hint="--only")
    extract_data(
        data, cache, text_encoder, image_encoder, batch_size=batch_size, max_tokens=max_tokens, normalize=normalize,
        device=device, decode=decode, workers=workers, skip_bad=skip_bad, only=only, echo=typer.echo,
    )


BatchFoldsOption = typer.Option(
    FitConfig.batch_folds, "--batch-folds", help="With --folds K: train the K folds as one batched model, pooled heads "
    "only (fusion/batched.py); sweep also batches the configurations that can share it (e.g. every fixed pooling of "
    "one head), in --jobs parts. The same fits without dropout, other dropout masks with it.",
)


@app.command()
@_one_line_errors
def fit(
    out: Path = typer.Option(..., "--out", help="Run folder to create (config.json, model.pt, metrics.json, report)."),
    data: Path = DataOption,
    cache: Path = CacheOption,
    text_encoder: str = TextEncoderOption,
    image_encoder: str = ImageEncoderOption,
    head: str = typer.Option(
        FitConfig.head, help="Fusion head: gated | cross-attention | concat | late | text-only | image-only."
    ),
    val_fraction: float = typer.Option(
        FitConfig.val_fraction, help="Stratified share of train.txt held out for validation."
    ),
    seed: int = typer.Option(
        FitConfig.seed, help="Seeds the initialisation and the batch order, and the split unless --split-seed is given."
    ),
    split_seed: int | None = typer.Option(
        None, "--split-seed", help="Seeds the split (the K folds, or the hold-out); default: --seed, as before the "
        "split had a seed of its own. fit --folds K --split-seed S validates on the rows of sweep --folds K "
        "--split-seed S, so their fold scores compare.",
    ),
    epochs: int = typer.Option(
        FitConfig.epochs, min=1, help="Most epochs; early stopping on validation macro-F1 ends sooner."
    ),
    patience: int = typer.Option(
        FitConfig.patience, min=1, help="Epochs without a better validation macro-F1 before stopping."
    ),
    batch_size: int = typer.Option(FitConfig.batch_size, min=1),
    lr: float = typer.Option(FitConfig.lr, help="AdamW learning rate."),
    weight_decay: float = typer.Option(FitConfig.weight_decay),
    loss: str = LossOption,
    class_weights: bool = typer.Option(
        FitConfig.class_weights, "--class-weights", help="Weight the loss by inverse class frequency."
    ),
    label_smoothing: float = typer.Option(FitConfig.label_smoothing),
    balanced_sampling: bool = typer.Option(
        FitConfig.balanced_sampling, "--balanced-sampling",
        help="Draw training rows class-balanced (probability ∝ 1 / class count)."
    ),
    logit_adjustment: bool = typer.Option(
        FitConfig.logit_adjustment, "--logit-adjustment",
        help="Subtract τ·log prior from the logits, τ tuned on validation; predict too."
    ),
    modalities: str = typer.Option(
        FitConfig.modalities, help="both | text | image: mask the other modality out (ablation)."
    ),
    precision: str = typer.Option(
        FitConfig.precision, help="auto | fp32 | bf16: bf16 autocast in training; auto = bf16 where the CPU has bf16 "
        "matrix units (AMX, AVX512-BF16), else fp32.",
    ),
    aux_data: Path | None = typer.Option(
        None, help="Text-only folder (texts.csv, e.g. ../shared/data/mvsa-multiple-text, extracted first) whose "
        "labelled texts join the training rows without images; never used for validation.",
    ),
    aux_per_epoch: float = typer.Option(
        FitConfig.aux_per_epoch, help="Auxiliary texts drawn per epoch, as a multiple of training pairs."
    ),
    # Head options: each head takes only its own (fusion/config.py); one it does not take fails in one line.
    hidden: int | None = typer.Option(None, help=f"Head hidden size D (default {BaseHeadConfig.hidden})."),
    num_heads: int | None = typer.Option(
        None, help=f"Attention heads per block, attention heads only (cross-attention; default "
        f"{AttentionHeadConfig.num_heads}); must divide --hidden.",
    ),
    layers: int | None = typer.Option(
        None, help=f"Attention blocks per branch, attention heads only (default {AttentionHeadConfig.layers}).",
    ),
    dropout: float | None = typer.Option(None, help=f"Dropout (default {BaseHeadConfig.dropout})."),
    text_pool: str | None = typer.Option(
        None, help=f"last | first | mean | max | attention (default {PooledHeadConfig.text_pool})."
    ),
    image_pool: str | None = typer.Option(
        None, help=f"last | first | mean | max | attention (default {PooledHeadConfig.image_pool})."
    ),
    norm: str | None = typer.Option(
        None, help=f"layer | batch: norm in the attention blocks, attention heads only (default "
        f"{AttentionHeadConfig.norm}).",
    ),
    image_positions: str | None = typer.Option(
        None, help=f"Patch positions: none | sinusoidal | learned (default {PooledHeadConfig.image_positions})."
    ),
    folds: int = typer.Option(
        1, "--folds", min=1, help="K > 1: K-fold cross-validation, a run per fold in OUT/fold-k; predict --run OUT "
        "then averages the K heads (a fold ensemble). 1: one stratified split of --val-fraction.",
    ),
    decision: str = typer.Option(
        "mean", "--decision", help="With --folds K: the rule predict applies to the K heads by default, mean | "
        "geometric | temperature | prior | bias (bias fits K·2 more heads); all but bias are stored in "
        "OUT/decision.json anyway.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run (or folds) already in the folder."),
    resume: bool = typer.Option(
        False, "--resume", help="With --folds K: finish an interrupted K-fold fit in --out (the same options): its "
        "complete folds are kept, the others fitted.",
    ),
    batch_folds: bool = BatchFoldsOption,
) -> None:
    """Stage two: train a fusion head on the cached features and report validation metrics."""
    fit_config = FitConfig(
        head=head, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        loss=loss, class_weights=class_weights, label_smoothing=label_smoothing, val_fraction=val_fraction, seed=seed,
        balanced_sampling=balanced_sampling, logit_adjustment=logit_adjustment, modalities=modalities,
        aux_data=str(aux_data or ""), aux_per_epoch=aux_per_epoch, precision=precision, batch_folds=batch_folds,
    ).validate()
    head_options = {
        key: value
        for key, value in {
            "hidden": hidden, "num_heads": num_heads, "layers": layers, "dropout": dropout,
            "text_pool": text_pool, "image_pool": image_pool, "norm": norm, "image_positions": image_positions,
        }.items()
        if value is not None
    }
    if folds == 1 and decision != "mean":
        raise typer.BadParameter("a decision rule combines the heads of --folds K (K ≥ 2)", param_hint="--decision")
    if folds == 1 and batch_folds:
        raise typer.BadParameter("batches the K folds of --folds K (K ≥ 2)", param_hint="--batch-folds")
    if folds == 1 and resume:
        raise typer.BadParameter("continues the K folds of --folds K (K ≥ 2); one fit starts again",
                                 param_hint="--resume")
    _fit_and_report(
        data, cache, out, fit_config, head_options, folds=folds, split_seed=split_seed, decision=decision,
        overwrite=overwrite, resume=resume, text_encoder=text_encoder, image_encoder=image_encoder,
    )


def _fit_and_report(
    data: Path,
    cache: Path,
    out: Path,
    fit_config: FitConfig,
    head_options: dict[str, Any],
    *,
    folds: int,
    split_seed: int | None,
    decision: str | None,
    overwrite: bool,
    text_encoder: str,
    image_encoder: str,
    resume: bool = False,
) -> None:
    """fit's work and printout once its options are read: pipeline's second stage runs it too, so it prints the same."""
    from fusion.metrics import cv_summary, format_report, metric_of
    from fusion.run import fit_folds, fit_run, read_metrics

    head = fit_config.head
    common = {"text_encoder": text_encoder, "image_encoder": image_encoder, "split_seed": split_seed,
              "overwrite": overwrite}
    if folds > 1:
        results = fit_folds(data, cache, out, fit_config, head_options, folds=folds, decision=decision, resume=resume,
                            **common)
        shown = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("neutral recall", "neutral_recall"))
        for fold, result in enumerate(results):
            typer.echo(
                f"fold {fold}: best epoch {result.trainer.best_epoch_}, fit in {result.trainer.fit_seconds_:.1f} s; "
                + ", ".join(f"{name} {metric_of(result.validation, key):.4f}" for name, key in shown)
            )
        summary = cv_summary([result.validation for result in results])
        typer.echo(f"{folds}-fold cross-validation of {head} (mean ± std): " + ", ".join(
            f"{name} {summary[f'{key}_mean']:.4f} ± {summary[f'{key}_std']:.4f}" for name, key in shown
        ))
        typer.echo(f"run folder: {out} (fold-0 … fold-{folds - 1}; `predict --run {out}` averages them)")
        return
    trainer = fit_run(data, cache, out, fit_config, head_options, **common)
    metrics = read_metrics(out)
    tau = metrics.get("logit_adjustment", {}).get("tau")
    typer.echo(
        f"{head}: best epoch {trainer.best_epoch_} of {len(trainer.history_)}, fit in {trainer.fit_seconds_:.1f} s; "
        + (f"logit adjustment τ={tau} (tuned on validation); " if tau is not None else "")
        + "validation report:"
    )
    typer.echo(format_report(metrics["validation"]))
    typer.echo(f"run folder: {out}")


@app.command()
@_one_line_errors
def predict(
    run: list[Path] = typer.Option(
        ..., "--run", help="Run folder written by fit or finetune; repeat it, or give a K-fold sweep trial's folder "
        "(fold-*/ runs inside), to predict with the average of their probabilities.",
    ),
    data: Path = DataOption,
    cache: Path = CacheOption,
    out: Path | None = typer.Option(None, "--out", help="Submission CSV to write (guid,tag for every test row)."),
    text: str | None = typer.Option(None, "--text", help="Text of one new post (with --image)."),
    image: Path | None = typer.Option(None, "--image", help="Image of one new post (with --text)."),
    decision: str | None = typer.Option(
        None, "--decision", help="How the runs' probabilities become one label: mean | geometric | temperature | "
        "bias | prior (default: the rule a K-fold folder's decision.json names, else mean, the plain average).",
    ),
    explain: Path | None = typer.Option(
        None, "--explain", help="With --text/--image: write which words and image regions pushed the prediction to "
        "this folder (explanation.json, patches.png, words.html; Integrated Gradients on the head's inputs).",
    ),
    chunk_rows: int = typer.Option(
        4096, "--chunk-rows", min=1, help="Test rows read, labelled and appended to OUT.part at a time (memory is "
        "bounded by it); a rerun after a crash resumes from OUT.part. Under torchrun, each process labels a slice.",
    ),
) -> None:
    """Write the submission for test_without_label.txt, or label one new post (--text and --image).

    The submission streams: a chunk of test rows at a time goes from the cache to OUT.part, which
    becomes OUT at the end; an interrupted predict, rerun the same, resumes. Under torchrun
    (torchrun --nproc-per-node N -- cli.py predict …; the "--" keeps torchrun from reading --run)
    each process labels a slice into OUT.rank-k.part and rank 0 joins them in input order. The
    prior rule needs every row at once: one pass, no resume.
    """
    from fusion.api import Post, Run
    from fusion.decision import RULES
    from fusion.explain import write_explanation

    if (text is None) != (image is None):
        raise typer.BadParameter("give both --text and --image for a single post", param_hint="--text/--image")
    if decision is not None and decision not in RULES:
        raise typer.BadParameter(f"{decision!r} is not one of {sorted(RULES)}", param_hint="--decision")
    if explain is not None and text is None:
        raise typer.BadParameter("--explain explains one post: give --text and --image", param_hint="--explain")
    if text is not None:
        loaded = Run.load(run, decision=decision, data_dir=data)
        post = Post(text, image)
        if explain is not None:
            explanation, picture = loaded.explain(post)
            image_length = next(iter(loaded.encoder_sets.values())).image[0].length
            written = write_explanation(explanation, picture, explain, image_length)
            probabilities = explanation.probabilities
        else:
            probabilities = dict(zip(loaded.labels, map(float, loaded.predict_proba(post)[0])))
        label = max(probabilities, key=probabilities.get)
        typer.echo(f"{label}  " + "  ".join(f"{k}={v:.3f}" for k, v in probabilities.items()))
        if explain is not None:
            typer.echo("explanation: " + ", ".join(str(path) for path in written))
        return
    if out is None:
        raise typer.BadParameter("give --out FILE for the submission, or --text and --image for one post")
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder: give the submission's file name (e.g. {out / 'submission.csv'})",
                                 param_hint="--out")
    _submit_and_report(run, data, cache, out, decision, chunk_rows)


def _check_resumed_options(ctx: typer.Context, out: Path, options: dict[str, Any]) -> None:
    """Refuse --resume with a training option typed on the command line that differs from the run's own: the run
    continues as it was started, so such an option would be silently ignored."""
    from fusion.run import read_config

    stored = read_config(out).get("finetune", {})
    changed = [
        f"--{name.replace('_', '-')} {value} (the run's: {stored[name]})" for name, value in options.items()
        if name in stored and value != stored[name] and _typed(ctx, name)
    ]
    if changed:
        raise typer.BadParameter(f"continues {out} as it was started; leave off {', '.join(changed)}, or start a "
                                 "new run", param_hint="--resume")


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not a default, nor an option the command lacks)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _submit_and_report(
    runs: list[Path], data: Path, cache: Path, out: Path, decision: str | None, chunk_rows: int = 4096
) -> None:
    """Write the submission of ``runs`` and print how many rows went to each class (predict, pipeline).

    Under torchrun only rank 0 prints: the other ranks return once their slice is written.
    """
    from extract.dataset import LABELS
    from fusion.api import ensemble_decision
    from fusion.predict import stream_submission

    rule = ensemble_decision(runs, decision, data)
    summary = stream_submission(runs, data, cache, out, rule, chunk_rows=chunk_rows)
    if summary is None:
        return
    resumed = f"; {summary.resumed} of them kept from an interrupted run's part file" if summary.resumed else ""
    typer.echo(f"wrote {summary.rows} predictions to {out} (decision rule {rule.name}): " + ", ".join(
        f"{label} {count}" for label, count in zip(LABELS, summary.counts)
    ) + resumed)


@app.command()
@_one_line_errors
def finetune(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Run folder to create (or to continue with --resume)."),
    data: Path = DataOption,
    from_run: Path | None = typer.Option(
        None, "--from-run", help="Start from a head trained by fit: reuses its head, encoders and validation split."
    ),
    text_encoder: str | None = typer.Option(
        None, "--text-encoder", help=f"Text encoder when not starting --from-run (default {defaults.TEXT_ENCODER})."
    ),
    image_encoder: str | None = typer.Option(
        None, "--image-encoder", help=f"Image encoder when not starting --from-run (default {defaults.IMAGE_ENCODER})."
    ),
    head: str | None = typer.Option(None, help=f"Fusion head when not starting --from-run (default {FitConfig.head})."),
    unfreeze: str = typer.Option("top-2", help="Encoder blocks to train: all | none | top-K (the last K of each)."),
    epochs: int = typer.Option(3, min=1),
    patience: int = typer.Option(2, min=1, help="Epochs without a better validation macro-F1 before stopping."),
    batch_size: int = typer.Option(16, min=1),
    grad_accum: int = typer.Option(1, min=1, help="Optimiser step every N batches."),
    head_lr: float = typer.Option(3e-4),
    encoder_lr: float = typer.Option(3e-5, help="Top text block and image encoder; lower text blocks decay from it."),
    layer_decay: float = typer.Option(0.8, help="Text block i from the top learns at encoder_lr · decay^i."),
    warmup: float = typer.Option(0.1, help="Share of steps spent warming up, then cosine/linear decay."),
    schedule: str = typer.Option("cosine", help="cosine | linear."),
    augment: bool = typer.Option(False, "--augment", help="Random resized crop, flip and colour jitter in training."),
    loss: str = LossOption,
    class_weights: bool = typer.Option(False, "--class-weights"),
    label_smoothing: float = typer.Option(
        FitConfig.label_smoothing, help="Share of each target spread evenly over the classes, as in fit."
    ),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (autocast; a grad scaler for fp16)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA)."),
    max_steps_per_epoch: int | None = typer.Option(None, min=1, help="Cap on optimiser steps per epoch."),
    seed: int = typer.Option(0),
    val_fraction: float = typer.Option(0.1, help="Used only without --from-run."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda."),
    workers: int | None = typer.Option(None, min=0, help="Data-loading processes (default: half the CPU cores)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted finetune from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow writing into a non-empty run folder."),
) -> None:
    """End-to-end mode: train the encoders (unfrozen blocks) together with a fusion head, on raw pairs."""
    from extract.device import resolve_device
    from fusion.finetune import FinetuneConfig, finetune_run
    from fusion.metrics import format_report

    config = FinetuneConfig(
        epochs=epochs, patience=patience, batch_size=batch_size, grad_accum=grad_accum, head_lr=head_lr,
        encoder_lr=encoder_lr, layer_decay=layer_decay, warmup=warmup, schedule=schedule, unfreeze=unfreeze,
        augment=augment, precision=precision, compile=compile, loss=loss, class_weights=class_weights,
        label_smoothing=label_smoothing, max_steps_per_epoch=max_steps_per_epoch, seed=seed, val_fraction=val_fraction,
    )
    if resume:
        _check_resumed_options(ctx, out, dataclasses.asdict(config))
    torch_device = resolve_device(device)
    if precision == "fp16" and torch_device.type != "cuda":
        raise typer.BadParameter("fp16 needs CUDA; use bf16 or fp32 on the CPU", param_hint="--precision")
    given = [name for name, value in (("--text-encoder", text_encoder), ("--image-encoder", image_encoder),
                                      ("--head", head)) if value is not None]
    if from_run is not None and given:
        raise typer.BadParameter(
            f"{', '.join(given)} cannot be combined with --from-run, which reuses the run's encoders and head",
            param_hint="--from-run",
        )
    text_encoder, image_encoder = text_encoder or defaults.TEXT_ENCODER, image_encoder or defaults.IMAGE_ENCODER
    head = head or FitConfig.head
    started = time.perf_counter()
    metrics = finetune_run(
        data, out, config, device=torch_device, from_run=from_run, text_encoder=text_encoder,
        image_encoder=image_encoder, head=head, resume=resume, overwrite=overwrite, workers=workers,
    )
    typer.echo(f"finetuned on {torch_device} in {time.perf_counter() - started:.0f} s; best validation report:")
    typer.echo(format_report(metrics))
    typer.echo(f"run folder: {out}")


FoldsOption = typer.Option(
    1, "--folds", min=1, help="Stratified K-fold cross-validation of train.txt (1 = one hold-out split)."
)
JobsOption = typer.Option(1, "--jobs", min=1, help="Configurations fitted in parallel worker processes.")
ResumeSweepOption = typer.Option(
    False, "--resume", help="Finish an interrupted sweep in --out (the same grid and options): its complete fits "
    "are kept, the rest fitted; the leaderboard is the whole sweep's.",
)
SplitSeedOption = typer.Option(
    0, "--split-seed", help="Seeds the split: every configuration sees the same folds, those of fit --folds K "
    "--split-seed S (fit's default split seed is its --seed; the default seeds, 0, agree).",
)
SetOption = typer.Option(
    [], "--set", help="key=v1,v2 (repeatable): a fit option or the head's option (FitConfig, the head's config)."
)


@app.command()
@_one_line_errors
def sweep(
    out: Path = typer.Option(..., "--out", help="Sweep folder to create: leaderboard.csv|md|png, report.md, runs/."),
    grid: Path | None = typer.Option(
        None, "--grid", help="YAML/JSON grid: option → list of values, or a list of such mappings (joined)."
    ),
    sets: list[str] = SetOption,
    folds: int = FoldsOption,
    jobs: int = JobsOption,
    split_seed: int = SplitSeedOption,
    data: Path = DataOption,
    cache: Path = CacheOption,
    text_encoder: str = TextEncoderOption,
    image_encoder: str = ImageEncoderOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow writing into a non-empty sweep folder."),
    resume: bool = ResumeSweepOption,
    backend: str = typer.Option(
        "local", "--backend", help="local (this machine: --jobs processes) | ray (each configuration × fold a Ray "
        "Tune trial on a Ray cluster; same runs and leaderboard)."
    ),
    address: str | None = typer.Option(
        None, "--address", help="ray: the cluster to join (auto: the one `ray start` runs on this machine; "
        "default: that one if there is one, else Ray started here for the sweep)."
    ),
    cpus_per_trial: int = typer.Option(1, "--cpus-per-trial", help="ray: CPUs (and torch threads) of each trial."),
    search: str = typer.Option(
        "grid", "--search", help="grid (every combination) | random | optuna (ray: --trials samples of the grid "
        "file's ranges, e.g. lr: {loguniform: [1e-4, 3e-3]}, ASHA-screened on fold 0; the kept ones on every fold)."
    ),
    trials: int = typer.Option(20, "--trials", help="random | optuna: configurations to sample."),
    batch_folds: bool = BatchFoldsOption,
) -> None:
    """Fit every combination of a grid on the cached features (loaded once) and rank them on validation macro-F1.

    Options not in the grid keep the defaults of fit; --set overrides the grid file's values. With --search,
    several values of an option are a choice, and {uniform|loguniform: [low, high]} or {choice: [...]} ranges.
    """
    from fusion.sweep import SweepOptions, build_grids, markdown_table, sweep_from_cache

    if grid is None and not sets:
        raise typer.BadParameter("give a --grid file and/or --set key=v1,v2 options", param_hint="--grid/--set")
    _, rows = sweep_from_cache(
        data, cache, out, build_grids(grid, sets + ["batch_folds=true"] * batch_folds),
        SweepOptions(folds, jobs, split_seed, backend, address, cpus_per_trial, search, trials),
        text_encoder=text_encoder, image_encoder=image_encoder, overwrite=overwrite, resume=resume, echo=typer.echo,
    )
    typer.echo(markdown_table(rows, folds))
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
@_one_line_errors
def ablate(
    out: Path = typer.Option(..., "--out", help="Folder to create (a sweep folder: leaderboard, report, runs/)."),
    head: str | None = typer.Option(None, help="The head to ablate (default: fit's default head)."),
    sets: list[str] = typer.Option(
        [], "--set", help="key=value (repeatable): a fit or head option held fixed in all three rows."
    ),
    folds: int = typer.Option(5, "--folds", min=2, help="Stratified K-fold cross-validation of train.txt."),
    jobs: int = JobsOption,
    split_seed: int = SplitSeedOption,
    data: Path = DataOption,
    cache: Path = CacheOption,
    text_encoder: str = TextEncoderOption,
    image_encoder: str = ImageEncoderOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow writing into a non-empty folder."),
    resume: bool = ResumeSweepOption,
) -> None:
    """The seed's ablation table — text only, image only, text + image — for one head, K-fold mean ± std.

    Each row retrains the same head with the same options on the same folds; only the input differs:
    the left-out modality is masked out (modalities=text|image), so it never reaches the logits.
    """
    from fusion.sweep import SweepOptions, ablation_grid, ablation_table, build_grids, sweep_from_cache

    head = head or FitConfig.head
    trials, rows = sweep_from_cache(
        data, cache, out, ablation_grid(head, build_grids(None, sets)[0]), SweepOptions(folds, jobs, split_seed),
        text_encoder=text_encoder, image_encoder=image_encoder, overwrite=overwrite, resume=resume, echo=typer.echo,
    )
    typer.echo(f"ablation of {head} ({folds}-fold validation, mean ± std):")
    typer.echo(ablation_table(rows, trials, folds))


@app.command()
@_one_line_errors
def pipeline(
    data: Path = DataOption,
    cache: Path = CacheOption,
    run: Path = typer.Option(
        defaults.RUN_DIR, "--run", help="Run folder of the fitted heads (rewritten each run)."
    ),
    folds: int = typer.Option(
        5, "--folds", min=1, help="Fit K heads by K-fold cross-validation and predict with their average (1: one head)."
    ),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="Submission CSV to write."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda, for extraction."),
    text_encoder: str = TextEncoderOption,
    image_encoder: str = ImageEncoderOption,
) -> None:
    """The main job on the embedded defaults: extract (resumable) → fit the default head on 5 folds → submission.

    The submission averages the K fold heads' probabilities: in nested cross-validation
    (benchmarks/ensemble.py) this fold ensemble beat a single head, and the K-fold report is a
    steadier estimate than one 10 % split.
    """
    from extract.run import extract_data

    shared = f"--data {data} --cache {cache}"
    encoders = f"--text-encoder {text_encoder} --image-encoder {image_encoder}"  # predict reads them from the run
    # Each stage is the command it prints, rerunnable as such: every option it leaves out keeps that command's default.
    typer.secho(f"$ python cli.py extract {shared} {encoders} --device {device}", bold=True)
    extract_data(data, cache, text_encoder, image_encoder, device=device, echo=typer.echo)
    typer.secho(f"$ python cli.py fit {shared} {encoders} --out {run} --folds {folds} --overwrite", bold=True)
    _fit_and_report(
        data, cache, run, FitConfig().validate(), {}, folds=folds, split_seed=None, decision=None, overwrite=True,
        text_encoder=text_encoder, image_encoder=image_encoder,
    )
    typer.secho(f"$ python cli.py predict {shared} --run {run} --out {out}", bold=True)
    _submit_and_report([run], data, cache, out, None)


@app.command()
@_one_line_errors
def stack(
    run: list[Path] = typer.Option(
        ..., "--run", help="K-fold folder (fit --folds K) of one member; repeat it (2 or more), all with the same "
        "folds (the same --folds and --split-seed).",
    ),
    out: Path = typer.Option(..., "--out", help="Stack folder to create (stack.json); predict --run OUT applies it."),
    data: Path = DataOption,
    cache: Path = CacheOption,
    features: str = typer.Option("probability", help="What the regression reads of each member: probability | log."),
    class_weight: str | None = typer.Option(
        None, "--class-weight", help="balanced: weight rows inversely to their class's share (more neutral found)."
    ),
    seed: int = typer.Option(0, help="Shuffles the inner folds that choose the regularisation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT/stack.json."),
) -> None:
    """Fit a logistic regression over the members' out-of-fold probabilities, scored first in nested CV."""
    from fusion.decision import STACK_FEATURES
    from fusion.stack import fit_stack, markdown

    if features not in STACK_FEATURES:
        raise typer.BadParameter(f"{features!r} is not one of {list(STACK_FEATURES)}", param_hint="--features")
    if class_weight not in (None, "balanced"):
        raise typer.BadParameter(f"{class_weight!r} is not 'balanced'", param_hint="--class-weight")
    rule, methods = fit_stack(run, out, data, cache, features=features, class_weight=class_weight, seed=seed,
                              overwrite=overwrite)
    typer.echo(f"nested CV over the members' {len(methods['stack'])} folds (out-of-fold rows):\n{markdown(methods)}")
    typer.echo(f"wrote {out}/stack.json (c = {rule.c:g}); predict with `python cli.py predict --run {out}`")


@app.command()
@_one_line_errors
def serve(
    run: list[Path] = typer.Option(
        defaults.RUN_DIR, "--run", help="Run folder to serve (fit, finetune, or a K-fold folder; repeat to combine)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --token or --insecure."),
    port: int = typer.Option(8000, min=1, max=65535),
    token: str | None = typer.Option(
        None, "--token", envvar="MMSENT_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every request (the "
        "page: open /?token=TOKEN). Also read from $MMSENT_TOKEN.",
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow binding beyond loopback without a token."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.01, help="Largest image upload accepted."),
    max_megapixels: float = typer.Option(
        40.0, "--max-megapixels", min=0.01, help="Largest decoded image accepted (a small PNG can claim a huge one)."
    ),
    max_text_chars: int = typer.Option(2000, "--max-text-chars", min=1, help="Longest post text accepted."),
    decision: str | None = typer.Option(None, "--decision", help="Decision rule of an ensemble (as predict)."),
    data: Path = DataOption,
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda."),
) -> None:
    """Serve a trained run over HTTP: a web page at /, POST /predict and /predict/batch, docs at /docs.

    The run's encoders and heads load once, before the first request; uploads stay in memory.
    """
    import uvicorn

    from fusion.api import Run
    from serve.app import Limits, check_binding, check_port_free, create_app

    check_binding(host, token, insecure)
    check_port_free(host, port)  # before the model loads, rather than after, in uvicorn's words
    started = time.perf_counter()
    loaded = Run.load(run, decision=decision, data_dir=data, device=device)
    for encoders in loaded.encoder_sets.values():
        encoders.build(loaded.device)  # now, not on the first request
    limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_megapixels * 1e6),
                    max_text_chars=max_text_chars)
    typer.echo(f"loaded {loaded} in {time.perf_counter() - started:.1f} s; serving on http://{host}:{port}/")
    uvicorn.run(create_app(loaded, token=token, limits=limits), host=host, port=port, log_level="warning")

if __name__ == "__main__":
    sys.exit(app())
