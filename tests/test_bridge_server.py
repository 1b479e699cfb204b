"""The bridge server with the embedded model, driven by both clients (pyzmq and stdlib ZMTP)."""

from __future__ import annotations

import io
import json
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

zmq = pytest.importorskip("zmq")

from sdkit.bridge import Client, protocol, serve  # noqa: E402
from sdkit.bridge.client import BridgeError  # noqa: E402

PROMPT = "a red circle on a blue background"
FAST = {"num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="session")
def bridge_engine():
    import sdkit

    # SDKIT_TEST_MODEL lets a developer point at another snapshot; the suite uses the default.
    return sdkit.load(os.environ.get("SDKIT_TEST_MODEL") or None)


@pytest.fixture(scope="module")
def server(bridge_engine):
    handle = serve(bridge_engine, "tcp://127.0.0.1:0")
    yield handle
    handle.stop()


@pytest.fixture(params=["zmq", "zmtp"])
def client(request, server):
    c = Client(server.address, transport=request.param, timeout=600)
    yield c
    c.close()


def _picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_transport_is_the_one_asked_for(client, request):
    assert client.transport == request.node.callspec.params["client"]


def test_hello_describes_server_model_and_limits(client, bridge_engine):
    h = client.hello()
    assert h["versions"] == [1]
    assert h["model"]["family"] == bridge_engine.family
    assert h["limits"]["max_pixels"] > 0 and h["limits"]["max_queued_per_client"] > 0
    assert "DDIM" in h["schedulers"] and "Euler a" in h["schedulers"]
    from sdkit import modes

    info = bridge_engine.info()
    assert h["modes"] == info["modes"]  # the registry's description, as the engine serves it
    assert [m["name"] for m in h["modes"]] == [
        str(s.name) for s in modes.registered() if s.serves(bridge_engine.family)
    ]
    assert h["size_multiple"] == info["size_multiple"] and h["ranges"] == info["ranges"]
    assert h["schedulers"] == info["scheduler_names"]
    assert client.ping() > 0


def test_txt2img_matches_the_engine_and_streams_progress(client, bridge_engine):
    events = []
    r = client.txt2img(PROMPT, seed=11, progress=events.append, preview=1, **FAST)
    assert len(r) == 1 and r[0].size == (64, 64) and r.seeds == [11]
    assert "Seed: 11" in r.infotexts[0] and PROMPT in r.infotexts[0]
    assert [(e.step, e.total) for e in events] == [(1, 2), (2, 2)]
    assert all(e.preview is not None and e.preview.size[0] > 0 for e in events)
    local = bridge_engine.txt2img(PROMPT, seed=11, progress=False, **FAST)
    assert np.array_equal(np.asarray(r[0]), np.asarray(local[0].convert("RGB")))


def test_clip_skip_is_a_field_the_bridge_carries(client, bridge_engine):
    fields = {m["name"]: m["fields"] for m in client.hello()["modes"]}
    assert all("clip_skip" in fields[m] for m in ("txt2img", "img2img", "inpaint"))
    r = client.txt2img(PROMPT, seed=11, clip_skip=2, **FAST)
    assert r.request.clip_skip == 2 and "Clip skip: 2" in r.infotexts[0]
    local = bridge_engine.txt2img(PROMPT, seed=11, clip_skip=2, progress=False, **FAST)
    assert np.array_equal(np.asarray(r[0]), np.asarray(local[0].convert("RGB")))
    with pytest.raises(BridgeError) as err:
        client.txt2img(PROMPT, clip_skip=13, **FAST)
    assert err.value.field == "request.clip_skip"  # the bridge names the header path


def test_img2img_and_batch_seeds(client):
    r = client.img2img(
        _picture(1), PROMPT, strength=0.5, seed=3, num_images=2, num_inference_steps=4
    )
    assert len(r) == 2 and r.seeds == [3, 4] and r[0].size == (64, 64)
    assert not np.array_equal(np.asarray(r[0]), np.asarray(r[1]))


def test_inpaint_keeps_pixels_outside_the_mask(client):
    image = _picture(2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = client.inpaint(image, mask, "a green star", seed=5, mask_blur=0, num_inference_steps=3)
    out, src = np.asarray(r[0]), np.asarray(image)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], src[keep])
    assert not np.array_equal(out[~keep], src[~keep])


def test_unconditional(client):
    r = client.unconditional(num_inference_steps=2, seed=1)
    assert len(r) == 1 and r[0].size[0] > 0 and r.request.mode == "unconditional"


def test_png_frames_in_and_out(server):
    with Client(server.address) as c:
        buf = io.BytesIO()
        _picture(3).save(buf, format="PNG")
        job = c.submit(
            mode="img2img",
            image=Image.open(io.BytesIO(buf.getvalue())),
            prompt=PROMPT,
            result_format="png",
            **FAST,
        )
        r = job.result(600)
        assert r[0].size == (64, 64)


def test_bad_request_fields_come_back_as_errors_naming_the_field(client):
    with pytest.raises(BridgeError) as e:
        client.txt2img(PROMPT, num_inference_steps=0)
    assert e.value.code == "bad_field" and e.value.field == "request.num_inference_steps"
    with pytest.raises(BridgeError) as e:
        client.txt2img(PROMPT, width=62, height=64, num_inference_steps=1)
    assert e.value.field == "request.width" and "multiple of" in e.value.message
    with pytest.raises(BridgeError) as e:
        client.txt2img(PROMPT, colour="red")
    assert e.value.code == "bad_field" and e.value.field == "request.colour"
    with pytest.raises(BridgeError) as e:
        client.txt2img(PROMPT, model="/etc/passwd")
    assert e.value.code == "model_not_allowed"
    with pytest.raises(BridgeError) as e:
        client.generate(mode="inpaint", image=_picture(), prompt="x")
    assert e.value.field == "request.mask"
    assert client.ping() > 0  # still serving


def test_cancel_a_running_job(client):
    seen = []
    job = client.submit(
        prompt=PROMPT, num_inference_steps=200, width=64, height=64, progress=seen.append
    )
    deadline = time.monotonic() + 300  # generous: CI machines can be very busy
    while not seen and not job.done() and time.monotonic() < deadline:
        client.pump(0.05)
    assert seen, f"the job never started ({job.state}, {job._error})"
    job.cancel()
    with pytest.raises(BridgeError) as e:
        job.result(300)
    assert e.value.code == "cancelled" and job.state == "cancelled"
    assert len(seen) < 200


def test_cancel_a_queued_job_it_never_runs(client):
    first = client.submit(prompt=PROMPT, num_inference_steps=200, width=64, height=64)
    queued_progress = []
    second = client.submit(prompt=PROMPT, progress=queued_progress.append, **FAST)
    deadline = time.monotonic() + 300
    while second.position is None and time.monotonic() < deadline:
        client.pump(0.05)
    assert second.state == "queued" and second.position >= 1
    second.cancel()
    with pytest.raises(BridgeError) as e:
        second.result(300)
    assert e.value.code == "cancelled" and queued_progress == []
    first.cancel()
    with pytest.raises(BridgeError):
        first.result(300)
    assert client.txt2img(PROMPT, **FAST)[0].size == (64, 64)


def test_status_lists_this_clients_jobs(client):
    job = client.submit(prompt=PROMPT, num_inference_steps=100, width=64, height=64)
    while job.job_id is None:
        client.pump(0.05)
    st = client.status()
    assert job.id in st["jobs"] and st["jobs"][job.id] in ("queued", "running")
    job.cancel()
    with pytest.raises(BridgeError):
        job.result(300)
    assert job.id not in client.status()["jobs"]


def test_raw_protocol_errors_carry_the_request_id(server):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 10_000
    s.connect(server.address)
    try:
        s.send_multipart([b'{"v":9,"op":"ping","id":"a1"}'])
        s.send_multipart([b'{"v":1,"op":"dance","id":"a2"}'])
        s.send_multipart([b'{"v":1,"op":"ping","id":"a3","extra":1}'])
        hdr = {
            "v": 1,
            "op": "generate",
            "id": "a4",
            "request": {"mode": "img2img", "prompt": "x"},
            "frames": [{"name": "image", "format": "rgba8", "width": 8, "height": 8}],
        }
        s.send_multipart([json.dumps(hdr).encode(), b"\0" * 100])  # truncated pixels
        s.send_multipart([b"\xff garbage"])
        got = [protocol.decode_event(s.recv_multipart()) for _ in range(5)]
        assert [(g.id, g.code, g.field) for g in got] == [
            ("a1", "bad_version", "v"),
            ("a2", "unknown_op", "op"),
            ("a3", "unknown_field", "extra"),
            ("a4", "bad_frames", "frames[0]"),
            (None, "bad_message", None),
        ]
        txt2img_with_image = {
            "v": 1,
            "op": "generate",
            "id": "a5",
            "request": {"prompt": "x"},
            "frames": [{"name": "image", "format": "rgba8", "width": 8, "height": 8}],
        }
        s.send_multipart([json.dumps(txt2img_with_image).encode(), b"\0" * 256])
        ev = protocol.decode_event(s.recv_multipart())
        assert (ev.id, ev.code) == ("a5", "bad_frames") and "txt2img takes no image" in ev.message
    finally:
        s.close()


def test_queue_limit_per_client(bridge_engine):
    handle = serve(
        bridge_engine, "tcp://127.0.0.1:0", limits=protocol.Limits(max_queued_per_client=2)
    )
    try:
        with Client(handle.address, timeout=300) as c:
            jobs = [
                c.submit(prompt=PROMPT, num_inference_steps=100, width=64, height=64)
                for _ in range(3)
            ]
            with pytest.raises(BridgeError) as e:
                jobs[2].result(300)
            assert e.value.code == "queue_full" and "limit is 2" in e.value.message
            for j in jobs[:2]:
                j.cancel()
            for j in jobs[:2]:
                with pytest.raises(BridgeError):
                    j.result(300)
            assert c.txt2img(PROMPT, **FAST)[0].size == (64, 64)
    finally:
        handle.stop()


def test_structured_json_logs(server):
    from sdkit.bridge.logs import json_log_handler

    stream = io.StringIO()
    handler = json_log_handler(stream, logging.INFO)
    logger = logging.getLogger("sdkit.bridge")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with Client(server.address, timeout=600) as c:
            c.txt2img(PROMPT, **FAST)
            with pytest.raises(BridgeError):
                c.txt2img(PROMPT, num_inference_steps=-1)
        # The server may log after it replied: wait for the records, do not sleep on it.
        deadline = time.monotonic() + 30
        while '"bad_request"' not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = [ln["event"] for ln in lines]
    assert "accepted" in events and "result" in events and "bad_request" in events
    acc = next(ln for ln in lines if ln["event"] == "accepted")
    assert acc["mode"] == "txt2img" and acc["id"] and acc["client"] and acc["level"] == "info"
    bad = next(ln for ln in lines if ln["event"] == "bad_request")
    assert bad["field"] == "request.num_inference_steps" and bad["code"] == "bad_field"


def test_serve_in_a_background_thread_and_stop(bridge_engine):
    handle = serve(bridge_engine, "tcp://127.0.0.1:0")
    assert handle.running and handle.address.startswith("tcp://127.0.0.1:")
    with Client(handle.address, timeout=300) as c:
        assert c.hello()["versions"] == [1]
    handle.stop()
    assert not handle.running
