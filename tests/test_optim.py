"""fusion.optim.AdamW moves weights as torch.optim.AdamW(fused=True) does, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from fusion.optim import AdamW


def _model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))


def _groups(model: torch.nn.Module, unused: torch.nn.Parameter) -> list[dict]:
    # as HeadTrainer groups them: matrices decay, vectors do not
    return [{"params": [p for p in model.parameters() if p.dim() == 2] + [unused], "weight_decay": 0.01},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def test_adamw_is_torch_fused_adamw_bit_for_bit():
    torch.manual_seed(0)
    ours, theirs = _model(), _model()
    theirs.load_state_dict(ours.state_dict())
    # a parameter that never gets a gradient: neither optimizer may move it (not even by weight decay)
    unused = torch.nn.Parameter(torch.randn(4, 2))
    their_unused = torch.nn.Parameter(unused.detach().clone())
    mine = AdamW(_groups(ours, unused), lr=3e-2)
    reference = torch.optim.AdamW(_groups(theirs, their_unused), lr=3e-2, fused=True)
    for step in range(7):
        x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
        for model, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        for (name, weights), expected in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(weights, expected), f"step {step}: {name}"
    assert torch.equal(unused, their_unused)
    mine.zero_grad()
    assert all(p.grad is None for p in ours.parameters())


def test_training_a_head_does_not_import_the_compiler():
    """torch.optim's first optimizer imports torch._dynamo (~1.7 s); the heads' fits, one by one or batched, do not."""
    code = """
import sys
import numpy as np
import torch
from test_train import head_config, synthetic
from fusion.batched import Member, fit_batched
from fusion.config import FitConfig
from fusion.split import stratified_folds

labels = np.random.default_rng(0).integers(0, 3, 40)
config, features = head_config(), synthetic(labels, seed=0, signal=0.2)
fit = FitConfig(head="gated", epochs=2, batch_size=8).validate()
folds = stratified_folds(labels, 2, seed=0)
fit_batched([Member(fit, config, features, labels, train, val) for train, val in folds])
from fusion.train import HeadTrainer
train, val = folds[0]
HeadTrainer(fit, config).fit(features.subset(train), labels[train], features.subset(val), labels[val], progress=False)
print("torch._dynamo" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                            env={"PYTHONPATH": f"{root}:{root / 'tests'}", "PATH": ""})
    assert loaded.stdout.strip().splitlines()[-1] == "False"
