"""Name → class registry of fusion heads, and the config each head takes.

A head is one file in ``fusion/heads/`` with ``@register_head("name")`` on its class,
plus one import line in ``fusion/heads/__init__.py``. The key is the CLI name and is
stored in each run's ``config.json``. A head takes ``(text, text_mask, image, image_mask)``
and says in ``modalities`` which of the two it reads: the trainer copies only those. Its
``config_class`` (a dataclass of ``fusion.config``) holds the options it takes, and no other.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from fusion.config import CACHE_SIZES, BaseHeadConfig

if TYPE_CHECKING:
    from torch import nn

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str):
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, BaseHeadConfig)):
            raise ValueError(f"head {name!r}: {cls.__name__}.config_class must name a BaseHeadConfig subclass")
        HEADS[name] = cls
        return cls

    return decorator


def head_names() -> list[str]:
    import fusion.heads  # noqa: F401  (importing registers the built-in heads)

    return sorted(HEADS)


def head_class(name: str) -> type[nn.Module]:
    if name not in head_names():
        raise ValueError(f"unknown head {name!r}; choose one of {head_names()}")
    return HEADS[name]


def head_options(name: str) -> list[str]:
    """The options head ``name`` takes (its config's fields but the sizes set from the caches), in field order."""
    return [f.name for f in fields(head_class(name).config_class) if f.name not in CACHE_SIZES]


def head_config_from_dict(name: str, values: dict[str, Any], *, drop_foreign: bool = False) -> BaseHeadConfig:
    """Head ``name``'s validated config from ``values``, refusing any key it does not take, in one line.

    ``drop_foreign`` drops instead the options that only other heads take: a sweep crossing heads sets
    them for every head, and a config.json written before each head had its own config holds them all
    (e.g. ``num_heads`` of a gated run, which the head never read). A key no head takes still fails.
    """
    config_class = head_class(name).config_class
    own = {f.name for f in fields(config_class)}
    if drop_foreign:
        others = {f.name for other in head_names() for f in fields(HEADS[other].config_class)}
        values = {key: value for key, value in values.items() if key in own or key not in others}
    refused = [key for key in values if key not in own]
    if refused:
        raise ValueError(f"head {name!r} does not take {', '.join(refused)}; its options are "
                         f"{', '.join(head_options(name))}")
    return config_class(**values).validate()


def create_run_head(run_config: dict[str, Any]) -> nn.Module:
    """The (untrained) head a run's config.json describes, whether fit or finetune wrote it, before or after
    each head had its own config: ``predict``, ``finetune --from-run`` and ``--resume`` rebuild it alike."""
    name = run_config["fit"]["head"]
    return create_head(name, head_config_from_dict(name, run_config["head"], drop_foreign=True))


def input_poolings(name: str, config: BaseHeadConfig) -> dict[str, str]:
    """Modality → fixed pooling of each branch of head ``name`` that pools its raw inputs with one.

    Such a branch sees the same pooled vector every epoch: the trainer pools it once per cache
    (``fusion.run.LabelledFeatures.pooled_stream``) instead of streaming the whole sequence each batch.
    Heads without the ``PoolsInputs`` mixin (cross-attention) pool after attending: nothing to share.
    """
    poolings = getattr(head_class(name), "input_poolings", None)
    return poolings(config) if poolings is not None else {}


def create_head(name: str, config: BaseHeadConfig) -> Any:
    cls = head_class(name)
    if not isinstance(config, cls.config_class):
        raise ValueError(f"head {name!r} takes a {cls.config_class.__name__}, not a {type(config).__name__}: "
                         f"build it with head_config_from_dict({name!r}, …)")
    return cls(config)
