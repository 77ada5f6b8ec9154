"""Name → class registry of fusion heads.

A head is one file in ``fusion/heads/`` with ``@register_head("name")`` on its class,
plus one import line in ``fusion/heads/__init__.py``. The key is the CLI name and is
stored in each run's ``config.json``. A head takes ``(text, text_mask, image, image_mask)``
and says in ``modalities`` which of the two it reads: the trainer copies only those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from fusion.config import HeadConfig

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str):
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        HEADS[name] = cls
        return cls

    return decorator


def head_names() -> list[str]:
    import fusion.heads  # noqa: F401  (importing registers the built-in heads)

    return sorted(HEADS)


def input_poolings(name: str, config: HeadConfig) -> dict[str, str]:
    """Modality → fixed pooling of each branch of head ``name`` that pools its raw inputs with one.

    Such a branch sees the same pooled vector every epoch: the trainer pools it once per loaded
    cache (``PairFeatures.pooled``) instead of streaming the whole sequence each batch.
    Heads without the ``PoolsInputs`` mixin (cross-attention) pool after attending: nothing to share.
    """
    if name not in head_names():
        raise ValueError(f"unknown head {name!r}; choose one of {head_names()}")
    poolings = getattr(HEADS[name], "input_poolings", None)
    return poolings(config) if poolings is not None else {}


def create_head(name: str, config: HeadConfig) -> Any:
    if name not in head_names():
        raise ValueError(f"unknown head {name!r}; choose one of {head_names()}")
    return HEADS[name](config)
