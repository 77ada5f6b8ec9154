"""GPU check: extraction pairs/s and a bf16 finetune with BERT-base- and ResNet-50-sized encoders.

The hub weights cannot be downloaded on the GPU machine, so both encoders are the real
architectures with random weights (speed does not depend on the weights): a default
``BertConfig`` (bert-base-uncased's shape and vocabulary) and torchvision ``resnet50``.

Image extraction runs twice, each into its own cache: with JPEGs decoded by PIL in the
DataLoader workers (``extract_image``, the reference) and decoded in batches on the device
(``extract_image_tensor_decode``: nvjpeg on CUDA, see extract/decode.py). The second also
records how far it is from the first: pixels in 8-bit levels and cached features.

    python -m benchmarks.gpu --data DIR --tokenizer DIR [--steps 300] [--out results.json]

Each extraction is timed warm: a first pass over ``--warmup-pairs`` pairs pays CUDA's start,
cuDNN's algorithm search and the workers' start, and is reported on its own. ``stages`` then
times each step of the tensor path alone over all pairs (read the bytes in one process, decode
on the device, encoder forward, copy to the host, write to HDF5), so the pairs/s can be set
against the step that bounds them. ``extract_text_float32`` repeats the text extraction with
TF32 matrix products turned off (extraction's default on CUDA is TF32, extract/device.py), and
``extract_text`` records how far its features are from that run's.

Prints a table and writes the figures as JSON. ``--tiny`` runs the same path with small
models on the CPU, to check the script before spending GPU time. ``--steps 0`` skips the finetunes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from extract.cache import load_features
from extract.dataset import BadImageError, image_path, read_split
from extract.decode import EncodedJpeg, decode_images, read_raw_image
from extract.device import resolve_device, tf32_matmuls
from extract.encoders.base import PatchImageEncoder, TextEncoder
from extract.registry import create_image_encoder, create_text_encoder
from extract.run import data_guids, extract_features
from fusion.finetune import FinetuneConfig, finetune_run


def random_bert(tokenizer_dir: Path, folder: Path, tiny: bool) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tiny:
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=37)
    else:
        config = BertConfig(vocab_size=len(tokenizer))  # bert-base-uncased: 12 layers, 768 wide, 110 M parameters
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fill_missing_images(data_dir: Path) -> int:
    """Give guids without an image a copy of a present one, in turn; returns how many were filled.

    The GPU machine receives the working tree through a 64 MiB limit, so only a subset of
    the real JPEGs travels; reusing them keeps the decode cost per pair realistic.
    """
    present = sorted((data_dir / "data").glob("*.jpg"))
    missing = [g for g in data_guids(data_dir) if not (data_dir / "data" / f"{g}.jpg").exists()]
    for index, guid in enumerate(missing):
        shutil.copyfile(present[index % len(present)], data_dir / "data" / f"{guid}.jpg")
    return len(missing)


def warm_file_cache(data_dir: Path, guids: list[str]) -> None:
    """Read every image once, so neither image extraction pays for the first reads from disk."""
    for guid in guids:
        path = image_path(data_dir, guid)
        if path.is_file():
            path.read_bytes()


def decode_agreement(encoder: PatchImageEncoder, data_dir: Path, guids: list[str], device: torch.device) -> dict:
    """The tensor path's pixels against the PIL path's over ``guids``, in 8-bit levels (|Δ| · std · 255)."""
    square = {"image_size": encoder.image_size, "mean": encoder.mean, "std": encoder.std}
    raw = [read_raw_image(data_dir, guid, **square) for guid in guids]
    decoded = decode_images(raw, **square, device=device)
    std = torch.tensor(encoder.std).view(3, 1, 1)
    levels = [
        (pixels.cpu() - encoder.read(data_dir, guid)).abs() * std * 255.0  # (3, S, S)
        for guid, pixels in zip(guids, decoded)
        if not isinstance(pixels, BadImageError)
    ]
    return {
        "images": len(levels),
        "decoded_as_jpeg_bytes": sum(isinstance(item, EncodedJpeg) for item in raw),
        "max_levels": round(max(float(level.max()) for level in levels), 2),
        "mean_levels": round(float(np.mean([float(level.mean()) for level in levels])), 4),
    }


def feature_agreement(path: Path, reference: Path, guids: list[str]) -> dict:
    """Cached features of ``path`` against ``reference`` over ``guids``: |Δ| and the reference's mean |x|."""
    features = load_features(path, guids).features.astype(np.float32)  # (N, P, D)
    expected = load_features(reference, guids).features.astype(np.float32)  # (N, P, D)
    difference = np.abs(features - expected)
    return {
        "pairs": len(guids), "max_abs_diff": round(float(difference.max()), 4),
        "mean_abs_diff": round(float(difference.mean()), 5),
        "mean_abs_feature": round(float(np.abs(expected).mean()), 4),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(totals: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    """Add the seconds of the block to ``totals[key]``, the device's queued work included."""
    started = time.perf_counter()
    yield
    synchronize(device)
    totals[key] = totals.get(key, 0.0) + time.perf_counter() - started


def stage_seconds(encoder: PatchImageEncoder | TextEncoder, data_dir: Path, guids: list[str], device: torch.device,
                  batch_size: int, scratch: Path) -> dict:
    """Each step of extraction alone, over ``guids``: seconds and the pairs/s it alone would allow.

    The steps run one after another with the device synchronised between them, so each is
    measured on its own; extraction overlaps only the workers' reads with the rest. As in
    extraction, matrix products use TF32 on CUDA and features become float16 on the device.
    """
    fast = encoder.for_inference().to(device)
    totals: dict[str, float] = {}
    with timed(totals, "read", device):  # one process; extraction spreads this over its workers, overlapped
        if isinstance(encoder, PatchImageEncoder):
            square = {"image_size": encoder.image_size, "mean": encoder.mean, "std": encoder.std}
            raw = [read_raw_image(data_dir, guid, **square) for guid in guids]
        else:
            raw = [encoder.read(data_dir, guid) for guid in guids]
    with h5py.File(scratch / f"stages-{encoder.kind}.h5", "w") as handle, torch.inference_mode(), tf32_matmuls(device):
        # (N, L, D): L is the encoder's longest sequence; text batches are padded only to their longest text
        written = handle.create_dataset("features", (len(raw), encoder.length, encoder.dim), np.float16,
                                        chunks=(1, encoder.length, encoder.dim))
        for start in range(0, len(raw), batch_size):
            items = raw[start : start + batch_size]
            if isinstance(encoder, PatchImageEncoder):
                with timed(totals, "decode", device):
                    items = decode_images(items, **square, device=device)
                with timed(totals, "forward", device):
                    features, mask = fast.encode(items, device)  # (B, P, D), (B, P)
            else:
                with timed(totals, "tokenize", device):
                    batch = {key: value.to(device) for key, value in fast.collate(items).items()}
                with timed(totals, "forward", device):
                    features, mask = fast(**batch)  # (B, T, D), (B, T)
            with timed(totals, "to_host", device):
                features = features.to(torch.float16).cpu().numpy()
            with timed(totals, "write", device):
                written[start : start + len(features), : features.shape[1]] = features
        with timed(totals, "write", device):
            handle.flush()
    return {key: {"seconds": round(seconds, 2), "pairs_per_s": round(len(guids) / seconds, 1)}
            for key, seconds in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with a BERT uncased tokenizer")
    parser.add_argument("--steps", type=int, default=300, help="finetune optimiser steps (0: no finetune)")
    parser.add_argument("--warmup-pairs", type=int, default=256, help="pairs of the untimed first pass per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--extract-batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="small models, to check the script on a CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fill-missing-images", action="store_true", help="reuse present images for missing ones")
    parser.add_argument("--compare-pairs", type=int, default=256, help="pairs whose pixels and features both "
                        "image decoders are compared on")
    args = parser.parse_args()

    device = resolve_device(args.device)
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    if args.fill_missing_images:
        results["images_reused"] = fill_missing_images(args.data)
    guids = data_guids(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        text = create_text_encoder(str(random_bert(args.tokenizer, scratch / "bert", args.tiny)), max_tokens=64)
        image = create_image_encoder("tv:resnet18" if args.tiny else "resnet50", weights="random")
        warm_file_cache(args.data, guids)
        # One cache folder per run: the second image run would otherwise find every pair cached.
        # extract_text_float32 turns TF32 matrix products off, to measure what they gain and move.
        runs = (("extract_text", text, "auto", True), ("extract_text_float32", text, "auto", False),
                ("extract_image", image, "pil", True), ("extract_image_tensor_decode", image, "tensor", True))
        caches: dict[str, Path] = {}
        for key, encoder, decode, tf32 in runs:
            options = {"decode": decode, "tf32": tf32, "batch_size": args.extract_batch_size, "device": device,
                       "num_workers": args.workers}
            started = time.perf_counter()
            extract_features(encoder, args.data, scratch / f"warmup-{key}", guids=guids[: args.warmup_pairs],
                             **options)
            synchronize(device)
            warmup_seconds = time.perf_counter() - started
            started = time.perf_counter()
            summary = extract_features(encoder, args.data, scratch / key, guids=guids, **options)
            synchronize(device)
            seconds = time.perf_counter() - started
            caches[key] = summary.path
            results[key] = {
                "encoder": "bert-base (random)" if encoder.kind == "text" and not args.tiny else encoder.name,
                "decode": decode if encoder.kind == "image" else None,
                "tf32_matmul": tf32,
                "pairs": summary.encoded, "seconds": round(seconds, 2),
                "pairs_per_s": round(summary.encoded / seconds, 1),
                "warmup": {"pairs": min(args.warmup_pairs, len(guids)), "seconds": round(warmup_seconds, 2)},
                "cache_mb": round(summary.path.stat().st_size / 2**20, 1),
            }
            print(key, results[key], flush=True)
            encoder.cpu()
        results["extract_text"]["features_vs_float32"] = feature_agreement(
            caches["extract_text"], caches["extract_text_float32"], guids[: args.compare_pairs]
        )
        for key, encoder in (("extract_text", text), ("extract_image_tensor_decode", image)):
            results[key]["stages"] = stage_seconds(encoder, args.data, guids, device, args.extract_batch_size,
                                                   scratch)
            print(key, "stages", results[key]["stages"], flush=True)
            encoder.cpu()
        compared = guids[: args.compare_pairs]
        results["extract_image_tensor_decode"]["pixels_vs_pil"] = decode_agreement(image, args.data, compared, device)
        results["extract_image_tensor_decode"]["features_vs_pil"] = feature_agreement(
            caches["extract_image_tensor_decode"], caches["extract_image"], compared
        )
        train_pairs = len(read_split(args.data, "train")) * 0.9  # the default validation split keeps 10 %
        finetunes = (("bf16", args.steps), ("fp16", max(args.steps // 10, 2))) if args.steps > 0 else ()
        for precision, steps in finetunes:
            epochs = math.ceil(steps / math.ceil(train_pairs / args.batch_size))
            config = FinetuneConfig(epochs=epochs, patience=epochs, batch_size=args.batch_size, unfreeze="all",
                                    precision=precision, max_steps_per_epoch=math.ceil(steps / epochs), warmup=0.05)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            metrics = finetune_run(args.data, scratch / f"finetune-{precision}", config, device=device,
                                   encoders=(text, image), workers=args.workers, progress=False)
            seconds = time.perf_counter() - started
            history = json.loads((scratch / f"finetune-{precision}" / "metrics.json").read_text())["history"]
            train_steps = sum(epoch["train_steps"] for epoch in history)
            train_seconds = sum(epoch["train_seconds"] for epoch in history)
            results[f"finetune_{precision}"] = {
                "steps": train_steps, "epochs": len(history), "batch_size": args.batch_size,
                "train_seconds": round(train_seconds, 1), "steps_per_s": round(train_steps / train_seconds, 2),
                "pairs_per_s": round(train_steps * args.batch_size / train_seconds, 1),
                "seconds_with_validation": round(seconds, 1), "val_macro_f1": round(metrics["macro_f1"], 4),
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
            }
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
