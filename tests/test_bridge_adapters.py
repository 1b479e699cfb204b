"""Adapters over the bridge (issue 14.8): `hello` lists the server's LoRAs, embeddings and
control models by name, and a request names them, never a path, over real sockets."""

from __future__ import annotations

import json
import os

import pytest

zmq = pytest.importorskip("zmq")

from sdkit.bridge import protocol, serve  # noqa: E402
from sdkit.bridge.editor_connection import Connection  # noqa: E402
from sdkit.bridge.ops import ADAPTER_KINDS, adapter_names  # noqa: E402

FAST = {"num_inference_steps": 1, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA folder outside the model, whose path must never reach a client."""
    folder = tmp_path_factory.mktemp("secret-loras")
    from sdkit.embedded.train_adapters import ADAPTERS_DIR, LORA_NAME

    (folder / "mine.safetensors").write_bytes(
        (ADAPTERS_DIR / f"{LORA_NAME}.safetensors").read_bytes()
    )
    return folder


@pytest.fixture(scope="module")
def engine(lora_dir):
    import sdkit

    try:
        return sdkit.load(os.environ.get("SDKIT_TEST_MODEL") or None, lora_dirs=[str(lora_dir)])
    except TypeError:  # an engine without adapter folders yet: hello lists nothing
        return sdkit.load(os.environ.get("SDKIT_TEST_MODEL") or None)


@pytest.fixture(scope="module")
def server(engine):
    handle = serve(engine, "tcp://127.0.0.1:0")
    yield handle
    handle.stop()


def _ask(address: str, header: dict) -> tuple[bytes, protocol.Event]:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger, s.rcvtimeo = 0, 60_000
    s.connect(address)
    try:
        s.send_multipart([json.dumps(header).encode()])
        raw = s.recv_multipart()
        return raw[0], protocol.decode_event(raw)
    finally:
        s.close()


def test_hello_lists_the_engines_adapters_by_name_only(server, engine, lora_dir):
    raw, hello = _ask(server.address, {"v": 1, "op": "hello", "id": "h"})
    info = engine.info()
    for kind in ADAPTER_KINDS:
        assert hello.header[kind] == list(info.get(kind) or []), kind
        assert all("/" not in n and "\\" not in n for n in hello.header[kind])
    assert str(lora_dir).encode() not in raw  # no folder, anywhere in the reply
    if "loras" in info:  # the engine knows adapter folders (sdkit.adapters)
        assert "mine" in hello.header["loras"]


def test_adapter_names_are_lists_of_names_even_for_an_engine_without_adapters():
    assert adapter_names({}) == {"loras": [], "embeddings": [], "controls": []}
    info = {"loras": ["a", 3, None], "embeddings": None, "controls": ["c"]}
    assert adapter_names(info) == {"loras": ["a"], "embeddings": [], "controls": ["c"]}


@pytest.mark.parametrize(
    "name", ["../mine", "/tmp/mine.safetensors", "C:\\loras\\mine", "mine:1", "<mine>"]
)
def test_a_path_like_lora_is_a_protocol_error_naming_the_field(server, name):
    header = {
        "v": 1,
        "op": "generate",
        "id": "g",
        "request": {"prompt": "x", "loras": [{"name": "ok", "weight": 1}, {"name": name}], **FAST},
    }
    _, ev = _ask(server.address, header)
    assert (ev.event, ev.id, ev.code, ev.field) == (
        "error",
        "g",
        "bad_field",
        "request.loras[1].name",
    )
    assert "no path" in ev.message


def test_the_editor_connection_offers_the_servers_lora_names(server, engine):
    conn = Connection(server.address, client="test")
    try:
        conn.wait_ready(30)
        assert conn.adapters("loras") == list(engine.info().get("loras") or [])
        assert conn.adapters("embeddings") == list(engine.info().get("embeddings") or [])
        assert conn.adapters("nonsense") == []
    finally:
        conn.close()


def test_a_chosen_lora_goes_into_the_prompt_as_a1111s_tag():
    from sdkit.bridge import editor_actions as ea

    assert ea.with_lora("", "sdkcross") == "<lora:sdkcross:1>"
    assert ea.with_lora("a red x ", "sdkcross", 0.5) == "a red x <lora:sdkcross:0.5>"
    once = ea.with_lora("a red x", "sdkcross")
    assert ea.with_lora(once, "sdkcross") == once  # chosen twice: one tag


def test_check_lora_names_what_the_server_offers(server, engine):
    from sdkit.bridge import editor_actions as ea
    from sdkit.bridge import editor_geometry as geo

    conn = Connection(server.address, client="test")
    try:
        conn.wait_ready(30)
        offered = conn.adapters("loras")
        for name in offered:
            assert ea.check_lora(conn, name) == name
        with pytest.raises(geo.EditorError) as err:
            ea.check_lora(conn, "../../etc/passwd")
        assert "no LoRA '../../etc/passwd'" in str(err.value)
        assert (", ".join(offered) or "none") in str(err.value)
    finally:
        conn.close()


@pytest.mark.parametrize(
    "request_fields",
    [
        {"loras": [{"name": "nope", "weight": 1}]},
        {"prompt": "x <lora:nope:1>"},
    ],
)
def test_an_unknown_lora_is_named_without_the_servers_folders(
    server, engine, lora_dir, request_fields
):
    """The engine's own message lists the folders it searched (useful at a terminal); a
    bridge client learns the name and what the server offers, never the server's disk."""
    pytest.importorskip("sdkit.adapters")
    from sdkit.embedded.train_adapters import ADAPTERS_DIR

    header = {
        "v": 1,
        "op": "generate",
        "id": "u",
        "request": {"prompt": "x", **request_fields, **FAST},
    }
    raw, ev = _ask(server.address, header)
    assert (ev.event, ev.code) == ("error", "bad_field"), ev.header
    assert ev.field.startswith("request."), ev.field
    assert "'nope'" in ev.message and "sdkcross" in ev.message, ev.message
    for folder in (lora_dir, ADAPTERS_DIR):
        assert str(folder).encode() not in raw, ev.message
