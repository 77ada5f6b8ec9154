"""Pipeline benchmark: extraction speed per encoder, cache size, and fit time and quality per head.

    python -m benchmarks.pipeline [--data DIR] [--cache cache] [--extract-pairs 256] [--heads a,b]
                                  [--sweep-grid results/grids/bench-24.yaml] [--jobs 1]
                                  [--poolings] [--flops] [--main-job]

Extraction is timed on the first ``--extract-pairs`` pairs into a scratch cache (model
loading excluded, reported apart); cache sizes are those of the full caches under
``--cache`` (run ``python cli.py extract`` first); each head is fitted with the default
options of ``fit`` on the default split; the sweep runs ``--sweep-grid`` on one hold-out
split, timed from loading the cache to the written leaderboard. ``--poolings`` times the
design card's headline: a fixed-pooling and an attention-pooling fit, and the 5-fold
comparison of every fixed text × image pooling (``results/grids/fixed-poolings.yaml``, 80
fits) from loading the cache, with no pooled vector kept yet and with them kept (it first
removes the cache's kept pooled vectors), and the README's command as a whole process;
``--flops`` measures the cross-attention head's training step in FLOP/s beside the peak of
one large matmul on this machine; ``--main-job`` times ``python cli.py pipeline`` from an
empty cache. Prints a Markdown table per part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from extract import defaults
from extract.cache import cache_path
from extract.registry import create_encoder
from extract.run import data_guids, extract_features
from fusion.config import FitConfig
from fusion.optim import AdamW
from fusion.pooled_cache import pooled_dir
from fusion.registry import create_head, head_names
from fusion.run import fit_rows, fit_run, load_labelled
from fusion.split import stratified_split
from fusion.sweep import SweepOptions, build_grids, sweep_from_cache
from fusion.train import HeadTrainer

# minilm without +vader: the text cache every earlier row of results/pipeline.md was timed on
DEFAULT_ENCODERS = (("text", "minilm"), ("image", defaults.IMAGE_ENCODER))


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


def bench_fit(
    data: Path, cache: Path, heads: list[str], text_encoder: str, image_encoder: str
) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for head in heads:
            trainer = fit_run(
                data, cache, Path(scratch) / head, FitConfig(head=head), {}, text_encoder=text_encoder,
                image_encoder=image_encoder, progress=False,
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


def bench_sweep(
    data: Path, cache: Path, grid: Path, jobs: int, text_encoder: str, image_encoder: str
) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        trials, rows = sweep_from_cache(
            data, cache, Path(scratch) / "sweep", build_grids(grid, []), SweepOptions(jobs=jobs),
            text_encoder=text_encoder, image_encoder=image_encoder, echo=lambda line: None,
        )
        seconds = time.perf_counter() - started
    return [{
        "grid": str(grid), "configs": len(trials), "jobs": jobs, "sweep s": f"{seconds:.1f}",
        "s/config": f"{seconds / len(trials):.1f}", "best": rows[0]["config"],
        "best val macro-F1": f"{rows[0]['macro_f1_mean']:.4f}",
    }]


def bench_poolings(data: Path, cache: Path, text_encoder: str, image_encoder: str) -> list[dict[str, object]]:
    """The card's headline: a head on fixed poolings, one on attention pooling, and the 80-fit pooling comparison.

    The kept pooled vectors of ``cache`` are removed first, so that the rows time pooling them once (as a first fit
    or sweep does) as well as reading them back (as every later one does).
    """
    grid = Path("results/grids/fixed-poolings.yaml")
    rows = []
    shutil.rmtree(pooled_dir(cache, data), ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        labelled = load_labelled(data, cache, text_encoder=text_encoder, image_encoder=image_encoder)
        started = time.perf_counter()
        sequences = labelled.features  # every sequence, read and normalised
        loaded = time.perf_counter() - started
        train_rows, val_rows = stratified_split(labelled.labels, FitConfig().val_fraction, FitConfig().seed)
        # Before pooling once: the same fixed-pooling head trained on the whole sequences, as every fit did.
        mean_pools = labelled.head_config(FitConfig.head, {"text_pool": "mean", "image_pool": "mean"})
        whole = HeadTrainer(FitConfig(), mean_pools).fit(
            sequences.subset(train_rows), labelled.labels[train_rows], sequences.subset(val_rows),
            labelled.labels[val_rows], progress=False,
        )
        rows.append({
            "what": "gated, fixed (mean / mean) on whole sequences, as before", "fits": 1,
            "seconds": f"{whole.fit_seconds_:.2f}",
            "notes": f"{len(whole.history_)} epochs; val macro-F1 {whole.val_metrics_['macro_f1']:.4f}",
        })
        for name, pools in (("fixed (mean / mean)", "mean"), ("attention (the default)", "attention")):
            options = {"text_pool": pools, "image_pool": pools}
            started = time.perf_counter()
            labelled.head_inputs(FitConfig(), labelled.head_config(FitConfig.head, options))  # pools, keeps
            pooled = time.perf_counter() - started
            result = fit_rows(
                labelled, Path(scratch) / pools, FitConfig(), options, train_rows, val_rows, progress=False
            )
            rows.append({
                "what": f"gated, {name}", "fits": 1, "seconds": f"{result.trainer.fit_seconds_:.2f}",
                "notes": f"reading the sequences {loaded:.1f} s; pooling once {pooled:.2f} s; "
                f"{len(result.trainer.history_)} epochs; val macro-F1 {result.validation['macro_f1']:.4f}",
            })
        started = time.perf_counter()
        load_labelled(data, cache, text_encoder=text_encoder, image_encoder=image_encoder).head_inputs(
            FitConfig(), mean_pools
        )
        rows[1]["notes"] += f"; a later fit reads the kept vectors in {time.perf_counter() - started:.2f} s"
        # the 80 fits: first as one batched model in two workers with no pooled vector kept (the sweep pools the
        # 8 streams), then one by one, batched in one process and batched in two workers, reading them back
        shutil.rmtree(pooled_dir(cache, data), ignore_errors=True)
        for batch_folds, jobs, kept in ((True, 2, False), (False, 1, True), (True, 1, True), (True, 2, True)):
            started = time.perf_counter()
            trials, board = sweep_from_cache(
                data, cache, Path(scratch) / f"sweep-{batch_folds}-{jobs}-{kept}",
                build_grids(grid, ["batch_folds=true"] if batch_folds else []), SweepOptions(folds=5, jobs=jobs),
                text_encoder=text_encoder, image_encoder=image_encoder, echo=lambda line: None,
            )
            seconds = time.perf_counter() - started
            best = board[0]
            rows.append({
                "what": f"5-fold comparison of {len(trials)} fixed poolings (`{grid}`"
                + (", `--batch-folds`: the 80 fits as one batched model" if batch_folds else "")
                + (f", `--jobs {jobs}`: in {jobs} halves, one per worker" if jobs > 1 else "")
                + ("), from loading the cache" if kept else "), from loading the cache, no pooled vector kept yet"),
                "fits": len(trials) * 5, "seconds": f"{seconds:.1f}",
                "notes": f"best {best['config']}: macro-F1 {best['macro_f1_mean']:.4f} ± {best['macro_f1_std']:.4f}",
            })
        # the README's command as a user runs it: a whole process, imports included
        command = [
            sys.executable, "cli.py", "sweep", "--data", str(data), "--cache", str(cache), "--grid", str(grid),
            "--text-encoder", text_encoder, "--image-encoder", image_encoder, "--folds", "5", "--batch-folds",
            "--jobs", "2", "--out", str(Path(scratch) / "cli"),
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        rows.append({
            "what": f"`python cli.py sweep --grid {grid} --folds 5 --batch-folds --jobs 2`, the whole process",
            "fits": 80, "seconds": f"{time.perf_counter() - started:.1f}",
            "notes": "imports included; the pooled vectors and splits kept by the rows above",
        })
    return rows


def matmul_peak(size: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """FLOP/s of one large square matmul with the current torch threads: this machine's practical ceiling."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: thread pool and kernels
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def bench_flops(
    data: Path, cache: Path, text_encoder: str, image_encoder: str, steps: int = 20
) -> list[dict[str, object]]:
    """Achieved matmul FLOP/s of the cross-attention head's training step vs the peak measured in the same run."""
    from torch.utils.flop_counter import FlopCounterMode

    labelled = load_labelled(data, cache, text_encoder=text_encoder, image_encoder=image_encoder)
    config = FitConfig(head="cross-attention")
    torch.manual_seed(0)
    model = create_head(config.head, labelled.head_config(config.head, {})).train()
    optimizer = AdamW([{"params": model.parameters(), "weight_decay": config.weight_decay}], lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    batches = [
        labelled.features.batch(torch.randperm(len(labelled.labels), generator=generator)[: config.batch_size])
        for _ in range(steps)
    ]  # (B, T', D_text), (B, T'), (B, P, D_image), (B, P) each, gathered before the clock

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        loss = model(*batch).logsumexp(dim=-1).mean()  # any scalar: the same matmuls as cross-entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    flops_per_step = counter.get_total_flops()
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    seconds = (time.perf_counter() - started) / steps
    peak_fp32, peak_bf16 = matmul_peak(), matmul_peak(dtype=torch.bfloat16)
    achieved = flops_per_step / seconds
    return [{
        "cross-attention train step (batch 64)": f"{flops_per_step / 1e9:.2f} GFLOP in {seconds * 1e3:.1f} ms",
        "achieved GFLOP/s": f"{achieved / 1e9:.1f}", "fp32 2048² matmul GFLOP/s": f"{peak_fp32 / 1e9:.1f}",
        "share of fp32 peak": f"{achieved / peak_fp32:.1%}", "bf16 2048² matmul GFLOP/s": f"{peak_bf16 / 1e9:.1f}",
        "cpu": f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
    }]


def bench_main_job(data: Path) -> list[dict[str, object]]:
    """``python cli.py pipeline`` (the README's main job, default encoders and head) from an empty cache."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable, "cli.py", "pipeline", "--data", str(data), "--cache", f"{scratch}/cache",
            "--run", f"{scratch}/runs/default", "--out", f"{scratch}/submission.csv",
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        summary = json.loads(Path(f"{scratch}/runs/default/cv.json").read_text())["summary"]
    return [{
        "command": "python cli.py pipeline (empty cache)", "wall s": f"{seconds:.1f}",
        "wall min": f"{seconds / 60:.1f}",
        "5-fold macro-F1": f"{summary['macro_f1_mean']:.4f} ± {summary['macro_f1_std']:.4f}",
        "5-fold accuracy": f"{summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}",
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
    parser.add_argument("--text-encoder", default="minilm", help="text cache of the fit, pooling and FLOP rows")
    parser.add_argument("--poolings", action="store_true", help="time fixed vs attention pooling and the 80-fit sweep")
    parser.add_argument("--flops", action="store_true", help="cross-attention FLOP/s vs this machine's matmul peak")
    parser.add_argument("--main-job", action="store_true", help="time `python cli.py pipeline` from an empty cache")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    encoders = (args.text_encoder, DEFAULT_ENCODERS[1][1])

    results: dict[str, object] = {"torch_threads": torch.get_num_threads(), "defaults": dataclasses.asdict(FitConfig())}
    if args.extract_pairs:
        results["extract"] = bench_extract(args.data, args.cache, args.extract_pairs)
        print(f"## Extraction ({torch.get_num_threads()} torch threads)\n\n{markdown(results['extract'])}\n")
    heads = [h for h in args.heads.split(",") if h]
    if heads:
        results["fit"] = bench_fit(args.data, args.cache, heads, *encoders)
        print(f"## Fit on the cache (default options, seed 0, 10 % validation)\n\n{markdown(results['fit'])}\n")
    if str(args.sweep_grid) not in ("", "."):
        results["sweep"] = bench_sweep(args.data, args.cache, args.sweep_grid, args.jobs, *encoders)
        print(f"## Sweep on the cache (one hold-out split)\n\n{markdown(results['sweep'])}\n")
    if args.poolings:
        results["poolings"] = bench_poolings(args.data, args.cache, *encoders)
        print(f"## Poolings: the card's headline (default split; 5 folds)\n\n{markdown(results['poolings'])}\n")
    if args.flops:
        results["flops"] = bench_flops(args.data, args.cache, *encoders)
        print(f"## Cross-attention training step vs this CPU's matmul peak\n\n{markdown(results['flops'])}\n")
    if args.main_job:
        results["main_job"] = bench_main_job(args.data)
        print(f"## The main job from an empty cache\n\n{markdown(results['main_job'])}\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
