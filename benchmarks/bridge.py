"""Round trip of a 1024x1024 RGBA selection + mask: the bridge vs base64 PNG in JSON over HTTP.

Both sides run a no-op engine (the result is the input image), so what is measured is the
transport: for the bridge, raw RGBA/mask frames over ZeroMQ (pyzmq client and the
standard-library ZMTP client); for the baseline, what AUTOMATIC1111's API and the GIMP
plug-ins do: PNG-encode, base64, JSON, HTTP POST, and the same back (stdlib http.server).

    .venv/bin/python benchmarks/bridge.py [--size 1024] [--repeat 7]

Prints times and ratios; never fails.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import threading
import time
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image
from sdkit.bridge import Client, serve

from sdkit.request import Request
from sdkit.result import Result


class NoopJob:
    """Finished as soon as it is made: the result is the request's own image."""

    def __init__(self, request: Request, callback) -> None:
        self.id = "noop"
        self.request = request
        self.state = "done"
        self.error = None
        self._result = Result([request.image], [0], request, {"total": 0.0})
        for kind in ("started", "done"):
            callback(kind, self, None)

    def result(self, timeout=None) -> Result:
        return self._result

    def cancel(self) -> None:
        pass

    def done(self) -> bool:
        return True


class NoopEngine:
    spec = "noop"
    family = "sd1"
    vae_factor = 8
    defaults = {"width": 1024, "height": 1024, "num_inference_steps": 1}
    scheduler_names = ["DDIM"]
    current_job = None

    def info(self) -> dict:
        return {"spec": self.spec, "name": "noop", "family": self.family, "defaults": self.defaults}

    def submit(self, request: Request, *, preview_every: int = 0, callback=None) -> NoopJob:
        return NoopJob(request, callback)

    def queue_length(self) -> int:
        return 0


def make_inputs(size: int) -> tuple[Image.Image, Image.Image]:
    """A selection that looks like a painting (smooth shapes, some grain), and a soft mask."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x * 255, y * 255, (1 - x) * (1 - y) * 255], -1)
    rgb += rng.normal(0, 6, rgb.shape)
    alpha = np.full((size, size, 1), 255.0)
    rgba = np.clip(np.concatenate([rgb, alpha], -1), 0, 255).astype(np.uint8)
    d = np.hypot(x - 0.5, y - 0.5)
    mask = np.clip((0.3 - d) * 2000, 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA"), Image.fromarray(mask, "L")


# ---------------------------------------------------------------------------- HTTP baseline


def _png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _from_b64(text: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(text)))
    im.load()
    return im


class Handler(BaseHTTPRequestHandler):
    # Keep-alive and no Nagle, as uvicorn (A1111) and urllib3 (requests) do: a fair baseline.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        image = _from_b64(body["init_images"][0])
        _from_b64(body["mask"])  # decoded as the server would, then unused by the no-op
        out = json.dumps({"images": [_png_b64(image)], "parameters": body["parameters"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args) -> None:
        pass


class FastHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def http_round_trip(conn: HTTPConnection, image: Image.Image, mask: Image.Image) -> Image.Image:
    payload = json.dumps(
        {
            "init_images": [_png_b64(image)],
            "mask": _png_b64(mask),
            "parameters": {"prompt": "a red star", "denoising_strength": 0.75},
        }
    ).encode()
    conn.request("POST", "/sdapi/v1/img2img", payload, {"Content-Type": "application/json"})
    reply = json.loads(conn.getresponse().read())
    return _from_b64(reply["images"][0])


# ---------------------------------------------------------------------------- main


def _time(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    image, mask = make_inputs(args.size)

    handle = serve(NoopEngine(), "tcp://127.0.0.1:0")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    rows = []
    try:
        for transport in ("zmq", "zmtp"):
            with Client(handle.address, transport=transport, timeout=120) as c:

                def bridge_once(c=c) -> None:
                    r = c.inpaint(image, mask, "a red star")
                    assert r[0].size == image.size

                rows.append(
                    (
                        f"bridge ({transport}, raw RGBA + mask frames)",
                        *_time(bridge_once, args.repeat),
                    )
                )
        conn = FastHTTPConnection("127.0.0.1", httpd.server_address[1])

        def http_once() -> None:
            assert http_round_trip(conn, image, mask).size == image.size

        rows.append(("HTTP + JSON + base64 PNG (A1111 style)", *_time(http_once, args.repeat)))
    finally:
        handle.stop()
        httpd.shutdown()
    base = rows[-1][1]
    print(
        f"round trip of a {args.size}x{args.size} RGBA selection + 8-bit mask, no-op engine, "
        f"median of {args.repeat} (min in brackets)"
    )
    for name, med, best in rows:
        print(f"  {name:44s} {med * 1000:9.1f} ms  ({best * 1000:.1f})  {base / med:6.1f}x vs HTTP")


if __name__ == "__main__":
    main()
