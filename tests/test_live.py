"""Live painting (issue 16): queue policies in the engine, the live preset, the prompt cache.

Real tiny pipelines; a UNet pre-hook holds the worker where a test needs the queue to fill
(no sleeps: every wait is on an event with a timeout).
"""

from __future__ import annotations

import contextlib
import threading

import pytest

from sdkit.engine import JobCancelled
from sdkit.jobs import QueuePolicy
from sdkit.request import Request, RequestError

PROMPT = "a red circle on a blue background"


def req(steps: int = 2, **fields) -> Request:
    return Request(prompt=PROMPT, num_inference_steps=steps, scheduler="Euler", **fields)


@contextlib.contextmanager
def held(engine, at_call: int = 1):
    """Blocks the worker inside its `at_call`-th UNet call until the block exits;
    yields the event set once the worker is held."""
    gate, holding = threading.Event(), threading.Event()
    calls = [0]

    def hold(module, args):
        calls[0] += 1
        if calls[0] == at_call:
            holding.set()
            assert gate.wait(60)

    handle = engine.pipeline("txt2img").unet.register_forward_pre_hook(hold)
    try:
        yield holding
    finally:
        gate.set()
        handle.remove()


def starts(jobs) -> list[str]:
    """Ids of `jobs` in the order they start (filled by callbacks as they run)."""
    order: list[str] = []
    for j in jobs:
        j.add_callback(lambda kind, job, ev: order.append(job.id) if kind == "started" else None)
    return order


def test_policy_is_typed_and_unknown_policy_names_the_field(sd_engine):
    assert QueuePolicy("replace") is QueuePolicy.REPLACE and QueuePolicy.FRONT == "front"
    with pytest.raises(RequestError) as e:
        sd_engine.submit(req(), policy="sideways")
    assert e.value.field == "policy" and "replace" in e.value.message
    with pytest.raises(RequestError) as e:
        sd_engine.submit(req(), policy="replace")  # replace needs a source
    assert e.value.field == "source"
    with pytest.raises(RequestError) as e:
        sd_engine.submit(req(), policy="replace", source=["not", "hashable"])
    assert e.value.field == "source"


def test_replace_supersedes_the_waiting_job_which_never_runs(sd_engine):
    with held(sd_engine) as holding:
        blocker = sd_engine.submit(req())
        assert holding.wait(60)
        old = sd_engine.submit(req(), policy="replace", source="live-1")
        other = sd_engine.submit(req())  # another caller's job, behind `old`
        new = sd_engine.submit(req(seed=5), policy="replace", source="live-1")
        order = starts([old, other, new])
        assert old.state == "cancelled" and old.superseded and old.done()
        assert not new.superseded and sd_engine.queue_length() == 2  # other + new
    new.result(timeout=120)
    other.result(timeout=120)
    blocker.result(timeout=120)
    assert other.wait_delivered(30) and new.wait_delivered(30)
    with pytest.raises(JobCancelled):
        old.result(timeout=1)
    assert old.started_at is None and old.id not in order
    assert order == [new.id, other.id]  # the new job took the superseded one's place


def test_replace_stops_the_running_job_within_one_step(sd_engine):
    steps: list[int] = []
    with held(sd_engine, at_call=3) as holding:  # the worker is inside step 3's UNet call
        old = sd_engine.submit(
            req(200),
            policy="replace",
            source="live-2",
            callback=lambda kind, job, ev: steps.append(ev.step) if kind == "progress" else None,
        )
        assert holding.wait(60)
        new = sd_engine.submit(req(seed=9), policy="replace", source="live-2")
        assert old.superseded and old.cancel_requested
    new.result(timeout=120)
    with pytest.raises(JobCancelled):
        old.result(timeout=1)
    assert old.wait_delivered(30)
    assert steps == [1, 2]  # step 3 was under way when it was superseded: it never finished


def test_front_goes_ahead_of_waiting_jobs_in_order(sd_engine):
    with held(sd_engine) as holding:
        blocker = sd_engine.submit(req())
        assert holding.wait(60)
        b1 = sd_engine.submit(req())
        b2 = sd_engine.submit(req(), policy="back")
        f1 = sd_engine.submit(req(), policy="front")
        f2 = sd_engine.submit(req(), policy=QueuePolicy.FRONT)
        order = starts([b1, b2, f1, f2])
    for j in (blocker, b1, b2, f1, f2):
        j.result(timeout=120)
    assert b2.wait_delivered(30)
    assert order == [f1.id, f2.id, b1.id, b2.id]


def test_results_of_one_source_never_arrive_older_after_newer(sd_engine):
    """A stream of replace submits while the worker runs: the results that arrive are in
    submit order, every job ends, and the newest always completes."""
    arrived: list[int] = []
    lock = threading.Lock()
    jobs = []

    def listener(index):
        def on(kind, job, ev):
            if kind == "done":
                with lock:
                    arrived.append(index)

        return on

    for i in range(12):
        jobs.append(
            sd_engine.submit(req(3), policy="replace", source="live-3", callback=listener(i))
        )
    jobs[-1].result(timeout=120)
    for j in jobs:
        assert j.wait_delivered(60)
        assert j.state in ("done", "cancelled")
        assert j.superseded == (j.state == "cancelled")
    assert arrived == sorted(arrived) and arrived[-1] == 11


def test_a_burst_of_1000_replace_submits_keeps_one_job_waiting(sd_engine):
    with held(sd_engine) as holding:
        blocker = sd_engine.submit(req())
        assert holding.wait(60)
        jobs = [
            sd_engine.submit(req(1), policy="replace", source="live-4", preview_every=0)
            for _ in range(1000)
        ]
        assert sd_engine.queue_length() == 1
        assert len(sd_engine._queue._pending) == 1  # superseded jobs do not pile up
        assert sum(j.superseded for j in jobs) == 999
    jobs[-1].result(timeout=120)
    blocker.result(timeout=120)
    assert all(j.state == "cancelled" for j in jobs[:-1])
    assert sd_engine._queue._newest.get("live-4") is None  # forgotten once it ran


# ---------------------------------------------------------------------------- the bridge


def _entry(client: bytes, seq: int):
    from sdkit.bridge.clients import Entry

    return Entry(client, f"{client.decode()}{seq}", f"j{seq}", None, "engine", 0, "rgba8", seq)


def test_fair_queue_front_moves_within_its_client_only():
    from sdkit.bridge.dispatch import FairQueue

    q = FairQueue()
    a1, a2, b1, a3 = _entry(b"a", 1), _entry(b"a", 2), _entry(b"b", 3), _entry(b"a", 4)
    for e in (a1, a2, b1):
        q.push(e)
    q.push(a3, front=True)  # ahead of a's own entries, never ahead of b's turn
    assert [e.rid for e in q] == ["a4", "b3", "a1", "a2"]
    a5 = _entry(b"a", 5)
    assert q.take_place(a1, a5) and not q.take_place(a1, a5)  # a replace keeps a1's place
    assert [e.rid for e in q] == ["a4", "b3", "a5", "a2"]
    assert [q.pop().rid for _ in range(4)] == ["a4", "b3", "a5", "a2"] and q.pop() is None


@pytest.fixture
def server(sd_engine):
    pytest.importorskip("zmq")
    from sdkit.bridge import serve

    handle = serve(sd_engine, "tcp://127.0.0.1:0")
    yield handle
    handle.stop()


def _until(client, cond, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        client.pump(0.02)


def test_bridge_replace_per_request_with_fairness_between_clients(server, sd_engine):
    """Over real sockets: client a's live stream supersedes its own requests (queued ones
    never run, the running one stops); client b's normal job still gets its turn, ahead
    of a's second normal job (round robin; first in, first out would put it last)."""
    from sdkit.bridge import Client
    from sdkit.bridge.client import BridgeError

    fast = {"prompt": PROMPT, "num_inference_steps": 2, "scheduler": "Euler"}
    started: list[int] = []
    unsubscribe = sd_engine.subscribe(
        lambda kind, job, ev: started.append(job.request.seed) if kind == "started" else None
    )
    try:
        with Client(server.address, timeout=300) as a, Client(server.address, timeout=300) as b:
            with held(sd_engine) as holding:
                blocker = a.submit(**fast, seed=1000)
                assert holding.wait(60)
                live = [a.submit(**fast, seed=i, policy="replace", stream="s") for i in range(5)]
                others = [a.submit(**fast, seed=50), a.submit(**fast, seed=51)]
                _until(a, lambda: all(j.job_id or j.done() for j in [*live, *others]))
                single = b.submit(**fast, seed=99)
                _until(b, lambda: single.job_id is not None)
            for job in live[:-1]:
                with pytest.raises(BridgeError) as e:
                    job.result(300)
                assert e.value.code == "cancelled" and job.track.superseded
            final = live[-1].result(300)
            for job in (blocker, single, *others):
                job.result(300)
            assert not set(range(4)) & set(started)  # superseded while waiting: never ran
            assert started.index(99) < started.index(51), started
            # the live frame equals a plain run of the same request
            assert final[0].tobytes() == a.generate(**fast, seed=4)[0].tobytes()

            # a running stream request stops when a newer one of its stream arrives
            slow = a.submit(**{**fast, "num_inference_steps": 1000}, policy="replace", stream="s")
            _until(a, lambda: slow.progress is not None)
            newer = a.submit(**fast, seed=7, policy="replace", stream="s")
            with pytest.raises(BridgeError) as e:
                slow.result(300)
            assert e.value.code == "cancelled" and slow.track.superseded
            assert slow.progress.step < 1000
            newer.result(300)
    finally:
        unsubscribe()


def test_bridge_unknown_policy_is_an_error_naming_it(server):
    import json

    import zmq
    from sdkit.bridge import Client, protocol
    from sdkit.bridge.client import BridgeError

    with Client(server.address, timeout=60) as a:
        with pytest.raises(BridgeError) as e:
            a.submit(prompt=PROMPT, policy="sideways")  # refused before sending
        assert e.value.field == "policy"
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger, s.rcvtimeo = 0, 30_000
    s.connect(server.address)
    try:
        for rid, extra in (("p1", {"policy": "sideways"}), ("p2", {"stream": 7})):
            hdr = {"v": 1, "op": "generate", "id": rid, "request": {"prompt": PROMPT}, **extra}
            s.send_multipart([json.dumps(hdr).encode()])
            ev = protocol.decode_event(s.recv_multipart())
            assert (ev.id, ev.code, ev.field) == (rid, "bad_field", next(iter(extra)))
    finally:
        s.close()


# ---------------------------------------------------------------------------- prompt cache


@pytest.fixture(scope="module")
def lora_engine(tiny_models, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from test_lora import kohya_lora

    from sdkit.engine import Engine

    folder = tmp_path_factory.mktemp("live-loras")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    kohya_lora(pipe, folder / "style.safetensors", seed=1)  # text encoder and UNet
    engine = Engine(tiny_models["sd"], device="cpu", lora_dirs=[folder])
    yield engine
    engine.close()


def _pixels(engine, *, cached: bool = True, prompt: str = PROMPT, **fields):
    import numpy as np

    engine.prompt_cache.enabled = cached
    try:
        result = engine.txt2img(prompt, progress=False, num_inference_steps=2, seed=3, **fields)
    finally:
        engine.prompt_cache.enabled = True
    return np.asarray(result.images[0])


@pytest.mark.parametrize("prompt", [PROMPT, "a (red:1.3) circle [on:under:1] a blue background"])
def test_prompt_cache_hits_are_bit_identical_to_encoding_again(lora_engine, prompt):
    cache = lora_engine.prompt_cache
    cache.clear()
    first = _pixels(lora_engine, prompt=prompt)
    hits = cache.hits
    again = _pixels(lora_engine, prompt=prompt)
    assert cache.hits == hits + 1
    fresh = _pixels(lora_engine, cached=False, prompt=prompt)
    assert (first == again).all() and (again == fresh).all()


def test_prompt_cache_follows_loras_and_clip_skip(lora_engine):
    """Each cached run equals an uncached one, in a sequence where a key that missed the
    LoRA state or clip skip would hand back the previous encoding."""
    style = {"name": "style", "weight": 0.8}
    sequence = [{}, {"loras": [style]}, {"loras": [{**style, "weight": 1.5}]}, {}]
    sequence += [{"clip_skip": 2}, {}, {"prompt": f"<lora:style:0.8> {PROMPT}"}]
    runs = []
    for fields in sequence:
        cached = _pixels(lora_engine, **fields)
        assert (cached == _pixels(lora_engine, cached=False, **fields)).all(), fields
        runs.append(cached)
    assert not (runs[0] == runs[1]).all() and not (runs[1] == runs[2]).all()
    assert not (runs[0] == runs[4]).all() and (runs[0] == runs[3]).all()
    assert (runs[1] == runs[6]).all()  # a tag and the field are the same LoRA


def test_the_protocol_lists_the_engine_policies_and_the_live_preset_runs(sd_engine):
    from sdkit.bridge import protocol

    from sdkit.live import LIVE_DEFAULTS, LIVE_POLICY, live_request

    assert protocol.QUEUE_POLICIES == tuple(p.value for p in QueuePolicy)
    assert QueuePolicy(LIVE_POLICY) is QueuePolicy.REPLACE
    from PIL import Image

    canvas = Image.new("RGB", (32, 32), "blue")
    req = live_request(canvas, PROMPT, seed=None)
    assert req.mode == "img2img" and req.seed == LIVE_DEFAULTS["seed"]
    assert live_request(canvas, PROMPT, mask=Image.new("L", (32, 32), 255)).mode == "inpaint"
    job = sd_engine.submit(req, policy=LIVE_POLICY, source="live-preset")
    assert job.result(timeout=120).images[0].size == (32, 32)


def test_bridge_burst_of_1000_replace_requests_stays_bounded(server, sd_engine):
    """1000 live frames sent at once (over the client's 8-request limit if they piled up):
    none is refused, every one but the newest few ends superseded, the newest completes."""
    from sdkit.bridge import Client
    from sdkit.bridge.client import BridgeError

    fast = {"prompt": PROMPT, "num_inference_steps": 1, "scheduler": "Euler"}
    with Client(server.address, timeout=300) as a:
        with held(sd_engine) as holding:
            blocker = a.submit(**fast, seed=1)
            assert holding.wait(60)
            jobs = [a.submit(**fast, seed=i, policy="replace", stream="burst") for i in range(1000)]
            _until(a, lambda: jobs[-1].job_id is not None or jobs[-1].done())
            assert a.status()["queue_length"] <= 2
        final = jobs[-1].result(300)
        blocker.result(300)
        codes = []
        for job in jobs[:-1]:
            with pytest.raises(BridgeError) as e:
                job.result(300)
            codes.append((e.value.code, job.track.superseded))
        assert set(codes) == {("cancelled", True)}
        assert final[0].size == (32, 32)
