"""Pipeline benchmark: extraction speed per encoder, cache size, and fit time and quality per head.

    python -m benchmarks.pipeline [--data DIR] [--cache cache] [--extract-pairs 256] [--heads a,b]
                                  [--sweep-grid results/grids/bench-24.yaml] [--jobs 1]

Extraction is timed on the first ``--extract-pairs`` pairs into a scratch cache (model
loading excluded, reported apart); cache sizes are those of the full caches under
``--cache`` (run ``python cli.py extract`` first); each head is fitted with the default
options of ``fit`` on the default split; the sweep runs ``--sweep-grid`` on one hold-out
split, timed from loading the cache to the written leaderboard. Prints a Markdown table per part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from extract.cache import cache_path
from extract.registry import create_encoder
from extract.run import data_guids, extract_features
from fusion.config import FitConfig
from fusion.registry import head_names
from fusion.run import fit_run
from fusion.sweep import SweepOptions, build_grids, sweep_from_cache

DEFAULT_ENCODERS = (("text", "minilm"), ("image", "efficientnet-lite0"))


def markdown(rows: list[dict[str, object]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def bench_extract(data: Path, cache: Path, pairs: int) -> list[dict[str, object]]:
    guids = data_guids(data)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for kind, name in DEFAULT_ENCODERS:
            started = time.perf_counter()
            encoder = create_encoder(kind, name)
            loaded = time.perf_counter()
            summary = extract_features(encoder, data, scratch, guids=guids[:pairs], progress=False)
            seconds = time.perf_counter() - loaded
            full = cache_path(cache, data, kind, name)
            size_mb = full.stat().st_size / 2**20 if full.is_file() else float("nan")
            rows.append({
                "encoder": f"{kind}:{name}", "load s": f"{loaded - started:.1f}", "pairs": summary.encoded,
                "pairs/s": f"{summary.encoded / seconds:.1f}",
                "est. full extract min": f"{len(guids) / (summary.encoded / seconds) / 60:.1f}",
                "cache MB (full)": f"{size_mb:.0f}", "KB/pair": f"{size_mb * 1024 / len(guids):.0f}",
            })
    return rows


def bench_fit(data: Path, cache: Path, heads: list[str]) -> list[dict[str, object]]:
    # The first optimizer of a process imports torch._dynamo (~1.5 s here), once: a sweep or a CLI run
    # pays it once, so it is paid here before the clock, not charged to the first head timed.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for head in heads:
            trainer = fit_run(
                data, cache, Path(scratch) / head, FitConfig(head=head), {}, text_encoder="minilm",
                image_encoder="efficientnet-lite0", progress=False,
            )
            metrics = trainer.val_metrics_
            rows.append({
                "head": head, "fit s": f"{trainer.fit_seconds_:.1f}", "epochs": len(trainer.history_),
                "best epoch": trainer.best_epoch_,
                "s/epoch": f"{trainer.fit_seconds_ / len(trainer.history_):.2f}",
                "params": sum(p.numel() for p in trainer.model_.parameters()),
                "val accuracy": f"{metrics['accuracy']:.4f}", "val macro-F1": f"{metrics['macro_f1']:.4f}",
                "neutral recall": f"{metrics['per_class']['neutral']['recall']:.4f}",
            })
    return rows


def bench_sweep(data: Path, cache: Path, grid: Path, jobs: int) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        trials, rows = sweep_from_cache(
            data, cache, Path(scratch) / "sweep", build_grids(grid, []), SweepOptions(jobs=jobs),
            text_encoder="minilm", image_encoder="efficientnet-lite0", echo=lambda line: None,
        )
        seconds = time.perf_counter() - started
    return [{
        "grid": str(grid), "configs": len(trials), "jobs": jobs, "sweep s": f"{seconds:.1f}",
        "s/config": f"{seconds / len(trials):.1f}", "best": rows[0]["config"],
        "best val macro-F1": f"{rows[0]['macro_f1_mean']:.4f}",
    }]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvsa-single"))
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--extract-pairs", type=int, default=256, help="pairs timed per encoder (0 skips)")
    parser.add_argument("--heads", default=",".join(head_names()), help="comma-separated heads to fit ('' skips)")
    parser.add_argument("--sweep-grid", type=Path, default=Path("results/grids/bench-24.yaml"),
                        help="grid of the timed sweep ('' skips)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes of the timed sweep")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    results: dict[str, object] = {"torch_threads": torch.get_num_threads(), "defaults": dataclasses.asdict(FitConfig())}
    if args.extract_pairs:
        results["extract"] = bench_extract(args.data, args.cache, args.extract_pairs)
        print(f"## Extraction ({torch.get_num_threads()} torch threads)\n\n{markdown(results['extract'])}\n")
    heads = [h for h in args.heads.split(",") if h]
    if heads:
        results["fit"] = bench_fit(args.data, args.cache, heads)
        print(f"## Fit on the cache (default options, seed 0, 10 % validation)\n\n{markdown(results['fit'])}\n")
    if str(args.sweep_grid) not in ("", "."):
        results["sweep"] = bench_sweep(args.data, args.cache, args.sweep_grid, args.jobs)
        print(f"## Sweep on the cache (one hold-out split)\n\n{markdown(results['sweep'])}\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
