"""rapidocr's ONNX models with fewer, cheaper ops: scalar affines folded into the convolutions, hard-swish as two ops.

PP-OCRv4's models (PPLCNetV3 layers) were exported op by op: a convolution is followed by a
learnable scalar affine (Mul s, Add b), then a hard-swish spelled as four elementwise ops
(x · clip(x + 3, 0, 6) / 6), then another scalar affine before the next convolution. On a CPU
each of those is a full pass over an activation map, and together they cost more than the
convolutions: ONNX Runtime's profile of the recognition model, one thread, spends 57 % of its
time in Mul, Add, Clip and Div and 28 % in Conv. ``fold_model`` rewrites:

* Conv → Mul s → Add b (scalars)  ⇒  the Conv, with weights W·s and bias c·s + b;
* Mul s → Add b → Conv  ⇒  the Conv, with weights W·s, and b·ΣW added to its bias where the
  convolution pads nothing (a padded border would see b where the original sees 0: there the Add stays);
* Add 3 → Clip(0, 6) → Mul x → Div 6  ⇒  HardSigmoid(α = 1/6, β = 1/2) → Mul x, an op of the
  model's own opset (HardSwish would need opset 14, whose Squeeze these models do not speak).

The same function up to float rounding: the logits move by ~1e-6 (``tests/test_onnx_fold.py``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


class _Graph:
    """The lookups a rewrite needs (who makes a tensor, who reads it, which tensors are constants) over a graph."""

    def __init__(self, graph: object) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.constants |= {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"
        }
        self.added: list[object] = []  # new initializers, appended by ``set_conv_weights``
        self.reindex()

    def reindex(self) -> None:
        self.producer = {name: node for node in self.graph.node for name in node.output}
        self.readers: dict[str, list[object]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def only_reader(self, name: str, op_type: str) -> object | None:
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    def affine(self, node: object) -> tuple[str, float] | None:
        """(the non-constant input, the scalar) of a Mul or Add of a tensor and one scalar constant; else None."""
        if node is None or node.op_type not in ("Mul", "Add") or len(node.input) != 2:
            return None
        scalars = [self.scalar(name) for name in node.input]
        if (scalars[0] is None) == (scalars[1] is None):
            return None
        at = 0 if scalars[0] is None else 1
        return node.input[at], scalars[1 - at]

    def conv_weights(self, conv: object) -> tuple[np.ndarray, np.ndarray] | None:
        """A Conv's weights (O, I/g, k, k) and bias (O,) as float32, if both are constants."""
        if conv.input[1] not in self.constants or (len(conv.input) > 2 and conv.input[2] not in self.constants):
            return None
        weights = self.constants[conv.input[1]].astype(np.float32)
        has_bias = len(conv.input) > 2
        bias = self.constants[conv.input[2]].astype(np.float32) if has_bias else np.zeros(len(weights), np.float32)
        return weights, bias

    def set_conv_weights(self, conv: object, weights: np.ndarray, bias: np.ndarray) -> None:
        from onnx import numpy_helper

        names = []
        for suffix, value in (("weight", weights), ("bias", bias)):
            name = f"{conv.output[0]}.folded_{suffix}_{len(self.added)}"
            self.constants[name] = value
            self.added.append(numpy_helper.from_array(value, name))
            names.append(name)
        del conv.input[1:]
        conv.input.extend(names)


def _fold_following_affine(g: _Graph) -> bool:
    """Conv → Mul/Add by a scalar, the conv's only reader: into the conv. True if one was folded."""
    for conv in g.graph.node:
        if conv.op_type != "Conv":
            continue
        reader = g.readers.get(conv.output[0], [None])
        affine = g.affine(reader[0]) if len(reader) == 1 else None
        weights = g.conv_weights(conv)
        if affine is None or weights is None:
            continue
        (weights, bias), value = weights, np.float32(affine[1])
        if reader[0].op_type == "Mul":
            weights, bias = weights * value, bias * value
        else:
            bias = bias + value
        g.set_conv_weights(conv, weights, bias)
        conv.output[0] = reader[0].output[0]
        g.graph.node.remove(reader[0])
        return True
    return False


def _fold_preceding_affine(g: _Graph) -> bool:
    """Mul/Add by a scalar whose only reader is a Conv: into the conv (an Add only where the conv pads nothing)."""
    from onnx import numpy_helper

    for conv in g.graph.node:
        if conv.op_type != "Conv":
            continue
        before = g.producer.get(conv.input[0])
        affine = g.affine(before)
        weights = g.conv_weights(conv)
        if affine is None or weights is None or len(g.readers[before.output[0]]) != 1:
            continue
        (weights, bias), value = weights, np.float32(affine[1])
        if before.op_type == "Mul":
            weights = weights * value
        elif any(next((a.ints for a in conv.attribute if a.name == "pads"), [])):
            # y·s + b = (y + b/s)·s: the scale moves next to the conv, which takes it; the Add stays
            scale = g.producer.get(affine[0])
            scaled = g.affine(scale)
            if scale is None or scale.op_type != "Mul" or scaled is None or len(g.readers[scale.output[0]]) != 1:
                continue
            value = np.float32(scaled[1])
            constant = f"{before.output[0]}.shift"
            g.constants[constant] = np.array(np.float32(affine[1]) / value, np.float32)
            g.added.append(numpy_helper.from_array(g.constants[constant], constant))
            before.input[:] = [scaled[0], constant]
            g.set_conv_weights(conv, weights * value, bias)
            g.graph.node.remove(scale)
            return True
        else:
            bias = bias + value * weights.sum(axis=(1, 2, 3))
        g.set_conv_weights(conv, weights, bias)
        conv.input[0] = affine[0]
        g.graph.node.remove(before)
        return True
    return False


def _fuse_hard_swish(g: _Graph) -> bool:
    """x + 3 → Clip(0, 6) → · x → / 6 as HardSigmoid(x) · x. True if one was fused."""
    from onnx import helper

    for add in g.graph.node:
        affine = g.affine(add)
        if affine is None or add.op_type != "Add" or affine[1] != 3.0:
            continue
        x = affine[0]
        clip = g.only_reader(add.output[0], "Clip")
        if clip is None or [g.scalar(name) for name in clip.input[1:]] != [0.0, 6.0]:
            continue
        mul = g.only_reader(clip.output[0], "Mul")
        if mul is None or x not in mul.input:
            continue
        div = g.only_reader(mul.output[0], "Div")
        if div is None or div.input[0] != mul.output[0] or g.scalar(div.input[1]) != 6.0:
            continue
        gate = f"{div.output[0]}.hard_sigmoid"
        at = list(g.graph.node).index(add)
        for node in (add, clip, mul, div):
            g.graph.node.remove(node)
        g.graph.node.insert(at, helper.make_node("Mul", [x, gate], [div.output[0]], name=f"{gate}.mul"))
        g.graph.node.insert(at, helper.make_node("HardSigmoid", [x], [gate], name=gate, alpha=1 / 6, beta=0.5))
        return True
    return False


def fold_model(model: object) -> object:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place as the module says, and drop the constants left unread."""
    g = _Graph(model.graph)
    for rewrite in (_fold_following_affine, _fold_preceding_affine, _fuse_hard_swish):
        while rewrite(g):
            g.reindex()
    model.graph.initializer.extend(g.added)
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in read]:
        model.graph.node.remove(node)
    kept = [i for i in model.graph.initializer if i.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def folded_model_path(source: Path, folder: Path | None = None) -> Path:
    """``source`` folded (``fold_model``), written once under ``folder`` (named by its content) and reused.

    ``folder`` defaults to ``$XDG_CACHE_HOME/mmsent/onnx`` (``~/.cache/mmsent/onnx``). Written to a temporary
    file then renamed, so processes folding the same model at once never read a torn one.
    """
    try:
        import onnx
    except ImportError as error:
        raise ImportError(
            "OCR's folded models need the package onnx (pip install -r requirements.txt); "
            "OcrSettings(folded=False) runs rapidocr's models as shipped"
        ) from error

    source = Path(source)
    if folder is None:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmsent" / "onnx"
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    target = Path(folder) / f"{source.stem}-folded-{digest}.onnx"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = fold_model(onnx.load(str(source)))
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as handle:
        handle.write(model.SerializeToString())
    os.replace(handle.name, target)
    return target
