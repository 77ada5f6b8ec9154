"""Extraction with one process and with N under torchrun, on the same pairs: pairs/s of each.

    python benchmarks/scale.py --pairs 512 --processes 1,2 [--only image] [--json results/scale.json]

Writes a manifest of the first ``--pairs`` pairs of the data folder (train split; the images
stay where they are), then times ``cli.py extract --data MANIFEST`` into a fresh cache folder,
once per process count (``torchrun --nproc-per-node N`` for N > 1), and checks that every run
cached the same features. Model loading is in the time, as a user waits for it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract import defaults  # noqa: E402
from extract.cache import cache_path  # noqa: E402
from extract.dataset import image_path, read_split, read_text  # noqa: E402


def write_manifest(data: Path, pairs: int, path: Path) -> Path:
    rows = read_split(data, "train")[:pairs]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["guid", "text", "image", "label"])
        for row in rows:
            writer.writerow([row.guid, read_text(data, row.guid), image_path(data, row.guid).resolve(), row.tag])
    return path


def extract(manifest: Path, cache: Path, processes: int, only: str | None, encoders: dict[str, str]) -> float:
    command = ["cli.py", "extract", "--data", str(manifest), "--cache", str(cache),
               "--text-encoder", encoders["text"], "--image-encoder", encoders["image"]]
    command += ["--only", only] if only else []
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--"]
    started = time.perf_counter()
    subprocess.run(launcher + command, cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def features(cache: Path, manifest: Path, kind: str, encoder: str) -> np.ndarray:
    with h5py.File(cache_path(cache, manifest, kind, encoder), "r") as handle:
        return handle["features"][:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=defaults.DATA_DIR)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--only", choices=("text", "image"), default=None)
    parser.add_argument("--text-encoder", default=defaults.TEXT_ENCODER)
    parser.add_argument("--image-encoder", default=defaults.IMAGE_ENCODER)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    encoders = {"text": args.text_encoder, "image": args.image_encoder}
    kinds = [args.only] if args.only else ["text", "image"]

    rows, reference = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        manifest = write_manifest(args.data, args.pairs, Path(scratch) / "pairs.csv")
        for processes in map(int, args.processes.split(",")):
            cache = Path(scratch) / f"cache-{processes}"
            seconds = extract(manifest, cache, processes, args.only, encoders)
            for kind in kinds:
                cached = features(cache, manifest, kind, encoders[kind])
                reference.setdefault(kind, cached)
                difference = float(np.abs(cached.astype(np.float32) - reference[kind].astype(np.float32)).max())
                assert difference <= 1e-2, f"{kind}: {processes} processes cached other features ({difference})"
            rows.append({
                "processes": processes, "pairs": args.pairs, "encoders": " + ".join(encoders[k] for k in kinds),
                "seconds": f"{seconds:.1f}", "pairs/s": f"{args.pairs / seconds:.1f}",
            })
            print(rows[-1], flush=True)
    header = list(rows[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
