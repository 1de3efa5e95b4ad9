"""Throwaway certificates for the local broker's TLS listener: a CA and a broker certificate for localhost.

Made with the JDK's ``keytool`` (present wherever the broker's Java is), so no new Python dependency. Files, under
``<state_dir>/tls/`` (git-ignored, owner-only permissions)::

    ca.pem              the CA certificate: clients trust it (kafka_ssl_cafile)
    broker.p12          the broker's key and certificate chain (PKCS12), signed by the CA
    store.password      the password of the two PKCS12 stores (random; only the broker reads it)
    ca.p12              the CA's key, kept to sign a renewed broker certificate
    meta.json           when the certificates expire

Generated on first use and again when they are missing or expire within :data:`RENEW_BEFORE_DAYS`; delete the
folder to rotate them by hand (docs/security.md). Not for production: the CA key sits next to what it signs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("jobs.tls_certs")

VALIDITY_DAYS = 365
RENEW_BEFORE_DAYS = 30
BROKER_SAN = "dns:localhost,ip:127.0.0.1"


class CertificateError(RuntimeError):
    """keytool is missing or failed; the message has its output."""


@dataclass(frozen=True)
class LocalCertificates:
    """Where the local broker's certificates are."""

    folder: Path

    @property
    def ca_pem(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_store(self) -> Path:
        return self.folder / "ca.p12"

    @property
    def broker_store(self) -> Path:
        return self.folder / "broker.p12"

    @property
    def password_file(self) -> Path:
        return self.folder / "store.password"

    @property
    def meta_file(self) -> Path:
        return self.folder / "meta.json"

    def store_password(self) -> str:
        return self.password_file.read_text().strip()

    def expires_at(self) -> float | None:
        """Unix time the certificates expire, or None if they are missing or unreadable."""
        try:
            return float(json.loads(self.meta_file.read_text())["not_after"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def usable(self, now: float | None = None) -> bool:
        expires = self.expires_at()
        files = (self.ca_pem, self.ca_store, self.broker_store, self.password_file)
        now = time.time() if now is None else now
        return expires is not None and expires - now > RENEW_BEFORE_DAYS * 86400 and all(f.is_file() for f in files)


def find_keytool(java: Path | None = None) -> Path:
    """keytool next to the given java binary, else on PATH."""
    if java is not None:
        candidate = Path(java).resolve().parent / "keytool"
        if candidate.is_file():
            return candidate
    found = shutil.which("keytool")
    if not found:
        raise CertificateError("keytool not found (it comes with the JDK); install a JDK 17+ or set JAVA_HOME")
    return Path(found)


def _keytool(keytool: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([str(keytool), *args], input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise CertificateError(f"keytool {args[0]} failed (exit {done.returncode}): {(done.stdout + done.stderr).strip()}")
    return done.stdout


def ensure_local_certificates(folder: Path, *, java: Path | None = None, now: float | None = None) -> LocalCertificates:
    """The certificates in ``folder``, generated (or renewed) if missing or about to expire."""
    certs = LocalCertificates(Path(folder).resolve())
    if certs.usable(now):
        return certs
    keytool = find_keytool(java)
    started = time.monotonic()
    certs.folder.mkdir(parents=True, exist_ok=True)
    os.chmod(certs.folder, 0o700)
    for stale in (certs.ca_pem, certs.ca_store, certs.broker_store, certs.password_file, certs.meta_file):
        stale.unlink(missing_ok=True)
    password = secrets.token_urlsafe(24)
    certs.password_file.write_text(password + "\n")
    os.chmod(certs.password_file, 0o600)
    validity = str(VALIDITY_DAYS)
    common = ("-storetype", "PKCS12", "-storepass", password, "-keypass", password)
    not_after = (time.time() if now is None else now) + VALIDITY_DAYS * 86400
    # The CA: a self-signed certificate allowed to sign others.
    _keytool(keytool, "-genkeypair", "-alias", "ca", "-keyalg", "RSA", "-keysize", "2048", "-validity", validity,
             "-dname", "CN=Onramp local CA", "-ext", "bc:c", "-keystore", str(certs.ca_store), *common)
    ca_pem = _keytool(keytool, "-exportcert", "-rfc", "-alias", "ca", "-keystore", str(certs.ca_store), *common[2:4])
    certs.ca_pem.write_text(ca_pem)
    # The broker: a key pair, a signing request, the CA's signature (with the names clients check), the chain.
    store = ("-keystore", str(certs.broker_store))
    _keytool(keytool, "-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", validity,
             "-dname", "CN=localhost", "-ext", f"SAN={BROKER_SAN}", *store, *common)
    request = _keytool(keytool, "-certreq", "-alias", "broker", *store, *common[2:4])
    signed = _keytool(keytool, "-gencert", "-rfc", "-alias", "ca", "-keystore", str(certs.ca_store), *common[2:4],
                      "-validity", validity, "-ext", f"SAN={BROKER_SAN}", "-ext", "KU=digitalSignature,keyEncipherment",
                      "-ext", "EKU=serverAuth,clientAuth", stdin=request)
    _keytool(keytool, "-importcert", "-noprompt", "-alias", "ca", "-file", str(certs.ca_pem), *store, *common[2:4])
    _keytool(keytool, "-importcert", "-noprompt", "-alias", "broker", *store, *common, stdin=ca_pem + signed)
    for f in (certs.ca_store, certs.broker_store):
        os.chmod(f, 0o600)
    certs.meta_file.write_text(json.dumps({"not_after": not_after, "san": BROKER_SAN}) + "\n")
    log.info("generated local TLS certificates in %s (CA %s) in %.1fs", certs.folder, certs.ca_pem,
             time.monotonic() - started)
    return certs
