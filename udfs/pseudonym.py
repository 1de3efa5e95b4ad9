"""Pseudonymization: user and anonymous ids become keyed hashes before they reach state or any output but the
decision addressed back to the app.

``pseudonym = hex(HMAC-SHA256(key, "<kind>:" + id))[:32]`` with kind ``user`` or ``anon``:

* keyed (HMAC, not a plain hash), so nobody without the key can test a guessed id against a pseudonym;
* domain-separated, so a user id and an anonymous id that happen to be equal stay different keys;
* 128 bits kept: collisions are out of reach for any user count, and keys stay short in state and shuffles.

The key is the UTF-8 text of ``ONRAMP_PSEUDONYM_KEY`` when that environment variable is set, else the content of
the key file (config ``pseudonym_key_file``), whitespace at either end stripped; at least 32 characters. It is
never logged or shipped in the job graph: the job carries only the file's path, and each TaskManager reads the
file (or its environment) itself. ``key_id`` (first 8 hex of SHA-256 of the key) names a key in audit records
without revealing it, so a rotation is visible downstream (docs/privacy.md).

The Java twin (jvm/src/main/java/io/onramp/flink/RoutingKey.java) computes the same pseudonym for the Kafka
source's routing key; tests/test_minicluster.py runs shared vectors through both.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

KEY_ENV = "ONRAMP_PSEUDONYM_KEY"
MIN_KEY_LENGTH = 32
PSEUDONYM_HEX_CHARS = 32
USER = "user"
ANON = "anon"


class PseudonymKeyError(ValueError):
    """No usable pseudonymization key; the message says where one is expected."""


@dataclass(frozen=True)
class PseudonymKey:
    secret: bytes
    key_id: str

    def __repr__(self) -> str:  # never print the secret, not even in a traceback's locals
        return f"PseudonymKey(key_id={self.key_id!r})"

    def pseudonym(self, kind: str, raw_id: str) -> str:
        """The pseudonym of ``raw_id`` (a user id if ``kind`` is ``user``, an anonymous id if ``anon``)."""
        digest = hmac.new(self.secret, f"{kind}:{raw_id}".encode(), hashlib.sha256).hexdigest()
        return digest[:PSEUDONYM_HEX_CHARS]

    def user(self, user_id: str) -> str:
        return self.pseudonym(USER, user_id)

    def anon(self, anonymous_id: str) -> str:
        return self.pseudonym(ANON, anonymous_id)


def key_from_text(text: str, source: str) -> PseudonymKey:
    secret = text.strip()
    if len(secret) < MIN_KEY_LENGTH:
        raise PseudonymKeyError(
            f"pseudonymization key from {source} is {len(secret)} characters; at least {MIN_KEY_LENGTH} are needed "
            "(generate one with `onramp privacy new-key`)"
        )
    raw = secret.encode()
    return PseudonymKey(raw, hashlib.sha256(raw).hexdigest()[:8])


def load_key(key_file: str | Path | None, environ: Mapping[str, str] | None = None) -> PseudonymKey:
    """The key from ``ONRAMP_PSEUDONYM_KEY``, else from ``key_file``; a clear error when neither has one."""
    environ = os.environ if environ is None else environ
    if environ.get(KEY_ENV, "").strip():
        return key_from_text(environ[KEY_ENV], f"${KEY_ENV}")
    if not key_file:
        raise PseudonymKeyError(f"no pseudonymization key: set {KEY_ENV} or the config pseudonym_key_file")
    path = Path(key_file)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PseudonymKeyError(
            f"pseudonymization key file {path} does not exist: create it with `onramp privacy new-key` "
            f"(local services create one on `onramp up`), or set {KEY_ENV}"
        ) from None
    except OSError as exc:
        raise PseudonymKeyError(f"cannot read pseudonymization key file {path}: {exc.strerror}") from None
    return key_from_text(text, str(path))


def write_new_key(path: str | Path) -> PseudonymKey:
    """Create a random key file readable only by its owner; refuses to overwrite (that would re-key every
    profile: see docs/privacy.md, key rotation)."""
    path = Path(path)
    if path.exists():
        raise PseudonymKeyError(f"{path} already exists; a new key re-keys every profile (docs/privacy.md)")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    return key_from_text(text, str(path))


def ensure_key_file(path: str | Path, environ: Mapping[str, str] | None = None) -> PseudonymKey:
    """The configured key, creating the key file first if there is neither a file nor ``ONRAMP_PSEUDONYM_KEY``
    (local set-ups: the demo and tests need no manual step)."""
    environ = os.environ if environ is None else environ
    if not environ.get(KEY_ENV, "").strip() and not Path(path).exists():
        return write_new_key(path)
    return load_key(path, environ)
