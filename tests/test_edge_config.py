"""The kit's configuration file: a good one loads, each mistake names its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import EdgeConfigError, load_config, read_config

GOOD = """
server = "http://127.0.0.1:8080/"
credential = "credential.json"
camera = "/dev/video0"
microphone = "synthetic"
language = "en"
page = "127.0.0.1:8099"
video = "320x240"
fps = 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_its_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.server == "http://127.0.0.1:8080"
    assert config.credential == tmp_path / "credential.json"
    assert (config.camera, config.microphone, config.language) == ("/dev/video0", "synthetic", "en")
    assert (config.page_host, config.page_port) == ("127.0.0.1", 8099)
    assert (config.width, config.height, config.fps) == (320, 240, 10)
    assert config.turn is None


def test_defaults_are_swedish_640x480_at_15(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'server = "https://nara.example.se"\ncredential = "/var/lib/c.json"\n'))
    assert (config.camera, config.microphone, config.language) == ("auto", "auto", "sv")
    assert (config.width, config.height, config.fps, config.page) == (640, 480, 15, "127.0.0.1:8090")
    assert config.credential == Path("/var/lib/c.json")


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ('server = "ftp://x"', "server", "http"),
        ('server = ""', "server", "non-empty"),
        ("server = 8080", "server", "quotes"),
        ('camera = "webcam"', "camera", "/dev/video0"),
        ('microphone = ""', "microphone", "non-empty"),
        ('language = "de"', "language", "sv, en"),
        ('page = "localhost"', "page", "host:port"),
        ('page = "127.0.0.1:99999"', "page", "host:port"),
        ('video = "640x"', "video", "WIDTHxHEIGHT"),
        ('video = "641x480"', "video", "even"),
        ("fps = 0", "fps", "1 to 30"),
        ('fps = "15"', "fps", "whole number"),
        ("fps = true", "fps", "whole number"),
        ('camra = "auto"', "camra", "not a setting"),
        ('turn = "turn:x"', "turn", "table"),
    ],
)
def test_each_mistake_names_its_field(tmp_path: Path, line: str, field: str, words: str) -> None:
    lines = {"server": 'server = "http://127.0.0.1:8080"', "credential": 'credential = "c.json"'}
    key = line.split("=")[0].strip()
    lines[key] = line
    config, errors = read_config(write(tmp_path, "\n".join(lines.values()) + "\n"))
    assert config is None
    assert [e.field for e in errors] == [field]
    assert words in errors[0].message


def test_missing_required_fields_are_all_reported(tmp_path: Path) -> None:
    _, errors = read_config(write(tmp_path, 'language = "en"\n'))
    assert {e.field for e in errors} == {"server", "credential"}
    assert all(e.message == "is required" for e in errors)


def test_turn_relay_fields_are_checked(tmp_path: Path) -> None:
    text = GOOD + '[turn]\nurl = "stun:x"\nusername = "kit"\npassword = "p"\n'
    _, errors = read_config(write(tmp_path, text))
    assert {e.field for e in errors} == {"turn.url", "turn.password", "turn.credential"}
    good = GOOD + '[turn]\nurl = "turn:127.0.0.1:3478"\nusername = "kit"\ncredential = "p"\n'
    turn = load_config(write(tmp_path, good)).turn
    assert turn is not None and (turn.url, turn.username, turn.credential) == ("turn:127.0.0.1:3478", "kit", "p")


def test_unreadable_and_broken_files_are_one_clear_error(tmp_path: Path) -> None:
    _, errors = read_config(tmp_path / "missing.toml")
    assert errors[0].field == "file" and "cannot read" in errors[0].message
    _, errors = read_config(write(tmp_path, "server = \n"))
    assert errors[0].field == "file" and "not valid TOML" in errors[0].message
    with pytest.raises(EdgeConfigError) as raised:
        load_config(write(tmp_path, 'fps = 99\nserver = "http://x"\ncredential = "c"\n'))
    assert raised.value.field == "fps"


def test_check_config_command_prints_every_mistake(tmp_path: Path) -> None:
    path = write(tmp_path, 'server = "nara.example.se"\ncredential = "c.json"\nfps = 60\n')
    result = subprocess.run([sys.executable, "-m", "nara.cli", "edge", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "server: must be an http:// or https:// address" in result.stdout
    assert "fps: must be a whole number from 1 to 30" in result.stdout
    good = write(tmp_path, GOOD)
    result = subprocess.run([sys.executable, "-m", "nara.cli", "edge", "check-config", str(good)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout


def test_the_data_folder_and_the_upload_ceiling(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.data_dir == Path("/var/lib/nara-edge") and config.upload_kbps == 2000
    assert config.outbox_dir == Path("/var/lib/nara-edge/outbox")
    config = load_config(write(tmp_path, GOOD + 'data_dir = "state"\nupload_kbps = 256\n'))
    assert config.data_dir == tmp_path / "state" and config.upload_kbps == 256


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("upload_kbps = 0", "16 to 100000"),
        ('upload_kbps = "2000"', "whole number"),
        ("upload_kbps = 1.5", "whole number"),
        ('data_dir = ""', "non-empty"),
    ],
)
def test_data_folder_and_upload_mistakes_name_their_field(tmp_path: Path, line: str, words: str) -> None:
    config, errors = read_config(write(tmp_path, GOOD + line + "\n"))
    assert config is None
    assert [e.field for e in errors] == [line.split(" ")[0]]
    assert words in errors[0].message
