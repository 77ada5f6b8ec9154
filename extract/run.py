"""Stage one: run one encoder over every pair of a data folder into its HDF5 cache."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from extract.cache import CacheMismatchError, FeatureCache, cache_path, is_cached_unsharded, shard_path, stitch_shards
from extract.dataset import BadImageError, is_text_only, read_split
from extract.decode import decode_images, read_raw_image, resolve_decoder
from extract.device import resolve_device, tf32_matmuls
from extract.distributed import Launch, all_gather, barrier, join, leader_first
from extract.encoders.base import Encoder, PatchImageEncoder
from extract.memory import reuse_freed_memory
from extract.ocr import adopted_ocr_path, extract_ocr, merge_ocr_parts, read_ocr
from extract.registry import create_encoder, stream_names


@dataclass
class ExtractSummary:
    path: Path
    total: int  # guids the data folder asks for
    encoded: int  # rows written by this run
    skipped: list[str]  # guids recorded as unreadable (--skip-bad)


class _RawItems(Dataset):
    """Raw inputs for the encoder; read errors are returned, not raised, so the main process reports them."""

    def __init__(self, read: Callable[[Path, str], Any], data_dir: Path, guids: list[str]):
        self.read, self.data_dir, self.guids = read, data_dir, guids

    def __len__(self) -> int:
        return len(self.guids)

    def __getitem__(self, index: int):
        guid = self.guids[index]
        try:
            return guid, self.read(self.data_dir, guid)
        except BadImageError as error:
            return guid, error


def _as_list(items):
    return items


def data_guids(data_dir: Path, splits: tuple[str, ...] = ("train", "test")) -> list[str]:
    """Guids of the label files, in file order, each once."""
    guids: dict[str, None] = {}
    for split in splits:
        for row in read_split(data_dir, split):
            guids.setdefault(row.guid, None)
    return list(guids)


def default_workers(cores: int | None = None) -> int:
    """Half the cores (a torchrun rank: half its share), at most 8."""
    return min(8, (cores or os.cpu_count() or 2) // 2)


def extract_features(
    encoder: Encoder,
    data_dir: Path,
    cache_root: Path,
    *,
    guids: list[str] | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    skip_bad: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    decode: str = "auto",
    tf32: bool = True,
    launch: Launch | None = None,
) -> ExtractSummary:
    """Encode the guids missing from the cache and append them; resumable by construction.

    ``decode`` picks how an image encoder's JPEGs become pixels (extract/decode.py): ``pil`` in the
    DataLoader workers (the reference), ``tensor`` batched on ``device`` after the workers read the
    bytes, ``auto`` = tensor on CUDA, where worker decoding is the bottleneck, PIL otherwise. Text
    encoders read no pixels and ignore it. The decoder is not part of the cache's identity: like GPU
    against CPU arithmetic, it moves features by small amounts (measured by tests/test_decode.py on
    the CPU, by benchmarks/gpu.py on CUDA). Neither is ``tf32``: on CUDA the encoders' float32 matrix
    products use TF32 (about 1.5× faster bert-base extraction on an H200), which moves features by about one
    float16 step of the cache (benchmarks/gpu.py); ``tf32=False`` keeps them in full float32.

    ``launch`` (a torchrun rank, extract/distributed.py, process group joined): this rank encodes its
    contiguous slice of ``guids`` into its own shard file, resuming it, and rank 0 stitches the shards
    into the cache file once every rank is done (extract/cache.py). Every rank returns the summary of
    all ranks; ``num_workers`` then defaults to half the rank's share of the cores.
    """
    reuse_freed_memory()  # batch activations of 50–150 MB, reused instead of faulted in anew (extract/memory.py)
    data_dir = Path(data_dir)
    guids = data_guids(data_dir) if guids is None else guids
    path = cache_path(cache_root, data_dir, encoder.kind, encoder.name)
    identity = encoder.describe()  # before the move: hashing the weights reads them all, from the host here
    encoder = encoder.to(device).eval()
    loop = {
        "data_dir": data_dir, "batch_size": batch_size, "device": device, "skip_bad": skip_bad,
        "num_workers": default_workers(launch and launch.cores()) if num_workers is None else num_workers,
        "decoder": resolve_decoder(decode, device), "tf32": tf32,
    }
    if launch is None:
        with FeatureCache(path, identity, data_dir) as cache:
            encoded, skipped = _encode_missing(encoder, cache, guids, progress=progress, **loop)
        return ExtractSummary(path, len(guids), encoded, skipped)
    if is_cached_unsharded(path, launch.world_size, identity, guids):
        return ExtractSummary(path, len(guids), 0, [])
    share = launch.share(guids)
    with FeatureCache(shard_path(path, launch.rank, launch.world_size), identity, data_dir) as shard:
        strays = shard.guids() - set(share)
        if strays:
            raise CacheMismatchError(
                f"{shard.path}: holds {len(strays)} guids outside this rank's slice (e.g. {sorted(strays)[:3]}): "
                f"the label files changed since it was written; delete {path.name} and its shards to extract again"
            )
        encoded, skipped = _encode_missing(encoder, shard, share, progress=progress and launch.leader, **loop)
    ranks = all_gather((encoded, skipped))  # every shard is complete once this returns
    if launch.leader:
        stitch_shards(path, launch.world_size)
    barrier()  # no rank goes on before the cache file is there
    return ExtractSummary(path, len(guids), sum(count for count, _ in ranks), [g for _, bad in ranks for g in bad])


def sharded_ocr(
    data_dir: Path, cache_root: Path, guids: list[str], launch: Launch, *, skip_bad: bool = False
) -> dict[str, str]:
    """OCR under torchrun: each rank reads its slice's images missing from the cache's OCR file into a part
    file of its own (resumable, one reader process per share of the cores), then rank 0 appends the parts
    to the cache's file in guid order; every rank returns the texts of ``guids``."""
    with leader_first(launch):  # rank 0 adopts an OCR file from before settings named files, then the rest read it
        done = read_ocr(adopted_ocr_path(cache_root, data_dir))
    mine = [guid for guid in launch.share(guids) if guid not in done]
    extract_ocr(data_dir, cache_root, mine, skip_bad=skip_bad, progress=launch.leader, workers=launch.cores(),
                part=launch.rank)
    barrier()
    if launch.leader:
        merge_ocr_parts(cache_root, data_dir, guids)
    barrier()
    texts = read_ocr(adopted_ocr_path(cache_root, data_dir))
    return {guid: texts[guid] for guid in guids}


def extract_data(
    data_dir: Path,
    cache_root: Path,
    text_encoder: str,
    image_encoder: str,
    *,
    batch_size: int = 32,
    max_tokens: int = 64,
    normalize: str = "none",
    device: str = "auto",
    decode: str = "auto",
    workers: int | None = None,
    skip_bad: bool = False,
    only: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[ExtractSummary]:
    """Stage one as ``extract`` and ``pipeline`` run it: every encoder of both comma lists over every pair, resumable.

    One function for both commands, so the pipeline's extraction is the command's, defaults included
    (tests/test_cli.py pins the command's option defaults to these). A "+ocr" text encoder reads the
    text inside the images first (cached, resumable); a text-only folder (texts.csv) gets its texts
    encoded only. Under torchrun every process encodes its slice of the pairs (``extract_features``)
    and only rank 0 calls ``echo``. ``only`` is "text", "image" or None (both).
    """
    kinds = {"text": (text_encoder, {"max_tokens": max_tokens, "normalize": normalize}), "image": (image_encoder, {})}
    if only not in (None, *kinds):
        raise ValueError(f"only={only!r}: expected 'text', 'image' or None")
    launch = Launch.from_env()  # None unless a launcher started several processes
    leader = launch is None or launch.leader  # the one process that prints
    say = echo if leader else lambda _: None
    torch_device = resolve_device(device)
    guids = data_guids(data_dir)
    if is_text_only(data_dir):
        if only == "image":
            raise ValueError(f"{data_dir}: a text-only folder (texts.csv) has no images to extract")
        say(f"{data_dir}: text-only folder (texts.csv); extracting text only")
        only = "text"
    if launch is not None:  # this rank's GPU (cuda:LOCAL_RANK) or share of the cores, in the process group
        torch_device = join(launch, torch_device)
    where = torch_device if launch is None else f"{launch.world_size} processes ({torch_device.type})"
    summaries = []
    for kind, (names, options) in kinds.items():
        if only not in (None, kind):
            continue
        for name in stream_names(names):
            started = time.perf_counter()
            encoder = create_encoder(kind, name, **options)
            if getattr(encoder, "ocr", False):  # a "+ocr" text encoder: the OCR stage runs (or resumes) first
                if launch is None:
                    ocr_texts = extract_ocr(data_dir, cache_root, guids, skip_bad=skip_bad, progress=leader)
                else:
                    ocr_texts = sharded_ocr(data_dir, cache_root, guids, launch, skip_bad=skip_bad)
                encoder.ocr_texts.update(ocr_texts)
                say(f"ocr: image text of {len(guids)} pairs in {time.perf_counter() - started:.1f} s")
            summary = extract_features(
                encoder, data_dir, cache_root, guids=guids, batch_size=batch_size, device=torch_device,
                skip_bad=skip_bad, num_workers=workers, decode=decode, launch=launch,
            )
            say(
                f"{kind} {name}: {summary.encoded} new of {summary.total} pairs in "
                f"{time.perf_counter() - started:.1f} s on {where} → {summary.path}"
                + (f" ({len(summary.skipped)} skipped: {summary.skipped[:5]})" if summary.skipped else "")
            )
            summaries.append(summary)
    return summaries


def _encode_missing(
    encoder: Encoder,
    cache: FeatureCache,
    guids: list[str],
    *,
    data_dir: Path,
    batch_size: int,
    device: torch.device | str,
    skip_bad: bool,
    num_workers: int,
    decoder: str,
    tf32: bool,
    progress: bool,
) -> tuple[int, list[str]]:
    """Encode the ``guids`` the open cache lacks, in their order, appending batch by batch: (rows written, skipped)."""
    tensor_decode = decoder == "tensor" and isinstance(encoder, PatchImageEncoder)
    square = {"image_size": encoder.image_size, "mean": encoder.mean, "std": encoder.std} if tensor_decode else {}
    read = partial(read_raw_image, **square) if tensor_decode else encoder.read
    skipped: list[str] = []
    encoded = 0
    # unreadable in an earlier run (--skip-bad): read again, and written in place if they are fine now
    todo = cache.missing(guids) + cache.skipped(guids)
    fast = encoder.for_inference() if todo else encoder  # same features, faster; the cache was checked on ``encoder``
    loader = DataLoader(
        _RawItems(read, data_dir, todo), batch_size=batch_size, collate_fn=_as_list,
        num_workers=num_workers if len(todo) > batch_size else 0,
        pin_memory=torch.device(device).type == "cuda",
    )
    bar = tqdm(total=len(todo), unit="pair", desc=f"{encoder.kind}:{encoder.name}", disable=not progress)
    with bar, torch.inference_mode(), tf32_matmuls(device, tf32):
        for batch in loader:
            if tensor_decode:  # JPEG bytes → (3, S, S) pixels on the device, or the file's BadImageError
                pixels = decode_images([item for _, item in batch], **square, device=device)
                batch = [(guid, item) for (guid, _), item in zip(batch, pixels)]
            good = [(g, item) for g, item in batch if not isinstance(item, BadImageError)]
            bad = [(g, item) for g, item in batch if isinstance(item, BadImageError)]
            if bad and not skip_bad:
                raise bad[0][1]
            if good:
                features, mask = fast.encode([item for _, item in good], device)  # (B, L, D), (B, L)
                # float16 on the device: half the bytes to copy, and the same rounding as numpy's
                cache.append([g for g, _ in good], features.to(torch.float16).cpu().numpy(), mask.cpu().numpy())
            if bad:
                # A skipped pair keeps a row whose mask is all False, so later stages see "no input".
                cache.append([g for g, _ in bad], np.zeros((len(bad), 1, encoder.dim), np.float16),
                             np.zeros((len(bad), 1), bool), skipped=True)
                skipped.extend(g for g, _ in bad)
            encoded += len(batch)
            bar.update(len(batch))
    return encoded, skipped
