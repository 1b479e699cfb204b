"""The client-side job tracker (bridge/tracker.py): TrackedJob, Session, limits before sending."""

from __future__ import annotations

import pytest
from sdkit.bridge import protocol as P
from sdkit.bridge import tracker


class Loopback:
    """A transport whose sent frames are kept and whose incoming frames the test writes."""

    def __init__(self):
        self.epoch = 0
        self.sent: list[list] = []
        self.incoming: list[list] = []

    def send_multipart(self, frames):
        self.sent.append(list(frames))

    def poll(self, timeout=0.0):
        out, self.incoming = self.incoming, []
        return out

    def close(self):
        pass


def _ev(event, rid, pictures=(), **fields):
    return P.decode_event(P.event_frames(event, rid, pictures, **fields))


def test_a_job_goes_from_sent_to_done_and_ignores_what_comes_after():
    job = tracker.TrackedJob("r1")
    assert (job.state, job.status, job.fraction) == ("sent", "sent…", 0.0)
    assert not job.apply(_ev("progress", "other", step=1, total=2))
    assert job.apply(_ev("accepted", "r1", position=2, job="j7", request={"mode": "txt2img"}))
    assert (job.state, job.status, job.job) == ("queued", "queued (position 2)", "j7")
    job.apply(_ev("started", "r1"))
    assert (job.state, job.position, job.status) == ("running", 0, "running")
    job.apply(_ev("queued", "r1", position=5))  # a late queue probe never goes backwards
    assert job.state == "running"
    preview = P.Picture(1, 1, "rgba8", b"\x01\x02\x03\xff")
    job.apply(_ev("progress", "r1", [("preview", preview)], step=3, total=4, elapsed=0.5))
    assert (job.step, job.total, job.fraction, job.status) == (3, 4, 0.75, "step 3/4")
    assert job.preview is not None and bytes(job.preview.data) == b"\x01\x02\x03\xff"
    job.apply(_ev("result", "r1", seeds=[9]))
    assert job.done and job.state == "done" and job.fraction == 1.0
    assert not job.apply(_ev("error", "r1", code="failed", message="late"))
    assert job.state == "done" and job.error is None


def test_errors_name_the_field_and_cancel_is_not_a_failure():
    job = tracker.TrackedJob("r1")
    job.apply(_ev("error", "r1", code="bad_field", message="width must be ...", field="width"))
    assert job.state == "failed" and job.error_text == "width must be ... (field width)"
    assert job.status == job.error_text
    cancelled = tracker.TrackedJob("r2")
    cancelled.apply(_ev("error", "r2", code="cancelled", message="cancelled"))
    assert cancelled.state == "cancelled" and cancelled.done


def test_garbage_values_in_events_do_not_break_the_job():
    job = tracker.TrackedJob("r1")
    job.apply(_ev("progress", "r1", step="three", total=None, elapsed="soon"))
    assert (job.state, job.step, job.total, job.elapsed, job.fraction) == (
        "running",
        0,
        0,
        0.0,
        0.0,
    )
    job.apply(_ev("queued", "r1", position=[1]))
    assert job.position == 0  # running: the bad probe is ignored


def test_session_applies_events_to_its_jobs_and_forgets_ended_ones():
    t = Loopback()
    s = tracker.Session(t, client="test")
    rid = s.generate({"prompt": "a red circle"})
    job = s.jobs[rid]
    t.incoming.append(P.event_frames("accepted", rid, position=1))
    t.incoming.append(P.event_frames("progress", rid, step=1, total=2))
    assert [e.event for e in s.poll()] == ["accepted", "progress"]
    assert job.state == "running" and rid in s.jobs
    s.cancel(rid)
    assert job.status == "cancelling…"
    t.incoming.append(P.event_frames("error", rid, code="cancelled", message="cancelled"))
    s.poll()
    assert job.state == "cancelled" and rid not in s.jobs and rid not in s.pending


def test_a_dropped_connection_ends_the_job_as_connection_lost():
    t = Loopback()
    s = tracker.Session(t)
    job = s.jobs[s.generate({"prompt": "x"})]
    t.epoch += 1
    (ev,) = s.poll()
    assert ev.code == "connection_lost" and job.state == "failed"
    assert "connection to the server dropped" in job.error_text
    timed = s.jobs[s.generate({"prompt": "y"}, timeout=0.0)]
    s.poll()
    assert timed.state == "failed" and timed.error.code == "timeout"


def test_limits_come_from_hello_and_are_checked_before_sending():
    t = Loopback()
    s = tracker.Session(t)
    assert s.limits is None
    s.generate({"prompt": "x" * 100_000})  # no hello yet: nothing to check against
    h = s.hello()
    limits = {"max_header_bytes": 1000, "max_pixels": 64 * 64, "max_frames": 3}
    t.incoming.append(P.event_frames("hello", h, limits=limits, modes=[]))
    s.poll()
    assert s.limits.max_header_bytes == 1000 and s.info["modes"] == []
    sent = len(t.sent)
    with pytest.raises(P.ProtocolError) as e:
        s.generate({"prompt": "x" * 2000, "seed": 1})
    assert e.value.code == "too_large" and e.value.field == "request.prompt"
    assert "at most 1000" in e.value.message
    with pytest.raises(P.ProtocolError, match="65x64") as e:
        s.generate({"mode": "img2img"}, image=P.Picture(65, 64, "rgba8", bytes(65 * 64 * 4)))
    assert e.value.field == "image"
    with pytest.raises(P.ProtocolError, match="2 x 64x64") as e:
        s.generate({"width": 64, "height": 64, "num_images": 2})
    assert e.value.field == "request.width"
    with pytest.raises(P.ProtocolError, match="num_inference_steps=2000") as e:
        s.generate({"num_inference_steps": 2000})  # over the default max_steps
    assert e.value.field == "request.num_inference_steps"
    assert len(t.sent) == sent and not s.jobs.keys() - {r for r in s.pending}
    s.generate({"width": 64, "height": 64})
    assert len(t.sent) == sent + 1


def test_a_server_with_garbage_limits_gets_the_default_ones():
    t = Loopback()
    s = tracker.Session(t)
    h = s.hello()
    t.incoming.append(P.event_frames("hello", h, limits=["not", "a", "dict"]))
    s.poll()
    assert s.limits == P.Limits()


# --- sdkit.bridge.Client against the real server -------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server on a tiny random-weight SD pipeline."""
    from sdkit.bridge import serve

    from sdkit.engine import Engine
    from tests import tiny

    folder = tmp_path_factory.mktemp("tiny-sd") / "sd"
    engine = Engine(tiny.save(tiny.sd_pipeline(folder), folder, tiny.TINY_DEFAULTS), device="cpu")
    handle = serve(engine, bind="tcp://127.0.0.1:0")
    yield handle
    handle.stop()
    engine.close()


@pytest.mark.parametrize("transport", ["zmq", "zmtp"])
def test_client_refuses_a_70_kb_prompt_at_once(server, transport):
    """Issue 13.7: the server's header limit (64 KiB) is checked before sending, no timeout."""
    from sdkit.bridge import Client
    from sdkit.bridge.client import BridgeError

    with Client(server.address, transport=transport, timeout=300) as c:
        seen = server.server.stats["messages"]
        with pytest.raises(BridgeError) as e:
            c.txt2img("a red circle " * 5400)  # ~70 KB
        assert e.value.code == "too_large" and e.value.field == "request.prompt"  # no timeout
        assert "65536" in e.value.message
        assert server.server.stats["messages"] == seen + 1  # the hello only
        job = c.submit(prompt="x", num_inference_steps=1, width=8, height=8)
        assert job.result(timeout=120)[0].size == (8, 8)
        assert job.state == "done" and job.job_id
