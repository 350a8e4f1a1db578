"""Response times and memory of `chimle explore`, measured as the page sees them: HTTP requests to a running server.

    python benchmarks/explore_latency.py sr8-small --repeat 1   # the shipped model, a 48x48 input (issue 28's case)
    python benchmarks/explore_latency.py                        # --demo: random-init tiny 8x SR tower
    python benchmarks/explore_latency.py WEIGHTS --only guided  # the jobs whose name contains "guided"

Starts the server as a subprocess on a free port, uploads the centre of a bundled photo (scikit-image's
astronaut, `--input` x 8 px, degraded by the task: a 48x48 input for 8x SR by default), then times, end to
end (request -> JSON answer with every image rendered; the page then fetches the PNGs): 8 samples, a
variation of 8 from level 2, a 16-frame interpolation, and guided searches with the page's default settings
on a painted hint (without and with 10 refinement steps) and on a reference image. Prints the median and the
fastest of `--repeat` runs of each, the load average beside each (the machine may be shared), and the
server's resident memory: after loading, its peak (VmHWM) and what it holds idle after the jobs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
from PIL import Image


def post(url: str, body: dict | bytes | None = None) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


def start(argv: list[str], threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "chimle", "explore", *argv, "--port", "0"]  # as a user starts it
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120 and proc.poll() is None:
        url = next((w for line in list(lines) for w in line.split() if w.startswith("http://")), None)
        if url:
            return proc, url
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start:\n" + "".join(lines))


def memory(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in MB (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def load() -> str:
    return "load " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="?", help="8x SR weights or a model's name (default: --demo, a random-init tower)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--input", type=int, default=48, help="input side in pixels (the photo is input x 8, degraded)")
    p.add_argument("--only", action="append", help="run only the jobs whose name contains this (repeatable)")
    p.add_argument("--threads", type=int, help="torch threads of the server (default: the server's default)")
    a = p.parse_args(argv)
    proc, url = start([a.weights] if a.weights else ["--demo"], a.threads)
    try:
        info = json.loads(urllib.request.urlopen(url + "api/info").read())
        from chimle.data.imageio import builtin_photo_dir

        photo = np.asarray(Image.open(builtin_photo_dir() / "astronaut.png").convert("RGB"))
        side = a.input * info["scale"]
        h0, w0 = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        crop = photo[h0 : h0 + side, w0 : w0 + side]
        inp = post(url + "api/input?name=astronaut.png&degrade=1", png_bytes(crop))
        w, h = inp["width"], inp["height"]
        ids = [it["id"] for it in post(url + "api/sample", {"input": inp["input"], "num": 2, "seed": 99})["items"]]
        hint = np.zeros((h, w, 4), np.uint8)
        hint[h // 4 : h // 2, w // 4 : 3 * w // 4] = (255, 0, 0, 255)  # "this band should be red"
        hint_url = "data:image/png;base64," + base64.b64encode(png_bytes(hint)).decode()
        d = info["defaults"]
        guided = {"input": inp["input"], "hint": hint_url, "k": d["k"], "samples": d["samples"], "seed": 0}
        # the reference: the photo itself, mirrored (another image of the same size)
        post(url + f"api/reference?input={inp['input']}&name=mirror.png", png_bytes(crop[:, ::-1].copy()))
        jobs = {
            "8 samples": ("api/sample", {"input": inp["input"], "num": 8, "seed": 0}),
            "vary from level 2 (8)": ("api/vary", {"item": ids[0], "level": 2, "num": 8, "seed": 1}),
            "interpolate, 16 frames": ("api/interpolate", {"a": ids[0], "b": ids[1], "steps": 16}),
            "guided search, painted hint": ("api/guided", {**guided, "refine_steps": 0}),
            "guided search + 10 refine steps": ("api/guided", {**guided, "refine_steps": 10}),
            "guided search, reference image": ("api/guided", {**{**guided, "hint": None}, "reference": True}),
        }
        if a.only:
            jobs = {k: v for k, v in jobs.items() if any(o in k for o in a.only)}
        mem0 = memory(proc.pid)
        print(
            f"chimle explore latency: {info['model']}, {info['levels']} levels, input {w // info['scale']}x"
            f"{h // info['scale']} -> outputs {w}x{h}, {os.cpu_count()} cores, server threads: "
            f"{a.threads or 'default'}, k={d['k']}, candidates={d['samples']}, median / fastest of {a.repeat}",
            flush=True,
        )
        print(f"  server RSS after loading and one input: {mem0['VmRSS']:.0f} MB ({load()})", flush=True)
        for name, (path, body) in jobs.items():
            times = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                answer = post(url + path, body)
                times.append(time.perf_counter() - t)
            m = memory(proc.pid)
            print(
                f"  {name:34s} {statistics.median(times):7.2f} s / {min(times):7.2f} s   RSS {m['VmRSS']:5.0f} MB, "
                f"peak {m['VmHWM']:5.0f} MB  ({load()})  {answer.get('message', '')[:90]}",
                flush=True,
            )
        time.sleep(2)
        m = memory(proc.pid)
        print(
            f"  server RSS: start {mem0['VmRSS']:.0f} MB, peak {m['VmHWM']:.0f} MB, idle after the jobs "
            f"{m['VmRSS']:.0f} MB ({m['VmRSS'] - mem0['VmRSS']:+.0f} MB)",
            flush=True,
        )
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
