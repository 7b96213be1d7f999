"""The kit's settings: one TOML file, checked at start.

Example (``/etc/nara/edge.toml``)::

    server = "https://nara.example.se"
    credential = "/var/lib/nara-edge/credential.json"
    camera = "auto"          # "auto", "synthetic", "none", "/dev/video0" or "picamera2"
    microphone = "auto"      # "auto", "synthetic", "none" or an ALSA input such as "hw:1,0"
    language = "sv"          # "sv" or "en": the kit's screen
    page = "127.0.0.1:8090"  # where the kit's own screen page is served
    video = "640x480"
    fps = 15
    data_dir = "/var/lib/nara-edge"  # the photo outbox and what the kit must remember across restarts
    upload_kbps = 2000       # ceiling for photo uploads; during a call they also yield to its audio
    marker_mm = 20.0         # side of the ArUco scale marker (DICT_4X4_50) laid beside a wound, in mm

    [turn]                   # optional: send all media through this relay
    url = "turn:turn.example.se:3478?transport=udp"
    username = "kit"
    credential = "secret"

Every mistake is reported with the field it is in and what is wrong with it
(``EdgeConfigError``); unknown keys are mistakes too, so a misspelt setting
is not silently ignored.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CAMERA_CHOICES = ("auto", "synthetic", "none", "picamera2")
MICROPHONE_CHOICES = ("auto", "synthetic", "none")
LANGUAGES = ("sv", "en")
MAX_WIDTH, MAX_HEIGHT = 1920, 1080
UPLOAD_KBPS_RANGE = (16, 100_000)
MARKER_MM_RANGE = (5.0, 200.0)


class EdgeConfigError(Exception):
    """One thing wrong with the configuration: which field, and what."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TurnRelay:
    url: str
    username: str
    credential: str


@dataclass(frozen=True)
class EdgeConfig:
    server: str
    credential: Path
    camera: str = "auto"
    microphone: str = "auto"
    language: str = "sv"
    page: str = "127.0.0.1:8090"
    video: str = "640x480"
    fps: int = 15
    turn: TurnRelay | None = None
    data_dir: Path = Path("/var/lib/nara-edge")
    upload_kbps: int = 2000
    marker_mm: float = 20.0

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def width(self) -> int:
        return int(self.video.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.video.split("x")[1])

    @property
    def page_host(self) -> str:
        return self.page.rpartition(":")[0]

    @property
    def page_port(self) -> int:
        return int(self.page.rpartition(":")[2])


_FIELDS = ("server", "credential", "camera", "microphone", "language", "page", "video", "fps", "turn", "data_dir",
           "upload_kbps", "marker_mm")
_TURN_FIELDS = ("url", "username", "credential")


def _text(data: dict[str, Any], name: str, errors: list[EdgeConfigError], default: str | None = None) -> str:
    if name not in data:
        if default is None:
            errors.append(EdgeConfigError(name, "is required"))
            return ""
        return default
    value = data[name]
    if not isinstance(value, str) or not value.strip():
        errors.append(EdgeConfigError(name, "must be a non-empty text in quotes"))
        return default or ""
    return value.strip()


def _check_server(value: str, errors: list[EdgeConfigError]) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        errors.append(EdgeConfigError("server", f"must be an http:// or https:// address, not {value!r}"))
    elif parts.query or parts.fragment:
        errors.append(EdgeConfigError("server", "must be the server's base address, without ? or #"))


def _check_page(value: str, errors: list[EdgeConfigError]) -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        errors.append(EdgeConfigError("page", f"must be host:port, e.g. 127.0.0.1:8090, not {value!r}"))


def _check_video(value: str, errors: list[EdgeConfigError]) -> None:
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    if match is None:
        errors.append(EdgeConfigError("video", f"must be WIDTHxHEIGHT, e.g. 640x480, not {value!r}"))
        return
    width, height = int(match[1]), int(match[2])
    if not (16 <= width <= MAX_WIDTH and 16 <= height <= MAX_HEIGHT) or width % 2 or height % 2:
        errors.append(EdgeConfigError(
            "video", f"must have even sides between 16x16 and {MAX_WIDTH}x{MAX_HEIGHT}, not {value!r}"))


def _check_camera(value: str, errors: list[EdgeConfigError]) -> None:
    if value not in CAMERA_CHOICES and not value.startswith("/dev/"):
        errors.append(EdgeConfigError(
            "camera", f"must be one of {', '.join(CAMERA_CHOICES)} or a device path like /dev/video0, not {value!r}"))


def _turn(data: dict[str, Any], errors: list[EdgeConfigError]) -> TurnRelay | None:
    value = data.get("turn")
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.append(EdgeConfigError("turn", "must be a table: [turn] with url, username and credential"))
        return None
    for key in value:
        if key not in _TURN_FIELDS:
            errors.append(EdgeConfigError(f"turn.{key}", f"is not a setting; known: {', '.join(_TURN_FIELDS)}"))
    found = []
    for key in _TURN_FIELDS:
        item = value.get(key)
        if not isinstance(item, str) or not item:
            errors.append(EdgeConfigError(f"turn.{key}", "is required: a non-empty text in quotes"))
            found.append("")
        else:
            found.append(item)
    if found[0] and not found[0].startswith(("turn:", "turns:")):
        errors.append(EdgeConfigError("turn.url", f"must start with turn: or turns:, not {found[0]!r}"))
    return TurnRelay(*found)


def config_errors(data: dict[str, Any], base: Path = Path(".")) -> tuple[EdgeConfig | None, list[EdgeConfigError]]:
    """The configuration in ``data`` (a parsed TOML document) and everything wrong with it.

    A relative ``credential`` or ``data_dir`` path is taken relative to ``base`` (the configuration file's folder).
    """
    errors: list[EdgeConfigError] = []
    for key in data:
        if key not in _FIELDS:
            errors.append(EdgeConfigError(key, f"is not a setting; known: {', '.join(_FIELDS)}"))
    server = _text(data, "server", errors)
    if server:
        _check_server(server, errors)
    credential = _text(data, "credential", errors)
    camera = _text(data, "camera", errors, "auto")
    _check_camera(camera, errors)
    microphone = _text(data, "microphone", errors, "auto")
    language = _text(data, "language", errors, "sv")
    if language not in LANGUAGES:
        errors.append(EdgeConfigError("language", f"must be one of {', '.join(LANGUAGES)}, not {language!r}"))
    page = _text(data, "page", errors, "127.0.0.1:8090")
    _check_page(page, errors)
    video = _text(data, "video", errors, "640x480")
    _check_video(video, errors)
    fps = data.get("fps", 15)
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 30:
        errors.append(EdgeConfigError("fps", f"must be a whole number from 1 to 30, not {fps!r}"))
        fps = 15
    data_dir = _text(data, "data_dir", errors, "/var/lib/nara-edge")
    low, high = UPLOAD_KBPS_RANGE
    upload_kbps = data.get("upload_kbps", 2000)
    if isinstance(upload_kbps, bool) or not isinstance(upload_kbps, int) or not low <= upload_kbps <= high:
        errors.append(EdgeConfigError(
            "upload_kbps", f"must be a whole number of kbit/s from {low} to {high}, not {upload_kbps!r}"))
        upload_kbps = 2000
    marker_mm = data.get("marker_mm", 20.0)
    if isinstance(marker_mm, bool) or not isinstance(marker_mm, (int, float)) or not (
            MARKER_MM_RANGE[0] <= marker_mm <= MARKER_MM_RANGE[1]):
        errors.append(EdgeConfigError(
            "marker_mm", f"must be the marker's side in mm, from {MARKER_MM_RANGE[0]:g} to {MARKER_MM_RANGE[1]:g}, "
                         f"not {marker_mm!r}"))
        marker_mm = 20.0
    turn = _turn(data, errors)
    if errors:
        return None, errors
    path, data_path = Path(credential), Path(data_dir)
    config = EdgeConfig(
        server=server.rstrip("/"), credential=path if path.is_absolute() else base / path, camera=camera,
        microphone=microphone, language=language, page=page, video=video, fps=fps, turn=turn,
        data_dir=data_path if data_path.is_absolute() else base / data_path, upload_kbps=upload_kbps,
        marker_mm=float(marker_mm),
    )
    return config, []


def read_config(path: Path) -> tuple[EdgeConfig | None, list[EdgeConfigError]]:
    """Read and check a configuration file; a file that cannot be read or parsed is one error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [EdgeConfigError("file", f"cannot read {path}: {exc.strerror or exc}")]
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, [EdgeConfigError("file", f"{path} is not UTF-8 text")]
    except tomllib.TOMLDecodeError as exc:
        return None, [EdgeConfigError("file", f"{path} is not valid TOML: {exc}")]
    return config_errors(data, path.parent)


def load_config(path: Path) -> EdgeConfig:
    """The checked configuration in ``path``; raises the first ``EdgeConfigError`` otherwise."""
    config, errors = read_config(path)
    if errors:
        raise errors[0]
    assert config is not None
    return config
