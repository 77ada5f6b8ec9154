"""The HDF5 feature cache and the extraction loop (extract/cache.py, extract/run.py)."""

from __future__ import annotations

import copy
import json
import random

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from extract.cache import (
    IDENTITY_KEYS,
    SCHEMA,
    CacheMismatchError,
    FeatureCache,
    cache_dir_for,
    cache_path,
    load_features,
    package_versions,
    read_description,
)
from extract.dataset import BadImageError, image_path
from extract.run import extract_features

# fp16 keeps ~11 bits: one rounding step is below 1e-3 relative.
FP16 = {"rtol": 1e-3, "atol": 1e-3}


def _extract(encoder, data_dir, cache_root, **kwargs):
    kwargs = {"batch_size": 4, "num_workers": 0, "progress": False, **kwargs}
    return extract_features(encoder, data_dir, cache_root, **kwargs)


def _direct(encoder, data_dir, guids):
    """Features of the guids encoded directly: a list of (L_real, D) float32 arrays.

    Texts are encoded one at a time (no padding); images in one batch (the encoder is batch-independent).
    """
    with torch.no_grad():
        if encoder.kind == "text":
            return [encoder.encode([encoder.read(data_dir, guid)])[0][0].numpy() for guid in guids]
        features, mask = encoder.encode([encoder.read(data_dir, guid) for guid in guids])  # (B, P, C), (B, P)
    assert mask.all()
    return list(features.numpy())


def _stored_rows(path):
    with h5py.File(path, "r") as handle:
        return [g.decode() if isinstance(g, bytes) else g for g in handle["guid"][:]]


@pytest.fixture
def encoder(request):
    """The tiny text or image encoder, by parameter."""
    return request.getfixturevalue(f"tiny_{request.param}_encoder")


@pytest.mark.parametrize("encoder", ["text", "image"], indirect=True)
def test_round_trip_matches_direct_encoding(encoder, data_dir, data_spec, tmp_path):
    cache_root = tmp_path / "cache"
    summary = _extract(encoder, data_dir, cache_root)
    assert summary.path == cache_path(cache_root, data_dir, encoder.kind, encoder.name)
    assert (summary.total, summary.encoded, summary.skipped) == (len(data_spec.guids), len(data_spec.guids), [])
    assert sorted(_stored_rows(summary.path)) == sorted(data_spec.guids)

    wanted = data_spec.guids[::-1][:20]
    random.Random(0).shuffle(wanted)
    cached = load_features(summary.path, wanted, expected=encoder.describe())
    assert cached.guids == wanted
    assert cached.features.dtype == np.float16 and cached.mask.dtype == np.bool_
    assert cached.features.shape == (len(wanted), encoder.length, encoder.dim)  # (N, L, D)
    assert cached.mask.shape == (len(wanted), encoder.length)  # (N, L)
    for row, (guid, direct) in enumerate(zip(wanted, _direct(encoder, data_dir, wanted))):
        real = direct.shape[0]
        assert cached.mask[row, :real].all() and not cached.mask[row, real:].any(), guid
        np.testing.assert_allclose(cached.features[row, :real].astype(np.float32), direct, **FP16, err_msg=guid)


def test_text_rows_shorter_than_max_tokens_are_zero_padded(tiny_text_encoder, data_dir, data_spec, tmp_path):
    guids = [g for g in data_spec.guids if g not in (data_spec.utf8_guid, data_spec.undecodable_guid)]
    summary = _extract(tiny_text_encoder, data_dir, tmp_path / "cache", guids=guids, batch_size=64)
    cached = load_features(summary.path, guids)
    tokens = int(cached.mask.sum(1).max())  # T of the one batch
    assert tokens < tiny_text_encoder.length
    assert cached.features[:, :tokens].any()
    assert not cached.features[:, tokens:].any()  # beyond the batch's T: zeros
    assert not cached.mask[:, tokens:].any()


def test_rerun_encodes_nothing_and_subset_encodes_only_subset(tiny_text_encoder, data_dir, data_spec, tmp_path):
    cache_root = tmp_path / "cache"
    subset = data_spec.guids[3:9]
    first = _extract(tiny_text_encoder, data_dir, cache_root, guids=subset)
    assert (first.total, first.encoded) == (len(subset), len(subset))
    assert _stored_rows(first.path) == subset
    full = _extract(tiny_text_encoder, data_dir, cache_root)
    assert (full.total, full.encoded) == (len(data_spec.guids), len(data_spec.guids) - len(subset))
    again = _extract(tiny_text_encoder, data_dir, cache_root)
    assert again.encoded == 0
    assert sorted(_stored_rows(again.path)) == sorted(data_spec.guids)  # no duplicates


# --- resume -----------------------------------------------------------------------------------------------


def _interrupt_after(monkeypatch, encoder, batches):
    """Make ``encoder.encode`` raise KeyboardInterrupt (as Ctrl-C would) once ``batches`` batches are done."""
    original = encoder.encode
    done = []

    def encode(items, device="cpu"):
        if len(done) == batches:
            raise KeyboardInterrupt
        done.append(len(items))
        return original(items, device)

    monkeypatch.setattr(encoder, "encode", encode)


def _record_reads(monkeypatch, encoder):
    original, read = encoder.read, []

    def record(data_dir, guid):
        read.append(guid)
        return original(data_dir, guid)

    monkeypatch.setattr(encoder, "read", record)
    return read


def _assert_same_cache(path, reference, guids):
    got, want = load_features(path, guids), load_features(reference, guids)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.features.astype(np.float32), want.features.astype(np.float32), **FP16)
    with h5py.File(path, "r") as handle, h5py.File(reference, "r") as ref:
        for name in ("guid", "features", "mask"):
            assert handle[name].shape == ref[name].shape, name


@pytest.mark.parametrize("torn_write", [False, True], ids=["between-batches", "inside-append"])
def test_resume_after_interruption(tiny_text_encoder, data_dir, data_spec, tmp_path, monkeypatch, torn_write):
    guids = data_spec.guids
    reference = _extract(copy.deepcopy(tiny_text_encoder), data_dir, tmp_path / "reference").path

    cache_root = tmp_path / "cache"
    interrupted = copy.deepcopy(tiny_text_encoder)
    _interrupt_after(monkeypatch, interrupted, batches=2)
    with pytest.raises(KeyboardInterrupt):
        _extract(interrupted, data_dir, cache_root)
    path = cache_path(cache_root, data_dir, "text", tiny_text_encoder.name)
    if torn_write:
        # A crash inside append: features and mask grew, the guid column (written last) did not.
        with h5py.File(path, "a") as handle:
            for name in ("features", "mask"):
                handle[name].resize(handle[name].shape[0] + 3, axis=0)
            handle["features"][-3:] = 7.0
            handle["mask"][-3:] = True

    # The file is valid and holds exactly the two finished batches.
    assert _stored_rows(path) == guids[:8]
    finished = load_features(path, guids[:8], expected=tiny_text_encoder.describe())
    assert finished.mask[:, 0].all()
    with pytest.raises(CacheMismatchError, match=f"{len(guids) - 8} guids are not cached"):
        load_features(path, guids)

    read = _record_reads(monkeypatch, tiny_text_encoder)
    resumed = _extract(tiny_text_encoder, data_dir, cache_root)
    assert read == guids[8:]  # only the missing guids are read and encoded
    assert (resumed.total, resumed.encoded) == (len(guids), len(guids) - 8)
    assert _stored_rows(path) == guids
    _assert_same_cache(path, reference, guids)


# --- identity checks --------------------------------------------------------------------------------------


@pytest.fixture
def small_text_cache(tiny_text_encoder, data_dir, data_spec, tmp_path):
    """A text cache of the first 4 guids; returns (path, cache root, guids)."""
    guids = data_spec.guids[:4]
    summary = _extract(tiny_text_encoder, data_dir, tmp_path / "cache", guids=guids)
    return summary.path, tmp_path / "cache", guids


def _refused_everywhere(path, cache_root, data_dir, encoder, guids, match):
    """The cache must be refused by the writer, by extraction and by the loader, and stay untouched."""
    before = _stored_rows(path)
    with pytest.raises(CacheMismatchError, match=match), FeatureCache(path, encoder.describe(), data_dir):
        pass
    with pytest.raises(CacheMismatchError, match=match):
        _extract(encoder, data_dir, cache_root, guids=guids + ["25"])
    with pytest.raises(CacheMismatchError, match=match):
        load_features(path, guids, expected=encoder.describe())
    assert _stored_rows(path) == before


def test_other_max_tokens_refused(small_text_cache, tiny_text_encoder_dir, data_dir):
    from extract.registry import create_text_encoder

    path, cache_root, guids = small_text_cache
    other = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=8)
    assert cache_path(cache_root, data_dir, "text", other.name) == path  # same file, other features
    _refused_everywhere(path, cache_root, data_dir, other, guids, match=r"length=16 but 8 is wanted")


def test_other_weights_refused(small_text_cache, tiny_text_encoder, data_dir):
    path, cache_root, guids = small_text_cache
    other = copy.deepcopy(tiny_text_encoder)
    with torch.no_grad():
        other.model.embeddings.word_embeddings.weight[5, 0] += 0.01
    _refused_everywhere(path, cache_root, data_dir, other, guids, match=r"fingerprint=.* is wanted")


def test_other_preprocessing_refused(small_text_cache, tiny_text_encoder, data_dir):
    path, _, guids = small_text_cache
    expected = tiny_text_encoder.describe()
    expected["preprocessing"] = {**expected["preprocessing"], "lowercase": False}
    with pytest.raises(CacheMismatchError, match="preprocessing="):
        load_features(path, guids, expected=expected)
    with pytest.raises(CacheMismatchError, match="preprocessing="), FeatureCache(path, expected, data_dir):
        pass


def test_other_encoder_name_refused_by_loader(small_text_cache, tiny_text_encoder):
    path, _, guids = small_text_cache
    with pytest.raises(CacheMismatchError, match=r"encoder=.* but 'minilm' is wanted"):
        load_features(path, guids, expected={**tiny_text_encoder.describe(), "encoder": "minilm"})


def test_matching_description_accepted_and_error_is_value_error(small_text_cache, tiny_text_encoder):
    path, _, guids = small_text_cache
    assert load_features(path, guids, expected=tiny_text_encoder.describe()).guids == guids
    assert issubclass(CacheMismatchError, ValueError)  # the CLI prints it as one line


def test_missing_guid_refused(small_text_cache):
    path, _, guids = small_text_cache
    with pytest.raises(CacheMismatchError, match=r"2 guids are not cached \(e\.g\. \['nope', 'nada'\]\)"):
        load_features(path, [guids[0], "nope", "nada"])


def test_missing_cache_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        load_features(tmp_path / "text-x.h5", ["1"])
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        read_description(tmp_path / "text-x.h5")


def test_unreadable_cache_file_refused(tiny_text_encoder, data_dir, tmp_path):
    path = cache_path(tmp_path / "cache", data_dir, "text", tiny_text_encoder.name)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not hdf5")
    with pytest.raises(CacheMismatchError, match="not a readable HDF5 cache"):
        _extract(tiny_text_encoder, data_dir, tmp_path / "cache")


def test_other_package_versions_only_warn(small_text_cache, tiny_text_encoder, data_dir, data_spec):
    path, cache_root, _ = small_text_cache
    with h5py.File(path, "a") as handle:
        handle.attrs["versions"] = json.dumps({**package_versions(), "torch": "0.0.1"})
    with pytest.warns(UserWarning, match="other package versions"):
        summary = _extract(tiny_text_encoder, data_dir, cache_root, guids=data_spec.guids[:6])
    assert summary.encoded == 2


# --- attributes and paths ---------------------------------------------------------------------------------


def test_attributes_recorded(small_text_cache, tiny_text_encoder, data_dir):
    path, _, _ = small_text_cache
    description = tiny_text_encoder.describe()
    with h5py.File(path, "r") as handle:
        attrs = dict(handle.attrs)
        assert handle["features"].dtype == np.float16
        assert handle["mask"].dtype == np.bool_
        assert h5py.check_string_dtype(handle["guid"].dtype) is not None
    assert attrs["schema"] == SCHEMA
    assert attrs["kind"] == "text"
    assert attrs["encoder"] == tiny_text_encoder.name
    assert attrs["fingerprint"] == description["fingerprint"]
    assert (int(attrs["dim"]), int(attrs["length"])) == (32, 16)
    assert json.loads(attrs["preprocessing"]) == tiny_text_encoder.preprocessing()
    versions = json.loads(attrs["versions"])
    assert versions == package_versions()
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"torchvision", "transformers", "h5py"} <= set(versions)
    assert attrs["data_dir"] == str(data_dir.resolve())
    stored = read_description(path)
    assert {key: stored[key] for key in IDENTITY_KEYS} == {key: description[key] for key in IDENTITY_KEYS}
    assert not list(path.parent.glob("*.tmp"))  # the file was built under a temporary name, then renamed


def test_relative_data_folder_recorded_absolute(tiny_text_encoder, data_dir, data_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(data_dir.parent)
    summary = _extract(tiny_text_encoder, data_dir.name, "cache", guids=data_spec.guids[:2])
    assert summary.path.parent.resolve() == cache_dir_for(tmp_path / "cache", data_dir)  # same as absolute
    with h5py.File(summary.path, "r") as handle:
        assert handle.attrs["data_dir"] == str(data_dir.resolve())


def test_cache_paths_per_data_folder_and_encoder(tmp_path):
    root = tmp_path / "cache"
    one, two = tmp_path / "a" / "data", tmp_path / "b" / "data"
    assert cache_dir_for(root, one) != cache_dir_for(root, two)  # same folder name, other data
    assert cache_dir_for(root, one).name.startswith("data-")
    path = cache_path(root, one, "text", "/models/tiny bert:v1")
    assert path.parent == cache_dir_for(root, one)  # a path-like encoder name never escapes the folder
    assert path.name == "text-_models_tiny_bert_v1.h5"
    assert cache_path(root, one, "image", "tiny") != cache_path(root, one, "text", "tiny")


# --- bad images -------------------------------------------------------------------------------------------


@pytest.fixture
def broken_images(data_dir, data_spec):
    """Corrupt one image and delete another; returns their guids in extraction order."""
    corrupt, missing = data_spec.guids[9], data_spec.guids[20]
    image_path(data_dir, corrupt).write_bytes(b"\xff\xd8 not really a jpeg")
    image_path(data_dir, missing).unlink()
    return [corrupt, missing]


@pytest.mark.parametrize("workers", [0, 2])  # workers send the error back pickled
def test_bad_image_stops_extraction_naming_guid(tiny_image_encoder, data_dir, tmp_path, broken_images, workers):
    with pytest.raises(BadImageError, match=f"guid {broken_images[0]}: cannot read image") as info:
        _extract(tiny_image_encoder, data_dir, tmp_path / "cache", num_workers=workers)
    assert info.value.guid == broken_images[0]


def test_skip_bad_records_empty_rows(tiny_image_encoder, data_dir, data_spec, tmp_path, broken_images):
    cache_root = tmp_path / "cache"
    summary = _extract(tiny_image_encoder, data_dir, cache_root, skip_bad=True)
    assert summary.skipped == broken_images
    assert (summary.total, summary.encoded) == (len(data_spec.guids), len(data_spec.guids))
    cached = load_features(summary.path, data_spec.guids, expected=tiny_image_encoder.describe())
    bad = np.isin(cached.guids, broken_images)
    assert not cached.mask[bad].any()  # an all-False row: "no image"
    assert not cached.features[bad].any()
    assert cached.mask[~bad].all()
    row = data_spec.guids.index(data_spec.cmyk_guid)
    (direct,) = _direct(tiny_image_encoder, data_dir, [data_spec.cmyk_guid])
    np.testing.assert_allclose(cached.features[row].astype(np.float32), direct, **FP16)
    # a rerun tries the skipped pairs again: still unreadable, they stay empty rows (no second row each)
    rerun = _extract(tiny_image_encoder, data_dir, cache_root, skip_bad=True)
    assert (rerun.encoded, rerun.skipped) == (2, broken_images)
    again = load_features(summary.path, data_spec.guids, expected=tiny_image_encoder.describe())
    assert not again.mask[bad].any() and len(h5py.File(summary.path, "r")["guid"]) == len(data_spec.guids)
    # once their images are fixed, the next run encodes them into their own rows
    for guid in broken_images:
        Image.new("RGB", (40, 30), (200, 90, 20)).save(image_path(data_dir, guid), format="JPEG")
    fixed = _extract(tiny_image_encoder, data_dir, cache_root, skip_bad=True)
    assert (fixed.encoded, fixed.skipped) == (2, [])
    cached = load_features(summary.path, data_spec.guids, expected=tiny_image_encoder.describe())
    assert cached.mask.all() and len(h5py.File(summary.path, "r")["guid"]) == len(data_spec.guids)
    for guid, direct in zip(broken_images, _direct(tiny_image_encoder, data_dir, broken_images)):
        np.testing.assert_allclose(cached.features[data_spec.guids.index(guid)].astype(np.float32), direct, **FP16)
    assert (_extract(tiny_image_encoder, data_dir, cache_root, skip_bad=True).encoded) == 0  # nothing left to try
