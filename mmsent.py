"""mmsent from Python: ``from mmsent import Post, Run, fit`` (see fusion/api.py and the README's "Python API")."""

from fusion.api import FitSpec, Post, Run, fit
from fusion.config import FitConfig

__all__ = ["FitConfig", "FitSpec", "Post", "Run", "fit"]
