"""Fixed poolings kept beside the feature caches (fusion/pooled_cache.py): pooled once per cache, then read back."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_sweep import tiny_cache
from typer.testing import CliRunner

import cli
import fusion.run
from extract.cache import file_identity
from fusion.config import FitConfig
from fusion.features import pool_stream
from fusion.pooled_cache import pooled_dir, pooled_path
from fusion.run import fit_rows, load_labelled
from fusion.split import stratified_split

__all__ = ["tiny_cache"]  # test_sweep.py's module fixture (the generated data and its caches), reused here


@pytest.fixture
def caches(tiny_cache, tmp_path):
    """A copy of the tiny caches, to pool into and to change."""
    shutil.copytree(tiny_cache["cache_root"], tmp_path / "cache")
    return tiny_cache | {"cache_root": tmp_path / "cache"}


def labelled_of(caches):
    return load_labelled(caches["data_dir"], caches["cache_root"], text_encoder=caches["text_encoder"],
                         image_encoder=caches["image_encoder"])


def inputs(labelled, head: str = "gated", **options):
    config = FitConfig(head=head)
    return labelled.head_inputs(config, labelled.head_config(head, options))[0]


def refuse_sequences(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("read the sequences")

    monkeypatch.setattr(fusion.run, "load_modality", refuse)


def test_fixed_poolings_are_pooled_once_then_read_without_the_sequences(caches, monkeypatch):
    first = labelled_of(caches)
    pooled = inputs(first, text_pool="mean", image_pool="max")
    for modality, kind in (("text", "mean"), ("image", "max")):
        vectors, mask = pool_stream(*first.stream(modality), kind)  # (N, 1, D), (N, 1)
        assert torch.equal(getattr(pooled, modality), vectors)
        assert torch.equal(getattr(pooled, f"{modality}_mask"), mask)
        path = pooled_path(caches["cache_root"], caches["data_dir"], modality, caches[f"{modality}_encoder"], kind)
        assert path.is_file()
    refuse_sequences(monkeypatch)  # a new process: the vectors come from the files alone
    again = labelled_of(caches)
    read = inputs(again, text_pool="mean", image_pool="max")
    for name in ("text", "text_mask", "image", "image_mask"):
        assert torch.equal(getattr(read, name), getattr(pooled, name)), name
    assert again.loaded == {}
    with pytest.raises(AssertionError, match="read the sequences"):
        inputs(again, text_pool="attention", image_pool="max")  # attention pooling needs the text sequences


def test_a_changed_cache_is_pooled_again(caches):
    labelled = labelled_of(caches)
    before = inputs(labelled, text_pool="mean", image_pool="mean").image
    cache_file = next(caches["cache_root"].glob("*/image-*.h5"))
    stat = cache_file.stat()
    os.utime(cache_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # e.g. extracted again
    reread = labelled_of(caches)
    calls = []
    original = reread.stream

    def counted(modality):
        calls.append(modality)
        return original(modality)

    reread.stream = counted
    assert torch.equal(inputs(reread, text_pool="mean", image_pool="mean").image, before)
    assert calls == ["image"]  # the text cache is unchanged: its vectors are read back


def test_sequences_read_before_a_cache_changed_are_read_again(caches):
    """What was read of a cache is answered from memory only while its files are unchanged, so vectors pooled
    after a new extraction come from the new features."""
    loaded = {}
    first = labelled_of(caches)
    first.loaded = loaded
    before = first.stream("image")[0]
    assert first.stream("image")[0] is before  # read once
    cache_file = next(caches["cache_root"].glob("*/image-*.h5"))
    stat = cache_file.stat()
    os.utime(cache_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert first.stream("image")[0] is not before
    assert len(loaded) == 2


def test_a_shard_of_a_stitched_cache_is_part_of_its_identity(tmp_path):
    cache_file = tmp_path / "image-x.h5"
    cache_file.write_bytes(b"stitched")
    shard = tmp_path / "image-x.shard-00-of-02.h5"
    shard.write_bytes(b"rows")
    before = file_identity(cache_file)
    assert [entry[0] for entry in before] == ["image-x.h5", "image-x.shard-00-of-02.h5"]
    shard.write_bytes(b"other rows")
    assert file_identity(cache_file) != before


def test_a_damaged_pooled_file_is_pooled_again(caches):
    labelled = labelled_of(caches)
    expected = inputs(labelled, text_pool="last", image_pool="first")
    path = pooled_path(caches["cache_root"], caches["data_dir"], "text", caches["text_encoder"], "last")
    path.write_bytes(b"not a tensor file")
    again = inputs(labelled_of(caches), text_pool="last", image_pool="first")
    assert torch.equal(again.text, expected.text)
    assert path.read_bytes() != b"not a tensor file"


def test_a_cache_folder_that_takes_no_file_still_fits(caches):
    """Pooled vectors that cannot be stored (a read-only or full cache folder) are pooled in memory all the same."""
    pooled_dir(caches["cache_root"], caches["data_dir"]).write_text("a file where the folder would be")
    labelled = labelled_of(caches)
    pooled = inputs(labelled, text_pool="mean", image_pool="mean")
    assert torch.equal(pooled.image, pool_stream(*labelled.stream("image"), "mean")[0])


def test_a_head_reads_no_sequence_of_a_modality_it_does_not_use(caches, monkeypatch):
    labelled = labelled_of(caches)
    train_rows, val_rows = stratified_split(labelled.labels, 0.25, 0)
    config = FitConfig(head="text-only", epochs=3, batch_size=8)
    everything = labelled.features.pooled({"text": "mean"})  # the image sequences as before, text pooled
    expected = fusion.run.HeadTrainer(config, labelled.head_config("text-only", {"text_pool": "mean"})).fit(
        everything.subset(train_rows), labelled.labels[train_rows], everything.subset(val_rows),
        labelled.labels[val_rows], progress=False,
    )
    inputs(labelled, head="text-only", text_pool="mean")  # pools the text once
    refuse_sequences(monkeypatch)
    fresh = labelled_of(caches)
    unread = inputs(fresh, head="text-only", text_pool="mean")
    assert unread.image.shape[1] == 1 and not unread.image_mask.any()
    assert inputs(fresh, head="text-only", text_pool="mean").image is unread.image  # one stream, every fold
    result = fit_rows(fresh, caches["cache_root"].parent / "run", config, {"text_pool": "mean"}, train_rows,
                      val_rows, progress=False, plots=False)
    assert result.trainer.val_metrics_ == expected.val_metrics_
    for got, want in zip(result.trainer.model_.parameters(), expected.model_.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fit_checks_the_caches_before_writing_a_run(caches, tmp_path):
    """Sequences are read when a head first needs them, still before fit writes anything."""
    text_cache = next(caches["cache_root"].glob("*/text-*.h5"))
    text_cache.write_bytes(text_cache.read_bytes()[:2048])  # truncated: the description may read, the rows not
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.app, [
        "fit", "--data", str(caches["data_dir"]), "--cache", str(caches["cache_root"]), "--out", str(out),
        "--text-encoder", caches["text_encoder"], "--image-encoder", caches["image_encoder"], "--epochs", "1",
    ])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and str(text_cache) in result.output
    assert not out.exists()
