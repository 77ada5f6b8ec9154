"""`predict --out` streams (fusion/predict.py: stream_submission): chunks, resuming, torchrun slices.

One data folder, its caches and a 2-fold run for the module (the tiny encoders). Whatever the chunk,
an interruption or the number of processes, the submission is byte for byte the one-pass file of
``predict_submission``.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import TINY_MAX_TOKENS, build_tiny_image_encoder, write_data_dir
from typer.testing import CliRunner, Result

import cli
import fusion.predict
from extract.registry import create_text_encoder
from extract.run import extract_features
from fusion.api import FitSpec, Run, fit
from fusion.config import FitConfig
from fusion.predict import DEFAULT_CHUNK_ROWS, part_path, predict_submission

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT = 300  # seconds, as tests/test_distributed_extract.py
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
runner = CliRunner()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_text_encoder_dir: Path) -> dict[str, Path]:
    """A data folder, its text and image caches, a 2-fold run on them, and the one-pass submission."""
    root = tmp_path_factory.mktemp("streaming")
    data, cache = write_data_dir(root / "tiny-data"), root / "cache"
    image_encoder = build_tiny_image_encoder()
    for encoder in (create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS), image_encoder):
        extract_features(encoder, data, cache, batch_size=8, num_workers=0, progress=False)
    spec = FitSpec(str(tiny_text_encoder_dir), image_encoder.name, FitConfig(epochs=2, batch_size=8), {"hidden": 8})
    fit(spec, root / "run", data=data, cache=cache, folds=2)
    predict_submission([root / "run"], data, cache, root / "one-pass.csv")
    return {"data": data, "cache": cache, "run": root / "run", "one_pass": root / "one-pass.csv"}


def predict(fitted: dict[str, Path], out: Path, *options: object) -> Result:
    args = ["predict", "--run", fitted["run"], "--data", fitted["data"], "--cache", fitted["cache"], "--out", out]
    return runner.invoke(cli.app, [str(arg) for arg in (*args, *options)])


def succeeded(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def leftovers(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.glob(f"{out.name}.*"))


@pytest.mark.parametrize("chunk_rows", [1, 4, DEFAULT_CHUNK_ROWS])
def test_streaming_writes_the_one_pass_submission(fitted, tmp_path, chunk_rows):
    out = tmp_path / "sub.csv"
    result = succeeded(predict(fitted, out, "--chunk-rows", chunk_rows))
    assert out.read_bytes() == fitted["one_pass"].read_bytes()
    assert leftovers(out) == []  # the part and its identity are gone
    assert f"wrote 6 predictions to {out} (decision rule mean)" in result.output and "kept" not in result.output


def test_the_command_and_the_function_agree_on_the_chunk():
    options = {param.name: param.default for param in typer.main.get_command(cli.app).commands["predict"].params}
    assert options["chunk_rows"] == DEFAULT_CHUNK_ROWS
    assert inspect.signature(cli._submit_and_report).parameters["chunk_rows"].default == DEFAULT_CHUNK_ROWS
    assert DEFAULT_CHUNK_ROWS % 256 == 0  # a whole number of fusion.train.predict_proba batches


def interrupt_after(chunks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next predict die (as a kill would) when it asks for chunk ``chunks + 1``."""
    calls = {"count": 0}
    original = Run.member_probabilities_cached

    def dying(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] > chunks:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Run, "member_probabilities_cached", dying)


def interrupted_predict(fitted, out: Path, chunks: int, monkeypatch) -> Path:
    """A streaming predict in chunks of 2 rows, killed after ``chunks`` chunks; returns its output path."""
    interrupt_after(chunks, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fusion.predict.stream_submission([fitted["run"]], fitted["data"], fitted["cache"], out, chunk_rows=2,
                                         progress=False)
    monkeypatch.undo()
    return out


def test_an_interrupted_predict_resumes_to_the_same_file(fitted, tmp_path, monkeypatch):
    out = interrupted_predict(fitted, tmp_path / "sub.csv", 2, monkeypatch)
    part = part_path(out, None)
    assert not out.exists() and len(part.read_text().splitlines()) == 1 + 4  # header and two chunks of 2
    with part.open("a") as handle:
        handle.write(fitted["one_pass"].read_text().splitlines()[5][:3])  # a row cut short by the kill
    result = succeeded(predict(fitted, out, "--chunk-rows", 4))  # another chunk: the rows written still count
    assert out.read_bytes() == fitted["one_pass"].read_bytes()
    assert "; 4 of them kept from an interrupted run's part file" in result.output
    assert leftovers(out) == []


def test_a_part_of_another_prediction_is_refused(fitted, tmp_path, monkeypatch):
    out = interrupted_predict(fitted, tmp_path / "sub.csv", 1, monkeypatch)
    result = predict(fitted, out, "--decision", "geometric")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {part_path(out, None)}: left by another prediction (its decision differ); delete it" in (
        result.output
    )
    # A part whose rows are not this prediction's first rows is refused too, naming the line.
    part = part_path(out, None)
    part.write_text(part.read_text().replace(fitted["one_pass"].read_text().splitlines()[1].split(",")[0], "999"))
    result = predict(fitted, out)
    assert result.exit_code == 1 and f"error: {part}:2: " in result.output and "not the next row" in result.output


def test_the_prior_rule_predicts_in_one_pass(fitted, tmp_path):
    out = tmp_path / "sub.csv"
    succeeded(predict(fitted, out, "--decision", "prior", "--chunk-rows", 1))
    predict_submission([fitted["run"]], fitted["data"], fitted["cache"], tmp_path / "reference.csv", "prior")
    assert out.read_bytes() == (tmp_path / "reference.csv").read_bytes()
    assert leftovers(out) == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_write_the_one_process_submission(fitted, tmp_path):
    """torchrun --nproc-per-node 2 cli.py predict on the CPU (gloo): a slice each, joined by rank 0 in input order."""
    out = tmp_path / "sub.csv"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        # "--" ends torchrun's options: its parser would take predict's --run for an abbreviation of --run-path
        "--master-port", str(_free_port()), "--", "cli.py", "predict", "--run", str(fitted["run"]), "--data",
        str(fitted["data"]), "--cache", str(fitted["cache"]), "--out", str(out), "--chunk-rows", "2",
    ]
    done = subprocess.run(command, cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.read_bytes() == fitted["one_pass"].read_bytes()
    assert done.stdout.count("wrote 6 predictions") == 1  # rank 0 alone reports
    assert leftovers(out) == []  # both ranks' parts joined and removed


def test_the_identity_names_every_member(fitted, tmp_path, monkeypatch):
    """Both folds' weights are part of what a resumed part must match."""
    interrupt_after(1, monkeypatch)
    out = tmp_path / "sub.csv"
    with pytest.raises(KeyboardInterrupt):
        fusion.predict.stream_submission([fitted["run"]], fitted["data"], fitted["cache"], out, chunk_rows=2,
                                         progress=False)
    identity = json.loads(Path(f"{part_path(out, None)}.json").read_text())
    assert [Path(m["run"]).name for m in identity["members"]] == ["fold-0", "fold-1"]
    assert identity["slice"] is None and identity["decision"]["rule"] == "mean"
