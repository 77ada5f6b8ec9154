"""Does a stack beat its members? Nested CV of ``StackRule`` variants over K-fold folders' out-of-fold rows.

    python -m benchmarks.stack --run FOLDER --run FOLDER [...] [--data DIR] [--cache cache] [--json FILE]

The members are ``fit --folds K`` folders with the same folds (``python cli.py stack`` refuses others). Their
out-of-fold probabilities are read once (every fold head predicts its own validation rows); then, for each
of the members' folds held out, every candidate is fitted on the other folds' rows and scores the held-out
ones: the stack on log-probabilities or probabilities, with or without balanced class weights; the plain
average of the members; the single member best on the other folds; and each member alone (its own CV score).

Prints a Markdown table: mean ± sample std over the folds, and paired Δ from the best single member and
from the average. A Δ "beyond noise" exceeds 2 · std / √folds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fusion.decision import StackRule
from fusion.metrics import evaluate
from fusion.stack import StackInputs, markdown, nested_scores

VARIANTS = {  # StackRule options of each candidate
    "stack (p)": {"features": "probability"},  # the stack command's default
    "stack (p, balanced)": {"features": "probability", "class_weight": "balanced"},
    "stack (log p)": {"features": "log"},
    "stack (log p, balanced)": {"features": "log", "class_weight": "balanced"},
}


def main() -> None:
    from extract import defaults

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", required=True, help="a member's K-fold folder; repeat")
    parser.add_argument("--data", type=Path, default=defaults.DATA_DIR)
    parser.add_argument("--cache", type=Path, default=defaults.CACHE_ROOT)
    parser.add_argument("--seed", type=int, default=0, help="shuffles the inner folds choosing each stack's c")
    parser.add_argument("--json", type=Path, default=None, help="also write every fold's scores as JSON here")
    args = parser.parse_args()

    started = time.perf_counter()
    inputs = StackInputs.gather(args.run, args.data, args.cache)
    stacks = {name: StackRule(seed=args.seed, **options) for name, options in VARIANTS.items()}
    methods, chosen = nested_scores(inputs, stacks)
    for member, folder in zip(inputs.members, inputs.folders):
        methods[f"member {member.folder.name}"] = [
            evaluate(inputs.labels[val], folder[val].argmax(1)) for val in inputs.folds
        ]
    seconds = time.perf_counter() - started
    print(f"## Stacking {len(inputs.members)} members, nested {len(inputs.folds)}-fold CV over {len(inputs.labels)} "
          f"out-of-fold rows ({torch.get_num_threads()} threads, {seconds:.0f} s)\n\n{markdown(methods)}")
    if args.json is not None:
        args.json.write_text(json.dumps(vars(args) | {
            "seconds": seconds, "members": [str(m.folder) for m in inputs.members], "variants": VARIANTS,
            "methods": methods, "chosen": chosen,
        }, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
