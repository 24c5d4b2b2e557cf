"""Cluster credentials: the per-cluster secret, client tokens, peer handshakes.

One random **cluster secret** (32 bytes, kept in a file readable only by its
owner) is the root of everything; two keys are derived from it so that a
leaked token key does not let anyone speak as a peer:

* the **peer key** authenticates node-to-node links with a challenge-response
  handshake (HELLO / WELCOME twice, both sides prove the key over both nonces,
  so a recorded handshake cannot be replayed and an impostor node learns
  nothing);
* the **token key** signs client tokens: JSON Web Tokens (RFC 7519) with
  HS256, claims ``sub`` (the sender id, decimal), ``role``, ``iat`` and
  optionally ``exp``.  Roles: ``client`` sends as its own sender only;
  ``service`` (a gateway or a load generator that multiplexes many senders
  on one connection) sends as any sender; ``admin`` also may reset STATS.

The protocol side is specified in docs/protocol.md ("Authentication").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECRET_BYTES = 32
NONCE_BYTES = 16
MAX_SENDER = (1 << 64) - 1
MAX_TOKEN = 4096  # bytes of a token a node reads at most
_PEER_LABEL = b"plexichat/v1/peer"
_TOKEN_LABEL = b"plexichat/v1/token"
_JWT_HEADER = {"alg": "HS256", "typ": "JWT"}
ROLES = ("client", "service", "admin")


class AuthError(ValueError):
    """A credential that does not verify (the text says why, never the key)."""


@dataclass(frozen=True)
class Identity:
    """Who an authenticated client is."""

    sender: int
    role: str = "client"

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def any_sender(self) -> bool:
        """May this identity send on behalf of other senders?"""
        return self.role != "client"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not text or len(text) % 4 == 1:
        raise AuthError("token part is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AuthError("token part is not base64url") from exc


def _mac(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


class Credentials:
    """The keys of one cluster, derived from its *secret*."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a cluster secret has at least 16 bytes")
        self.peer_key = hmac.new(secret, _PEER_LABEL, hashlib.sha256).digest()
        self.token_key = hmac.new(secret, _TOKEN_LABEL, hashlib.sha256).digest()

    @classmethod
    def generate(cls) -> tuple[Credentials, bytes]:
        """New credentials and the secret they come from."""
        secret = secrets.token_bytes(SECRET_BYTES)
        return cls(secret), secret

    # -- client tokens --------------------------------------------------------

    def token(
        self,
        sender: int,
        *,
        admin: bool = False,
        role: str = "client",
        ttl: float | None = None,
        now: float | None = None,
    ) -> str:
        """A signed token naming *sender* in *role* (``admin=True``: admin)."""
        if not 0 < sender <= MAX_SENDER:
            raise ValueError(f"sender {sender} outside 1 .. 2**64-1")
        if admin:
            role = "admin"
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sub": str(sender),
            "role": role,
            "iat": issued,
        }
        if ttl is not None:
            claims["exp"] = issued + int(ttl)
        head = _b64url(json.dumps(_JWT_HEADER, separators=(",", ":")).encode())
        body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing = f"{head}.{body}".encode("ascii")
        sig = hmac.new(self.token_key, signing, hashlib.sha256).digest()
        return f"{head}.{body}.{_b64url(sig)}"

    def verify_token(self, token: object, now: float | None = None) -> Identity:
        """The identity *token* names; :class:`AuthError` if it does not verify."""
        if not isinstance(token, str) or not token:
            raise AuthError("no token")
        if len(token) > MAX_TOKEN:
            raise AuthError(f"token longer than {MAX_TOKEN} bytes")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthError("a token has three dot-separated parts")
        head_b64, body_b64, sig_b64 = parts
        expected = hmac.new(
            self.token_key, f"{head_b64}.{body_b64}".encode("ascii"), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(expected, _unb64url(sig_b64)):
            raise AuthError("token signature does not verify")
        try:
            head = json.loads(_unb64url(head_b64))
            claims = json.loads(_unb64url(body_b64))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AuthError("token part is not JSON") from exc
        if not isinstance(head, dict) or head.get("alg") != "HS256":
            raise AuthError("token algorithm is not HS256")
        if not isinstance(claims, dict):
            raise AuthError("token claims are not an object")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.isdigit() or len(sub) > 20:
            raise AuthError("token subject is not a sender id")
        sender = int(sub)
        if not 0 < sender <= MAX_SENDER:
            raise AuthError("token subject outside 1 .. 2**64-1")
        role = claims.get("role")
        if role not in ROLES:
            raise AuthError(f"token role is not one of {', '.join(ROLES)}")
        exp = claims.get("exp")
        if exp is not None:
            if not isinstance(exp, int):
                raise AuthError("token expiry is not an integer")
            if (time.time() if now is None else now) >= exp:
                raise AuthError("token expired")
        return Identity(sender, role)

    # -- peer handshake ---------------------------------------------------------

    def server_proof(self, client_nonce: bytes, server_nonce: bytes, ids: Ids) -> str:
        """What a node answering a peer HELLO proves (hex)."""
        return _mac(self.peer_key, b"server", client_nonce, server_nonce, *ids).hex()

    def client_proof(self, client_nonce: bytes, server_nonce: bytes, ids: Ids) -> str:
        """What a connecting peer proves in its second HELLO (hex)."""
        return _mac(self.peer_key, b"client", client_nonce, server_nonce, *ids).hex()

    def check(self, proof: object, expected: str) -> None:
        """Raise :class:`AuthError` unless *proof* equals *expected*."""
        if not isinstance(proof, str) or not hmac.compare_digest(
            proof.encode("ascii", "replace"), expected.encode("ascii")
        ):
            raise AuthError("peer proof does not verify")


Ids = tuple[bytes, bytes]  # (connecting node id, answering node id), UTF-8


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def parse_nonce(value: object) -> bytes:
    """A hex nonce from a HELLO/WELCOME body (exactly 16 bytes)."""
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise AuthError(f"nonce must be {2 * NONCE_BYTES} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise AuthError("nonce is not hex") from exc


def peer_ids(connecting: str, answering: str) -> Ids:
    return connecting.encode(), answering.encode()


# -- files --------------------------------------------------------------------


def write_private(path: Path, text: str) -> None:
    """Write *text* to *path* readable by its owner only, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_secret(path: Path, secret: bytes) -> None:
    write_private(path, secret.hex() + "\n")


def read_secret(path: Path) -> bytes:
    """The secret in *path* (hex); refused if others may read the file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise AuthError(f"no cluster secret at {path}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError as exc:
        raise AuthError(f"{path} does not hold a hex secret") from exc
    if len(secret) < 16:
        raise AuthError(f"{path} holds fewer than 16 bytes")
    return secret


def credentials_from(path: Path | None) -> Credentials | None:
    """The credentials of the secret file at *path* (None: no file given)."""
    return None if path is None else Credentials(read_secret(path))


SECRET_FILE_HELP = (
    "the cluster secret file (as given to the nodes); tokens are made from it. "
    "Without it no token is sent: only an --insecure cluster accepts that"
)


def ensure_local_credentials(data_dir: Path) -> tuple[Credentials, Path, Path]:
    """Credentials of a node started without any: its own secret and an admin
    token in *data_dir* (made on first start, reused later).  Returns the
    credentials and the paths of the secret and of the admin token."""
    secret_path = data_dir / "auth" / "cluster.secret"
    token_path = data_dir / "auth" / "admin.token"
    if secret_path.exists():
        creds = Credentials(read_secret(secret_path))
    else:
        creds, secret = Credentials.generate()
        write_secret(secret_path, secret)
    if not token_path.exists():
        write_private(token_path, creds.token(1, admin=True) + "\n")
    return creds, secret_path, token_path


# -- TLS ----------------------------------------------------------------------

TLS_SERVER_NAME = "plexichat-node"  # the name a node certificate is issued to


def server_context(cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A node's TLS context (TLS 1.3 only) from its certificate chain and key."""
    if cert is None or key is None:
        raise ValueError("TLS needs a certificate and a key (--tls-cert, --tls-key)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    return context


def client_context(ca: Path) -> ssl.SSLContext:
    """A client's TLS context that trusts the node certificates *ca* signed
    (connect with ``server_hostname=TLS_SERVER_NAME``)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context
