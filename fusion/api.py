"""The Python API: a trained run as one object, and fitting as one function.

    from mmsent import Post, Run, fit

    run = Run.load("runs/default")                 # a fit run, a K-fold folder (its folds combined), or a finetune run
    run.predict_proba([Post("what a day", "a.jpg"), Post("meh", pil_image)])  # (N, 3) numpy
    run.predict([...])                             # labels
    run.explain(Post("what a day", "a.jpg"))       # per-word and per-patch attributions (fusion/explain.py)
    run = fit(FitSpec(head={"hidden": 64}), out="runs/mine", folds=5)

A ``Run`` holds its members (one head per run folder; a K-fold folder's ``fold-*`` runs), the
decision rule that combines them (``fusion/decision.py``), and the encoders the members read. The
encoders are built once per ``Run`` and shared by every member that was trained on the same ones
(all folds of an ensemble), never rebuilt per fold or per call: a post is encoded once, then every
head reads its features. A fit run's encoders compute the features exactly as ``extract`` cached
them (the same ``for_inference`` copies, normalised and stored as float16 alike), so a post and its
cached row predict the same; a finetune run's own encoders feed its head as they did in training.

Predictions on a data folder (``predict_cached``: the submission) read the caches instead, through
a memo kept by the ``Run`` and keyed by the rows asked for, so no call can receive another's rows.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from extract import defaults
from extract.cache import check_identity
from extract.dataset import LABELS, load_image, rgb_image
from extract.device import resolve_device, tf32_matmuls
from extract.encoders.base import Encoder
from extract.memory import reuse_freed_memory
from extract.ocr import ocr_path, read_ocr
from extract.registry import create_encoder
from fusion.calibration import LogitAdjustment, stored_adjustment
from fusion.config import FitConfig, from_dict
from fusion.decision import DEFAULT_RULE, RULES, DecisionRule, PriorRule, create_rule, read_decision, read_stack
from fusion.explain import DEFAULT_STEPS, Explanation, Word, explain, merge_words
from fusion.features import LoadedFeatures, PairFeatures, load_pair_features, stream_descriptions
from fusion.layers import normalise_features
from fusion.pair_model import PairModel, RawPairs, build_encoders, predict_raw
from fusion.registry import create_run_head
from fusion.run import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    fit_folds,
    fit_run,
    labelled_rows,
    load_head,
    load_weights,
    read_config,
    read_metrics,
    with_modalities,
)
from fusion.train import predict_proba


@dataclass(frozen=True)
class Post:
    """One social-media post: its text, and its image as a path, a PIL image or the bytes of an image file."""

    text: str
    image: str | Path | Image.Image | bytes

    def picture(self, name: str = "<post>", max_pixels: int | None = None) -> Image.Image:
        """The image as RGB, upright; an unreadable one raises ``BadImageError`` naming ``name``, and one of more than
        ``max_pixels`` pixels (default: PIL's limit) ``ImageTooLargeError`` (``extract.dataset.load_image``)."""
        if isinstance(self.image, Image.Image):
            return rgb_image(self.image)
        if isinstance(self.image, bytes):
            return load_image(io.BytesIO(self.image), name, max_pixels)
        return load_image(Path(self.image), name, max_pixels)


@dataclass
class EncoderSet:
    """The encoders one or more members read, one or more per modality, as they were trained with.

    A fit run's (``descriptions`` given) are built on first use, from its config: predictions from
    the caches never need them. They compute the features as ``extract`` cached them (the
    ``for_inference`` copies, float16 through ``PairFeatures.from_encoders``). A finetune run's are
    its own trained encoders, normalised in float32 as ``PairModel.forward`` does.
    """

    text: list[Encoder] = field(default_factory=list)
    image: list[Encoder] = field(default_factory=list)
    descriptions: dict[str, dict[str, Any]] | None = None  # a fit run's config["encoders"]

    def build(self, device: torch.device) -> EncoderSet:
        """Build a fit run's encoders (once), checked against the descriptions its head was trained on."""
        if self.descriptions is not None and not self.text:
            reuse_freed_memory()  # the encoders' batch activations, reused as in extraction (extract/memory.py)
            built = load_encoders(self.descriptions)
            self.text, self.image = ([e.for_inference().to(device) for e in built[kind]] for kind in ("text", "image"))
        return self

    @torch.inference_mode()
    def features(self, posts: Sequence[Post], pictures: Sequence[Image.Image], device: torch.device) -> PairFeatures:
        """The normalised features of a batch of posts, rows in order, on the CPU."""
        self.build(device)
        names = [f"<post {i}>" for i in range(len(posts))]
        # A fit run's features as extraction computes them, TF32 matrix products on CUDA included.
        with tf32_matmuls(device) if self.descriptions is not None else contextlib.nullcontext():
            text = [_on_cpu(e.encode([e.post_item(p.text, pic) for p, pic in zip(posts, pictures)], device))
                    for e in self.text]  # each (B, T_i, D_i), (B, T_i)
            image = [_on_cpu(e.encode([e.pixels(pic) for pic in pictures], device))
                     for e in self.image]  # each (B, P_i, D_i), (B, P_i)
        if self.descriptions is not None:
            return PairFeatures.from_encoders(names, text, image)
        (text_tokens, text_mask), (image_patches, image_mask) = text[0], image[0]
        return PairFeatures(
            names, normalise_features(text_tokens.float()), text_mask, normalise_features(image_patches.float()),
            image_mask,
        )


@dataclass
class Member:
    """One head of a run: where it came from, what it reads, and how its probabilities are adjusted."""

    run_dir: Path
    head: nn.Module
    encoders: str  # key of its EncoderSet in Run.encoder_sets
    modalities: str = "both"  # the ablation's input: the other modality is masked
    adjustment: LogitAdjustment = field(default_factory=LogitAdjustment)
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.json
    model: PairModel | None = None  # a finetune run's whole model (encoders and head)

    def probabilities(self, features: PairFeatures) -> np.ndarray:
        """(N, C) as the fitted run predicts: its modalities only, its logit adjustment applied."""
        return self.adjustment.apply(predict_proba(self.head, with_modalities(features, self.modalities)))


class Run:
    """A trained run, loaded once: its heads, their shared encoders, and the decision rule combining them."""

    def __init__(
        self, members: list[Member], encoder_sets: dict[str, EncoderSet], rule: DecisionRule,
        device: torch.device | None = None,
    ):
        self.members, self.encoder_sets, self.rule = members, encoder_sets, rule
        self.device = device or torch.device("cpu")
        self.labels: tuple[str, ...] = LABELS
        self._cached: LoadedFeatures = {}  # cache reads of predict_cached, keyed by caches and rows

    def __repr__(self) -> str:
        runs = ", ".join(str(m.run_dir) for m in self.members)
        return f"Run({len(self.members)} member(s): {runs}; decision {self.rule.name}; {self.device})"

    @classmethod
    def load(
        cls,
        path: str | Path | Sequence[str | Path],
        *,
        decision: str | DecisionRule | None = None,
        data_dir: str | Path | None = None,
        device: str = "auto",
    ) -> Run:
        """Load run folders: a fit or finetune run, a K-fold folder (``fold-*`` inside), or a list of them.

        ``decision`` is the rule combining several members, or its name (default: the one a K-fold
        folder's ``decision.json`` names, else the plain mean); ``data_dir`` gives the ``prior`` rule its
        training labels. ``device``: where encoders and heads run (auto: CUDA when present | cpu | cuda).
        """
        paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
        if not paths:
            raise ValueError("give at least one run folder")
        torch_device = resolve_device(device)
        members, encoder_sets = [], {}
        for run_dir in expand_runs(paths):
            config = read_config(run_dir)
            if config.get("kind") == "finetune":
                model = load_finetuned(run_dir, config).to(torch_device)
                key = f"finetune:{run_dir}"
                encoder_sets[key] = EncoderSet([model.text_encoder], [model.image_encoder])
                members.append(Member(run_dir, model.head, key, config=config, model=model))
                continue
            head, config = load_head(run_dir)
            key = json.dumps(config["encoders"], sort_keys=True)
            encoder_sets.setdefault(key, EncoderSet(descriptions=config["encoders"]))
            members.append(Member(
                run_dir, head.to(torch_device), key, from_dict(FitConfig, config["fit"]).modalities,
                stored_adjustment(read_metrics(run_dir)), config,
            ))
        rule = decision if isinstance(decision, DecisionRule) else ensemble_decision(
            paths, decision, None if data_dir is None else Path(data_dir)
        )
        return cls(members, encoder_sets, rule, torch_device)

    def member_probabilities(self, posts: Sequence[Post], batch_size: int = 32) -> np.ndarray:
        """Each member's probabilities (M, N, C) for raw posts, before the decision rule."""
        chunks = []
        for start in range(0, len(posts), batch_size):
            batch = list(posts[start : start + batch_size])
            pictures = [post.picture(f"<post {start + i}>") for i, post in enumerate(batch)]
            features = {key: encoders.features(batch, pictures, self.device)
                        for key, encoders in self.encoder_sets.items()}
            chunks.append(np.stack([m.probabilities(features[m.encoders]) for m in self.members]))  # (M, B, C)
        if not chunks:
            return np.zeros((len(self.members), 0, len(self.labels)), np.float32)
        return np.concatenate(chunks, axis=1)

    def predict_proba(self, posts: Sequence[Post] | Post, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, C), columns in ``self.labels`` order, of raw posts.

        The decision rule sees the posts together: ``prior`` gives them the training labels' class shares, as
        for a test set. ``decide_each`` decides each post alone, as a server must.
        """
        posts = [posts] if isinstance(posts, Post) else list(posts)
        return self.rule.apply(self.member_probabilities(posts, batch_size))

    def decide_each(self, members: np.ndarray) -> np.ndarray:
        """The decision rule on each post alone (N, C), from members' probabilities (M, N, C): a post's answer
        never depends on the posts that came with it (``prior`` fits class shares over the rows it is given)."""
        decided = [self.rule.apply(members[:, row : row + 1]) for row in range(members.shape[1])]  # (1, C) each
        return np.concatenate(decided) if decided else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, posts: Sequence[Post] | Post, batch_size: int = 32) -> list[str]:
        """The label of each post."""
        return [self.labels[i] for i in self.predict_proba(posts, batch_size).argmax(1)]

    def predict_cached(
        self, data_dir: str | Path, guids: Sequence[str], cache_root: str | Path = defaults.CACHE_ROOT,
        progress: bool = False,
    ) -> np.ndarray:
        """Probabilities (N, C) of ``guids`` of a data folder: fit members read its caches (``extract`` them
        first), finetune members encode its raw pairs."""
        return self.rule.apply(self.member_probabilities_cached(data_dir, guids, cache_root, progress))

    def member_probabilities_cached(
        self, data_dir: str | Path, guids: Sequence[str], cache_root: str | Path = defaults.CACHE_ROOT,
        progress: bool = False, keep: bool = True,
    ) -> np.ndarray:
        """Each member's probabilities (M, N, C) of ``guids`` of a data folder, before the decision rule.

        ``keep``: memoise the cache reads for later calls on the same rows. A caller streaming a large
        folder chunk by chunk (``fusion.predict.stream_submission``) passes False, so that it holds one
        chunk's features at a time; the members of the call still share each read.
        """
        data_dir, cache_root, guids = Path(data_dir), Path(cache_root), list(guids)
        loaded: LoadedFeatures = self._cached if keep else {}
        each = []
        for member in self.members:
            if member.model is not None:
                model = member.model
                if getattr(model.text_encoder, "ocr", False):
                    model.text_encoder.ocr_texts.update(read_ocr(ocr_path(cache_root, data_dir)))
                pairs = RawPairs(model, data_dir, guids)
                each.append(predict_raw(model, pairs, device=self.device, progress=progress).numpy())
                continue
            encoders = member.config["encoders"]
            features, _ = load_pair_features(
                cache_root, data_dir, guids, encoders["text"]["encoder"], encoders["image"]["encoder"],
                expected=encoders, loaded=loaded,
            )
            each.append(member.probabilities(features))
        return np.asarray(each)  # (M, N, C)

    @property
    def explainable(self) -> bool:
        """Whether ``explain`` can attribute this run's prediction: its members read the same encoders' features."""
        return len({member.encoders for member in self.members}) == 1

    def explain(
        self, post: Post, target: str | int | None = None, steps: int = DEFAULT_STEPS
    ) -> tuple[Explanation, Image.Image]:
        """Which words and image patches pushed the run's prediction for ``post``, and the picture they cover.

        Integrated Gradients (``fusion.explain.explain``) of each member head's logit for ``target``
        (default: the class the run predicts), averaged over the members: for an ensemble, the mean
        member's explanation. The probabilities are the run's (after its decision rule).
        """
        if not self.explainable:
            raise ValueError("explain needs members that share their encoders (one run, or the folds of one)")
        encoders = self.encoder_sets[self.members[0].encoders].build(self.device)
        picture = post.picture()
        features = encoders.features([post], [picture], self.device)  # encoded once, for the prediction and IG
        members = np.stack([member.probabilities(features) for member in self.members])  # (M, 1, C)
        probabilities = self.rule.apply(members)[0]  # (C,)
        target = self.labels[int(probabilities.argmax())] if target is None else target
        each = [
            explain(m.head, *with_modalities(features, m.modalities).batch(torch.tensor([0])), target=target,
                    steps=steps, labels=self.labels)
            for m in self.members
        ]
        # A member that does not read a modality (ablate's text-only or image-only runs) gets it as one masked
        # position, so its weights there are a single zero: zeros over the post's own positions instead.
        text_length, image_length = (x.shape[1] for x in features.batch(torch.tensor([0]))[::2])
        token_weights = np.mean([_zero_padded(e.token_weights, text_length) for e in each], axis=0)  # (T,)
        patch_weights = np.mean([_zero_padded(e.patch_weights, image_length) for e in each], axis=0)  # (P,)
        words: list[Word] = []
        text_encoder = encoders.text[0]
        if hasattr(text_encoder, "tokenize_item") and len(encoders.text) == 1:
            words = merge_words(text_encoder.tokenize_item(text_encoder.post_item(post.text, picture)), token_weights)
        explanation = Explanation(
            label=self.labels[int(probabilities.argmax())],
            target=each[0].target,
            probabilities={label: float(p) for label, p in zip(self.labels, probabilities)},
            token_weights=token_weights.astype(np.float32),
            patch_weights=patch_weights.astype(np.float32),
            logit_gap=float(np.mean([e.logit_gap for e in each])),
            delta=float(np.mean([e.delta for e in each])),
            steps=steps,
            words=words,
        )
        return explanation, picture


@dataclass
class FitSpec:
    """What to fit: the encoders (their caches), the training options, and the head's own options."""

    text_encoder: str = defaults.TEXT_ENCODER
    image_encoder: str = defaults.IMAGE_ENCODER
    fit: FitConfig = field(default_factory=FitConfig)
    head: dict[str, Any] = field(default_factory=dict)  # hidden, text_pool, …: the head's config fields


def fit(
    spec: FitSpec,
    out: str | Path,
    *,
    data: str | Path = defaults.DATA_DIR,
    cache: str | Path = defaults.CACHE_ROOT,
    folds: int = 1,
    decision: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Run:
    """Fit a head on the cached features (``extract`` first), write the run folder ``out``, and load it.

    ``folds`` > 1: K-fold cross-validation, a head per fold in ``out/fold-k``, combined by ``decision``
    (as ``python cli.py fit --folds K``); 1: one stratified hold-out split of ``spec.fit.val_fraction``.
    """
    encoders = {"text_encoder": spec.text_encoder, "image_encoder": spec.image_encoder}
    data, cache, out = Path(data), Path(cache), Path(out)
    if folds > 1:
        fit_folds(data, cache, out, spec.fit, spec.head, folds=folds, decision=decision, overwrite=overwrite,
                  progress=progress, **encoders)
    elif decision not in (None, "mean"):
        raise ValueError("a decision rule combines the heads of folds > 1")
    else:
        fit_run(data, cache, out, spec.fit, spec.head, overwrite=overwrite, progress=progress, **encoders)
    return Run.load(out, data_dir=data)


def expand_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders to combine: each path is a run, a folder of ``fold-*`` runs (a K-fold fit or sweep trial), or a
    ``stack`` folder (its member folders' runs, in the order its ``stack.json`` reads them)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        stack = read_stack(path)
        if stack is not None:
            runs.extend(expand_runs([Path(run) for run in stack.runs]))
            continue
        folds = sorted(path.glob("fold-*/config.json"))
        if (path / CONFIG_FILE).is_file() or not folds:
            runs.append(path)  # read_config names a folder that is neither
        else:
            runs.extend(config.parent for config in folds)
    return runs


def ensemble_decision(runs: Sequence[Path], decision: str | None = None, data_dir: Path | None = None) -> DecisionRule:
    """The rule that turns the runs' probabilities into one prediction.

    One K-fold folder with ``decision.json`` (``fit --folds K``): its default rule, or its stored rule named
    ``decision``. Any other list of runs (single runs, several folders whose rules were fitted on other
    heads, folders fitted before decision rules existed): the plain mean, or the named rule when it needs
    no fitting (``geometric``) or only the training labels (``prior``: the shares of ``data_dir``'s train.txt).
    A ``stack`` folder (``python cli.py stack``): its logistic regression, which alone decides for it.
    """
    if decision is not None and decision not in RULES:
        raise ValueError(f"unknown decision rule {decision!r}; choose one of {sorted(RULES)}")
    stacks = [stack for stack in map(read_stack, runs) if stack is not None]
    if stacks and (len(runs) > 1 or decision is not None):
        raise ValueError("a stack folder's logistic regression decides for it: predict with it alone, no --decision")
    if stacks:
        return stacks[0]
    stored = read_decision(runs[0]) if len(runs) == 1 else None
    if stored is not None:
        default, rules = stored
        if (decision or default) in rules:
            return rules[decision or default]
    name = decision or DEFAULT_RULE
    if name in ("mean", "geometric"):
        return create_rule(name)
    if name == "prior" and data_dir is not None:
        return PriorRule().fit(None, labelled_rows(data_dir)[1], len(LABELS))
    refit = "fit --folds K --decision bias" if name == "bias" else "fit --folds K"
    where = str(runs[0]) if len(runs) == 1 else f"{len(runs)} run folders (rules are read from one K-fold folder)"
    raise ValueError(
        f"decision rule {name!r} is fitted by `{refit}` and stored in the folder's decision.json; none for {where}: "
        "refit, or choose mean, geometric or prior"
    )


def load_finetuned(run_dir: Path, config: dict[str, Any]) -> PairModel:
    """Encoders and head of a finetune run, with the weights it trained (model.pt holds all three)."""
    text, image = build_encoders(config["encoders"])
    model = PairModel(text, image, create_run_head(config))
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS_FILE}; the finetune did not finish an epoch")
    load_weights(model, weights, fix="finetune it again with `python cli.py finetune --overwrite`")
    return model.eval()


def load_encoders(descriptions: dict[str, dict[str, Any]]) -> dict[str, list[Encoder]]:
    """Rebuild a run's encoders (one or more per modality) and check they are the ones its head was trained on."""
    encoders: dict[str, list[Encoder]] = {}
    for kind, description in descriptions.items():
        encoders[kind] = []
        for stream in stream_descriptions(description):
            encoder = create_encoder(kind, stream["encoder"], **stream["options"])
            check_identity(Path(f"<{kind} encoder {encoder.name}>"), encoder.eval().describe(), stream)
            encoders[kind].append(encoder)
    return encoders


def _zero_padded(weights: np.ndarray, length: int) -> np.ndarray:
    """(L,) weights followed by zeros up to (length,)."""
    return np.pad(np.asarray(weights), (0, length - len(weights)))


def _on_cpu(stream: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return stream[0].cpu(), stream[1].cpu()

