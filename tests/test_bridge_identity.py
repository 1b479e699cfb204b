"""Issue 13, finding 6: a job belongs to the connection (and key) that submitted it.

A second connection presenting another client's routing id must neither receive that
client's events nor control its jobs, with NULL on loopback and with CURVE (where the
intruder holds a different, authorized key).
"""

from __future__ import annotations

import json
import os
import time

import pytest

zmq = pytest.importorskip("zmq")

from sdkit.bridge import protocol, serve  # noqa: E402
from sdkit.bridge.security import create_keys, load_client_keys  # noqa: E402

PROMPT = "a red circle on a blue background"
LONG = {"prompt": PROMPT, "num_inference_steps": 1000, "width": 64, "height": 64}
ROUTING_ID = b"victim-0123456789abcdef"


@pytest.fixture(scope="module")
def bridge_engine():
    import sdkit

    return sdkit.load(os.environ.get("SDKIT_TEST_MODEL") or None)


class Peer:
    """A raw pyzmq DEALER with a chosen routing id (and optionally CURVE keys)."""

    def __init__(self, address: str, routing_id: bytes, keys=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.routing_id = routing_id
        if keys is not None:
            from sdkit.bridge import security

            security.apply_client(self.sock, keys)
        self.sock.connect(address)
        self.events: list[protocol.Event] = []

    def send(self, op: str, rid: str, **fields) -> None:
        self.sock.send_multipart(protocol.request_frames(op, rid, **fields))

    def pump(self, timeout: float = 0.05) -> list[protocol.Event]:
        got = []
        if self.sock.poll(int(timeout * 1000)):
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got.append(protocol.decode_event(frames))
        self.events.extend(got)
        return got

    def wait_for(self, cond, timeout: float, what: str) -> protocol.Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.pump(0.05):
                if cond(ev):
                    return ev
        raise AssertionError(f"timed out waiting for {what}; got {[e.header for e in self.events]}")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _mentions(ev: protocol.Event, rid: str) -> bool:
    return ev.id == rid or rid in json.dumps(ev.header)


def _takeover(address: str, victim_keys=None, intruder_keys=None) -> None:
    """The victim runs a long job; an intruder connects with the victim's routing id."""
    victim = Peer(address, ROUTING_ID, victim_keys)
    intruder = None
    try:
        victim.send("generate", "job-1", request=LONG)
        victim.wait_for(lambda e: e.event == "progress" and e.id == "job-1", 300, "progress")
        intruder = Peer(address, ROUTING_ID, intruder_keys)
        intruder.send("cancel", "c-1", target="job-1")
        intruder.send("status", "s-1")
        # The victim keeps getting its progress (five more steps) after the intruder came.
        steps_before = max(e.header["step"] for e in victim.events if e.event == "progress")
        victim.wait_for(
            lambda e: e.event == "progress" and e.header["step"] >= steps_before + 5,
            120,
            "the victim's progress to go on after the intruder connected",
        )
        intruder.pump(0.5)
        leaked = [e.header for e in intruder.events if _mentions(e, "job-1")]
        assert not leaked, f"the intruder saw the victim's job: {leaked}"
        assert not any(e.event == "error" and e.id == "job-1" for e in victim.events)
        # The rightful owner still controls its job.
        victim.send("cancel", "c-2", target="job-1")
        ev = victim.wait_for(lambda e: e.id == "job-1" and e.event == "error", 120, "cancelled")
        assert ev.code == "cancelled" and ev.message == "cancelled by the client"
        intruder.pump(0.2)
        assert not [e.header for e in intruder.events if _mentions(e, "job-1")]
    finally:
        victim.close()
        if intruder is not None:
            intruder.close()


def test_null_second_connection_with_the_same_routing_id_gets_nothing(bridge_engine):
    handle = serve(bridge_engine, "tcp://127.0.0.1:0")
    try:
        _takeover(handle.address)
    finally:
        handle.stop()


def test_curve_another_key_with_the_same_routing_id_gets_nothing(bridge_engine, tmp_path):
    keys = tmp_path / "keys"
    create_keys(keys, "alice")
    create_keys(keys, "mallory")  # also authorized: a legitimate user of the same server
    handle = serve(bridge_engine, "tcp://127.0.0.1:0", keys=keys)
    try:
        _takeover(
            handle.address, load_client_keys(keys, "alice"), load_client_keys(keys, "mallory")
        )
    finally:
        handle.stop()


def _reconnect_until_heard(address: str, routing_id: bytes, timeout: float) -> Peer:
    """A new connection with ``routing_id`` that the server answers.

    libzmq ignores a connection whose routing id is still held by an open one (no
    handover), so retry with fresh connections until the old one is gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        peer = Peer(address, routing_id)
        peer.send("status", "s-1")
        try:
            peer.wait_for(lambda e: e.event == "status", 1.0, "status")
            return peer
        except AssertionError:
            peer.close()
            if time.monotonic() > deadline:
                raise


def test_routing_id_reused_after_the_owner_left_does_not_inherit_its_jobs(bridge_engine):
    # A long probe interval: the server must not learn of the departure from a failed send.
    handle = serve(bridge_engine, "tcp://127.0.0.1:0", probe_interval=60)
    blocker = Peer(handle.address, b"blocker-connection-0001")
    try:
        blocker.send("generate", "b-1", request=LONG)  # keeps the victim's job queued
        blocker.wait_for(lambda e: e.event == "progress", 300, "the blocker to run")
        victim = Peer(handle.address, ROUTING_ID)
        victim.send("generate", "job-1", request=LONG)
        victim.wait_for(lambda e: e.event == "accepted", 60, "accepted")
        victim.close()  # gone without a bye; its id is free again
        assert handle.server.stats["clients_gone"] == 0  # the server has not noticed
        newcomer = _reconnect_until_heard(handle.address, ROUTING_ID, 60)
        try:
            st = next(e for e in newcomer.events if e.event == "status")
            assert "job-1" not in st.header["jobs"]
            newcomer.send("cancel", "c-1", target="job-1")
            ev = newcomer.wait_for(lambda e: e.event == "cancel", 60, "cancel reply")
            assert ev.header["found"] is False
            assert not [e.header for e in newcomer.events if e.id == "job-1"]
            # The orphaned job was cancelled when the newcomer spoke, not left to run.
            assert handle.server.stats["clients_gone"] == 1
        finally:
            newcomer.close()
    finally:
        blocker.send("cancel", "c-b", target="b-1")
        blocker.wait_for(lambda e: e.id == "b-1" and e.event == "error", 120, "blocker cancelled")
        blocker.close()
        handle.stop()


def test_curve_user_id_names_the_key(bridge_engine, tmp_path):
    """The server sees each message's authenticated key (what jobs are bound to)."""
    keys = tmp_path / "keys"
    create_keys(keys, "alice")
    handle = serve(bridge_engine, "tcp://127.0.0.1:0", keys=keys)
    alice = load_client_keys(keys, "alice")
    peer = Peer(handle.address, b"alice-1", alice)
    try:
        peer.send("ping", "p-1")
        peer.wait_for(lambda e: e.event == "pong", 60, "pong")
        ident = handle.server._clients.identity(b"alice-1")
        assert ident == "curve:" + alice.public.decode()  # z85, as in the key files
    finally:
        peer.close()
        handle.stop()
