"""The Ray backend of sweeps on a local two-CPU Ray instance: the local backend's leaderboard, through Tune trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_sweep import GRID_2X2, cli_args, read_csv, run, scores, tiny_cache
from typer.testing import CliRunner

import cli
from fusion.run import read_metrics
from fusion.sweep import (
    Range,
    SweepOptions,
    build_grids,
    parse_grid_file,
    plan_trials,
    sampled_options,
    search_space,
    sweep_from_cache,
)

ray = pytest.importorskip("ray")

__all__ = ["tiny_cache"]  # test_sweep.py's module fixture (the generated data and its caches), reused here


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module: starting one takes seconds, so every test shares it."""
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as error:  # whatever stops Ray from starting here, this sandbox cannot run it
        pytest.skip(f"Ray cannot start here: {error}")
    yield
    ray.shutdown()


def fold_f1(rows: list[dict], folds: int) -> list[list[float]]:
    """Each leaderboard row's macro-F1 on every fold, from its fold run folders (the row's run is fold 0's)."""
    return [[read_metrics(Path(row["run"]).parent / f"fold-{k}")["validation"]["macro_f1"] for k in range(folds)]
            for row in rows]


def test_ray_sweep_of_a_2x2_grid_on_2_folds_gives_the_local_leaderboard(tiny_cache, tmp_path):
    """Through the command line (one Tune run costs trial processes: the CLI path and the comparison share it)."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    _, local_rows = run(tiny_cache, local, [GRID_2X2], folds=2)
    sets = [arg for key, values in GRID_2X2.items() for arg in ("--set", f"{key}={','.join(map(str, values))}")]
    result = CliRunner().invoke(cli.app, [
        "sweep", *cli_args(tiny_cache), "--out", str(remote), *sets, "--folds", "2", "--backend", "ray",
        "--cpus-per-trial", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "[8/8] head=" in result.output and "| 4 | head=" in result.output
    rows = read_csv(remote / "leaderboard.csv")
    assert scores(remote) == scores(local)  # same configs in the same order, same means, stds and columns
    assert fold_f1(rows, 2) == fold_f1(local_rows, 2)  # and the same macro-F1 on every fold
    assert [Path(r["run"]).relative_to(remote) for r in rows] == [Path(r["run"]).relative_to(local) for r in local_rows]
    files = [sorted(p.relative_to(sweep) for p in (sweep / "runs").rglob("*") if p.is_file())
             for sweep in (local, remote)]
    assert files[0] == files[1]  # the same run folders, file for file
    assert (remote / "report.md").is_file() and (remote / "leaderboard.png").is_file()


def test_shared_features_are_zero_copy():
    from fusion.sweep_ray import get_shared, put_shared

    features = torch.randn(512, 512).half()  # 512 KB: above the size Ray inlines, so it lives in the object store
    ref = put_shared({"features": features, "mask": features > 0})
    first, second = get_shared(ref), get_shared(ref)
    assert torch.equal(first["features"], features) and torch.equal(first["mask"], features > 0)
    assert first["features"].data_ptr() == second["features"].data_ptr()  # both read the object store's buffer
    plain = ray.put(features)  # Ray's own pickling of a tensor: every get is a copy (so put_shared's reducer)
    assert ray.get(plain).data_ptr() != ray.get(plain).data_ptr()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--backend", "spark"], "error: backend='spark' is not one of ['local', 'ray']"),
        (["--address", "auto"], "error: address and cpus_per_trial are options of the ray backend"),
        (["--backend", "ray", "--jobs", "2"], "error: jobs is an option of the local backend"),
        (["--search", "random"], "error: search=random runs on Ray Tune: add --backend ray"),
        (["--trials", "5"], "error: trials is an option of --search random|optuna"),
    ],
)
def test_bad_backend_options_are_one_line_errors(tiny_cache, tmp_path, options, message):
    result = CliRunner().invoke(cli.app, ["sweep", *cli_args(tiny_cache), "--out", str(tmp_path / "s"),
                                          "--set", "head=concat", *options])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(message)
    assert not (tmp_path / "s").exists()


# ---- search beyond grids: ranges, sampling, ASHA ------------------------------------------------------------------

SPACE = """# tiny heads; the search samples lr and picks a head
hidden: 8
epochs: 3
batch_size: 8
head: [concat, gated]
lr: {loguniform: [1.0e-3, 1.0e-2]}
dropout: {uniform: [0, 0.5]}
"""


def test_ranges_in_grid_files_and_the_search_space(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    grids = build_grids(tmp_path / "space.yaml", [])
    assert grids[0]["lr"] == [Range("loguniform", (1e-3, 1e-2))]
    assert grids[0]["dropout"] == [Range("uniform", (0.0, 0.5))]
    space = search_space(grids)
    assert space["head"] == Range("choice", ("concat", "gated")) and space["hidden"] == 8
    assert sampled_options({"lr": 0.0012345678, "hidden": 64.4, "head": "gated"}) == {
        "lr": 0.00123, "hidden": 64, "head": "gated"}
    with pytest.raises(ValueError, match="lr is a search range: sample it with --search"):
        plan_trials(grids)
    with pytest.raises(ValueError, match="nothing to search"):
        search_space([{"head": ["gated"]}])
    for bad, message in [
        ("lr: {loguniform: [0, 1.0e-2]}", "low > 0"), ("lr: {normal: [1, 2]}", "kind one of"),
        ("head: {uniform: [a, b]}", "two numeric bounds"), ("hidden: {uniform: [64, 32]}", "low < high"),
    ]:
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(ValueError, match=message):
            parse_grid_file(tmp_path / "bad.yaml")


def test_optuna_search_screens_under_asha_and_ranks_what_it_keeps_on_every_fold(tiny_cache, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    out = tmp_path / "search"
    trials, rows = sweep_from_cache(
        tiny_cache["data_dir"], tiny_cache["cache_root"], out, build_grids(tmp_path / "space.yaml", []),
        SweepOptions(2, backend="ray", search="optuna", trials=4),
        text_encoder=tiny_cache["text_encoder"], image_encoder=tiny_cache["image_encoder"], echo=lambda _: None,
    )
    sampled = json.loads((out / "search.json").read_text())["sampled"]
    assert len(sampled) == 4
    for sample in sampled:
        options = sample["options"]
        assert options["head"] in ("concat", "gated") and 1e-3 <= options["lr"] <= 1e-2 and options["hidden"] == 8
        assert options["lr"] == float(f"{options['lr']:.3g}") and 1 <= sample["epochs"] <= 3
    kept = [sample["options"] for sample in sampled if sample["kept"]]
    assert len(rows) == len(trials) == len({json.dumps(k, sort_keys=True) for k in kept}) >= 1
    assert sorted(json.dumps(t.options, sort_keys=True) for t in trials) == sorted(
        {json.dumps(k, sort_keys=True) for k in kept})
    assert all(len(f1) == 2 for f1 in fold_f1(rows, 2))  # every kept configuration has a run on both folds
