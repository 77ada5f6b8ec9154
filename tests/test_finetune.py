"""End-to-end finetuning with the tiny encoders on the generated data folder, on the CPU.

Frozen and unfrozen encoders, ``set_trainable``, an exact ``--resume``, ``--from-run``, prediction
from a finetuned run, no CUDA on a CPU-only run, precision, checkpoints and augmentation.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

import cli
import fusion.finetune as finetune
from extract.dataset import LABELS, TEST_FILE, image_path, read_text
from extract.registry import create_text_encoder
from fusion import losses
from fusion.config import PooledHeadConfig
from fusion.finetune import CHECKPOINT_FILE, FinetuneConfig, augmentation, finetune_run, set_trainable
from fusion.pair_model import PairModel, RawPairs, predict_raw
from fusion.registry import create_head, create_run_head, head_config_from_dict

CPU = torch.device("cpu")
MAX_TOKENS = 16
runner = CliRunner()
# Wall-clock entries of the per-epoch history; everything else must replay exactly.
TIMINGS = ("train_seconds", "seconds")
POST = re.compile(r"(\w+)  positive=([\d.]+)  neutral=([\d.]+)  negative=([\d.]+)")


def tiny_config(**overrides) -> FinetuneConfig:
    values = {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 1, "unfreeze": "all", "seed": 0}
    return FinetuneConfig(**{**values, **overrides})


def run(data_dir: Path, out: Path, encoders: tuple, **overrides) -> dict:
    """A tiny finetune on the given (text, image) encoders, on the CPU without worker processes."""
    return finetune_run(data_dir, out, tiny_config(**overrides), device=CPU, encoders=encoders, workers=0,
                        progress=False)


@pytest.fixture
def fresh_encoders(tiny_text_encoder_dir, _tiny_image_encoder_template):
    """Factory of new (text, image) tiny encoders, all with the same initial weights."""

    def make() -> tuple:
        text = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=MAX_TOKENS)
        return text, copy.deepcopy(_tiny_image_encoder_template)

    return make


@pytest.fixture
def encoder_options(tiny_text_encoder_dir, tiny_image_encoder_name) -> list[str]:
    return ["--text-encoder", str(tiny_text_encoder_dir), "--image-encoder", tiny_image_encoder_name]


def invoke(*args: object) -> Result:
    return runner.invoke(cli.app, [str(arg) for arg in args])


def succeeded(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(prefix + ".")}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert before.keys() == after.keys()
    return [key for key in before if not torch.equal(before[key], after[key])]


@pytest.fixture
def initial_heads(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The state of every head ``finetune_run`` starts training from (after --from-run loads its weights)."""
    states = []
    original = finetune._train

    def spy(model, *args, **kwargs):
        states.append(clone(model.head.state_dict()))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(finetune, "_train", spy)
    return states


# ---- frozen and unfrozen encoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("unfreeze", ["all", "none"])
def test_one_step_trains_encoders_only_when_unfrozen(unfreeze, data_dir, tmp_path, fresh_encoders, initial_heads):
    text, image = fresh_encoders()
    before = {"text_encoder": clone(text.state_dict()), "image_encoder": clone(image.state_dict())}
    run(data_dir, tmp_path / "run", (text, image), unfreeze=unfreeze)

    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert changed(initial_heads[0], part(saved, "head"))  # the head learns either way
    for prefix, state in before.items():
        moved = changed(state, part(saved, prefix))
        if unfreeze == "all":
            assert moved, f"{prefix} did not change"
        else:
            assert not moved, f"{prefix} changed while frozen: {moved[:5]}"


def test_batch_norm_statistics_stay_frozen_while_the_image_encoder_trains(data_dir, tmp_path, fresh_encoders):
    text, image = fresh_encoders()
    before = clone(image.state_dict())
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert any(name.endswith(statistics) for name in before)  # the tiny ResNet has batch norms
    run(data_dir, tmp_path / "run", (text, image), unfreeze="all")
    moved = changed(before, part(torch.load(tmp_path / "run" / "model.pt", weights_only=True), "image_encoder"))
    assert any(name.endswith("weight") for name in moved)  # the encoder trained
    assert [name for name in moved if name.endswith(statistics)] == []


def tiny_pair_model(text, image) -> PairModel:
    sizes = {"text_dim": text.dim, "image_dim": image.dim, "image_length": image.length, "hidden": 8}
    return PairModel(text, image, create_head("concat", head_config_from_dict("concat", sizes)))


# The tiny BERT has 3 blocks (embeddings, 2 layers), the tiny ResNet-18 8 (4 with parameters).
@pytest.mark.parametrize("top", [1, 2, 3, 9])
def test_top_k_trains_exactly_the_last_k_blocks(top, tiny_text_encoder, tiny_image_encoder):
    model = tiny_pair_model(tiny_text_encoder, tiny_image_encoder)
    set_trainable(model, "all")  # then narrowing must freeze again
    chosen = set_trainable(model, f"top-{top}")
    for kind, encoder in (("text", model.text_encoder), ("image", model.image_encoder)):
        blocks = encoder.blocks()
        assert chosen[kind] == blocks[max(len(blocks) - top, 0) :]  # K past the count: every block
        in_blocks = set()
        for index, block in enumerate(blocks):
            expected = index >= len(blocks) - top
            flags = {p.requires_grad for p in block.parameters()}
            assert flags <= {expected}, f"{kind} block {index} of {len(blocks)}: requires_grad {flags}"
            in_blocks |= {id(p) for p in block.parameters()}
        # Parameters outside the listed blocks (e.g. BERT's pooler) stay frozen.
        assert not any(p.requires_grad for p in encoder.parameters() if id(p) not in in_blocks)
        assert any(p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_all_and_none(tiny_text_encoder, tiny_image_encoder):
    model = tiny_pair_model(tiny_text_encoder, tiny_image_encoder)
    encoders = [*model.text_encoder.parameters(), *model.image_encoder.parameters()]
    set_trainable(model, "none")
    assert not any(p.requires_grad for p in encoders)
    assert all(p.requires_grad for p in model.head.parameters())
    set_trainable(model, "all")
    assert all(p.requires_grad for p in encoders)
    set_trainable(model, "none")
    assert not any(p.requires_grad for p in encoders)


@pytest.mark.parametrize("value", ["top-x", "some", "top-", "top--1", "Top-2", ""])
def test_bad_unfreeze_values(value, tiny_text_encoder, tiny_image_encoder):
    with pytest.raises(ValueError, match="unfreeze="):
        set_trainable(tiny_pair_model(tiny_text_encoder, tiny_image_encoder), value)
    with pytest.raises(ValueError, match="unfreeze="):
        FinetuneConfig(unfreeze=value).validate()


# ---- resume, checkpoints ---------------------------------------------------------------------------------------


def history(out: Path) -> list[dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return [{k: v for k, v in epoch.items() if k not in TIMINGS} for epoch in metrics["history"]]


def test_resume_continues_exactly(data_dir, tmp_path, fresh_encoders, monkeypatch):
    options = {"epochs": 2, "max_steps_per_epoch": 2, "unfreeze": "top-1", "warmup": 0.5}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    encoders = fresh_encoders()
    torch.manual_seed(0)  # the head's initial weights come from the global generator
    run(data_dir, full, encoders, **options)

    epochs_started = []
    train_mode = finetune._train_mode

    def interrupt_at_epoch_2(model):
        epochs_started.append(model)
        if len(epochs_started) == 2:
            raise KeyboardInterrupt
        train_mode(model)

    monkeypatch.setattr(finetune, "_train_mode", interrupt_at_epoch_2)
    encoders = fresh_encoders()
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, resumed, encoders, **options)
    assert torch.load(resumed / CHECKPOINT_FILE, weights_only=False)["state"]["epoch"] == 1
    assert len(history(resumed)) == 1

    monkeypatch.setattr(finetune, "_train_mode", train_mode)
    torch.manual_seed(12345)  # the resumed run restores every generator from the checkpoint
    # The config comes from the run folder: this one (3 epochs, no step cap) must be ignored.
    finetune_run(data_dir, resumed, FinetuneConfig(epochs=3), device=CPU, encoders=fresh_encoders(), workers=0,
                 progress=False, resume=True)

    final = [torch.load(out / CHECKPOINT_FILE, weights_only=False) for out in (full, resumed)]
    assert final[0]["state"]["epoch"] == final[1]["state"]["epoch"] == 2
    assert final[0]["model"].keys() == final[1]["model"].keys()
    for key, value in final[0]["model"].items():
        torch.testing.assert_close(final[1]["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert history(resumed) == history(full)
    assert len(history(full)) == 2


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_on_cpu_and_a_checkpoint_per_epoch(precision, dtype, data_dir, tmp_path, fresh_encoders,
                                                     monkeypatch):
    logits_dtypes, checkpoints = [], []
    create = finetune.create_run_head

    def create_and_watch(*args, **kwargs):
        head = create(*args, **kwargs)
        head.register_forward_hook(lambda module, inputs, output: logits_dtypes.append(output.dtype))
        return head

    save = torch.save

    def save_and_count(obj, path, *args, **kwargs):
        if Path(path).name.startswith(CHECKPOINT_FILE):
            checkpoints.append(obj["state"]["epoch"])
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(finetune, "create_run_head", create_and_watch)
    monkeypatch.setattr(torch, "save", save_and_count)
    out = tmp_path / "run"
    metrics = run(data_dir, out, fresh_encoders(), precision=precision, epochs=2, patience=5, unfreeze="top-1")

    assert set(logits_dtypes) == {dtype}  # autocast on the CPU for bf16, none for fp32
    assert checkpoints == [1, 2]
    assert torch.load(out / CHECKPOINT_FILE, weights_only=False)["state"]["epoch"] == 2
    assert not list(out.glob("*.tmp"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["precision"] == precision and len(saved["history"]) == 2
    assert 0.0 <= metrics["macro_f1"] <= 1.0


def test_fp16_on_cpu_is_refused(data_dir, tmp_path, encoder_options):
    out = tmp_path / "run"
    result = invoke("finetune", "--data", data_dir, "--out", out, *encoder_options, "--precision", "fp16",
                    "--device", "cpu")
    # A bad option (typer.BadParameter): click's usage error, exit code 2, one message, no traceback.
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Invalid value for --precision: fp16 needs CUDA" in result.output
    assert not out.exists()


# ---- --from-run and prediction ---------------------------------------------------------------------------------


@pytest.fixture
def fitted_run(data_dir, tmp_path, encoder_options) -> Path:
    """A fit run (non-default head and split) on caches of the tiny encoders."""
    shared = ["--data", data_dir, "--cache", tmp_path / "cache"]
    succeeded(invoke("extract", *shared, *encoder_options, "--max-tokens", MAX_TOKENS, "--workers", 0))
    out = tmp_path / "fit-run"
    succeeded(invoke("fit", *shared, *encoder_options, "--out", out, "--head", "concat", "--hidden", 8,
                     "--epochs", 2, "--seed", 7, "--val-fraction", 0.25))
    return out


def test_from_run_reuses_head_weights_and_split(fitted_run, data_dir, tmp_path, fresh_encoders, initial_heads):
    out = tmp_path / "finetuned"
    # head and val_fraction/seed differ from the fit run's: --from-run must win.
    finetune_run(data_dir, out, tiny_config(val_fraction=0.1), device=CPU, from_run=fitted_run, head="cross-attention",
                 encoders=fresh_encoders(), workers=0, progress=False)

    source = json.loads((fitted_run / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["fit"]["head"] == source["fit"]["head"] == "concat"
    assert config["head"] == source["head"]
    assert config["val_guids"] == source["val_guids"] and len(source["val_guids"]) == 6
    assert json.loads((out / "metrics.json").read_text())["val_size"] == 6
    fit_weights = torch.load(fitted_run / "model.pt", weights_only=True)
    assert initial_heads[0].keys() == fit_weights.keys()
    assert all(torch.equal(initial_heads[0][key], value) for key, value in fit_weights.items())


def test_from_an_old_run_keeps_only_its_heads_options(fitted_run, data_dir, tmp_path, fresh_encoders, initial_heads):
    """A fit run written when every head stored every option: the finetune's config.json keeps the head's own."""
    path = fitted_run / "config.json"
    source = json.loads(path.read_text())
    source["head"] |= {"num_heads": 4, "layers": 1, "norm": "layer"}  # what such a run held besides concat's options
    path.write_text(json.dumps(source))
    out = tmp_path / "finetuned"
    finetune_run(data_dir, out, tiny_config(), device=CPU, from_run=fitted_run, encoders=fresh_encoders(), workers=0,
                 progress=False)
    head = json.loads((out / "config.json").read_text())["head"]
    assert set(head) == {field.name for field in dataclasses.fields(PooledHeadConfig)}
    fit_weights = torch.load(fitted_run / "model.pt", weights_only=True)
    assert all(torch.equal(initial_heads[0][key], value) for key, value in fit_weights.items())


def test_finetune_trains_with_the_loss_and_options_fit_takes(data_dir, tmp_path, encoder_options, monkeypatch):
    calls = []
    focal = losses.LOSSES["focal"]

    def spy(logits: torch.Tensor, targets: torch.Tensor, options: losses.LossOptions) -> torch.Tensor:
        calls.append(options)
        return focal(logits, targets, options)

    monkeypatch.setitem(losses.LOSSES, "focal", spy)
    out = tmp_path / "focal"
    finetune_by_cli(data_dir, out, encoder_options, "--loss", "focal", "--label-smoothing", 0.1, "--class-weights")
    assert calls and all(o.label_smoothing == 0.1 and o.class_weights is not None for o in calls)
    config = json.loads((out / "config.json").read_text())["finetune"]
    assert (config["loss"], config["label_smoothing"], config["focal_gamma"]) == ("focal", 0.1, 2.0)

    refused = invoke("finetune", "--data", data_dir, "--out", tmp_path / "hinge", *encoder_options, "--loss", "hinge")
    assert refused.exit_code == 1 and "error: loss='hinge' is not one of ['ce', 'focal']" in refused.output
    assert not (tmp_path / "hinge").exists()


def test_from_run_refuses_other_encoders(fitted_run, data_dir, tmp_path, tiny_text_encoder_dir, tiny_image_encoder):
    other_text = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=8)
    with pytest.raises(ValueError, match="cache was built with"):
        finetune_run(data_dir, tmp_path / "finetuned", tiny_config(), device=CPU, from_run=fitted_run,
                     encoders=(other_text, tiny_image_encoder), workers=0, progress=False)
    assert not (tmp_path / "finetuned").exists()


def finetune_by_cli(data_dir: Path, out: Path, encoder_options: list[str], *more: object) -> Result:
    return succeeded(invoke(
        "finetune", "--data", data_dir, "--out", out, *encoder_options, "--epochs", 1, "--max-steps-per-epoch", 1,
        "--batch-size", 4, "--workers", 0, "--unfreeze", "top-1", *more,
    ))


def predict_post(run_dir: Path, text: str, image: Path) -> tuple[str, dict[str, float]]:
    result = succeeded(invoke("predict", "--run", run_dir, "--text", text, "--image", image))
    match = POST.search(result.output)
    assert match, result.output
    return match.group(1), dict(zip(LABELS, map(float, match.groups()[1:])))


def test_finetuned_run_predicts(data_dir, data_spec, tmp_path, encoder_options, fresh_encoders):
    out, submission = tmp_path / "finetuned", tmp_path / "sub.csv"
    finetune_by_cli(data_dir, out, encoder_options, "--device", "cpu")
    for name in ("config.json", "model.pt", "metrics.json", "report.txt", CHECKPOINT_FILE):
        assert (out / name).is_file(), name

    # No cache folder: a finetuned run encodes the raw pairs with its own trained encoders.
    test_guids = data_spec.test[::-1]
    (data_dir / TEST_FILE).write_text("guid,tag\n" + "".join(f"{guid},null\n" for guid in test_guids))
    succeeded(invoke("predict", "--run", out, "--data", data_dir, "--cache", tmp_path / "no-cache",
                     "--out", submission))
    with submission.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["guid", "tag"]
    assert [guid for guid, _ in rows[1:]] == test_guids  # every test row, in file order
    tags = dict(rows[1:])

    # The same predictions from the saved weights, rebuilt here by hand.
    text, image = fresh_encoders()
    config = json.loads((out / "config.json").read_text())
    model = PairModel(text, image, create_run_head(config))
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    expected = predict_raw(model, RawPairs(model, data_dir, data_spec.test), device=CPU).argmax(1)
    assert [tags[guid] for guid in data_spec.test] == [LABELS[i] for i in expected]

    guid = data_spec.test[0]
    label, probabilities = predict_post(out, read_text(data_dir, guid), image_path(data_dir, guid))
    assert label == max(probabilities, key=probabilities.get) == tags[guid]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=2e-3)


def test_cpu_only_run_never_touches_cuda(data_dir, data_spec, tmp_path, encoder_options, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA was initialised on a CPU-only run")

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(True) or False)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    out = tmp_path / "finetuned"
    result = finetune_by_cli(data_dir, out, encoder_options)  # --device auto
    assert asked and "finetuned on cpu" in result.output
    assert json.loads((out / "metrics.json").read_text())["device"] == "cpu"
    succeeded(invoke("predict", "--run", out, "--data", data_dir, "--out", tmp_path / "sub.csv"))
    predict_post(out, "happy sunny day", image_path(data_dir, data_spec.test[0]))


# ---- augmentation ----------------------------------------------------------------------------------------------


def test_augmentation_keeps_the_encoder_image_size(data_dir, data_spec, tmp_path, fresh_encoders):
    text, image = fresh_encoders()
    size = image.image_size
    augment = augmentation(size)
    picture = Image.new("RGB", (33, 77), (200, 40, 40))
    torch.manual_seed(0)
    first, second = augment(picture), augment(Image.open(image_path(data_dir, "1")).convert("RGB"))
    assert first.size == second.size == (size, size)

    model = tiny_pair_model(text, image)
    pairs = RawPairs(model, data_dir, list(data_spec.train), augment=augment)
    assert all(pairs[i][1].shape == (3, size, size) for i in range(len(pairs)))
    # Random: the same pair is augmented differently on two visits.
    assert not torch.equal(pairs[0][1], pairs[0][1])

    out = tmp_path / "run"
    metrics = run(data_dir, out, (text, image), augment=True, max_steps_per_epoch=2)
    assert json.loads((out / "config.json").read_text())["finetune"]["augment"] is True
    assert metrics["labels"] == list(LABELS)


def test_from_run_refuses_encoders_or_head_given_beside_it(tmp_path):
    """--from-run reuses the run's encoders and head: naming others beside it would be silently ignored."""
    from typer.testing import CliRunner

    import cli

    for option in (["--text-encoder", "minilm"], ["--image-encoder", "efficientnet-lite2"], ["--head", "concat"]):
        result = CliRunner().invoke(cli.app, ["finetune", "--out", str(tmp_path / "ft"), "--from-run",
                                              str(tmp_path / "run"), *option])
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.replace("│", " ").split())  # typer boxes and wraps the usage error
        assert f"{option[0]} cannot be combined with --from-run" in said
