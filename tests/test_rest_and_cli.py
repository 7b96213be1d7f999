"""REST for administrators, the `nara` command, and the first-run experience."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp

from signalling.tokens import TokenAuthority, TokenKeys

from .conftest import RunningServer


async def test_rest_needs_the_admin_key(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/consultations") as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "admin_key_missing"
        async with http.get(f"{server.url}/api/consultations",
                            headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "admin_key_invalid"


async def test_consultations_and_tokens_over_rest(server: RunningServer) -> None:
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.post(f"{server.url}/api/consultations", json={"title": "Hemsjukvård Pajala"}) as r:
            assert r.status == 201
            created = await r.json()
        async with http.get(f"{server.url}/api/consultations") as r:
            listed = (await r.json())["consultations"]
        assert [c["id"] for c in listed] == [created["id"]]
        assert listed[0]["title"] == "Hemsjukvård Pajala"
        async with http.post(f"{server.url}/api/consultations/{created['id']}/tokens",
                             json={"name": "Dr Berg", "role": "clinician", "ttl_seconds": 600}) as r:
            assert r.status == 201
            minted = await r.json()
        claims = server.hub.authority.verify(minted["token"], created["id"])
        assert (claims.name, claims.role) == ("Dr Berg", "clinician")
        assert claims.expires_at - claims.issued_at == 600
        assert minted["join_url"].endswith(f"/c/{created['id']}#token={minted['token']}")
        bad_requests = [
            ({"name": "X", "role": "wizard"}, "role_invalid"),
            ({"role": "nurse"}, "name_invalid"),
            ({"name": "X", "role": "nurse", "ttl_seconds": 13 * 3600}, "ttl_invalid"),
            ({"name": "X", "role": "nurse", "ttl_seconds": True}, "ttl_invalid"),
            ({"name": "", "role": "nurse"}, "token_request_invalid"),
        ]
        for body, code in bad_requests:
            async with http.post(f"{server.url}/api/consultations/{created['id']}/tokens", json=body) as r:
                assert r.status == 400, body
                assert (await r.json())["error"]["code"] == code
        async with http.post(f"{server.url}/api/consultations/nope/tokens",
                             json={"name": "X", "role": "nurse"}) as r:
            assert r.status == 404
        async with http.post(f"{server.url}/api/consultations", data=b"{not json") as r:
            assert (await r.json())["error"]["code"] == "body_malformed"
        async with http.post(f"{server.url}/api/consultations", data=b"x" * 20000) as r:
            assert r.status == 413
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/healthz") as r:
            assert (await r.json())["status"] == "ok"


def nara(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nara.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path.cwd())})


def test_help_on_every_command(tmp_path: Path) -> None:
    for args in ([], ["serve"], ["token"], ["bench"], ["bench", "forward"]):
        result = nara(*args, "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "usage: nara" in result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_first_run_serves_with_generated_secrets_and_prints_join_links(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    process = subprocess.Popen(
        [sys.executable, "-m", "nara.cli", "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not any("home kit" in line for line in lines) and len(lines) < 20:  # the last join link
            lines.append(process.stdout.readline())
        output = "".join(lines)
        assert f"listening on http://127.0.0.1:{port}" in output
        links = dict(re.findall(r"^\s+(clinician|relative|home kit)\s+(\S+)$", output, re.M))
        assert set(links) == {"clinician", "relative", "home kit"}
        assert "/c/" in links["clinician"] and "/kit/" in links["home kit"], "a tablet opens the kit page"
        data = tmp_path / "nara-data"
        for name in ("token-secret", "admin-key"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
            assert (data / name).read_text() not in output, "secrets are never printed"
        assert (data / "nara.sqlite3").exists()
        room = links["clinician"].split("/c/")[1].split("#")[0]
        token = links["relative"].split("#token=")[1]
        authority = TokenAuthority(TokenKeys.shared_secret((data / "token-secret").read_text().encode()))
        claims = authority.verify(token, room)
        assert claims.role == "relative"
        # `nara token` mints with the same secret, for the same consultation
        minted = nara("token", "--room", room, "--name", "Sköterska Sara", "--role", "nurse", cwd=tmp_path)
        assert minted.returncode == 0, minted.stderr
        assert authority.verify(minted.stdout.strip(), room).name == "Sköterska Sara"
        refused = nara("token", "--room", "nope", "--name", "X", "--role", "nurse", cwd=tmp_path)
        assert refused.returncode == 2 and "no consultation" in refused.stderr
    finally:
        process.send_signal(signal.SIGTERM)  # no call is live: draining ends at once
        process.wait(timeout=20)
    assert process.returncode == 0
