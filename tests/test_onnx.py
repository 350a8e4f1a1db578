"""ONNX export (chimle/inference/onnx_export.py, `chimle export MODEL OUT.onnx`): onnxruntime draws the same
samples as PyTorch, within 1e-4, from the shipped models on real photos shrunk to the models' inputs.

One export per model (each takes seconds: torch.export traces the whole tower): colorize-small with a dynamic
batch and size (the "same" layout, whose input pyramid the exporter writes itself), run at two sizes and two
batches; sr8-small through the command line with --static at 48x48 (benchmarks/onnx_latency.py times it and
checks its dynamic export; so were the noise-encoder and the authors' towers checked once, not here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'chimle[onnx]'")
pytest.importorskip(
    "onnxscript", reason="onnxscript (torch's ONNX exporter) is not installed: pip install 'chimle[onnx]'"
)

from chimle.apps.cli import main  # noqa: E402
from chimle.data.tasks import make_task  # noqa: E402
from chimle.inference.onnx_export import export_onnx, input_names, onnx_feed  # noqa: E402
from chimle.inference.weights import load_with_task  # noqa: E402
from chimle.resample import resize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


def _targets(photos: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """The photos' centres at the aspect of h x w, shrunk to h x w: (N, 3, h, w) in [0, 1]."""
    out = []
    for p in photos:
        H, W = p.shape[-2:]
        s = min(H / h, W / w)
        ch, cw = int(h * s), int(w * s)
        top, left = (H - ch) // 2, (W - cw) // 2
        out.append(resize(p[:, top : top + ch, left : left + cw], (h, w)))
    return torch.stack(out)


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # 2 shared cores
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _max_diff(model, session, x: torch.Tensor, seed: int) -> float:
    codes = model.sample_codes(x.shape[0], torch.Generator().manual_seed(seed), input_hw=tuple(x.shape[-2:]))
    with torch.no_grad():
        ref = model(x, codes)[-1].numpy()
    out = session.run(["output"], onnx_feed(x, codes))[0]
    assert out.shape == ref.shape
    assert np.ptp(ref) > 0.1  # a real image, not a constant that any graph would match
    return float(np.abs(out - ref).max())


def test_colorize_small_dynamic_graph_matches_pytorch_on_photos(photos, tmp_path):
    model, task_cfg = load_with_task("colorize-small")
    task = make_task(**task_cfg)
    path = export_onnx(model, tmp_path / "colorize.onnx", (64, 64), task=task_cfg)
    session = _session(path)
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == input_names(3)
    assert inputs[0].shape == ["batch", 1, "4*height", "4*width"] and inputs[2].shape == ["batch", 3, "height", "width"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["chimle.task"]) == {"name": "colorize"}
    assert json.loads(meta["chimle.model"]) == model.cfg.to_dict()
    # every photo at the exported size, then three of them at another size (sides divisible by 4)
    for (h, w), some in (((64, 64), photos), ((72, 100), photos[:3])):
        x = task.degrade(_targets(some, h, w))  # the lightness L
        assert x.shape == (len(some), 1, h, w)
        diff = _max_diff(model, session, x, seed=h)
        print(f"colorize-small {len(some)} x {h}x{w}: ONNX max |diff| {diff:.2e}")
        assert diff < TOL, (h, w, diff)


def test_sr8_small_static_export_from_the_cli_matches_pytorch_on_photos(photos, tmp_path, capsys):
    path = tmp_path / "sr8.onnx"
    assert main(["export", "sr8-small", str(path), "--size", "48", "48", "--static"]) == 0
    assert f"exported {path}" in capsys.readouterr().out
    model, task_cfg = load_with_task("sr8-small")
    session = _session(path)
    assert session.get_inputs()[0].shape == [1, 3, 48, 48] and session.get_outputs()[0].shape == [1, 3, 384, 384]
    task = make_task(**task_cfg)
    x = task.degrade(_targets(photos[:3], 384, 384))  # 8x smaller: 48x48 inputs (all 6: the benchmark)
    diffs = [_max_diff(model, session, x[i : i + 1], seed=i) for i in range(len(x))]
    print("sr8-small 48x48: ONNX max |diff| per photo", " ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) < TOL, diffs
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # --static: that size and batch only
        session.run(["output"], onnx_feed(x[:2], model.sample_codes(2, input_hw=(48, 48))))


@pytest.mark.parametrize(
    "args, message",
    [
        (["sr8-small", "{d}/a.onnx"], "an ONNX export needs the input size: --size H W"),
        (["colorize-small", "{d}/a.onnx", "--size", "30", "30"], "input 30x30 must be divisible by 2^(levels-1) = 4"),
        (["sr8-small", "{d}/a.onnx", "--size", "48", "48", "--batch", "2"], "--batch fixes the batch of a --static"),
        (["sr8-small", "{d}/a.safetensors", "--size", "48", "48"], "--size, --static and --batch are for an ONNX"),
    ],
)
def test_bad_onnx_export_arguments_are_one_line(tmp_path, capsys, args, message):
    assert main(["export", *(a.format(d=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chimle export: error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written
