"""Who may talk to the bridge: loopback by default, CurveZMQ keys for anything else.

Key folder layout (what `sdkit keys DIR` writes, what ``--keys DIR`` reads)::

    DIR/server.key          server public key   (give to clients)
    DIR/server.key_secret   server key pair     (stays on the server)
    DIR/<name>.key_secret   a client's key pair (copy to that client, with server.key)
    DIR/authorized/<name>.key   client public keys the server accepts

A client whose public key is not in ``authorized/`` fails the CURVE handshake inside
libzmq and never reaches the server code: it gets nothing back.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER_NAME = "server"
AUTHORIZED = "authorized"


class SecurityError(ValueError):
    """The server would be reachable by others without authentication, or keys are missing."""


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.x, ::1, localhost, ipc, inproc)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://") :].rpartition(":")[0]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", interface names, host names: reachable from elsewhere
        return False


def check_bind(address: str, keys: Any | None) -> None:
    """Refuse a non-loopback bind without CurveZMQ keys (raises `SecurityError`)."""
    if keys is None and not is_loopback(address):
        raise SecurityError(
            f"refusing to bind {address}: it is reachable from other machines and no "
            "CurveZMQ keys were given. Create keys with `sdkit keys DIR` and start the "
            "server with --keys DIR (serve(..., keys=DIR)), or bind tcp://127.0.0.1:PORT."
        )


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized: Path  # folder of client public keys (*.key)


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def _load(path: Path) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise SecurityError(f"missing key file {path} (create keys with `sdkit keys DIR`)")
    try:
        return zmq.auth.load_certificate(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means an unusable key file
        raise SecurityError(f"cannot read key file {path}: {e}") from e


def load_server_keys(folder: str | Path) -> ServerKeys:
    folder = Path(folder)
    public, secret = _load(folder / f"{SERVER_NAME}.key_secret")
    if not secret:
        raise SecurityError(f"{folder / (SERVER_NAME + '.key_secret')} has no secret key")
    authorized = folder / AUTHORIZED
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise SecurityError(
            f"no authorized client keys in {authorized}: add one with `sdkit keys {folder}`"
        )
    return ServerKeys(public, secret, authorized)


def load_client_keys(folder: str | Path, name: str = "client") -> ClientKeys:
    folder = Path(folder)
    public, secret = _load(folder / f"{name}.key_secret")
    server_public, _ = _load(folder / f"{SERVER_NAME}.key")
    if not secret:
        raise SecurityError(f"{folder / (name + '.key_secret')} has no secret key")
    return ClientKeys(public, secret, server_public)


def create_keys(folder: str | Path, client: str = "client") -> dict[str, Path]:
    """Server pair (if missing) and one client pair, the client authorized; returns paths."""
    import zmq.auth

    if not client.replace("-", "").replace("_", "").isalnum() or client == SERVER_NAME:
        raise SecurityError(f"client name {client!r} must be alphanumeric (and not 'server')")
    folder = Path(folder)
    authorized = folder / AUTHORIZED
    authorized.mkdir(parents=True, exist_ok=True)
    server_secret = folder / f"{SERVER_NAME}.key_secret"
    if not server_secret.exists():
        zmq.auth.create_certificates(folder, SERVER_NAME)
    pub, sec = zmq.auth.create_certificates(folder, client)
    shutil.copy(pub, authorized / Path(pub).name)
    try:
        Path(sec).chmod(0o600)
        server_secret.chmod(0o600)
    except OSError:
        pass
    return {
        "server_public": folder / f"{SERVER_NAME}.key",
        "server_secret": server_secret,
        "client_public": Path(pub),
        "client_secret": Path(sec),
        "authorized": authorized / Path(pub).name,
    }


def apply_server(socket: Any, keys: ServerKeys) -> None:
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def apply_client(socket: Any, keys: ClientKeys) -> None:
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.server_public


def start_authenticator(context: Any, keys: ServerKeys) -> Any:
    """ZAP handler that admits only the authorized client keys (same context as the socket)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context, log=None)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    return auth
