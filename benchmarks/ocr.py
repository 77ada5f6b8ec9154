"""OCR speed and agreement: the reader of ``extract/ocr.py`` against a reference OCR cache.

    python -m benchmarks.ocr --data DIR --reference OLD.jsonl [--limit N] [--workers N] [--json FILE]
                             [--cache DIR] [--det-min-side 0] [--max-side 2000] [--cls] [--rec-batch 6]
                             [--no-folded]

Reads the images of the first ``--limit`` guids (default: all, train then test, the order of
``extract``) with ``extract_ocr`` into a scratch cache, or into ``--cache`` to keep the texts
(resumable: only the guids missing there are read and timed). The clock covers the whole call,
worker start-up and model loading included, as an extraction pays them. The settings default to
``extract.ocr.OCR_SETTINGS`` (rapidocr's own, which also wrote ``ocr-rapidocr.jsonl`` before
settings had tags); the options change them (the fast settings measured in the README:
``--det-min-side 0 --no-cls``; ``--no-folded``: rapidocr's models as shipped).

Agreement is measured on the guids present in ``--reference`` (a partial file is fine): the
share of images whose text is identical, where both are empty, where the reference has text
and the new reader none (lost) or the reverse (gained), the reference characters in lost
images, and the mean character error rate (Levenshtein distance / reference length) over the
images whose texts differ and whose reference is not empty. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from extract.ocr import OCR_SETTINGS, OcrSettings, extract_ocr, ocr_path, read_ocr
from extract.run import data_guids


def markdown(rows: list[dict[str, object]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of characters), two rows at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def agreement(reference: dict[str, str], texts: dict[str, str]) -> dict[str, object]:
    """How the new texts compare with the reference's, on the guids both have."""
    common = [guid for guid in texts if guid in reference]
    if not common:
        raise ValueError("no guid of the new texts is in the reference file: nothing to compare")
    differing = [guid for guid in common if texts[guid] != reference[guid] and reference[guid]]
    lost = [guid for guid in common if reference[guid] and not texts[guid]]
    reference_chars = max(sum(len(reference[guid]) for guid in common), 1)
    error_rates = [edit_distance(reference[guid], texts[guid]) / len(reference[guid]) for guid in differing]
    return {
        "images compared": len(common),
        "identical": round(sum(texts[guid] == reference[guid] for guid in common) / len(common), 4),
        "both empty": round(sum(not texts[guid] and not reference[guid] for guid in common) / len(common), 4),
        "lost text": round(len(lost) / len(common), 4),
        "gained text": round(sum(bool(texts[guid]) and not reference[guid] for guid in common) / len(common), 4),
        "reference chars in lost images": round(sum(len(reference[guid]) for guid in lost) / reference_chars, 4),
        "mean CER (differing)": round(sum(error_rates) / len(error_rates), 4) if error_rates else 0.0,
    }


def bench(data: Path, cache: Path, guids: list[str], workers: int | None, settings: OcrSettings) -> dict[str, object]:
    """Read ``guids`` into ``cache`` and time it; the images already there are neither read nor timed."""
    read = len([guid for guid in guids if guid not in read_ocr(ocr_path(cache, data, settings))])
    started = time.perf_counter()
    texts = extract_ocr(data, cache, guids, workers=workers, settings=settings)
    seconds = time.perf_counter() - started
    return {
        "settings": settings.tag, "models": "folded" if settings.folded else "as shipped",
        "workers": os.cpu_count() if workers is None else workers, "images read": read,
        "wall s": round(seconds, 1), "images/s": round(read / seconds, 2) if read else "n/a",
        "texts": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvsa-single"))
    parser.add_argument("--reference", type=Path, required=True, help="an OCR cache (JSONL) to compare with")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N guids (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="OCR processes (default: one per CPU core)")
    parser.add_argument("--cache", type=Path, default=None, help="keep the texts in this cache (default: scratch)")
    parser.add_argument("--det-min-side", type=int, default=OCR_SETTINGS.det_min_side)
    parser.add_argument("--max-side", type=int, default=OCR_SETTINGS.max_side)
    parser.add_argument("--cls", action=argparse.BooleanOptionalAction, default=OCR_SETTINGS.use_cls)
    parser.add_argument("--rec-batch", type=int, default=OCR_SETTINGS.rec_batch)
    parser.add_argument("--folded", action=argparse.BooleanOptionalAction, default=OCR_SETTINGS.folded,
                        help="rapidocr's models with scalar affines folded into convolutions (extract/onnx_fold.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if not args.reference.is_file():
        raise SystemExit(f"error: {args.reference}: reference OCR file not found")
    settings = OcrSettings(det_min_side=args.det_min_side, max_side=args.max_side, use_cls=args.cls,
                           rec_batch=args.rec_batch, folded=args.folded)
    guids = data_guids(args.data)[: args.limit]

    with tempfile.TemporaryDirectory() as scratch:
        speed = bench(args.data, args.cache or Path(scratch), guids, args.workers, settings)
    texts = speed.pop("texts")
    agreed = agreement(read_ocr(args.reference), texts)
    print(f"## OCR speed ({len(guids)} images)\n\n{markdown([speed])}\n")
    print(f"## Agreement with {args.reference}\n\n{markdown([agreed])}\n")
    if args.json is not None:
        results = {"speed": speed, "settings": dataclasses.asdict(settings), "reference": str(args.reference),
                   "agreement": agreed}
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
