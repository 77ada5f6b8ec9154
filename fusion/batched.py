"""Several fits of one pooled head trained as one batched model: one optimizer step advances them all.

A fit of a pooled head on fixed poolings is ~100 small eager ops per step (Python and autograd
dispatch), not data: the K folds of a cross-validation cost K times that. Here the K members'
weights are stacked along a new leading axis (``torch.func.stack_module_state``) and one forward,
``vmap(functional_call)`` of the head, runs every member on its own batch; the loss is the sum of
the members' mean losses, so each member's gradient is the one its own fit would get.

Each member is the fit ``HeadTrainer`` would make, step for step:

* its initial weights are built under its own ``torch.manual_seed(seed)``, and its batch order comes
  from its own generator seeded alike (``epoch_order``), so its batches are the same rows;
* a member whose training set is a row or two shorter (stratified folds) has a shorter last batch,
  or one step fewer: its batch is padded with masked rows whose logits never reach its loss, and in
  a step it has no rows for, its weights and optimizer state are left alone;
* AdamW is elementwise, so one fused AdamW call over every member's slices (each with its own step
  count) is K separate ones;
* each member keeps its own best epoch and patience; a member that stops leaves the batch (its
  weights are its best epoch's), and the others go on until all stopped or the epochs ran out.

Without dropout the members' weights, best epochs and validation metrics are their separate fits'
(``tests/test_batched_fit.py``, to float rounding: a batched matmul sums in another order). Dropout
draws one mask per layer and step for all members (``vmap(randomness="same")``) from the global
generator, which each member's seeding leaves where its own fit starts: members of one seed whose
batches have the same width draw their own fit's masks (5 folds of this data's 4,000 pairs: 3,200
rows each); a member whose last batch is narrower than the widest draws a wider mask there, and its
masks part from its own fit's after it. Heads that attend across positions (cross-attention, whose
batch norm also mixes rows) are not batched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from extract.memory import reuse_freed_memory
from fusion.config import BaseHeadConfig, FitConfig
from fusion.features import PairFeatures
from fusion.losses import training_loss
from fusion.metrics import evaluate
from fusion.optim import adamw_step
from fusion.pooling import PoolsInputs
from fusion.precision import autocast, resolve_head_precision
from fusion.registry import create_head, head_class, input_poolings
from fusion.sampling import epoch_order
from fusion.split import fold_splits
from fusion.train import HeadTrainer

if TYPE_CHECKING:
    from fusion.run import LabelledFeatures

VAL_CHUNK = 256  # validation rows per forward, as fusion.train.predict_proba


@dataclass
class Member:
    """One fit of a batch: ``HeadTrainer(fit_config, head_config).fit`` on ``train_rows``, selected on ``val_rows``."""

    fit_config: FitConfig
    head_config: BaseHeadConfig
    features: PairFeatures  # every row, as the head reads them (``LabelledFeatures.head_inputs``); members that
    # read the same features share the object, so a step gathers all their rows at once
    labels: np.ndarray  # (N,) class ids of those rows
    train_rows: np.ndarray  # (N_train,) rows it trains on
    val_rows: np.ndarray  # (N_val,) rows it is selected on


def batch_key(fit_config: FitConfig, head_config: BaseHeadConfig) -> str:
    """Members with equal keys train as one batched model: the same training options, the same head with the same
    weights' shapes, computing the same function of its inputs.

    A branch's fixed pooling is left out: the features come pooled (``PairFeatures.pooled``), and a head pools a
    pooled vector to itself whatever the kind, so ``mean / mean`` and ``last / max`` share one batch.
    """
    options = dataclasses.asdict(head_config)
    for modality in input_poolings(fit_config.head, head_config):
        options.pop(f"{modality}_pool")
    return json.dumps({"fit": dataclasses.asdict(fit_config), "head": options}, sort_keys=True)


def check_batchable(fit_config: FitConfig) -> None:
    """Refuse, in one line, a fit that ``fit_batched`` cannot train as its separate fit would."""
    if not issubclass(head_class(fit_config.head), PoolsInputs):
        raise ValueError(f"batch_folds trains the pooled heads only; {fit_config.head!r} attends across positions: "
                         "fit its folds one by one (leave batch_folds off)")
    if fit_config.aux_data:
        raise ValueError("batch_folds does not take aux_data (auxiliary texts): leave one of them off")


class StackedAdamW:
    """AdamW over members' stacked parameters (K, …), each member's slice with its own step count.

    The update is ``torch.optim.AdamW(fused=True)``'s kernel on the members' slices, so a member's
    weights move exactly as in its own fit; a member left out of a ``step`` is not touched at all
    (no moment decay, no weight decay, no step). ``keep`` drops the members that stopped.
    """

    def __init__(self, params: dict[str, torch.Tensor], lr: float, weight_decay: float):
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        # torch's moments and step, per stacked parameter: (K, …), (K, …), and (K,) one step per member
        self.state = {
            name: (torch.zeros_like(p), torch.zeros_like(p), torch.zeros(len(p), dtype=torch.float32))
            for name, p in params.items()
        }
        self._slice()

    def keep(self, members: torch.Tensor) -> None:
        """Keep only the members at ``members`` (positions along the stacked axis), in that order."""
        self.params = {name: p.detach()[members].requires_grad_() for name, p in self.params.items()}
        self.state = {name: tuple(s[members] for s in state) for name, state in self.state.items()}
        self._slice()

    def _slice(self) -> None:
        # Each member's views of the weights and of the optimizer state, made once (the gradients are new each step).
        self.slices = {
            name: tuple(stacked.unbind(0) for stacked in (p.detach(), *self.state[name]))
            for name, p in self.params.items()
        }

    @torch.no_grad()
    def step(self, live: list[int]) -> None:
        """One AdamW step of the members at positions ``live``, from their parameters' ``.grad``."""
        steps = next(iter(self.state.values()))[2]  # (K,) every parameter of a member has taken its steps
        # Every member live and at the same step: one kernel call on the stacked tensors is the K slices' calls
        # (the update is elementwise), without the per-slice dispatch that grows with the members.
        together = len(live) == len(steps) and bool((steps == steps[0]).all())
        # As HeadTrainer: weight matrices decay, biases, norm scales and pooling queries do not (one member's
        # dimensions are the stacked ones less the member axis).
        for decays in (True, False):
            tensors: list[list[torch.Tensor]] = [[], [], [], [], []]  # params, grads, exp_avg, exp_avg_sq, steps
            for name, p in self.params.items():
                if (p.dim() - 1 >= 2) != decays:
                    continue
                if together:
                    exp_avg, exp_avg_sq, step = self.state[name]
                    for bucket, stacked in zip(tensors, (p.detach(), p.grad, exp_avg, exp_avg_sq, step[:1].clone())):
                        bucket.append(stacked)
                    continue
                weights, *state = self.slices[name]
                for bucket, slices in zip(tensors, (weights, p.grad.unbind(0), *state)):
                    bucket.extend(slices[k] for k in live)
            params, grads, exp_avgs, exp_avg_sqs, step_counts = tensors
            adamw_step(
                params, grads, exp_avgs, exp_avg_sqs, step_counts, lr=self.lr,
                weight_decay=self.weight_decay if decays else 0.0,
            )
        if together:
            for _, _, step in self.state.values():
                step.add_(1)


def fit_batched(members: list[Member], *, progress: bool = False) -> list[HeadTrainer]:
    """Train ``members`` (equal ``batch_key``) as one batched model; each comes back as its own fitted ``HeadTrainer``.

    Each trainer holds what its separate ``fit`` would set (``model_``, ``best_epoch_``, ``history_``,
    ``val_metrics_``, ``precision_``); ``fit_seconds_`` is its share of the batch's wall time.
    """
    started = time.perf_counter()
    config, name = members[0].fit_config, members[0].fit_config.head
    check_batchable(config)
    reuse_freed_memory()
    if len({batch_key(m.fit_config, m.head_config) for m in members}) != 1:
        raise ValueError("members of one batched fit need the same training options and the same head weights' shapes")
    precision = resolve_head_precision(config.precision)
    models = []
    for member in members:  # each member's initial weights, as its own fit draws them
        torch.manual_seed(member.fit_config.seed)
        models.append(create_head(name, member.head_config))
    generators = [torch.Generator().manual_seed(m.fit_config.seed) for m in members]
    criteria = [training_loss(m.fit_config, m.labels[m.train_rows], m.head_config.num_classes) for m in members]
    # Without class weights (drawn from each member's labels) every member's loss is one function: a step whose
    # members all have full batches takes it once, vmapped, instead of once per member (forward and backward).
    every_loss = None if config.class_weights else vmap(criteria[0])  # (K, B, C), (K, B) → (K,)
    targets = [torch.as_tensor(m.labels[m.train_rows], dtype=torch.long) for m in members]  # (N_train,) each
    # name → (K, …), every matrix stored transposed (K, in, out): CPU batched matmuls run faster on it, its
    # gradient comes out in that layout with no transposing copy, and the head reads (K, out, in) views of it
    optimizer = StackedAdamW(
        {name: transposed(p.detach()).requires_grad_() for name, p in stack_module_state(models)[0].items()},
        config.lr, config.weight_decay,
    )
    stateless = copy.deepcopy(models[0]).to("meta")  # the head's code; weights come from the stack
    constants = dict(models[0].named_buffers())  # patch position tables: the same in every member

    def one_member(weights: dict[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(stateless, (weights, constants), inputs)  # (B, C)

    stacked_inputs = StackedInputs(members, stateless.modalities)
    forward = vmap(one_member, randomness="same")  # (K, …) weights and (K, B, …) inputs → (K, B, C); one dropout draw
    active = list(range(len(members)))  # the member at each position of the stacked axis
    best: list[tuple[float, dict[str, torch.Tensor], int]] = [(-1.0, {}, 0)] * len(members)  # F1, weights, stale
    fitted: dict[int, tuple[int, dict[str, Any]]] = {}  # member → (best epoch, its validation report)
    histories: list[list[dict[str, Any]]] = [[] for _ in members]
    bar = tqdm(range(1, config.epochs + 1), desc=f"fit {name} ×{len(members)}", unit="epoch", disable=not progress)
    for epoch in bar:
        stateless.train()
        orders = [epoch_order(members[k].labels[members[k].train_rows], config.balanced_sampling, generators[k])
                  for k in active]  # (N_train,) positions in each member's training rows
        total_loss = torch.zeros(len(active), dtype=torch.float64)  # (K,) Σ over batches of mean loss × rows
        for start in range(0, max(map(len, orders)), config.batch_size):
            rows = [order[start : start + config.batch_size] for order in orders]  # (B_k,) each, B_k ≤ B
            live = [i for i, r in enumerate(rows) if len(r)]  # members with rows left in this epoch
            inputs = stacked_inputs.gather(active, [members[k].train_rows for k in active], rows)
            with autocast(torch.device("cpu"), precision):
                # (K, B, C); padding rows never reach a loss
                logits = forward(head_weights(optimizer.params), *inputs).float()
            if every_loss is not None and all(len(r) == logits.shape[1] for r in rows):  # every member, full batch
                losses = every_loss(logits, torch.stack([targets[k][r] for k, r in zip(active, rows)]))  # (K,)
            else:
                losses = torch.stack([
                    criteria[active[i]](logits[i, : len(rows[i])], targets[active[i]][rows[i]]) for i in live
                ])  # (K_live,) each member's mean loss over its own rows
            for weights in optimizer.params.values():
                weights.grad = None
            losses.sum().backward()  # each member's weights get the gradient of its own loss alone
            optimizer.step(live)
            total_loss[live] += losses.detach().double() * torch.tensor([len(rows[i]) for i in live])
        stateless.eval()
        probabilities = validation_probabilities(
            forward, head_weights(optimizer.params), members, active, stacked_inputs
        )
        stopped = []
        for i, k in enumerate(active):
            member, p = members[k], probabilities[i]  # (N_val, C)
            y_val = member.labels[member.val_rows]
            val_loss = float(torch.nn.functional.nll_loss(torch.log(p.clamp_min(1e-12)), torch.as_tensor(y_val)))
            metrics = evaluate(y_val, p.argmax(1).numpy())
            histories[k].append({
                "epoch": epoch, "train_loss": float(total_loss[i]) / len(orders[i]), "val_loss": val_loss,
                "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
            })
            best_f1, weights, stale = best[k]
            if metrics["macro_f1"] > best_f1:
                weights = {n: w[i].detach().clone() for n, w in head_weights(optimizer.params).items()}
                best[k] = (metrics["macro_f1"], weights, 0)
                fitted[k] = (epoch, metrics)
            else:
                best[k] = (best_f1, weights, stale + 1)
                if stale + 1 >= config.patience:
                    stopped.append(i)
        bar.set_postfix(fitting=len(active) - len(stopped), best=f"{max(b[0] for b in best):.3f}")
        if stopped:  # they leave the batch: later steps compute the others only
            keep = [i for i in range(len(active)) if i not in stopped]
            active = [active[i] for i in keep]
            optimizer.keep(torch.tensor(keep, dtype=torch.long))
        if not active:
            break
    seconds = (time.perf_counter() - started) / len(members)
    trainers = []
    for k, (member, model) in enumerate(zip(members, models)):
        model.load_state_dict(best[k][1])
        best_epoch, val_metrics = fitted[k]
        trainers.append(HeadTrainer.fitted(
            member.fit_config, member.head_config, model, best_epoch=best_epoch, val_metrics=val_metrics,
            history=histories[k], fit_seconds=seconds, precision=precision,
        ))
    return trainers


def transposed(stacked: torch.Tensor) -> torch.Tensor:
    """A stacked parameter (K, …) with its last two dimensions swapped, contiguous; (K, n) vectors as they are."""
    return stacked.mT.contiguous() if stacked.dim() > 2 else stacked


def head_weights(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stacked parameters as the head's weights: views of the transposed matrices in the head's own layout."""
    return {name: p.mT if p.dim() > 2 else p for name, p in params.items()}


def fit_folds_batched(
    labelled: LabelledFeatures,
    fits: list[tuple[FitConfig, dict[str, Any], int]],
    *,
    folds: int,
    split_seed: int,
    progress: bool = False,
) -> list[HeadTrainer]:
    """Each (fit config, head options, fold) of ``fits`` as ``fusion.run.fit_fold`` fits it (the same rows of K
    ``folds``, the same seeds), all fitted as one batched model: their trainers, in order.

    The fits must share one ``batch_key``: e.g. the fixed poolings of one head on K folds, 16 × K members of one
    model rather than 16 × K fits.
    """
    # one split for all: the fits share their training options (batch_key), val_fraction with them
    splits = fold_splits(labelled.labels, folds, fits[0][0].val_fraction, split_seed)
    members = []
    for fit_config, head_options, fold in fits:
        head_config = labelled.head_config(fit_config.head, head_options)
        features, _ = labelled.head_inputs(fit_config, head_config)
        train_rows, val_rows = splits[fold]
        members.append(Member(fit_config, head_config, features, labelled.labels, train_rows, val_rows))
    return fit_batched(members, progress=progress)


class StackedInputs:
    """Every member's head inputs joined once, so that a step gathers all members' rows with one index per input.

    Per modality, the members' distinct streams (a fixed pooling's vectors are shared by every configuration
    with that pooling) are joined along the rows, each member reading its own stream's rows at an offset. A
    modality the head does not read is one masked position, as ``PairFeatures.batch`` gives it.
    """

    def __init__(self, members: list[Member], modalities: tuple[str, ...]):
        self.streams: list[tuple[torch.Tensor, torch.Tensor]] = []  # per modality: (ΣN, L, D) features, (ΣN, L) mask
        self.offsets: list[list[int]] = []  # per modality: each member's first row in it
        for modality in ("text", "image"):
            starts: dict[int, int] = {}  # id of a stream → its first row in the joined one
            parts, offsets = [], []
            for member in members:
                features, mask = getattr(member.features, modality), getattr(member.features, f"{modality}_mask")
                if id(features) not in starts:
                    starts[id(features)] = sum(len(part[0]) for part in parts)
                    parts.append((features, mask) if modality in modalities else (features[:, :1], mask[:, :1] & False))
                offsets.append(starts[id(features)])
            length = max(features.shape[1] for features, _ in parts)
            self.streams.append(parts[0] if len(parts) == 1 else (
                torch.cat([_padded_positions(features, length) for features, _ in parts]),
                torch.cat([_padded_positions(mask, length) for _, mask in parts]),
            ))
            self.offsets.append(offsets)

    def gather(self, positions: list[int], rows_of: list[np.ndarray], picks: list[torch.Tensor]
               ) -> tuple[torch.Tensor, ...]:
        """float32 inputs of ``rows_of[i][picks[i]]`` for the member at each of ``positions``, stacked: (K, B, L, D),
        (K, B, L) per modality, each sequence cut after its last real position in the batch.

        B is the longest pick; a shorter one (the last batch of a smaller fold, or none at all) is padded with
        its member's first row, whose logits the caller leaves out: a pooled head computes each row alone.
        """
        width = max(len(pick) for pick in picks)
        rows = torch.cat([
            torch.cat([torch.as_tensor(member_rows)[pick], torch.as_tensor(member_rows[:1]).expand(width - len(pick))])
            for member_rows, pick in zip(rows_of, picks)
        ])  # (K·B,) each member's rows in its own features
        inputs: list[torch.Tensor] = []
        for (features, mask), offsets in zip(self.streams, self.offsets):
            index = rows + torch.tensor([offsets[k] for k in positions]).repeat_interleave(width)  # (K·B,)
            picked_mask = mask.index_select(0, index)  # (K·B, L)
            real = picked_mask.any(dim=0).nonzero()  # (L_real, 1)
            length = int(real[-1]) + 1 if len(real) else 1
            picked = features[:, :length].index_select(0, index).float()  # (K·B, length, D)
            inputs += [picked.unflatten(0, (len(positions), width)),
                       picked_mask[:, :length].unflatten(0, (len(positions), width))]
        return tuple(inputs)


def _padded_positions(x: torch.Tensor, length: int) -> torch.Tensor:
    """(N, L, …) padded with zeros (False for masks) to (N, length, …)."""
    return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))], dim=1)


@torch.inference_mode()
def validation_probabilities(
    forward: Any, params: dict[str, torch.Tensor], members: list[Member], positions: list[int], inputs: StackedInputs
) -> list[torch.Tensor]:
    """Class probabilities (N_val, C) of the members at ``positions`` on their validation rows, as ``predict_proba``
    gives them."""
    chosen = [members[k] for k in positions]
    longest = max(len(m.val_rows) for m in chosen)
    chunks = []
    for start in range(0, longest, VAL_CHUNK):
        picks = [torch.arange(start, min(start + VAL_CHUNK, len(m.val_rows))) for m in chosen]  # (B_k,)
        batch = inputs.gather(positions, [m.val_rows for m in chosen], picks)
        chunks.append(torch.softmax(forward(params, *batch).float(), dim=-1))  # (K, B, C)
    probabilities = torch.cat(chunks, dim=1)  # (K, N_val_max + padding, C)
    return [probabilities[i, : len(m.val_rows)] for i, m in enumerate(chosen)]
