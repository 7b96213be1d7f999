"""deploy/ checked by the tools an operator would trust: hadolint, the Compose Specification's
schema, systemd-analyze, shellcheck, nginx -t, nft -c, and coturn itself answering TURN requests
made with the secret it shares with Nära. docs/deploy.md says what each file is for.

A tool that is missing skips its test here, never in CI (CI is set there, and .ci/run installs
every tool)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioice import stun
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deploy.md"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The path of a linter from the virtual environment or the system; skipped only outside CI."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: .ci/run or pyproject.toml should install it")
        pytest.skip(f"{name} is not installed here")
    return found


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload, no-any-return]


def compose() -> dict[str, object]:
    loaded: dict[str, object] = YAML(typ="safe").load((DEPLOY / "compose.yaml").read_text())
    return loaded


def services() -> dict[str, dict[str, object]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nara.example.se")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "fullchain.pem", folder / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# --- the ports, as docs/deploy.md's table gives them ---------------------------------------------------------------

def documented_ports() -> set[tuple[str, str]]:
    """(port or range, protocol) for every row of the ports table open to the internet."""
    rows = set()
    for line in DOCS.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"\d+(-\d+)?", cells[0].replace("–", "-")) and cells[2] == "internet":
            rows.add((cells[0].replace("–", "-"), cells[1]))
    return rows


def firewall_ports() -> set[tuple[str, str]]:
    """(port or range, protocol) that deploy/firewall/nara.nft accepts from anywhere."""
    opened = set()
    for line in (DEPLOY / "firewall" / "nara.nft").read_text().splitlines():
        match = re.fullmatch(r"\s*(tcp|udp) dport (\{[^}]*\}|\S+) accept", line)
        if match:
            for port in match.group(2).strip("{}").split(","):
                opened.add((port.strip(), match.group(1)))
    return opened


def test_docs_ports_table_is_what_the_firewall_opens_and_the_servers_use() -> None:
    documented = documented_ports()
    assert documented == firewall_ports()
    turn = (DEPLOY / "coturn" / "turnserver.conf").read_text()
    setting = dict(re.findall(r"^([a-z-]+)=(\S+)$", turn, flags=re.MULTILINE))
    assert {(setting["listening-port"], "udp"), (setting["listening-port"], "tcp"),
            (setting["tls-listening-port"], "tcp")} <= documented
    assert (f"{setting['min-port']}-{setting['max-port']}", "udp") in documented
    media = tomllib.loads((DEPLOY / "nara.toml").read_text())["media"]
    assert (f"{media['port_min']}-{media['port_max']}", "udp") in documented
    exposed = re.search(r"^EXPOSE (.*)$", (DEPLOY / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert exposed is not None
    assert f"{media['port_min']}-{media['port_max']}/udp" in exposed.group(1).split()


# --- the container image -------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    result = run(hadolint, "--failure-threshold", "style", DEPLOY / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nADD . /src\nRUN apt-get install curl\nCMD nara serve\n")
    result = run(hadolint, bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3020", "DL3008", "DL3025"):
        assert rule in result.stdout


def test_image_runs_unprivileged_checks_its_health_and_bakes_no_secret() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    instructions = [line.split()[0] for line in lines if line and not line.startswith("#")
                    and line.split()[0].isupper()]
    last_from = max(i for i, word in enumerate(instructions) if word == "FROM")
    user = [line.split()[1] for line in lines if line.startswith("USER ")][-1]
    assert instructions.index("USER", last_from) < instructions.index("CMD"), "the runtime stage must switch user first"
    assert user.split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "/health/live" in (DEPLOY / "Dockerfile").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"nara=={version}" in (DEPLOY / "Dockerfile").read_text(), "the image installs this version of Nära"
    assert services()["nara"]["image"] == f"nara:{version}"
    for line in lines:
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"(?i)(secret|password|token|key)\w*=", line), line


# --- compose -------------------------------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification() -> None:
    checker = tool("check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    checker = tool("check-jsonschema")
    bad = tmp_path / "compose.yaml"
    misspelt = (DEPLOY / "compose.yaml").read_text().replace("    network_mode: host\n", "    netwrk_mode: host\n", 1)
    bad.write_text(misspelt)
    result = run(checker, "--builtin-schema", "vendor.compose-spec", bad)
    assert result.returncode != 0
    assert "netwrk_mode" in result.stdout + result.stderr


def test_compose_mounts_what_the_repository_has_and_keeps_secrets_out() -> None:
    # The TLS certificate and a copy of the server's generated metrics token: docs/deploy.md.
    given_by_the_operator = {"./coturn/certs", "./prometheus/metrics-token"}
    for name, service in services().items():
        for volume in service.get("volumes", []):  # type: ignore[attr-defined]
            source = str(volume).split(":")[0]
            if source.startswith(".") and source not in given_by_the_operator:
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which deploy/ lacks"
        image = str(service.get("image", ""))
        assert re.search(r":v?\d", image) and not image.endswith(":latest"), f"{name}: image {image} is not pinned"
        assert "environment" not in service, f"{name}: settings belong in nara.toml, secrets in nara.env"
        for env_file in service.get("env_file", []):  # type: ignore[attr-defined]
            assert not (DEPLOY / env_file).exists() or run("git", "ls-files", "--error-unmatch", DEPLOY / env_file,
                                                          cwd=ROOT).returncode != 0, f"{env_file} is committed"
            assert (DEPLOY / f"{Path(env_file).stem}.env.example").exists()
    example = (DEPLOY / "nara.env.example").read_text()
    assert re.search(r"^NARA_TURN_STATIC_AUTH_SECRET=$", example, flags=re.MULTILINE), "the example holds no secret"
    assert "cluster" in services()["redis"]["profiles"]  # type: ignore[operator]
    for name in ("nara", "coturn"):  # WebRTC's addresses must be the host's own
        assert services()[name]["network_mode"] == "host"


# --- systemd -------------------------------------------------------------------------------------------------------

def verify_unit(unit: Path, tmp_path: Path) -> str:
    """systemd-analyze verify's complaints about a unit, with ExecStart pointed at this checkout's nara.

    systemd-analyze refuses a unit whose program does not exist, and /opt/nara is not installed here; everything
    else in the unit is verified as written."""
    analyze = tool("systemd-analyze")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/nara/venv/bin/nara", str(BIN / "nara")))
    result = run(analyze, "verify", "--man=no", copy)
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f" (exit {result.returncode})")


@pytest.mark.parametrize("unit", ["nara.service", "nara-edge.service"])
def test_systemd_unit_verifies_without_a_complaint(unit: str, tmp_path: Path) -> None:
    assert "/opt/nara/venv/bin/nara " in (DEPLOY / unit).read_text()
    assert verify_unit(DEPLOY / unit, tmp_path) == ""


def test_systemd_analyze_reports_a_key_it_does_not_know(tmp_path: Path) -> None:
    bad = tmp_path / "nara.service"
    bad.write_text((DEPLOY / "nara.service").read_text().replace("NoNewPrivileges=", "NoNewPrivilege=", 1))
    assert "Unknown key 'NoNewPrivilege'" in verify_unit(bad, tmp_path / "..")


# --- the Raspberry Pi kit's provisioning ---------------------------------------------------------------------------

PROVISION = DEPLOY / "pi" / "provision.sh"


def test_provisioning_script_passes_shellcheck() -> None:
    result = run(tool("shellcheck"), "--severity=style", PROVISION)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_dry_run_shows_every_step_and_changes_nothing(tmp_path: Path) -> None:
    wheel = tmp_path / "nara-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    before = {path: path.exists() for path in (Path("/opt/nara"), Path("/etc/nara/edge.toml"),
                                                Path("/etc/systemd/system/nara-edge.service"))}
    result = run("bash", PROVISION, "--dry-run", "--server", "https://nara.example.se", "--code", "QWER-TYUI",
                 "--package", wheel)
    assert result.returncode == 0, result.stdout + result.stderr
    plan = result.stdout
    assert "QWER-TYUI" not in plan + result.stderr, "the enrolment code is a secret"
    expected = [
        f"pip install --quiet --upgrade {wheel}",
        "edge check-config /etc/nara/edge.toml",
        "edge enrol --server https://nara.example.se --code <code> --credential /var/lib/nara-edge/credential.json",
        "/etc/sysctl.d/90-nara-edge.conf",
        "/etc/modules-load.d/nara-edge-bbr.conf",
        "systemctl enable nara-edge.service",
        "dry run: nothing was changed",
    ]
    for step in expected:
        assert step in plan
    if not Path("/opt/nara/venv/bin/python").exists():
        assert "python3 -m venv --system-site-packages /opt/nara/venv" in plan
    assert {path: path.exists() for path in before} == before


@pytest.mark.parametrize(("args", "message"), [
    (["--server", "http://nara.example.se", "--package", "{wheel}"], "--server must be an https:// URL"),
    (["--server", "https://nara.example.se", "--package", "/nonexistent/nara.whl"], "does not exist"),
    (["--server", "https://nara.example.se"], "--package is required"),
    (["--server", "https://nara.example.se", "--package", "{wheel}", "--cod", "X"], "unknown argument: --cod"),
])
def test_provisioning_refuses_bad_arguments_clearly(args: list[str], message: str, tmp_path: Path) -> None:
    wheel = tmp_path / "nara.whl"
    wheel.write_bytes(b"")
    result = run("bash", PROVISION, "--dry-run", *[a.replace("{wheel}", str(wheel)) for a in args])
    assert result.returncode == 1
    assert message in result.stderr


# --- the TLS proxy and the firewall --------------------------------------------------------------------------------

def test_nginx_accepts_the_proxy_configuration(tmp_path: Path) -> None:
    nginx = tool("nginx")
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("nginx -t reads its modules and logs as root")
    cert, key = self_signed(tmp_path)
    site = (DEPLOY / "proxy" / "nginx.conf").read_text()
    site = site.replace("/etc/letsencrypt/live/nara.example.se/fullchain.pem", str(cert))
    site = site.replace("/etc/letsencrypt/live/nara.example.se/privkey.pem", str(key))
    # nginx -t binds its listening sockets: loopback ports of the test's own instead of the web address.
    site = site.replace("198.51.100.20:80;", f"127.0.0.1:{free_port()};")
    site = site.replace("198.51.100.20:443 ", f"127.0.0.1:{free_port()} ")
    (tmp_path / "nara.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    include {tmp_path}/nara.conf;\n}}\n")
    result = run(nginx, "-t", "-p", tmp_path, "-c", tmp_path / "nginx.conf", "-e", "stderr")
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nft_accepts_the_firewall_rules() -> None:
    nft = tool("nft")
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("nft -c needs CAP_NET_ADMIN")
    result = run(nft, "-c", "-f", DEPLOY / "firewall" / "nara.nft")
    assert result.returncode == 0, result.stderr


# --- coturn as compose starts it -----------------------------------------------------------------------------------

REALM = "nara.example.se"
UDP_TRANSPORT = 17 << 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def turn_credential(secret: str, user: str, ttl: int = 600) -> tuple[str, str]:
    """A time-limited TURN username and password under the shared secret (the TURN REST API, coturn's
    use-auth-secret): what the server hands participants for [turn] static_auth_secret."""
    username = f"{int(time.time()) + ttl}:{user}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


class TurnClient:
    """Just enough TURN (RFC 8656) over UDP or TLS to allocate a relay and ask for permissions."""

    def __init__(self, sock: socket.socket, udp_to: tuple[str, int] | None = None) -> None:
        self.sock, self.udp_to = sock, udp_to
        self.nonce: bytes | None = None
        self.key = b""
        self.username = ""

    def exchange(self, request: stun.Message) -> stun.Message:
        if self.nonce is not None:
            request.attributes.update(USERNAME=self.username, REALM=REALM, NONCE=self.nonce)
            request.add_message_integrity(self.key)
        if self.udp_to is not None:
            self.sock.sendto(bytes(request), self.udp_to)
            data = self.sock.recv(2048)
        else:
            self.sock.sendall(bytes(request))
            data = self.read_exactly(20)
            data += self.read_exactly(int.from_bytes(data[2:4], "big"))
        answer = stun.parse_message(data)
        assert answer.transaction_id == request.transaction_id
        return answer

    def read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            assert chunk, "coturn closed the connection"
            data += chunk
        return data

    def allocate(self, username: str, password: str) -> stun.Message:
        challenge = self.exchange(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                                               attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT}))
        assert challenge.attributes["ERROR-CODE"][0] == 401
        self.nonce, self.username = challenge.attributes["NONCE"], username
        self.key = hashlib.md5(f"{username}:{REALM}:{password}".encode()).digest()
        return self.exchange(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                                          attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT}))

    def permit(self, peer: str) -> stun.Message:
        return self.exchange(stun.Message(stun.Method.CREATE_PERMISSION, stun.Class.REQUEST,
                                          attributes={"XOR-PEER-ADDRESS": (peer, 9)}))


def coturn_entrypoint(source: Path, copy: Path) -> str:
    """compose.yaml's coturn entrypoint, with the container's paths replaced by these."""
    script = str(services()["coturn"]["entrypoint"][2]).replace("$$", "$")  # type: ignore[index]
    return script.replace("/etc/coturn/turnserver.conf", str(source)).replace("/tmp/turnserver.conf", str(copy))


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[tuple[int, int, str]]:
    """deploy/coturn/turnserver.conf run by compose's entrypoint on loopback ports of its own."""
    turnserver = tool("turnserver")
    cert, key = self_signed(tmp_path)
    port, tls_port = free_port(), free_port()
    conf = (DEPLOY / "coturn" / "turnserver.conf").read_text()
    conf = conf.replace("/etc/coturn/certs", str(tmp_path))
    conf = re.sub(r"^listening-port=.*$", f"listening-port={port}", conf, flags=re.MULTILINE)
    conf = re.sub(r"^tls-listening-port=.*$", f"tls-listening-port={tls_port}", conf, flags=re.MULTILINE)
    conf = re.sub(r"^listening-ip=.*$", "listening-ip=127.0.0.1", conf, flags=re.MULTILINE)
    (tmp_path / "turnserver.conf").write_text(conf)
    secret = base64.b64encode(os.urandom(24)).decode()
    log = (tmp_path / "coturn.log").open("w")
    env = {**os.environ, "NARA_TURN_STATIC_AUTH_SECRET": secret, "PATH": f"{Path(turnserver).parent}:/usr/bin:/bin"}
    process = subprocess.Popen(["sh", "-c", coturn_entrypoint(tmp_path / "turnserver.conf", tmp_path / "running.conf")],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.settimeout(0.2)
        deadline = time.monotonic() + 15
        while True:  # ready when it answers a STUN binding request
            assert process.poll() is None, (tmp_path / "coturn.log").read_text()
            assert time.monotonic() < deadline, "coturn did not answer within 15 s"
            probe.sendto(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)), ("127.0.0.1", port))
            try:
                probe.recv(2048)
                break
            except TimeoutError:
                continue
        probe.close()
        yield port, tls_port, secret
        assert "Bad configuration format" not in (tmp_path / "coturn.log").read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def test_coturn_relays_for_nara_credentials_only_and_never_to_private_peers(coturn: tuple[int, int, str]) -> None:
    port, tls_port, secret = coturn
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        client = TurnClient(sock, ("127.0.0.1", port))
        answer = client.allocate(*turn_credential(secret, "kit-7"))
        assert answer.message_class == stun.Class.RESPONSE, answer.attributes.get("ERROR-CODE")
        assert answer.attributes["XOR-RELAYED-ADDRESS"][1] in range(50000, 51000)
        # A private network behind the server is out of reach; the SFU's own private address is not.
        assert client.permit("192.168.1.20").attributes["ERROR-CODE"][0] == 403
        assert client.permit("127.0.0.1").attributes["ERROR-CODE"][0] == 403
        assert client.permit("10.20.0.5").message_class == stun.Class.RESPONSE
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        forged = TurnClient(sock, ("127.0.0.1", port)).allocate(*turn_credential("not-the-secret", "kit-7"))
        assert forged.attributes["ERROR-CODE"][0] == 401


def test_coturn_allocates_over_tls(coturn: tuple[int, int, str]) -> None:
    port, tls_port, secret = coturn
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=REALM) as tls:
            answer = TurnClient(tls).allocate(*turn_credential(secret, "clinician"))
            assert answer.message_class == stun.Class.RESPONSE, answer.attributes.get("ERROR-CODE")


def test_coturn_entrypoint_refuses_an_empty_secret(tmp_path: Path) -> None:
    source = tmp_path / "turnserver.conf"
    source.write_text("")
    result = run("sh", "-c", coturn_entrypoint(source, tmp_path / "running.conf"),
                 env={**os.environ, "NARA_TURN_STATIC_AUTH_SECRET": ""})
    assert result.returncode == 78
    assert "NARA_TURN_STATIC_AUTH_SECRET is empty" in result.stderr
    assert not (tmp_path / "running.conf").exists()
