"""Live painting latency (issue 16.5) and where one live frame's time goes (16.6).

    python benchmarks/live.py             # the scripted session, engine and bridge
    python benchmarks/live.py --profile   # per-stage table of one live frame, before/after

The session: 30 strokes on the embedded model's canvas (a coloured blob dragged across a
rendered scene).  A stroke sends a frame every 100 ms while it lasts (Krita's poll, the
widget's debounce) and one at its end; strokes are 0.2-0.6 s apart (seeded).  Every frame
is `sdkit.live.live_request` submitted with the `replace` policy under one source, so a
newer frame supersedes the older ones.  Latency: a stroke's end frame -> the first picture
of that frame or a newer one.  CPU time wasted: process CPU time while a job that was
then superseded ran (approximate: the driver's own time is in it; it mostly sleeps).
One warm-up frame runs first (it builds the img2img pipeline from the loaded one).

--profile times the stages of a live frame with hooks (text encoder, UNet, VAE
encode/decode, scheduler steps, the VAE-encoding cache's key), the PNG encoding of the
result, and the event delivery (job end -> listener), in four columns: no caches; the
prompt cache only (`sdkit.prompt_cache`); the prompt and VAE-encoding caches
(`sdkit.encode_cache`) on the same canvas every frame (a stream that re-sends the picture
while the prompt, strength or seed change); both caches while every frame adds a dot to
the canvas (painting: the encoding cache misses every frame, so this column shows its cost).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a red circle on a blue background"


def strokes(n: int = 30, seed: int = 0) -> list[tuple[float, list[Image.Image]]]:
    """(pause before the stroke, the canvas after each 100 ms of it) for `n` strokes."""
    from sdkit.embedded import shapes

    rng = np.random.default_rng(seed)
    canvas = shapes.render(shapes.Scene("circle", "red", "blue", 32, 32, 14, 0))
    out = []
    for _ in range(n):
        x, y = rng.uniform(8, 56, 2)
        dx, dy = rng.uniform(-6, 6, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        frames = []
        for _ in range(int(rng.integers(2, 5))):
            canvas = canvas.copy()
            ImageDraw.Draw(canvas).ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            x, y = x + dx, y + dy
            frames.append(canvas)
        out.append((float(rng.uniform(0.2, 0.6)), frames))
    return out


class Tally:
    """Frames sent and pictures received, with times; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: list[float] = []  # frame index -> submit time
        self.ends: list[int] = []  # frame indices that ended a stroke
        self.arrived: list[tuple[float, int]] = []  # (time, frame index) of each picture
        self.cpu_start: dict[int, float] = {}
        self.wasted_cpu = 0.0
        self.started = self.superseded = self.completed = 0

    def event(self, index: int, kind: str, superseded: bool = False) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        with self.lock:
            if kind == "started":
                self.started += 1
                self.cpu_start[index] = cpu
            elif kind == "done":
                self.completed += 1
                self.arrived.append((now, index))
            elif kind in ("cancelled", "error") and superseded:
                self.superseded += 1
                if index in self.cpu_start:
                    self.wasted_cpu += cpu - self.cpu_start[index]

    def report(self, name: str) -> dict[str, Any]:
        lat = []
        for i in self.ends:
            later = [t for t, j in self.arrived if j >= i]
            if later:
                lat.append(min(later) - self.sent[i])
        order = [j for _, j in sorted(self.arrived)]
        done = {j for _, j in self.arrived}
        row = {
            "path": name,
            "frames": len(self.sent),
            "started": self.started,
            "superseded": self.superseded,
            "completed": self.completed,
            "p50_s": round(float(np.percentile(lat, 50)), 3) if lat else None,
            "p95_s": round(float(np.percentile(lat, 95)), 3) if lat else None,
            "worst_3_s": [round(v, 2) for v in sorted(lat)[-3:]],
            # stroke ends superseded by the next stroke before their picture came
            "ends_superseded": sum(i not in done for i in self.ends),
            "wasted_cpu_s": round(self.wasted_cpu, 2),
            "in_order": order == sorted(order),
        }
        return row


def replay(submit: Callable[[int, Image.Image], None], pump: Callable[[float], None], tally):
    """Play the strokes in real time; `submit(index, canvas)` sends a frame."""
    for pause, frames in strokes():
        pump(pause)
        for k, canvas in enumerate(frames):
            with tally.lock:
                index = len(tally.sent)
                tally.sent.append(time.perf_counter())
                if k == len(frames) - 1:
                    tally.ends.append(index)
            submit(index, canvas)
            pump(0.1)
    pump(3.0)  # the last pictures


def engine_session(engine) -> dict[str, Any]:
    from sdkit.live import LIVE_POLICY, live_request

    tally = Tally()
    jobs = []

    def submit(index: int, canvas: Image.Image) -> None:
        def on(kind, job, ev):
            tally.event(index, str(kind), job.superseded)

        req = live_request(canvas, PROMPT)
        jobs.append(
            engine.submit(req, preview_every=0, callback=on, policy=LIVE_POLICY, source="bench")
        )

    replay(submit, time.sleep, tally)
    for j in jobs:
        j.wait_delivered(60)
    return tally.report("engine")


def bridge_session(engine) -> dict[str, Any]:
    from sdkit.bridge import Client, serve

    from sdkit.live import LIVE_DEFAULTS, LIVE_POLICY

    tally = Tally()
    handle = serve(engine, "tcp://127.0.0.1:0")
    seen: set[str] = set()
    jobs: dict[int, Any] = {}
    try:
        with Client(handle.address, timeout=300) as client:
            client.hello()

            def pump(seconds: float) -> None:
                end = time.perf_counter() + seconds
                while True:
                    client.pump(0.005)
                    for i, job in jobs.items():
                        state = job.state
                        if state == "running" and f"s{i}" not in seen:
                            seen.add(f"s{i}")
                            tally.event(i, "started")
                        if job.done() and f"e{i}" not in seen:
                            seen.add(f"e{i}")
                            kind = "done" if state == "done" else "error"
                            tally.event(i, kind, job.track.superseded)
                    if time.perf_counter() >= end:
                        return

            def submit(index: int, canvas: Image.Image) -> None:
                jobs[index] = client.submit(
                    mode="img2img",
                    image=canvas,
                    prompt=PROMPT,
                    policy=LIVE_POLICY,
                    stream="bench",
                    **LIVE_DEFAULTS,
                )

            replay(submit, pump, tally)
    finally:
        handle.stop()
    return tally.report("bridge")


# ---------------------------------------------------------------------------- profile


# (prompt cache, encoding cache, painting) per column of --profile
PROFILE_COLUMNS: dict[str, tuple[bool, bool, bool]] = {
    "no caches": (False, False, False),
    "prompt cache": (True, False, False),
    "prompt + encode cache": (True, True, False),
    "both, painting": (True, True, True),
}


def profile(engine, frames: int) -> dict[str, dict[str, float]]:
    """Median seconds per live frame for each stage, per column of `PROFILE_COLUMNS`. The
    columns take turns frame by frame, so a change in the machine's load hits them alike."""
    from sdkit import encode_cache as encodings
    from sdkit.embedded import shapes
    from sdkit.live import LIVE_POLICY, live_request

    base = engine._base
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in PROFILE_COLUMNS}
    current: dict[str, float] = {}

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    patched = [
        (base.text_encoder, "forward"),
        (base.unet, "forward"),
        (base.vae, "encode"),
        (base.vae, "decode"),
    ]
    names = ["text encoding", "UNet steps", "VAE encode", "VAE decode"]
    for (obj, attr), name in zip(patched, names, strict=True):
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    import diffusers

    sched_cls = diffusers.DPMSolverMultistepScheduler
    step = sched_cls.step
    sched_cls.step = timed("scheduler", step)
    key = encodings.posterior_key
    encodings.posterior_key = timed("VAE encode cache key", key)
    still = shapes.render(shapes.Scene("circle", "red", "blue", 32, 32, 14, 0))
    painted = still
    rng = np.random.default_rng(1)
    try:
        for i in range(frames + 1):  # the first round warms up (and fills the caches)
            painted = painted.copy()  # a new dot every frame: a changed picture
            x, y = rng.uniform(4, 60, 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            ImageDraw.Draw(painted).ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            for column, (prompt_cache, encode_cache, painting) in PROFILE_COLUMNS.items():
                engine.prompt_cache.enabled = prompt_cache
                encodings.of(engine).enabled = encode_cache
                current.clear()
                arrived = threading.Event()
                stamp: list[float] = []

                def on(kind, job, ev, stamp=stamp, arrived=arrived):
                    if kind == "done":
                        stamp.append(time.perf_counter())
                        arrived.set()

                t0 = time.perf_counter()
                job = engine.submit(
                    live_request(painted if painting else still, PROMPT),
                    preview_every=0,
                    callback=on,
                    policy=LIVE_POLICY,
                    source="profile",
                )
                result = job.result()
                assert arrived.wait(60)
                t_end = stamp[0]
                current["event delivery"] = t_end - job.finished_at
                t = time.perf_counter()
                io_buf = io.BytesIO()
                result.images[0].save(io_buf, "png")
                current["PIL/PNG"] = time.perf_counter() - t
                current["total"] = t_end - t0 + current["PIL/PNG"]
                accounted = sum(v for k, v in current.items() if k != "total")
                current["other (pipeline glue, PIL in/out)"] = current["total"] - accounted
                if i:
                    rows[column].append(dict(current))
    finally:
        for obj, attr in patched:
            delattr(obj, attr)
        sched_cls.step = step
        encodings.posterior_key = key
        engine.prompt_cache.enabled = True
        encodings.of(engine).enabled = True
    keys = [*names, "VAE encode cache key", "scheduler", "event delivery", "PIL/PNG"]
    keys += ["other (pipeline glue, PIL in/out)", "total"]
    return {
        column: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys}
        for column, rs in rows.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="per-stage table of one live frame")
    ap.add_argument(
        "--frames", type=int, default=15, help="frames per profile column (after a warm-up round)"
    )
    ap.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import sdkit
    from sdkit.live import LIVE_DEFAULTS

    engine = sdkit.load(args.model)
    print(f"model {engine.model.name}, torch threads {torch.get_num_threads()}, live preset")
    print(f"{dict(LIVE_DEFAULTS)}")
    try:
        if args.profile:
            columns = profile(engine, args.frames)
            print("\n| stage (median s/frame) | " + " | ".join(columns) + " |")
            print("| --- |" + " --- |" * len(columns))
            for k in next(iter(columns.values())):
                print(f"| {k} | " + " | ".join(f"{c[k]:.4f}" for c in columns.values()) + " |")
            return
        from sdkit.embedded import shapes
        from sdkit.live import live_request

        canvas = shapes.render(shapes.Scene("circle", "red", "blue", 32, 32, 14, 0))
        engine.submit(live_request(canvas, PROMPT)).result()  # warm: the img2img pipeline
        rows = [engine_session(engine), bridge_session(engine)]
        keys = list(rows[0])
        print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
        for r in rows:
            print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
