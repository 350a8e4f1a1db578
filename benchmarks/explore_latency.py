"""Response times of `chimle explore`, measured as the page sees them: HTTP requests to a running server.

    python benchmarks/explore_latency.py                     # --demo: random-init tiny 8x SR tower
    python benchmarks/explore_latency.py WEIGHTS --repeat 5  # your weights (any 8x SR model)

Starts the server as a subprocess on a free port, loads the 256x256 centre of a bundled photo
(scikit-image's astronaut, degraded by the task: a 32x32 input for 8x SR), then times, end to end
(request -> JSON answer with every image rendered; the page then fetches the PNGs):
8 samples, a variation of 8 from level 2, a 16-frame interpolation, and guided searches on a painted
hint (k = 4 matches, 32, 16, 8 candidates at levels 1, 2, 3; without and with 10 refinement steps). Prints the median
and the fastest of `--repeat` runs of each. The model runs one job at a time, as on the page.
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


def post(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def start(argv: list[str], threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "chimle.apps.explore", *argv, "--port", "0"]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="?", help="8x SR weights (default: --demo, a random-init tiny tower)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads of the server (default: torch's, all cores)")
    a = p.parse_args(argv)
    proc, url = start([a.weights] if a.weights else ["--demo"], a.threads)
    try:
        info = json.loads(urllib.request.urlopen(url + "api/info").read())
        inp = post(url + "api/example?name=astronaut&degrade=1")
        w, h = inp["width"], inp["height"]
        ids = [it["id"] for it in post(url + "api/sample", {"input": inp["input"], "num": 2, "seed": 99})["items"]]
        hint = np.zeros((h, w, 4), np.uint8)
        hint[h // 4 : h // 2, w // 4 : 3 * w // 4] = (255, 0, 0, 255)  # "this band should be red"
        buf = io.BytesIO()
        Image.fromarray(hint).save(buf, format="PNG")
        hint_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        guided = {"input": inp["input"], "hint": hint_url, "k": 4, "samples": 32, "seed": 0}
        jobs = {
            "8 samples": ("api/sample", {"input": inp["input"], "num": 8, "seed": 0}),
            "vary from level 2 (8)": ("api/vary", {"item": ids[0], "level": 2, "num": 8, "seed": 1}),
            "interpolate, 16 frames": ("api/interpolate", {"a": ids[0], "b": ids[1], "steps": 16}),
            "guided search (k=4, m=32/16/8)": ("api/guided", {**guided, "refine_steps": 0}),
            "guided search + 10 refine steps": ("api/guided", {**guided, "refine_steps": 10}),
        }
        print(
            f"chimle explore latency: {info['model']}, {info['levels']} levels, input {w // info['scale']}x"
            f"{h // info['scale']} -> outputs {w}x{h}, {os.cpu_count()} cores, server threads: "
            f"{a.threads or 'torch default'}, median / fastest of {a.repeat}"
        )
        for name, (path, body) in jobs.items():
            times = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                post(url + path, body)
                times.append(time.perf_counter() - t)
            print(f"  {name:34s} {statistics.median(times):6.2f} s / {min(times):6.2f} s")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
