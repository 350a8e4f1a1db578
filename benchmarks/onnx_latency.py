"""ONNX export of the shipped models: file sizes, onnxruntime's agreement with PyTorch on real photos, and the CPU
time of one sample from a 48x48 input to sr8-small, onnxruntime against PyTorch.

    python benchmarks/onnx_latency.py                 # 1 and 2 threads, 30 timed samples each
    python benchmarks/onnx_latency.py --threads 1 --repeat 100

Exports sr8-small at 48x48 twice (dynamic batch and size, the default; --static) and colorize-small at 64x64
(dynamic), checks each graph against the tower on scikit-image's photos (the largest |difference|), then times
one sample: input and code in, the 384x384 image out (PyTorch: `model(x, codes)[-1]` under inference_mode;
onnxruntime: `session.run`), after 3 warm-up runs, a fresh code each time, the three taking turns. Prints the
median and the fastest time, PyTorch's median over this one's, and the load average (the machine may be
shared). Needs the onnx extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from chimle.data.imageio import builtin_photo_dir, list_images, load_image
from chimle.data.tasks import make_task
from chimle.inference.onnx_export import export_onnx, onnx_feed
from chimle.inference.weights import load_with_task, shipped_dir
from chimle.resample import resize


def photos_at(h: int, w: int) -> torch.Tensor:
    """scikit-image's photos, their centres at the aspect of h x w shrunk to h x w."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for p in list_images(builtin_photo_dir(Path(d))):
            img = load_image(p)
            H, W = img.shape[-2:]
            s = min(H / h, W / w)
            ch, cw = int(h * s), int(w * s)
            top, left = (H - ch) // 2, (W - cw) // 2
            out.append(resize(img[:, top : top + ch, left : left + cw], (h, w)))
    return torch.stack(out)


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_diff(model, sess: ort.InferenceSession, x: torch.Tensor, batch: int | None) -> float:
    """Largest |ONNX - PyTorch| over the photos, in batches of `batch` (all at once if None)."""
    worst, step = 0.0, batch or len(x)
    for i in range(0, len(x), step):
        xi = x[i : i + step]
        codes = model.sample_codes(len(xi), torch.Generator().manual_seed(i), input_hw=tuple(xi.shape[-2:]))
        with torch.inference_mode():
            ref = model(xi, codes)[-1].numpy()
        worst = max(worst, float(np.abs(sess.run(["output"], onnx_feed(xi, codes))[0] - ref).max()))
    return worst


def timed(fns: dict, repeat: int) -> dict[str, list[float]]:
    """Times of each function, run in turn (one of each per round), so that a change of the machine's load
    falls on all of them alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="chimle_onnx_"))
    sr, sr_task = load_with_task("sr8-small")
    col, col_task = load_with_task("colorize-small")
    files = {}
    for name, model, task, size, dynamic in [
        ("sr8-small", sr, sr_task, (48, 48), True),
        ("sr8-small --static", sr, sr_task, (48, 48), False),
        ("colorize-small", col, col_task, (64, 64), True),
    ]:
        t0 = time.perf_counter()
        path = export_onnx(model, out / f"{name.replace(' --', '-')}.onnx", size, task=task, dynamic=dynamic)
        files[name] = path
        mb, secs = path.stat().st_size / 2**20, time.perf_counter() - t0
        print(f"export {name:20s} {size[0]}x{size[1]}: {mb:6.2f} MB, {secs:5.1f} s")
    for name in ("sr8-small", "colorize-small"):
        print(f"  (the safetensors of {name}: {(shipped_dir() / f'{name}.safetensors').stat().st_size / 2**20:.2f} MB)")

    torch.set_num_threads(1)
    x_sr = make_task(**sr_task).degrade(photos_at(384, 384))  # 48x48 inputs
    x_col = make_task(**col_task).degrade(photos_at(64, 64))
    print(f"max |ONNX - PyTorch| on {len(x_sr)} photos:")
    print(f"  sr8-small 48x48 (dynamic graph)    {max_diff(sr, session(files['sr8-small'], 1), x_sr, None):.2e}")
    print(f"  sr8-small 48x48 (static graph)     {max_diff(sr, session(files['sr8-small --static'], 1), x_sr, 1):.2e}")
    print(f"  colorize-small 64x64 (dynamic)     {max_diff(col, session(files['colorize-small'], 1), x_col, None):.2e}")

    x = x_sr[:1]
    g = torch.Generator().manual_seed(0)
    print(f"one sample, sr8-small, 48x48 -> 384x384, batch 1 (median / fastest of {a.repeat}):")
    for threads in a.threads:
        torch.set_num_threads(threads)

        def torch_sample():
            codes = sr.sample_codes(1, g, input_hw=(48, 48))
            with torch.inference_mode():
                return sr(x, codes)[-1]

        fns = {"PyTorch (eager)": torch_sample}
        for label, key in (
            ("onnxruntime, dynamic graph", "sr8-small"),
            ("onnxruntime, static graph", "sr8-small --static"),
        ):
            sess = session(files[key], threads)
            fns[label] = lambda s=sess: s.run(["output"], onnx_feed(x, sr.sample_codes(1, g, input_hw=(48, 48))))
        rows = timed(fns, a.repeat)
        base = statistics.median(rows["PyTorch (eager)"])
        for label, times in rows.items():
            med = statistics.median(times)
            print(
                f"  {threads} thread(s)  {label:28s} {med * 1e3:7.1f} ms / {min(times) * 1e3:7.1f} ms"
                f"  PyTorch / this x{base / med:.2f}  load {os.getloadavg()[0]:.1f}"
            )
    print(f"files: {out}")


if __name__ == "__main__":
    main()
