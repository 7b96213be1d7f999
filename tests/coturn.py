"""A real TURN server for tests: Debian's coturn on loopback, with its own config, certificate and ports.

It relays only on 127.0.0.1 and allows loopback peers (the SFU is on loopback
too); TURN over UDP and TCP on one port, TURN over TLS on another, with a
self-signed certificate for 127.0.0.1 made here (``ca_file`` is what a client
must trust). Credentials are time-limited ones from ``secret``, as coturn's
``use-auth-secret`` expects.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.process import free_port

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
READY_LINE = b"SQLite DB connection success"


def turnserver_available() -> bool:
    return Path(TURNSERVER).exists()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own issuer, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nara test TURN")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "turn-cert.pem", directory / "turn-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class Coturn:
    """``turnserver`` on fixed loopback ports, so it can be stopped and started again."""

    def __init__(self, directory: Path, secret: str = "nara-test-turn-secret") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.secret = secret
        self.port = free_port()
        self.tls_port = free_port()
        self.ca_file, self.key_file = self_signed_certificate(directory)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "turnserver.log"

    @property
    def urls(self) -> list[str]:
        return [f"turn:127.0.0.1:{self.port}?transport=udp", f"turns:127.0.0.1:{self.tls_port}?transport=tcp"]

    def write_config(self) -> Path:
        config = self.directory / "turnserver.conf"
        config.write_text("\n".join([
            "listening-ip=127.0.0.1", "relay-ip=127.0.0.1",
            f"listening-port={self.port}", f"tls-listening-port={self.tls_port}",
            "min-port=40000", "max-port=45000",
            "use-auth-secret", f"static-auth-secret={self.secret}", "realm=nara.test",
            "allow-loopback-peers", "no-cli", "no-dtls", "no-multicast-peers", "fingerprint",
            f"cert={self.ca_file}", f"pkey={self.key_file}",
            f"userdb={self.directory / 'turndb'}", f"pidfile={self.directory / 'turnserver.pid'}",
            "log-file=stdout", "simple-log", "",
        ]))
        return config

    def start(self, timeout: float = 10.0) -> None:
        if not turnserver_available():
            pytest.fail("turnserver (Debian's coturn) is missing: apt-get install coturn")
        self.process = subprocess.Popen([TURNSERVER, "-c", str(self.write_config())],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready = threading.Event()
        threading.Thread(target=self._copy_log, args=(self.process, ready), daemon=True).start()
        if not ready.wait(timeout) or not (_tcp_open(self.port) and _tcp_open(self.tls_port)):
            self.stop()
            raise RuntimeError(f"turnserver did not start:\n{self.log.read_text()[-3000:]}")

    def _copy_log(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert process.stdout is not None
        with self.log.open("ab") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if READY_LINE in line:  # printed once every listener and relay thread is up
                    ready.set()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def coturn_or_skip() -> None:
    """Tests of TURN need Debian's coturn: missing locally they skip, in CI (``CI`` set) they fail."""
    import os

    if not turnserver_available() and not os.environ.get("CI"):
        pytest.skip("turnserver (Debian's coturn) is not installed: apt-get install coturn")
