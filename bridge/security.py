"""Who may talk to the bridge: loopback by default, CurveZMQ keys for anything else.

Key folder layout (what `sdkit keys DIR` writes, what ``--keys DIR`` reads)::

    DIR/server.key          server public key   (give to clients)
    DIR/server.key_secret   server key pair     (stays on the server)
    DIR/<name>.key_secret   a client's key pair (copy to that client, with server.key)
    DIR/authorized/<name>.key   client public keys the server accepts

A client whose public key is not in ``authorized/`` fails the CURVE handshake inside
libzmq and never reaches the server code: it gets nothing back.

Who is on a connection: `Authenticator` (the ZAP handler) names every connection, the
CURVE key or a per-connection token for NULL, and libzmq stamps that name on each of the
connection's messages (``User-Id``); the server binds requests to it (issue 13.6).
`secure_router` also bounds what unauthenticated connections can hold (issue 13.9).
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import threading
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


# ---------------------------------------------------------------------------- identity

NULL_PREFIX = "null:"
CURVE_PREFIX = "curve:"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"sdkit"


class Authenticator:
    """The ZAP handler: admits connections and names who is on each one.

    libzmq asks it once per handshake (in-process, before any message passes) and stamps
    the answer on every message of that connection as its ``User-Id`` property, which a
    peer cannot set.  CURVE: admitted only if the public key is in ``authorized/``; the
    identity is ``curve:<z85 key>``, the same on every connection of that key.  NULL (on
    loopback): everyone is admitted and each connection gets a fresh random
    ``null:<token>``, so a second connection never shares an identity with the first.
    The bridge binds jobs to this identity (see PROTOCOL.md, "Identity").
    """

    def __init__(self, context: Any, authorized: Path | None = None):
        self.context = context
        self.authorized = authorized
        self._allowed: set[bytes] = set()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.handshakes = 0  # connections admitted (for tests and status)
        self.refused = 0  # handshakes refused (a refused peer's messages never pass)

    def start(self) -> Authenticator:
        """Bind the ZAP endpoint of ``context``; raises if another handler holds it."""
        import zmq.auth

        if self.authorized is not None:
            self._allowed = {
                k for k, ok in zmq.auth.load_certificates(self.authorized).items() if ok
            }
        self._thread = threading.Thread(target=self._run, name="sdkit-zap", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        import zmq

        sock = self.context.socket(zmq.REP)
        sock.linger = 0
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self._error = SecurityError(f"cannot start the ZAP handler: {e}")
            sock.close(0)
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                request = sock.recv_multipart()
                sock.send_multipart(self._answer(request))
        except zmq.ZMQError:  # the context is terminating
            pass
        finally:
            sock.close(0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        """ZAP 1.0 (RFC 27): version, request id, domain, address, identity, mechanism, creds."""
        from zmq.utils import z85

        if len(request) < 6 or request[0] != b"1.0":
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad", b"", b""]
        request_id, mechanism, credentials = request[1], request[5], request[6:]
        user = None
        if mechanism == b"NULL":
            user = NULL_PREFIX + secrets.token_hex(16)
        elif mechanism == b"CURVE" and credentials and len(credentials[0]) == 32:
            key = z85.encode(credentials[0])
            if key in self._allowed:
                user = CURVE_PREFIX + key.decode()
        if user is None:
            self.refused += 1
            return [b"1.0", request_id, b"400", b"not authorized", b"", b""]
        self.handshakes += 1
        return [b"1.0", request_id, b"200", b"OK", user.encode(), b""]


def start_authenticator(context: Any, keys: ServerKeys | None = None) -> Authenticator:
    """The ZAP handler for ``context`` (the socket's): CURVE keys from ``keys``, else NULL."""
    return Authenticator(context, keys.authorized if keys is not None else None).start()


def secure_router(
    socket: Any, context: Any, keys: ServerKeys | None, handshake_ivl: float = 5.0
) -> Authenticator | None:
    """Set up the bridge's ROUTER against takeover and connection floods (issue 13.6, 13.9).

    * no ``ROUTER_HANDOVER``: a connection presenting a routing id that is already
      connected is ignored by libzmq, so it can neither receive that client's replies nor
      speak for it;
    * a ZAP handler names every connection (`Authenticator`): the server binds a routing
      id's requests to that identity;
    * a connection must finish its handshake within ``handshake_ivl`` s (libzmq's default
      is 30 s), and the soft file-descriptor limit is raised to the hard one, so idle TCP
      connections cannot hold the descriptors an authorized client needs.

    Returns the handler to stop with the socket (None: another handler already serves
    ``context``, so NULL connections go unnamed and jobs are bound by routing id only).
    """
    import zmq

    socket.setsockopt(zmq.ROUTER_HANDOVER, 0)
    socket.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(handshake_ivl * 1000)))
    raise_fd_limit()
    try:
        auth = start_authenticator(context, keys)
    except SecurityError:
        if keys is not None:
            raise  # CURVE without our handler would admit any key
        auth = None
    if auth is not None:
        apply_identity(socket)
    if keys is not None:
        apply_server(socket, keys)
    return auth


def apply_identity(socket: Any) -> None:
    """Make libzmq consult the ZAP handler for NULL connections too (it does for CURVE)."""
    socket.zap_domain = ZAP_DOMAIN


def identity_of(frame: Any) -> str | None:
    """The ``User-Id`` the ZAP handler gave this frame's connection (None: no handler)."""
    try:
        return frame.get("User-Id")
    except Exception:  # noqa: BLE001 - no ZAP answer for this connection, or not a zmq.Frame
        return None


# ---------------------------------------------------------------------------- resources


def raise_fd_limit(target: int = 1 << 16) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard limit; returns (before, after).

    Each connection, authenticated or not, holds a file descriptor until its handshake
    ends or times out; 1024 (a common soft default) is used up by a burst of idle TCP
    connections.  Where the platform has no such limit, returns (0, 0).
    """
    try:
        import resource
    except ImportError:  # Windows
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return (soft, want)
        except (ValueError, OSError):
            pass
    return (soft, soft)
