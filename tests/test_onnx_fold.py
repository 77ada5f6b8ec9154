"""extract.onnx_fold: the folded model computes what the original does, with the elementwise chains gone."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from extract.onnx_fold import fold_model, folded_model_path

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _layers_model() -> onnx.ModelProto:
    """PPLCNetV3's pattern on 4 channels: Conv → affine → hard-swish → affine → Conv, thrice, with and without padding.

    x → Conv 3×3 (pad 1) → ·1.5 → +0.25 → hswish → ·0.5 → +0.1 → Conv 1×1 → ·2 → −0.3 → hswish → ·0.7 → +0.2
      → depthwise Conv 3×3 (pad 1) → y
    """
    rng = np.random.default_rng(0)
    nodes, initializers = [], []

    def constant(name: str, value: np.ndarray | float) -> str:
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.asarray(value, dtype=np.float32).reshape(-1 if np.ndim(value) else 1), name)))
        return name

    def conv(x: str, name: str, shape: tuple[int, ...], pad: int, group: int = 1) -> str:
        initializers.extend([
            numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) * 0.3, f"{name}.w"),
            numpy_helper.from_array(rng.normal(size=shape[0]).astype(np.float32) * 0.1, f"{name}.b"),
        ])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], pads=[pad] * 4, group=group,
                                      kernel_shape=list(shape[2:])))
        return name

    def affine(x: str, name: str, scale: float, shift: float) -> str:
        nodes.append(helper.make_node("Mul", [constant(f"{name}.s", scale), x], [f"{name}.scaled"]))
        nodes.append(helper.make_node("Add", [f"{name}.scaled", constant(f"{name}.c", shift)], [name]))
        return name

    def hard_swish(x: str, name: str) -> str:
        nodes.append(helper.make_node("Add", [x, constant(f"{name}.3", 3.0)], [f"{name}.shifted"]))
        nodes.append(helper.make_node(
            "Clip", [f"{name}.shifted", constant(f"{name}.lo", 0.0), constant(f"{name}.hi", 6.0)], [f"{name}.clip"]
        ))
        nodes.append(helper.make_node("Mul", [x, f"{name}.clip"], [f"{name}.product"]))
        nodes.append(helper.make_node("Div", [f"{name}.product", constant(f"{name}.6", 6.0)], [name]))
        return name

    h = hard_swish(affine(conv("x", "conv1", (4, 4, 3, 3), 1), "lab1", 1.5, 0.25), "act1")
    h = hard_swish(affine(conv(affine(h, "lab2", 0.5, 0.1), "conv2", (4, 4, 1, 1), 0), "lab3", 2.0, -0.3), "act2")
    conv(affine(h, "lab4", 0.7, 0.2), "y", (4, 1, 3, 3), 1, group=4)
    graph = helper.make_graph(
        nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_folding_keeps_the_function_and_removes_the_elementwise_chains():
    model = _layers_model()
    x = np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32) * 3
    expected = _run(model, x)
    before = Counter(node.op_type for node in model.graph.node if node.op_type != "Constant")
    folded = fold_model(_layers_model())
    after = Counter(node.op_type for node in folded.graph.node if node.op_type != "Constant")
    np.testing.assert_allclose(_run(folded, x), expected, rtol=1e-5, atol=1e-5)
    assert before == {"Conv": 3, "Mul": 6, "Add": 6, "Clip": 2, "Div": 2}
    # every scalar Mul is in a conv; of the Adds only the shift before the padded depthwise conv stays, and each
    # hard-swish is HardSigmoid · x
    assert after == {"Conv": 3, "HardSigmoid": 2, "Mul": 2, "Add": 1}
    onnx.checker.check_model(folded)


def test_folded_models_are_written_once_and_named_by_their_content(tmp_path):
    source = tmp_path / "layers.onnx"
    onnx.save(_layers_model(), str(source))
    path = folded_model_path(source, tmp_path / "folded")
    written = path.stat().st_mtime_ns
    assert folded_model_path(source, tmp_path / "folded") == path and path.stat().st_mtime_ns == written
    assert path.name.startswith("layers-folded-") and not list(path.parent.glob("*.tmp"))
    x = np.ones((1, 4, 8, 8), np.float32)
    np.testing.assert_allclose(_run(path, x), _run(source, x), rtol=1e-5, atol=1e-5)


def test_rapidocr_models_fold_to_the_same_outputs(tmp_path):
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    models = Path(rapidocr.__file__).parent / "models"
    rng = np.random.default_rng(2)
    for name, shape in (("det", (1, 3, 96, 128)), ("rec", (2, 3, 48, 160)), ("cls", (2, 3, 48, 192))):
        source = next(models.glob(f"*_{name}_infer.onnx"))
        folded = folded_model_path(source, tmp_path)
        x = rng.uniform(-1, 1, size=shape).astype(np.float32)
        np.testing.assert_allclose(_run(folded, x), _run(source, x), rtol=1e-4, atol=1e-4)
        counts = [Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (source, folded)]
        assert sum(counts[1].values()) < sum(counts[0].values())
        if name != "cls":  # PP-OCRv4's hard-swish chains are gone (the v2 classifier has none)
            assert counts[0]["Clip"] > 0 and counts[1]["Clip"] == 0


def test_without_onnx_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(ImportError, match=r"need the package onnx \(pip install -r requirements.txt\)"):
        folded_model_path(tmp_path / "model.onnx", tmp_path)
