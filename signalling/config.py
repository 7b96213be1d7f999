"""The server's settings and its data directory.

On first run the data directory is created (mode 0700) with a generated
token-signing secret and an admin key, each in a file of mode 0600. Neither is
ever logged or printed; the admin key is read from its file by whoever needs it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tokens import TokenKeys

logger = logging.getLogger(__name__)

SECRET_FILE = "token-secret"
ADMIN_KEY_FILE = "admin-key"
DATABASE_FILE = "nara.sqlite3"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("nara-data")
    public_url: str | None = None  # how participants reach us; default http://host:port
    token_algorithm: str = "HS256"
    token_private_key: Path | None = None
    token_public_key: Path | None = None
    issuer: str = "nara"
    audience: str = "nara"
    # Addresses the SFU announces as ICE host candidates (None: every interface).
    media_addresses: list[str] | None = field(default_factory=lambda: ["127.0.0.1"])
    ice_servers: list[dict[str, Any]] = field(default_factory=list)
    ice_transport_policy: str = "all"  # "relay": clients use only the TURN servers above
    # Quality ladder and per-subscriber levels; off leaves a forwarding-only SFU.
    adaptation: bool = True
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    demo: bool = True
    upload_max_size: int = 30 * 1024 * 1024  # bytes of one image upload (tus Tus-Max-Size)
    # The rest is set from the configuration file (signalling/settings.py, docs/configuration.md).
    log_format: str = "text"  # "text" or "json" (one JSON object per line)
    log_level: str = "info"
    drain_timeout: float = 3600.0  # seconds a draining server waits for its last consultation
    # TLS proxies whose X-Forwarded-For is believed (signalling/proxies.py); empty: none.
    trusted_proxies: list[str] = field(default_factory=list)
    # UDP ports the SFU's ICE binds (one per participant and media address); None and None: any ephemeral port.
    media_port_min: int | None = None
    media_port_max: int | None = None
    # SFU worker processes (signalling/workers.py); None: one per core; 0: the SFU runs in this process.
    media_workers: int | None = None
    turn_urls: list[str] = field(default_factory=list)
    turn_username: str | None = None
    turn_credential: str | None = None  # secret
    turn_static_auth_secret: str | None = None  # secret: coturn's use-auth-secret
    turn_ttl: int = 3600  # seconds a credential made from turn_static_auth_secret lives
    cluster_redis_url: str = ""  # empty: one process
    cluster_node_id: str = field(default_factory=socket.gethostname)
    cluster_node_url: str | None = None  # the URL clients are sent to for this node
    cluster_load_interval: float = 2.0
    metrics_enabled: bool = True

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _read_private(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
        path.chmod(0o600)
    return path.read_text().strip()


def private_value(data_dir: Path, name: str) -> str:
    """Read a generated secret, creating it (mode 0600) on first use."""
    path = data_dir / name
    if not path.exists():
        try:
            _write_private(path, secrets.token_urlsafe(48))
        except FileExistsError:
            pass  # another process made it first
    return _read_private(path)


def prepare_data_dir(config: ServerConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_value(config.data_dir, SECRET_FILE)
    private_value(config.data_dir, ADMIN_KEY_FILE)


def token_keys(config: ServerConfig) -> TokenKeys:
    if config.token_algorithm == "HS256":
        secret = private_value(config.data_dir, SECRET_FILE).encode()
        return TokenKeys.shared_secret(secret)
    if config.token_public_key is None:
        raise ValueError(f"{config.token_algorithm} needs token_public_key (a PEM file)")
    return TokenKeys.from_files(config.token_algorithm, config.token_private_key, config.token_public_key)


def admin_key(config: ServerConfig) -> str:
    return private_value(config.data_dir, ADMIN_KEY_FILE)
