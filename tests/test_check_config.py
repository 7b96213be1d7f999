"""The server's configuration file: every kind of mistake is named field by field, all at once.

What an IT technician sees: `nara check-config` prints `field: code: sentence` per problem and
exits 1, or the effective settings without secrets and exits 0; `nara serve` refuses a bad
configuration with the same lines (exit 2) and never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from signalling import settings
from signalling.config import ServerConfig

PROJECT = Path(__file__).resolve().parent.parent


def problems_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> set[tuple[str, str]]:
    path = tmp_path / "nara.toml"
    path.write_text(text)
    _, problems = settings.load(path, environ or {})
    return {(p.field, p.code) for p in problems}


@pytest.mark.parametrize(("toml", "expected"), [
    ('[server]\nprot = 8080\n', ("server.prot", "unknown_key")),
    ('[sever]\nport = 8080\n', ("sever", "unknown_section")),
    ('media = 3\n', ("media", "wrong_type")),
    ('[server]\nport = "8080"\n', ("server.port", "wrong_type")),
    ('[server]\ndemo = "yes"\n', ("server.demo", "wrong_type")),
    ('[media]\naddresses = "127.0.0.1"\n', ("media.addresses", "wrong_type")),
    ('[server]\nport = 70000\n', ("server.port", "out_of_range")),
    ('[media]\nport_min = 80\nport_max = 90\n', ("media.port_min", "out_of_range")),
    ('[media]\nport_min = 40010\nport_max = 40000\n', ("media.port_min", "invalid_range")),
    ('[media]\nport_min = 40000\nport_max = 40000\n', ("media.port_max", "range_too_narrow")),
    ('[media]\naddresses = ["127.0.0.1", "10.0.0.5"]\nport_min = 40000\nport_max = 40002\n',
     ("media.port_max", "range_too_narrow")),
    ('[media]\nport_min = 40000\n', ("media.port_max", "incomplete_range")),
    ('[media]\naddresses = ["127.0.0.1", "all"]\n', ("media.addresses", "invalid_address")),
    ('[media]\naddresses = ["nara.example.se"]\n', ("media.addresses", "invalid_address")),
    ('[server]\npublic_url = "nara.example.se"\n', ("server.public_url", "invalid_url")),
    ('[cluster]\nnode_url = "ftp://node-1"\n', ("cluster.node_url", "invalid_url")),
    ('[cluster]\nredis_url = "http://redis:6379"\n', ("cluster.redis_url", "invalid_url")),
    ('[cluster]\nnode_id = "node 1!"\n', ("cluster.node_id", "invalid_value")),
    ('[cluster]\nload_interval = 0\n', ("cluster.load_interval", "out_of_range")),
    ('[turn]\nurls = ["stun:turn.example.se"]\nstatic_auth_secret = "s3cret-s3cret"\n', ("turn.urls", "invalid_url")),
    ('[turn]\nurls = ["turn:turn.example.se?transport=sctp"]\nstatic_auth_secret = "x"\n',
     ("turn.urls", "invalid_url")),
    ('[turn]\nurls = ["turn:turn.example.se"]\n', ("turn.urls", "missing_credentials")),
    ('[turn]\nurls = ["turn:turn.example.se"]\nusername = "nara"\n', ("turn.credential", "incomplete_credentials")),
    ('[turn]\nurls = ["turn:t.example.se"]\nusername = "u"\ncredential = "c"\nstatic_auth_secret = "s"\n',
     ("turn.static_auth_secret", "conflicting_keys")),
    ('[turn]\ntransport_policy = "relay"\n', ("turn.transport_policy", "missing_value")),
    ('[turn]\ntransport_policy = "relayed"\n', ("turn.transport_policy", "invalid_value")),
    ('[turn]\nttl = 5\n', ("turn.ttl", "out_of_range")),
    ('[tokens]\nalgorithm = "ES256"\n', ("tokens.algorithm", "unknown_algorithm")),
    ('[tokens]\nalgorithm = "EdDSA"\n', ("tokens.public_key", "missing_key")),
    ('[tokens]\nalgorithm = "RS256"\npublic_key = "/nonexistent/pub.pem"\n', ("tokens.public_key", "missing_file")),
    ('[tokens]\nissuer = ""\n', ("tokens.issuer", "invalid_value")),
    ('[server]\nlog_level = "verbose"\n', ("server.log_level", "invalid_value")),
    ('[server]\nlog_format = "logfmt"\n', ("server.log_format", "invalid_value")),
    ('[server]\nupload_max_size = 0\n', ("server.upload_max_size", "out_of_range")),
    ('[server]\nport = \n', ("config", "toml_syntax")),
])
def test_each_kind_of_mistake_names_its_field_and_code(tmp_path: Path, toml: str, expected: tuple[str, str]) -> None:
    assert expected in problems_of(tmp_path, toml)


def test_every_problem_is_reported_at_once_with_a_sentence(tmp_path: Path) -> None:
    path = tmp_path / "nara.toml"
    path.write_text('[server]\nprot = 1\nlog_level = "loud"\n[media]\nport_min = 50000\nport_max = 40000\n'
                    '[cluster]\nredis_url = "http://user:hunter2-password@redis"\n')
    _, problems = settings.load(path, {"NARA_SERVER_PORT": "abc"})
    fields = [p.field for p in problems]
    assert fields == ["server.prot", "server.port", "server.log_level", "media.port_min", "cluster.redis_url"]
    by_field = {p.field: p for p in problems}
    assert "Did you mean 'port'?" in by_field["server.prot"].message
    assert "NARA_SERVER_PORT='abc' is not a whole number" in by_field["server.port"].message
    assert "hunter2-password" not in str(problems), "a password in a URL is never repeated"
    assert str(by_field["media.port_min"]).startswith("media.port_min: invalid_range: ")


def test_toml_syntax_errors_say_where(tmp_path: Path) -> None:
    path = tmp_path / "nara.toml"
    path.write_text('[server]\nport = 8080\nhost = "127.0.0.1\n')
    _, problems = settings.load(path, {})
    assert [(p.field, p.code) for p in problems] == [("config", "toml_syntax")]
    assert "line 3" in problems[0].message and "column" in problems[0].message


def test_missing_and_unreadable_key_files(tmp_path: Path) -> None:
    public = tmp_path / "pub.pem"
    public.write_text("not a key")
    found = problems_of(tmp_path, f'[tokens]\nalgorithm = "EdDSA"\npublic_key = "{public}"\n'
                                  f'private_key = "{tmp_path / "missing.pem"}"\n')
    assert found == {("tokens.private_key", "missing_file")}
    found = problems_of(tmp_path, f'[tokens]\nalgorithm = "EdDSA"\npublic_key = "{public}"\n')
    assert found == {("tokens.public_key", "invalid_key")}
    found = problems_of(tmp_path, f'[tokens]\nalgorithm = "EdDSA"\npublic_key = "{tmp_path}"\n')
    assert found == {("tokens.public_key", "unreadable_file")}


def test_an_eddsa_key_pair_is_accepted(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert problems_of(tmp_path, f'[tokens]\nalgorithm = "EdDSA"\npublic_key = "{tmp_path / "pub.pem"}"\n'
                                 f'private_key = "{tmp_path / "key.pem"}"\n') == set()


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = tmp_path / "nara.toml"
    path.write_text('[server]\nport = 9000\nhost = "127.0.0.2"\n[media]\naddresses = ["127.0.0.1"]\n')
    environ = {"NARA_SERVER_PORT": "9001", "NARA_MEDIA_ADDRESSES": "127.0.0.1, 127.0.0.3",
               "NARA_CLUSTER_REDIS_URL": "redis://127.0.0.1:6379/0", "NARA_METRICS_ENABLED": "false",
               "NARA_MEDIA_PORT_MIN": "40000", "NARA_MEDIA_PORT_MAX": "40099", "NARA_TRACES": "/elsewhere"}

    def flags(config: ServerConfig) -> None:
        config.host = "127.0.0.4"

    config, problems = settings.load(path, environ, flags)
    assert problems == []
    assert (config.host, config.port) == ("127.0.0.4", 9001)
    assert config.media_addresses == ["127.0.0.1", "127.0.0.3"]
    assert config.cluster_redis_url == "redis://127.0.0.1:6379/0" and config.metrics_enabled is False
    assert (config.media_port_min, config.media_port_max) == (40000, 40099)


def test_environment_mistakes_name_the_variable(tmp_path: Path) -> None:
    _, problems = settings.load(None, {"NARA_MEDIA_ADAPTATION": "perhaps", "NARA_SERVER_PROT": "1",
                                       "NARA_TURN_CREDENTIAL": "x", "NARA_TURN_TTL": "an hour"})
    text = "\n".join(map(str, problems))
    assert "media.adaptation: wrong_type: NARA_MEDIA_ADAPTATION='perhaps' is not true or false." in text
    assert "NARA_SERVER_PROT: unknown_key:" in text and "NARA_SERVER_PORT" in text
    assert "turn.ttl: wrong_type: NARA_TURN_TTL='an hour'" in text


def test_without_a_file_the_embedded_defaults_stand() -> None:
    config, problems = settings.load(None, {})
    assert problems == []
    assert config == ServerConfig(cluster_node_id=config.cluster_node_id)
    assert (config.host, config.port, config.data_dir, config.media_addresses) == (
        "127.0.0.1", 8080, Path("nara-data"), ["127.0.0.1"])


def test_the_example_file_is_valid_and_shows_every_key() -> None:
    example = PROJECT / "deploy" / "nara.toml"
    config, problems = settings.load(example, {})
    assert problems == [], problems
    text = example.read_text()
    for key in settings.SCHEMA:
        assert f"{key.name} =" in text, f"deploy/nara.toml does not show {key.path}"


def nara(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NARA_")}
    return subprocess.run([sys.executable, "-m", "nara.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**environ, "PYTHONPATH": str(PROJECT), **(env or {})})


def test_check_config_prints_each_problem_and_exits_1_and_serve_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "nara.toml"
    path.write_text('[server]\nport = 99999\n[media]\nport_min = 40010\nport_max = 40000\n')
    checked = nara("check-config", str(path), cwd=tmp_path)
    assert checked.returncode == 1
    lines = checked.stdout.splitlines()
    assert lines[0].startswith("server.port: out_of_range: ") and lines[1].startswith("media.port_min: invalid_range")
    served = nara("serve", "--config", str(path), cwd=tmp_path)
    assert served.returncode == 2
    assert "Traceback" not in served.stderr
    assert served.stderr.splitlines()[:2] == lines
    assert not (tmp_path / "nara-data").exists(), "nothing was started or created"


def test_check_config_shows_the_effective_settings_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "nara.toml"
    path.write_text('[turn]\nurls = ["turn:turn.example.se:3478?transport=udp", "turns:turn.example.se:5349"]\n'
                    'static_auth_secret = "coturn-shared-secret-1234"\n'
                    '[cluster]\nredis_url = "redis://:redis-password-5678@127.0.0.1:6379/0"\n')
    checked = nara("check-config", cwd=tmp_path, env={"NARA_CONFIG": str(path), "NARA_SERVER_PORT": "9100"})
    assert checked.returncode == 0, checked.stdout
    assert "server.port = 9100" in checked.stdout
    assert "turn.static_auth_secret = (set)" in checked.stdout
    assert "coturn-shared-secret-1234" not in checked.stdout and "redis-password-5678" not in checked.stdout
