"""`extract` under torchrun (extract/distributed.py, the sharded path of extract/run.py and extract/cache.py).

Two real ``torchrun --nproc-per-node 2`` runs on the CPU (gloo) with the tiny text encoder: the
stitched cache equals the one-process cache, reads from a moved folder, and a rank stopped half-way
resumes to the same cache. The refusals happen before a rank's first collective call, so they run
in this process with a ``Launch`` of another rank or world size and no process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY_MAX_TOKENS, write_data_dir

from extract.cache import CacheMismatchError, FeatureCache, cache_path, load_features, shard_path
from extract.dataset import image_path, read_split
from extract.distributed import Launch
from extract.registry import create_text_encoder
from extract.run import extract_features

REPO = Path(__file__).resolve().parents[1]
FP16 = {"rtol": 1e-3, "atol": 1e-3}  # one float16 rounding step, as in tests/test_cache.py
TORCHRUN_TIMEOUT = 300  # seconds; two processes start in well under a minute even on a busy 2-core machine
SUMMARY = re.compile(r"text \S+: (\d+) new of (\d+) pairs")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_extract(data_dir: Path, cache_root: Path, model_dir: Path | str, processes: int = 2) -> tuple[int, int]:
    """``torchrun --nproc-per-node N cli.py extract --only text`` on the CPU; returns (new rows, total pairs)."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "cli.py", "extract", "--data", str(data_dir), "--cache", str(cache_root), "--text-encoder", str(model_dir),
        "--only", "text", "--max-tokens", str(TINY_MAX_TOKENS), "--batch-size", "4", "--workers", "0",
        "--device", "cpu",
    ]
    done = subprocess.run(
        command, cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=TORCHRUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summaries = SUMMARY.findall(done.stdout)
    assert len(summaries) == 1, done.stdout  # rank 0 alone prints
    return int(summaries[0][0]), int(summaries[0][1])


def _rows(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every row of a cache file as stored: guids, features (N, L, D) float32, mask (N, L)."""
    with h5py.File(path, "r") as handle:
        guids = [g.decode() if isinstance(g, bytes) else g for g in handle["guid"][:]]
        return guids, handle["features"][:].astype(np.float32), handle["mask"][:]


def assert_same_cache(path: Path, reference: Path) -> None:
    guids, features, mask = _rows(path)
    reference_guids, reference_features, reference_mask = _rows(reference)
    assert guids == reference_guids
    np.testing.assert_array_equal(mask, reference_mask)
    np.testing.assert_allclose(features, reference_features, **FP16)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder for the module: the caches of every test below are keyed by its path."""
    return write_data_dir(tmp_path_factory.mktemp("distributed") / "tiny-data")


@pytest.fixture(scope="module")
def one_process(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, tiny_text_encoder_dir: Path) -> Path:
    """The one-process text cache of ``tiny_data`` (the reference)."""
    encoder = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS)
    root = tmp_path_factory.mktemp("one-process")
    return extract_features(encoder, tiny_data, root, batch_size=4, num_workers=0, progress=False).path


@pytest.fixture(scope="module")
def two_processes(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, tiny_text_encoder_dir: Path) -> Path:
    """The cache root written by ``torchrun --nproc-per-node 2 cli.py extract``; copy it before changing it."""
    root = tmp_path_factory.mktemp("two-processes") / "cache"
    assert torchrun_extract(tiny_data, root, tiny_text_encoder_dir) == (30, 30)
    return root


def _text_cache(root: Path, data_dir: Path, model_dir: Path) -> Path:
    return cache_path(root, data_dir, "text", str(model_dir))


def test_two_processes_write_the_one_process_cache(two_processes, one_process, tiny_data, tiny_text_encoder_dir):
    path = _text_cache(two_processes, tiny_data, tiny_text_encoder_dir)
    assert_same_cache(path, one_process)
    with h5py.File(path, "r") as handle:
        assert int(handle.attrs["shards"]) == 2 and list(handle.attrs["shard_rows"]) == [15, 15]
        for name in ("features", "mask", "guid"):
            assert handle[name].is_virtual
            assert [source.file_name for source in handle[name].virtual_sources()] == [
                shard_path(path, rank, 2).name for rank in range(2)
            ]
        with h5py.File(one_process, "r") as reference:
            assert {k: handle.attrs[k] for k in reference.attrs if k != "versions"} == {
                k: reference.attrs[k] for k in reference.attrs if k != "versions"
            }


def test_stitched_cache_reads_from_a_moved_folder(two_processes, one_process, tiny_data, tiny_text_encoder_dir,
                                                  tmp_path, data_spec):
    moved = shutil.copytree(two_processes, tmp_path / "moved")
    path = _text_cache(moved, tiny_data, tiny_text_encoder_dir)
    wanted = data_spec.guids[::-1]
    encoder = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS)
    cached = load_features(path, wanted, expected=encoder.describe())
    reference = load_features(one_process, wanted)
    np.testing.assert_array_equal(cached.mask, reference.mask)
    np.testing.assert_allclose(cached.features.astype(np.float32), reference.features.astype(np.float32), **FP16)

    # A lost shard would read as zeros: refused with the fix instead.
    shard_path(path, 1, 2).unlink()
    with pytest.raises(CacheMismatchError, match=r"shard-01-of-02\.h5 is missing; rerun the same extract with 2"):
        load_features(path, wanted)


def test_a_stopped_rank_resumes_to_the_same_cache(two_processes, one_process, tiny_data, tiny_text_encoder_dir,
                                                  tmp_path):
    root = shutil.copytree(two_processes, tmp_path / "cache")
    path = _text_cache(root, tiny_data, tiny_text_encoder_dir)
    # What a rank killed after 6 of its 15 rows leaves: the guid column, written last, stops at 6.
    with h5py.File(shard_path(path, 1, 2), "a") as shard:
        shard["guid"].resize(6, axis=0)
    with pytest.raises(CacheMismatchError, match="changed since it was stitched"):
        load_features(path, [])
    assert torchrun_extract(tiny_data, root, tiny_text_encoder_dir) == (9, 30)
    assert_same_cache(path, one_process)


def test_shards_of_another_world_size_are_refused(two_processes, tiny_data, tiny_text_encoder, tmp_path):
    root = shutil.copytree(two_processes, tmp_path / "cache")
    for launch in (Launch(0, 3, 0, 3), Launch(2, 3, 2, 3)):
        with pytest.raises(CacheMismatchError, match=r"written by 2 processes but 3 are running; rerun with 2 in all"):
            extract_features(tiny_text_encoder, tiny_data, root, num_workers=0, progress=False, launch=launch)
    # Stray shards alone (the stitched file deleted) are refused the same way.
    _text_cache(root, tiny_data, tiny_text_encoder.name).unlink()
    with pytest.raises(CacheMismatchError, match=r"shard-00-of-02\.h5: written by 2 processes but 3 are running"):
        extract_features(tiny_text_encoder, tiny_data, root, num_workers=0, progress=False, launch=Launch(1, 3, 1, 3))


def test_one_process_extract_on_a_stitched_cache(two_processes, tiny_data, tiny_text_encoder, tmp_path, data_spec):
    root = shutil.copytree(two_processes, tmp_path / "cache")
    summary = extract_features(tiny_text_encoder, tiny_data, root, num_workers=0, progress=False)
    assert (summary.encoded, summary.total) == (0, 30)  # nothing missing: reads it, writes nothing
    with pytest.raises(CacheMismatchError, match=r"stitched from the shards of 2 processes, which lack 1 of the guids"):
        extract_features(tiny_text_encoder, tiny_data, root, guids=[*data_spec.guids, "new"], num_workers=0,
                         progress=False)


def test_a_one_process_cache_in_the_way(data_dir, tmp_path, tiny_text_encoder, data_spec):
    """Complete: torchrun ranks leave it as it is; incomplete: refused, since its rows can't join the shards."""
    root = tmp_path / "cache"
    extract_features(tiny_text_encoder, data_dir, root, guids=data_spec.guids[:10], num_workers=0, progress=False)
    with pytest.raises(CacheMismatchError, match=r"a one-process cache holding 10 of 30 guids is in the way"):
        extract_features(tiny_text_encoder, data_dir, root, num_workers=0, progress=False, launch=Launch(0, 2, 0, 2))
    path = extract_features(tiny_text_encoder, data_dir, root, num_workers=0, progress=False).path
    summary = extract_features(tiny_text_encoder, data_dir, root, num_workers=0, progress=False,
                               launch=Launch(1, 2, 1, 2))
    assert (summary.encoded, summary.total) == (0, 30)
    assert not shard_path(path, 1, 2).exists()
    with h5py.File(path, "r") as handle:
        assert not handle["features"].is_virtual


def test_a_shard_of_another_encoder_or_slice_is_refused(data_dir, tmp_path, tiny_text_encoder, data_spec):
    root = tmp_path / "cache"
    shard = shard_path(cache_path(root, data_dir, "text", tiny_text_encoder.name), 1, 2)
    other = tiny_text_encoder.describe() | {"length": TINY_MAX_TOKENS + 1}
    with FeatureCache(shard, other, data_dir):
        pass
    with pytest.raises(CacheMismatchError, match=r"shard-01-of-02\.h5: cache was built with length=17 but 16"):
        extract_features(tiny_text_encoder, data_dir, root, num_workers=0, progress=False, launch=Launch(1, 2, 1, 2))
    shard.unlink()
    # Rank 1 of 2 owns the second half of the guids; a shard holding the first half is from other label files.
    with FeatureCache(shard, tiny_text_encoder.describe(), data_dir) as cache:
        length, dim = tiny_text_encoder.length, tiny_text_encoder.dim
        cache.append(data_spec.guids[:2], np.zeros((2, length, dim), np.float16), np.ones((2, length), bool))
    with pytest.raises(CacheMismatchError, match=r"holds 2 guids outside this rank's slice"):
        extract_features(tiny_text_encoder, data_dir, root, num_workers=0, progress=False, launch=Launch(1, 2, 1, 2))


def test_launch_from_environment(monkeypatch):
    assert Launch.from_env({}) is None
    assert Launch.from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    launch = Launch.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert launch == Launch(rank=3, world_size=4, local_rank=1, local_world_size=2) and not launch.leader
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK is not"):
        Launch.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="inconsistent launcher variables"):
        Launch.from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert launch.cores() == 8 and Launch(0, 32, 0, 32).cores() == 1

    guids = [str(i) for i in range(11)]
    shares = [Launch(rank, 3, rank, 3).share(guids) for rank in range(3)]
    assert [len(share) for share in shares] == [3, 4, 4] and sum(shares, []) == guids


def test_two_processes_read_the_image_text_of_their_own_slices(tiny_data, tmp_path, tiny_text_encoder_dir):
    """+ocr under torchrun: each rank reads half the images into its part file; rank 0 merges them in guid order
    into the OCR file one process writes, and the text caches agree."""
    pytest.importorskip("rapidocr_onnxruntime")
    from PIL import Image, ImageDraw, ImageFont

    from extract.ocr import extract_ocr, ocr_part_path, ocr_path, read_ocr

    data = shutil.copytree(tiny_data, tmp_path / "data")
    guids = [row.guid for split in ("train", "test") for row in read_split(data, split)]
    for guid in guids[::5]:  # words in images of both ranks' slices
        image = Image.new("RGB", (480, 120), (255, 255, 255))
        ImageDraw.Draw(image).text((20, 30), f"hello {guid}", fill=(0, 0, 0), font=ImageFont.load_default(size=44))
        image.save(image_path(data, guid), format="JPEG")
    # rank 1 was stopped after its first image: its part file holds that image's text, kept as it is on rerun
    interrupted = ocr_part_path(tmp_path / "two", data, rank=1)
    interrupted.parent.mkdir(parents=True)
    interrupted.write_text(json.dumps({"guid": guids[15], "text": "read before the stop"}) + "\n")
    ocr_encoder = f"{tiny_text_encoder_dir}+ocr"
    assert torchrun_extract(data, tmp_path / "two", ocr_encoder) == (30, 30)
    alone = extract_ocr(data, tmp_path / "one", guids, progress=False, workers=0)
    alone[guids[15]] = "read before the stop"  # rank 1's slice starts at guid 16 of 30
    merged = ocr_path(tmp_path / "two", data)
    assert read_ocr(merged) == alone and sum(bool(text) for text in alone.values()) >= 4
    assert [json.loads(line)["guid"] for line in merged.read_text().splitlines()] == guids  # guid order
    assert not list(merged.parent.glob("*.rank-*.jsonl"))  # the parts are gone
    encoder = create_text_encoder(ocr_encoder, max_tokens=TINY_MAX_TOKENS)
    encoder.ocr_texts.update(alone)
    reference = extract_features(encoder, data, tmp_path / "one", batch_size=4, num_workers=0, progress=False)
    assert_same_cache(cache_path(tmp_path / "two", data, "text", ocr_encoder), reference.path)
