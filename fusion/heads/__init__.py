"""Built-in fusion heads; importing a module registers its names."""

from fusion.heads import cross_attention, gated, late, pooled  # noqa: F401
