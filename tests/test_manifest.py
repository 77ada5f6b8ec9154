"""A manifest file (CSV, JSON lines, Parquet: guid, text, image, label) wherever a data folder goes.

The readers of extract/dataset.py: the manifest written from the generated data folder caches the
same features and gives the same submission through extract → fit → predict; each bad manifest
stops the command in one line naming the file and line.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

import cli
from extract.cache import cache_dir_for, cache_path, load_features
from extract.dataset import UNLABELLED, image_path, read_split, read_text

runner = CliRunner()
MAX_TOKENS = 16
FIT_OPTIONS = ("--epochs", 3, "--hidden", 8, "--batch-size", 8)


def invoke(*args: object) -> Result:
    return runner.invoke(cli.app, [str(arg) for arg in args])


def succeeded(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Result, *fragments: str) -> None:
    """Exit code 1, no traceback, exactly one ``error:`` line, holding every fragment."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert all(fragment in errors[0] for fragment in fragments), errors[0]


def manifest_records(data_dir: Path, manifest: Path) -> list[dict[str, str | None]]:
    """The folder's pairs as manifest records: decoded text inline, image relative to ``manifest``, no test label."""
    return [
        {"guid": row.guid, "text": read_text(data_dir, row.guid),
         "image": os.path.relpath(image_path(data_dir, row.guid), manifest.parent),
         "label": None if row.tag == UNLABELLED else row.tag}
        for split in ("train", "test") for row in read_split(data_dir, split)
    ]


def write_manifest(path: Path, records: list[dict[str, str | None]], columns: tuple[str, ...] = ()) -> Path:
    """``records`` as ``path``'s format (.csv: empty label cells; .jsonl: null labels; .parquet)."""
    columns = columns or tuple(records[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([record.get(column) or "" for column in columns] for record in records)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({c: r.get(c) for c in columns}) + "\n" for r in records), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records]), path)
    return path


@pytest.fixture
def encoders(tiny_text_encoder_dir: Path, tiny_image_encoder_name: str) -> list[str]:
    return ["--text-encoder", str(tiny_text_encoder_dir), "--image-encoder", tiny_image_encoder_name]


def extract_fit_predict(data: Path, cache: Path, encoders: list[str], work: Path) -> Path:
    """The three stages on ``data`` (a folder or a manifest); returns the submission."""
    shared = ["--data", data, "--cache", cache]
    succeeded(invoke("extract", *shared, *encoders, "--max-tokens", MAX_TOKENS, "--workers", 0))
    succeeded(invoke("fit", *shared, *encoders, "--out", work / "run", *FIT_OPTIONS))
    succeeded(invoke("predict", *shared, "--run", work / "run", "--out", work / "submission.csv"))
    return work / "submission.csv"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_manifest_caches_and_predicts_as_its_folder(suffix, data_dir, data_spec, tmp_path, encoders):
    manifest = tmp_path / "elsewhere" / f"posts{suffix}"
    write_manifest(manifest, manifest_records(data_dir, manifest))
    assert [row.guid for row in read_split(manifest, "train")] == list(data_spec.train)
    assert [row.guid for row in read_split(manifest, "test")] == data_spec.test
    assert read_text(manifest, data_spec.gbk_guid) == data_spec.gbk_text

    cache = tmp_path / "cache"
    from_folder = extract_fit_predict(data_dir, cache, encoders, tmp_path / "folder")
    from_manifest = extract_fit_predict(manifest, cache, encoders, tmp_path / "manifest")
    for kind, name in (("text", encoders[1]), ("image", encoders[3])):
        folder_rows = load_features(cache_path(cache, data_dir, kind, name), data_spec.guids)
        manifest_rows = load_features(cache_path(cache, manifest, kind, name), data_spec.guids)
        np.testing.assert_array_equal(manifest_rows.mask, folder_rows.mask)
        np.testing.assert_array_equal(manifest_rows.features, folder_rows.features)
    assert from_manifest.read_bytes() == from_folder.read_bytes()


def test_a_manifest_has_a_stable_cache_folder_of_its_own(data_dir, tmp_path):
    manifest = write_manifest(tmp_path / "posts.csv", manifest_records(data_dir, tmp_path / "posts.csv"))
    folder = cache_dir_for(tmp_path / "cache", manifest)
    assert folder == cache_dir_for(tmp_path / "cache", Path(os.path.relpath(manifest)))  # however it is named
    assert folder.name.startswith("posts.csv-") and folder != cache_dir_for(tmp_path / "cache", data_dir)
    assert folder != cache_dir_for(tmp_path / "cache", tmp_path / "posts.jsonl")


def test_an_edited_manifest_is_read_again(data_dir, tmp_path):
    path = tmp_path / "posts.jsonl"
    records = manifest_records(data_dir, path)
    write_manifest(path, records[:-1])
    before = len(read_split(path, "test"))
    write_manifest(path, records)
    assert len(read_split(path, "test")) == before + 1


def _bad(records: list[dict[str, str | None]], fault: str) -> tuple[list[dict[str, str | None]], int]:
    """``records`` with one fault, and the line it is on (header line 1, first record line 2 in CSV)."""
    records = [dict(record) for record in records]
    if fault == "unknown label":
        records[3]["label"] = "postive"
        return records, 5
    if fault == "duplicate guid":
        records[6]["guid"] = records[2]["guid"]
        return records, 8
    records[4]["image"] = "nowhere/missing.jpg"  # missing image
    return records, 6


BAD = {
    "unknown label": ("unknown label 'postive'",),
    "duplicate guid": ("duplicate guid 3 (first on line",),
    "missing image": ("guid 5 has no image file", "missing.jpg"),
}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("fault", sorted(BAD))
def test_a_bad_manifest_stops_in_one_line(fault, suffix, data_dir, tmp_path, encoders):
    manifest = tmp_path / f"posts{suffix}"
    records, line = _bad(manifest_records(data_dir, manifest), fault)
    write_manifest(manifest, records)
    line -= suffix == ".jsonl"  # no header line
    result = invoke("extract", "--data", manifest, "--cache", tmp_path / "cache", *encoders, "--workers", 0)
    one_line_error(result, f"{manifest}:{line}: ", *BAD[fault])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_manifest_without_a_column_stops_in_one_line(suffix, data_dir, tmp_path, encoders):
    manifest = tmp_path / f"posts{suffix}"
    write_manifest(manifest, manifest_records(data_dir, manifest), columns=("guid", "text", "image"))
    where = {".csv": f"{manifest}:1", ".jsonl": f"{manifest}:1", ".parquet": str(manifest)}[suffix]
    result = invoke("fit", "--data", manifest, "--cache", tmp_path / "cache", *encoders, "--out", tmp_path / "run")
    one_line_error(result, f"{where}: missing column(s) ['label']")


def test_a_parquet_row_is_named_by_its_number(data_dir, tmp_path, encoders):
    manifest = tmp_path / "posts.parquet"
    records, _ = _bad(manifest_records(data_dir, manifest), "unknown label")
    write_manifest(manifest, records)
    one_line_error(invoke("extract", "--data", manifest, "--cache", tmp_path / "cache", *encoders),
                   f"{manifest}: row 4: unknown label 'postive'")


def test_a_missing_manifest_and_broken_json_are_one_line(tmp_path, encoders):
    one_line_error(invoke("extract", "--data", tmp_path / "none.csv", *encoders), "none.csv: manifest not found")
    broken = tmp_path / "posts.jsonl"
    broken.write_text('\n{"guid": 2,\n')
    one_line_error(invoke("extract", "--data", broken, *encoders), f"{broken}:2: not a JSON object")
