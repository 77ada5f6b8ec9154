"""Training precision: auto picks bf16 only where the CPU has bf16 units; bf16 training runs and stays close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.config import AttentionHeadConfig, FitConfig
from fusion.features import PairFeatures
from fusion.precision import cpu_has_bf16_units, resolve_head_precision
from fusion.train import HeadTrainer


def test_auto_follows_the_cpu_flags(tmp_path, monkeypatch):
    plain, amx = tmp_path / "plain", tmp_path / "amx"
    plain.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 avx512_bf16\n")
    assert not cpu_has_bf16_units(plain) and cpu_has_bf16_units(amx)
    assert not cpu_has_bf16_units(tmp_path / "missing")
    monkeypatch.setattr("fusion.precision.cpu_has_bf16_units", lambda: False)
    assert resolve_head_precision("auto") == "fp32"
    monkeypatch.setattr("fusion.precision.cpu_has_bf16_units", lambda: True)
    assert resolve_head_precision("auto") == "bf16"
    assert resolve_head_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="'fp8'.*auto"):
        resolve_head_precision("fp8")
    with pytest.raises(ValueError, match="precision='half'"):
        FitConfig(precision="half").validate()


def test_bf16_training_runs_and_stays_close_to_fp32(monkeypatch):
    """bf16 autocast changes the matmuls' rounding only: the same fit lands close, with fp32 weights."""
    generator = torch.Generator().manual_seed(0)
    n, labels = 90, np.arange(90) % 3
    direction = torch.randn(3, 8, generator=generator)
    text = (torch.randn(n, 4, 8, generator=generator) + 2 * direction[labels][:, None]).half()  # (N, T, D_text)
    image = torch.randn(n, 3, 6, generator=generator).half()  # (N, P, D_image)
    features = PairFeatures([str(i) for i in range(n)], text, torch.ones(n, 4, dtype=torch.bool), image,
                            torch.ones(n, 3, dtype=torch.bool))
    head = AttentionHeadConfig(text_dim=8, image_dim=6, image_length=3, hidden=8, num_heads=2)
    train, val = np.arange(60), np.arange(60, n)
    fits = {}
    for precision in ("fp32", "bf16"):
        config = FitConfig(head="cross-attention", epochs=3, patience=3, batch_size=16, precision=precision)
        fits[precision] = HeadTrainer(config, head).fit(
            features.subset(train), labels[train], features.subset(val), labels[val], progress=False
        )
    assert fits["bf16"].precision_ == "bf16" and fits["fp32"].precision_ == "fp32"
    assert all(p.dtype == torch.float32 for p in fits["bf16"].model_.parameters())
    np.testing.assert_allclose(
        [h["train_loss"] for h in fits["bf16"].history_], [h["train_loss"] for h in fits["fp32"].history_], rtol=0.05
    )
