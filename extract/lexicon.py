"""Lexicon sentiment scores: VADER's (neg, neu, pos, compound) for a text, a small dense signal.

VADER (Hutto & Gilbert, ICWSM 2014) is a rule-based scorer tuned on social media: it reads
capitals, punctuation, emoticons, negation and intensifiers, and ships its lexicon in the
``vaderSentiment`` wheel (offline). On its own it gets about 0.66 accuracy on mvsa-single
(../shared/OFFLINE-MODELS.md). Text encoders with the ``+vader`` variant append these scores
to every real token's features (``extract.encoders.hf_text``), so every head sees them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

VADER_SCORES = ("neg", "neu", "pos", "compound")


@functools.lru_cache(maxsize=1)
def _analyzer() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ImportError("the +vader variant needs vaderSentiment (pip install -r requirements.txt)") from error
    return SentimentIntensityAnalyzer()


def vader_scores(texts: list[str]) -> torch.Tensor:
    """(N, 4) scores (neg, neu, pos, compound) of each text; an empty text scores all zeros."""
    analyzer = _analyzer()
    rows = [[analyzer.polarity_scores(text)[key] for key in VADER_SCORES] for text in texts]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(texts), len(VADER_SCORES))
