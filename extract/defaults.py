"""Defaults every entry point shares: the CLI's options, the Python API, finetune and the benchmarks.

Kept free of imports so that ``python cli.py --help`` stays fast; the head and training defaults
live in ``fusion.config`` (``FitConfig`` and each head's config).
"""

from pathlib import Path

DATA_DIR = Path("../shared/data/mvsa-single")
CACHE_ROOT = Path("cache")
RUN_DIR = Path("runs/default")  # where the main job (``pipeline``) writes its fold heads
# minilm+vader: within noise of minilm+ocr+vader on 5 folds (−0.7 ± 1.6 points of macro-F1, results/sweep-signals.md)
# at a fraction of the cost (OCR of every image is most of an extraction); "+ocr" stays one flag away.
TEXT_ENCODER = "minilm+vader"
IMAGE_ENCODER = "efficientnet-lite0"
