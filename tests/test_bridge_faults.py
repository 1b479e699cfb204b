"""The bridge under hostile input, load, faults, with CURVE security, and scaled out."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

zmq = pytest.importorskip("zmq")

from sdkit.bridge import Client, protocol, serve  # noqa: E402
from sdkit.bridge.client import BridgeError, BridgeTimeout  # noqa: E402
from sdkit.bridge.security import SecurityError, create_keys  # noqa: E402

PROMPT = "a red circle on a blue background"
FAST = {"num_inference_steps": 1, "width": 64, "height": 64}


@pytest.fixture(scope="session")
def bridge_engine():
    import sdkit

    return sdkit.load(os.environ.get("SDKIT_TEST_MODEL") or None)


@pytest.fixture
def server(bridge_engine):
    handle = serve(bridge_engine, "tcp://127.0.0.1:0")
    yield handle
    handle.stop()


def _wait(cond, timeout: float, what: str, pump=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if pump is not None:
            pump(0.05)
        else:
            time.sleep(0.05)


# ---------------------------------------------------------------------------- fuzz

_BAD_REQUEST_FIELDS = [
    ("num_inference_steps", -1),
    ("num_inference_steps", 0),
    ("num_inference_steps", "20"),
    ("num_inference_steps", 10**9),
    ("num_inference_steps", 2.5),
    ("width", 63),
    ("width", -64),
    ("width", "64"),
    ("height", 0),
    ("height", [64]),
    ("strength", 0),
    ("strength", 2.0),
    ("strength", "x"),
    ("mode", "paint"),
    ("mode", 3),
    ("scheduler", "Nope Karras"),
    ("scheduler", 7),
    ("seed", -1),
    ("seed", 2**40),
    ("seed", "7"),
    ("num_images", 0),
    ("num_images", 99),
    ("fill", "glitter"),
    ("resize_mode", "stretch"),
    ("prompt", 5),
    ("prompt", ""),
    ("negative_prompt", {}),
    ("guidance_scale", -1),
    ("guidance_scale", "high"),
    ("mask_blur", -3),
    ("grow", 1.5),
    ("padding", None),
    ("only_masked", "yes"),
    ("model", "/etc/passwd"),
    ("model", 5),
    ("colour", "red"),
    ("extra", 5),
]
_BAD_HEADER_VALUES = [
    ("v", 2),
    ("v", "1"),
    ("v", None),
    ("v", -1),
    ("v", 1.0),
    ("op", "explode"),
    ("op", None),
    ("op", 1),
    ("preview", -1),
    ("preview", "on"),
    ("result_format", "gif"),
    ("request", []),
    ("request", "prompt"),
    ("frames", {}),
    ("frames", 5),
    ("unexpected", 1),
    ("target", 3),
]


def _bad_message(rng: random.Random, i: int) -> tuple[list[bytes], str | None]:
    """One deliberately broken message and the request id it carries (None: unreadable)."""
    rid = f"f{i}"
    base = {"v": 1, "op": "generate", "id": rid, "request": {"prompt": PROMPT, **FAST}}
    kind = i % 12
    if kind == 0:  # random frames
        frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 4))]
        if frames[0][:1] in (b"{", b"[") or not frames[0]:
            frames[0] = b"\xff" + frames[0]
        return frames, None
    if kind == 1:  # truncated JSON
        raw = json.dumps(base).encode()
        return [raw[: rng.randint(1, len(raw) - 1)]], None
    if kind == 2:  # valid JSON, not an object
        return [json.dumps(rng.choice([[1, 2], "generate", 42, None, True])).encode()], None
    if kind == 3:  # bad request field
        name, value = rng.choice(_BAD_REQUEST_FIELDS)
        base["request"][name] = value
        if name == "mode" and value == "paint":
            base["request"]["prompt"] = PROMPT
        return [json.dumps(base).encode()], rid
    if kind == 4:  # bad header value
        name, value = rng.choice(_BAD_HEADER_VALUES)
        base[name] = value
        return [json.dumps(base).encode()], rid
    if kind == 5:  # negative or huge sizes in a descriptor
        w = rng.choice([-64, 0, 10**7, 2**63, "64", 64.0, None])
        base["request"]["mode"] = "img2img"
        base["frames"] = [{"name": "image", "format": "rgba8", "width": w, "height": 64}]
        return [json.dumps(base).encode(), b"\0" * 64], rid
    if kind == 6:  # truncated / oversized pixels
        base["request"]["mode"] = "inpaint"
        base["frames"] = [
            {"name": "image", "format": "rgba8", "width": 8, "height": 8},
            {"name": "mask", "format": "l8", "width": 8, "height": 8},
        ]
        img = b"\x80" * rng.choice([0, 1, 255, 256 - 1, 256 + 1])
        return [json.dumps(base).encode(), img, b"\xff" * 64], rid
    if kind == 7:  # frame count does not match the descriptors
        base["frames"] = [{"name": "mask", "format": "l8", "width": 2, "height": 2}]
        return [json.dumps(base).encode(), b"\0" * 4, b"extra"], rid
    if kind == 8:  # fake PNG
        base["request"]["mode"] = "img2img"
        base["frames"] = [{"name": "image", "format": "png", "width": 8, "height": 8}]
        data = (
            protocol.PNG_SIGNATURE + rng.randbytes(rng.randint(0, 40))
            if rng.random() < 0.7
            else b"GIF89a"
        )
        return [json.dumps(base).encode(), data], rid
    if kind == 9:  # unknown op / version with a readable id
        h = {
            "v": rng.choice([0, 1, 2, 99]),
            "op": rng.choice(["hallo", "generate!", "", "GENERATE"]),
            "id": rid,
        }
        if h["v"] == 1 and h["op"] == "":
            h["op"] = "nope"
        return [json.dumps(h).encode()], rid
    if kind == 10:  # bad ids
        h = {"v": 1, "op": "ping", "id": rng.choice([None, 5, "", "x" * 200, ["f"], {"a": 1}])}
        return [json.dumps(h).encode()], None
    # kind 11: a frame picture sent to a mode that takes none, or bad op arguments
    if rng.random() < 0.5:
        base["frames"] = [{"name": "image", "format": "rgba8", "width": 2, "height": 2}]
        return [json.dumps(base).encode(), b"\0" * 16], rid
    h = {"v": 1, "op": rng.choice(["cancel", "ping", "hello"]), "id": rid}
    h.update(
        rng.choice(
            [{"target": 5}, {"data": 7}, {"client": ["k"]}, {"versions": "1"}, {"target": ""}]
        )
    )
    if h["op"] == "cancel" and "target" not in h:
        h["target"] = 0
    if h["op"] == "ping" and "data" not in h:
        h["data"] = 1
    if h["op"] == "hello" and not ({"client", "versions"} & set(h)):
        h["client"] = 1
    return [json.dumps(h).encode()], rid


@pytest.mark.slow
def test_fuzz_10000_bad_messages_each_answered_and_server_survives(server):
    rng = random.Random(1234)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 30_000
    s.sndhwm = s.rcvhwm = 0
    s.connect(server.address)
    n, batch = 10_000, 500
    expected: dict[str, int] = {}
    replies, anonymous = {}, 0
    try:
        for start in range(0, n, batch):
            for i in range(start, start + batch):
                frames, rid = _bad_message(rng, i)
                if rid is not None:
                    expected[rid] = i
                s.send_multipart(frames)
            for _ in range(batch):
                ev = protocol.decode_event(s.recv_multipart())
                assert ev.event == "error", ev.header
                assert ev.code in protocol.ERROR_CODES and ev.message
                if ev.id is None:
                    anonymous += 1
                else:
                    assert ev.id not in replies, f"two answers for {ev.id}"
                    replies[ev.id] = ev
    finally:
        s.close()
    assert len(replies) + anonymous == n  # every message got exactly one error
    assert set(replies) == set(expected)  # every message with an id got its error
    codes = {ev.code for ev in replies.values()}
    assert {"bad_field", "bad_frames", "bad_version", "unknown_op", "too_large"} <= codes
    assert server.running
    with Client(server.address, timeout=600) as c:
        assert c.txt2img(PROMPT, **FAST)[0].size == (64, 64)


# ---------------------------------------------------------------------------- load


@pytest.mark.slow
def test_load_8_clients_25_requests_each_all_delivered_to_the_right_client(server):
    n_clients, per_client = 8, 25
    outcomes: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(ci: int) -> None:
        got = []
        try:
            transport = "zmtp" if ci % 2 else "zmq"
            with Client(server.address, transport=transport, timeout=600) as c:
                pending = []
                for j in range(per_client):
                    seed = ci * 1000 + j
                    pending.append((seed, c.submit(prompt=f"{PROMPT} {ci}", seed=seed, **FAST)))
                    if len(pending) >= 4:
                        seed0, job = pending.pop(0)
                        got.append((seed0, job.result()))
                for seed0, job in pending:
                    got.append((seed0, job.result()))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        outcomes[ci] = got

    threads = [threading.Thread(target=run, args=(ci,)) for ci in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors
    total = 0
    for ci, got in outcomes.items():
        assert len(got) == per_client
        for seed, result in got:
            total += 1
            assert result.seeds == [seed]
            assert result.request.prompt == f"{PROMPT} {ci}"
            assert result[0].size == (64, 64)
    assert total == n_clients * per_client


# ---------------------------------------------------------------------------- faults

_KILLED_CLIENT = r"""
import sys
from sdkit.bridge import Client
c = Client(sys.argv[1], transport="zmtp")
job = c.submit(prompt="a red circle on a blue background", num_inference_steps=1000, width=64, height=64)
while job.progress is None:
    c.pump(0.05)
print("running", flush=True)
while True:
    c.pump(0.5)
"""


def test_client_killed_mid_job_does_not_hold_the_server(server, bridge_engine):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, server.address], stdout=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 600)  # never hang the suite
        assert ready and proc.stdout.readline().strip() == "running"
        running = bridge_engine.current_job
        assert running is not None and running.request.num_inference_steps == 1000
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with Client(server.address, timeout=300) as c:
            r = c.txt2img(PROMPT, **FAST)  # served although the dead client's job was queued first
            assert r[0].size == (64, 64)
        assert running.state == "cancelled"
        assert server.server.stats["clients_gone"] >= 1
    finally:
        if proc.poll() is None:
            proc.kill()


def test_client_gone_with_queued_jobs_is_cleaned_up(server, bridge_engine):
    c = Client(server.address, transport="zmq", timeout=600)
    blocker = c.submit(prompt=PROMPT, num_inference_steps=1000, width=64, height=64)
    waiting = [c.submit(prompt=PROMPT, **FAST) for _ in range(3)]
    _wait(lambda: all(j.job_id for j in waiting), 300, "accepted", c.pump)
    c._transport.close()  # vanish without a bye
    _wait(
        lambda: bridge_engine.queue_length() == 0 and bridge_engine.current_job is None,
        120,
        "cleanup",
    )
    assert server.server.stats["clients_gone"] >= 1
    assert blocker.job_id is not None


@pytest.mark.parametrize("transport", ["zmq", "zmtp"])
def test_server_restart_mid_session(bridge_engine, transport):
    first = serve(bridge_engine, "tcp://127.0.0.1:0")
    address = first.address
    c = Client(address, transport=transport, timeout=600)
    try:
        assert c.txt2img(PROMPT, **FAST)[0].size == (64, 64)
        job = c.submit(prompt=PROMPT, num_inference_steps=1000, width=64, height=64)
        _wait(lambda: job.progress is not None, 300, "the long job to run", c.pump)
        first.stop(notify=False)  # like a crash: nobody tells the client
        with pytest.raises(BridgeError) as e:
            job.result(300)  # a clear error, never a hang
        assert e.value.code == "connection_lost" and "restart" in e.value.message
        second = serve(bridge_engine, address)
        try:
            assert c.txt2img(PROMPT, **FAST)[0].size == (64, 64)  # reconnected by itself
            job = c.submit(prompt=PROMPT, num_inference_steps=1000, width=64, height=64)
            _wait(lambda: job.progress is not None, 300, "the long job to run", c.pump)
            second.stop()  # a clean stop tells the client
            with pytest.raises(BridgeError) as e:
                job.result(300)
            assert e.value.code in ("shutdown", "connection_lost")
        finally:
            second.stop()
    finally:
        first.stop()
        c.close()


class _Relay:
    """A TCP relay between client and server whose client side can be cut while the server
    side stays open, so the server does not notice that the client's connection is gone."""

    def __init__(self, upstream: str):
        import socket

        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self.downstream: list = []
        self.upstream: list = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self._closed:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self._upstream)
            self.downstream.append(down)
            self.upstream.append(up)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return  # the other side stays open: the server is never told
            try:
                dst.sendall(data)
            except OSError:
                pass  # the cut client side: drop what the server says

    def cut_clients(self) -> None:
        """Close every client-side connection; the server-side ones stay open and silent."""
        import socket

        for down in self.downstream:
            try:
                down.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            down.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self.downstream + self.upstream:
            sock.close()


@pytest.mark.parametrize("transport", ["zmq", "zmtp"])
def test_a_dropped_connection_the_server_has_not_noticed_is_replaced_under_a_new_id(
    server, transport
):
    """With ROUTER_HANDOVER off, the server ignores a connection presenting a routing id
    it still holds; the client must therefore reconnect under a fresh id, or it is deaf
    until the server's heartbeat (30 s) times the old connection out."""
    relay = _Relay(server.address)
    c = Client(relay.address, transport=transport, timeout=60)
    try:
        assert c.hello()["versions"] == [1]
        before = server.server.stats.get("clients_gone", 0)
        relay.cut_clients()
        _wait(lambda: len(relay.upstream) >= 2, 10, "the client to reconnect", c.pump)
        deadline = time.monotonic() + 10
        while True:  # hello answered on the new connection, well before 30 s
            try:
                assert c.hello(timeout=1)["versions"] == [1]
                break
            except BridgeTimeout:
                assert time.monotonic() < deadline, "the reconnected client was ignored"
        assert server.server.stats.get("clients_gone", 0) == before  # not noticed
        assert c.txt2img(PROMPT, **FAST)[0].size == (64, 64)
    finally:
        c.close()
        relay.close()


def test_request_to_a_server_that_never_answers_times_out():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with Client(f"tcp://127.0.0.1:{port}", transport="zmtp", timeout=0.5) as c:
        with pytest.raises(BridgeTimeout):
            c.txt2img(PROMPT)
        with pytest.raises(BridgeTimeout):
            c.hello(timeout=0.3)


# ---------------------------------------------------------------------------- security


def test_non_loopback_bind_without_keys_is_refused(bridge_engine):
    with pytest.raises(SecurityError, match="sdkit keys"):
        serve(bridge_engine, "tcp://0.0.0.0:0")
    with pytest.raises(SecurityError):
        serve(bridge_engine, "tcp://*:0")
    from sdkit.bridge.cli import main

    assert main(["serve", "--bind", "tcp://0.0.0.0:5599"]) == 2


def test_curve_known_key_works_unknown_key_gets_nothing(bridge_engine, tmp_path):
    good, bad = tmp_path / "keys", tmp_path / "intruder"
    create_keys(good, "alice")
    create_keys(bad, "mallory")
    shutil.copy(good / "server.key", bad / "server.key")  # knows the server, not authorized
    handle = serve(bridge_engine, "tcp://0.0.0.0:0", keys=good)  # off loopback: keys required
    try:
        port = handle.address.rsplit(":", 1)[1]
        address = f"tcp://127.0.0.1:{port}"
        with Client(address, keys=good, client_name="alice", timeout=600) as c:
            assert c.hello()["versions"] == [1]
            assert c.txt2img(PROMPT, **FAST)[0].size == (64, 64)
        _wait(lambda: handle.server.stats["messages"] >= 3, 60, "alice's hello, generate, bye")
        seen = handle.server.stats["messages"]
        with Client(address, keys=bad, client_name="mallory") as c:
            with pytest.raises(BridgeTimeout):
                c.hello(timeout=2)
        # The ZAP handler refused mallory's handshake, so libzmq passes none of its messages.
        _wait(lambda: handle.server._auth.refused >= 1, 30, "the refusal of mallory's key")
        with Client(address, transport="zmtp") as c:  # no CURVE at all: the cause is raised
            with pytest.raises(BridgeError, match="CURVE"):
                c.hello(timeout=2)
        # An authorized round trip after theirs: when its reply arrives the server has read
        # everything sent before it, and the only new message it counted is that ping.
        with Client(address, keys=good, client_name="alice") as c:
            c.ping(timeout=60)
            assert handle.server.stats["messages"] == seen + 1  # nothing of theirs
    finally:
        handle.stop()


def test_keys_command_creates_an_authorized_pair(tmp_path, capsys):
    from sdkit.bridge.cli import main
    from sdkit.bridge.security import load_client_keys, load_server_keys

    assert main(["keys", str(tmp_path / "k")]) == 0
    assert main(["keys", str(tmp_path / "k"), "--client", "gimp"]) == 0
    server = load_server_keys(tmp_path / "k")
    assert sorted(p.name for p in server.authorized.glob("*.key")) == ["client.key", "gimp.key"]
    for name in ("client", "gimp"):
        assert load_client_keys(tmp_path / "k", name).server_public == server.public
    assert "--keys" in capsys.readouterr().out
    with pytest.raises(SecurityError, match="missing key file"):
        load_server_keys(tmp_path / "nothing")


# ---------------------------------------------------------------------------- issue 13


def _raw(address: str):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 60_000
    s.connect(address)
    return s


def _ask(s, header: dict, *binary: bytes) -> protocol.Event:
    s.send_multipart([json.dumps(header).encode(), *binary])
    return protocol.decode_event(s.recv_multipart())


def test_any_exception_on_one_message_is_an_error_reply_and_the_loop_goes_on(
    server, bridge_engine, monkeypatch
):
    """Finding 1: a frame name that is a list killed the loop; now every failure is answered."""
    s = _raw(server.address)
    try:
        bomb = {
            "v": 1,
            "op": "generate",
            "id": "n1",
            "request": {"mode": "img2img", "prompt": "x"},
            "frames": [{"name": [0, True], "format": "l8", "width": 8, "height": 8}],
        }
        ev = _ask(s, bomb, b"\0" * 64)
        assert (ev.id, ev.code, ev.field) == ("n1", "bad_field", "frames[0].name")
        from sdkit.bridge import server as server_module

        real = server_module.decode_request

        def broken(frames, limits=None):  # a decoder bug: not a ProtocolError
            if b"boom" in bytes(frames[0]):
                raise TypeError("unhashable type: 'list'")
            return real(frames, limits)

        monkeypatch.setattr(server_module, "decode_request", broken)
        ev = _ask(s, {"v": 1, "op": "ping", "id": "boom"})
        assert (ev.id, ev.code) == ("boom", "internal")
        monkeypatch.setattr(type(bridge_engine), "info", lambda self: 1 / 0)
        ev = _ask(s, {"v": 1, "op": "hello", "id": "h1"})  # a handler bug
        assert (ev.id, ev.code) == ("h1", "internal")
        monkeypatch.undo()
        assert _ask(s, {"v": 1, "op": "ping", "id": "p1"}).event == "pong"
        assert server.running
    finally:
        s.close()


_HOSTILE_VALUES = [
    ("grow", 3000),
    ("grow", 10**30),
    ("mask_blur", 10**9),
    ("padding", 2**70),
    ("seed", 2**70),
    ("num_inference_steps", 10**30),
    ("guidance_scale", 1e308),
    ("strength", -0.5),
    ("width", 2**64),
    ("num_images", 2**40),
]


def test_hostile_values_are_bad_field_replies_never_failed_or_internal(server):
    """Finding 2: huge or out-of-range values never reach the engine."""
    s = _raw(server.address)
    try:
        for i, (name, value) in enumerate(_HOSTILE_VALUES):
            request = {"mode": "inpaint", "prompt": "x", "num_inference_steps": 1, name: value}
            header = {
                "v": 1,
                "op": "generate",
                "id": f"h{i}",
                "request": request,
                "frames": [
                    {"name": "image", "format": "rgba8", "width": 64, "height": 64},
                    {"name": "mask", "format": "l8", "width": 64, "height": 64},
                ],
            }
            ev = _ask(s, header, b"\x80" * 64 * 64 * 4, b"\xff" * 64 * 64)
            assert ev.event == "error", (name, value, ev.header)
            assert ev.code in ("bad_field", "too_large"), (name, value, ev.header)
            assert ev.field == f"request.{name}", (name, value, ev.header)
    finally:
        s.close()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height: signature and IHDR, no pixels (a bomb's head)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        protocol.PNG_SIGNATURE
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def test_limits_apply_to_the_request_as_it_will_run(server, bridge_engine):
    """Finding 3: no width/height given; the size comes from the image, then the limits hold."""
    import io

    from PIL import Image

    s = _raw(server.address)
    small = serve(
        bridge_engine,
        "tcp://127.0.0.1:0",
        limits=protocol.Limits(max_pixels=256 * 256, max_steps=10, max_images=2),
    )
    t = _raw(small.address)
    try:
        buf = io.BytesIO()
        Image.new("RGB", (2048, 2048)).save(buf, format="PNG")  # a few KB, 4 Mpx
        png = buf.getvalue()
        header = {
            "v": 1,
            "op": "generate",
            "id": "big",
            "request": {"mode": "img2img", "prompt": "x", "num_images": 16},
            "frames": [{"name": "image", "format": "png", "width": 2048, "height": 2048}],
        }
        ev = _ask(s, header, png)  # core's own limit (16 Mpx per job) refuses it
        assert (ev.id, ev.field) == ("big", "request.num_images"), ev.header
        assert ev.code in ("bad_field", "too_large")
        buf = io.BytesIO()
        Image.new("RGB", (256, 256)).save(buf, format="PNG")
        header["frames"] = [{"name": "image", "format": "png", "width": 256, "height": 256}]
        header["request"] = {"mode": "img2img", "prompt": "x", "num_inference_steps": 5}
        header["request"]["num_images"] = 2
        ev = _ask(t, header, buf.getvalue())  # a server with lower limits: its own rule
        assert (ev.code, ev.field) == ("too_large", "request.num_images"), ev.header
        assert "2 x 256x256" in ev.message
        header["request"] = {"prompt": "x", "num_inference_steps": 11, "width": 64, "height": 64}
        del header["frames"]
        ev = _ask(t, header)
        assert (ev.code, ev.field) == ("too_large", "request.num_inference_steps")
        header["request"] = {"prompt": "x", "num_images": 3, "width": 64, "height": 64}
        assert _ask(t, header).field == "request.num_images"
        bomb = {**header, "id": "bomb", "request": {"mode": "img2img", "prompt": "x"}}
        bomb["frames"] = [{"name": "image", "format": "png", "width": 64, "height": 64}]
        ev = _ask(s, bomb, _png_header_only(100_000, 100_000))  # refused from its header
        assert (ev.id, ev.code) == ("bomb", "too_large"), ev.header
    finally:
        s.close()
        t.close()
        small.stop()


def test_the_pixel_limit_counts_the_hires_fix_target(bridge_engine):
    """A hires job makes images at the target size: the server's limit must count that one,
    not the first pass's (64x64 passed a 100x100 limit and then drew 128x128)."""
    small = serve(bridge_engine, "tcp://127.0.0.1:0", limits=protocol.Limits(max_pixels=100 * 100))
    t = _raw(small.address)
    try:
        header = {
            "v": 1,
            "op": "generate",
            "id": "hires",
            "request": {"prompt": "x", "width": 64, "height": 64, "hires_scale": 2},
        }
        ev = _ask(t, header)
        assert (ev.id, ev.code, ev.field) == ("hires", "too_large", "request.hires_scale")
        assert "128x128" in ev.message
    finally:
        t.close()
        small.stop()


def test_an_oversized_header_gets_too_large_with_its_id(server):
    """Finding 7: the id was null, so the sender could not match the error and hung."""
    s = _raw(server.address)
    try:
        ev = _ask(s, {"v": 1, "op": "generate", "id": "g70", "request": {"prompt": "x" * 70_000}})
        assert (ev.id, ev.code) == ("g70", "too_large")
    finally:
        s.close()


def test_every_request_field_in_every_wrong_shape_is_answered_never_internal(server):
    """Finding 1/2 at the server: any shape in any Request field is a clear reply."""
    import dataclasses

    from sdkit.request import Request

    shapes = ([0, True], {"a": [1]}, 2**70, -(2**70), 1e308, -1.5, "x" * 300, "", None, True)
    s = _raw(server.address)
    accepted = []
    try:
        n = 0
        for f in dataclasses.fields(Request):
            if f.name in ("image", "mask"):
                continue
            for shape in shapes:
                n += 1
                request = {"prompt": "x", "num_inference_steps": 1, "width": 64, "height": 64}
                request[f.name] = shape
                ev = _ask(s, {"v": 1, "op": "generate", "id": f"w{n}", "request": request})
                while ev.id in accepted:  # events of a job accepted earlier
                    ev = protocol.decode_event(s.recv_multipart())
                assert ev.id == f"w{n}", ev.header
                if ev.event == "accepted":  # a shape that happens to be valid (e.g. seed 0)
                    accepted.append(ev.id)
                    continue
                assert ev.event == "error" and ev.code not in ("internal", "failed"), (
                    f.name,
                    shape,
                    ev.header,
                )
        assert len(accepted) < n // 2, accepted
        s.send_multipart([b'{"v":1,"op":"bye","id":"bye"}'])  # cancels what still runs
        assert server.running
    finally:
        s.close()
