"""The network doctor: `nara doctor` against a real `nara serve` and a real coturn, and the server's side of it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiortc import RTCPeerConnection

from bench.process import PROJECT, free_port
from mediaserver.doctor_peer import MAX_BYTES, MAX_SECONDS, DoctorPeer
from nara.doctor import DoctorOptions, ProbeConnection
from nara.doctor import run_doctor as doctor_in_process
from nara.doctor_verdict import Check, Report, render, verdict
from signalling.doctor import DOCTOR, DOCTOR_ROOM, MAX_PEERS, OFFER_BURST, mint_doctor_token
from signalling.turn import time_limited_credential

from .conftest import RunningServer, start_server
from .coturn import Coturn, coturn_or_skip
from .edge_helpers import ServerProcess, enrolled_kit
from .tcp_only import namespaces_available, run_behind_tcp_only

DOCTOR_SECONDS = "1"  # each direction of the bandwidth test: enough on loopback


# --- a nara serve with a TURN server -------------------------------------------------


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    coturn_or_skip()
    turn = Coturn(tmp_path_factory.mktemp("coturn"))
    turn.start()
    yield turn
    turn.stop()


@pytest.fixture(scope="module")
def served(coturn: Coturn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`nara serve` whose [turn] names coturn over UDP and over TLS, with coturn's shared secret."""
    directory = tmp_path_factory.mktemp("served")
    config = directory / "nara.toml"
    config.write_text(f"[turn]\nurls = {json.dumps(coturn.urls)}\nstatic_auth_secret = \"{coturn.secret}\"\n")
    server = ServerProcess(directory / "data", "--config", str(config))
    server.start()
    yield server
    assert server.process is not None
    server.process.terminate()
    server.process.wait(20)


@pytest.fixture
def turn_up(coturn: Coturn) -> Coturn:
    if coturn.process is None:
        coturn.start()
    return coturn


def doctor_token(server: ServerProcess) -> str:
    from signalling.config import ServerConfig, token_keys
    from signalling.tokens import TokenAuthority

    keys = token_keys(ServerConfig(data_dir=server.data_dir))
    return mint_doctor_token(TokenAuthority(keys))[0]


def doctor_command(server_url: str, token: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nara.cli", "doctor", "--server", server_url, "--token", token,
            "--local-address", "127.0.0.1", "--seconds", DOCTOR_SECONDS, "--timeout", "5", *extra]


def doctor_env(coturn: Coturn) -> dict[str, str]:
    """The doctor trusts the test's TURN certificate the way any Python program trusts a private CA."""
    return {**os.environ, "PYTHONPATH": str(PROJECT), "SSL_CERT_FILE": str(coturn.ca_file)}


async def run_doctor(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(*command, cwd=PROJECT, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def row(table: str, label: str) -> str:
    """The table's line for one check."""
    return next(line for line in table.splitlines() if line.startswith(f"  {label} "))


def checks_of(output: str) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in json.loads(output)["checks"]}


async def test_doctor_sees_udp_and_both_turn_paths_then_the_relay_going_down(
        served: ServerProcess, turn_up: Coturn) -> None:
    token = doctor_token(served)
    status, out, err = await run_doctor(doctor_command(served.url, token, "--json"), doctor_env(turn_up))
    assert status == 0, out + err
    checks = checks_of(out)
    for kind in ("http", "websocket", "udp-direct", "turn-udp", "turn-tls"):
        assert checks[kind]["ok"], checks[kind]
        assert 0 < checks[kind]["rtt_ms"] < 1000, checks[kind]
    assert checks["turn-udp"]["url"] == turn_up.urls[0] and checks["turn-tls"]["url"] == turn_up.urls[1]
    for kind in ("bandwidth-down", "bandwidth-up"):  # loopback carries far more than any home link
        assert checks[kind]["ok"] and checks[kind]["kbps"] > 2000, checks[kind]
        assert checks[kind]["detail"] == "over UDP direct"
    assert "Calls go directly over UDP" in json.loads(out)["verdict"]

    turn_up.stop()
    status, out, err = await run_doctor(doctor_command(served.url, token, "--json"), doctor_env(turn_up))
    assert status == 0, out + err  # a call is still possible, straight over UDP
    checks = checks_of(out)
    assert checks["udp-direct"]["ok"] and checks["bandwidth-down"]["ok"]
    for kind, over, port in (("turn-udp", "UDP", turn_up.port), ("turn-tls", "TLS", turn_up.tls_port)):
        assert not checks[kind]["ok"]  # and says why, as far as can be seen from here
        assert checks[kind]["detail"].startswith(f"127.0.0.1:{port} refused {over}"), checks[kind]
    words = json.loads(out)["verdict"]
    assert "If UDP is ever blocked here there is no fallback" in words and "TURN/TLS failed" in words


@pytest.mark.skipif(not namespaces_available() and not os.environ.get("CI"),
                    reason="needs root with unshare and ip for a network namespace (run ./scripts/test)")
async def test_behind_a_firewall_that_lets_only_tcp_through_the_doctor_finds_turn_over_tls(
        served: ServerProcess, turn_up: Coturn, tmp_path: Path) -> None:
    # The doctor's namespace reaches the server's HTTP port and coturn's TCP ports, and no UDP at all.
    status, out, err = await run_behind_tcp_only(
        tmp_path, [served.port, turn_up.port, turn_up.tls_port],
        doctor_command(served.url, doctor_token(served)), timeout=90, env=doctor_env(turn_up))
    assert status == 0, out + err
    assert " ok " in row(out, "HTTP(S)") and " ok " in row(out, "WebSocket"), out
    assert "FAILED" in row(out, "UDP direct") and "FAILED" in row(out, "TURN/UDP"), out
    assert "refused UDP" in row(out, "TURN/UDP") and "no connection over UDP" in row(out, "UDP direct"), out
    assert " ok " in row(out, "TURN/TLS") and row(out, "TURN/TLS").endswith(turn_up.urls[1]), out
    assert "over TURN/TLS" in row(out, "Bandwidth down") and "kbit/s" in row(out, "Bandwidth up"), out
    assert f"UDP is blocked: calls will go through TURN over TLS on port {turn_up.tls_port}" in out, out
    assert "A call is possible." in out


async def test_a_kit_checks_with_its_own_configuration_and_credential(
        served: ServerProcess, turn_up: Coturn, tmp_path: Path) -> None:
    _, credential = await enrolled_kit(served.url, served.admin_key, tmp_path)
    config = tmp_path / "kit.toml"
    config.write_text(f'server = "{served.url}"\ncredential = "{credential}"\n')
    command = [sys.executable, "-m", "nara.cli", "doctor", "--kit-config", str(config), "--json",
               "--local-address", "127.0.0.1", "--seconds", DOCTOR_SECONDS]
    status, out, err = await run_doctor(command, doctor_env(turn_up))
    assert status == 0, out + err
    assert json.loads(out)["server"] == served.url and json.loads(out)["relay_only"] is None
    checks = checks_of(out)
    assert checks["udp-direct"]["ok"] and checks["turn-udp"]["ok"] and checks["turn-tls"]["ok"], checks

    # A kit with a relay of its own sends every call through it: that relay is what is checked.
    username, password = time_limited_credential(turn_up.secret, "kit-7", 600, time.time())
    config.write_text(f'server = "{served.url}"\ncredential = "{credential}"\n\n[turn]\n'
                      f'url = "{turn_up.urls[1]}"\nusername = "{username}"\ncredential = "{password}"\n')
    status, out, err = await run_doctor(command, doctor_env(turn_up))
    assert status == 0, out + err
    checks = checks_of(out)
    assert "turn-udp" not in checks and checks["turn-tls"]["ok"] and checks["turn-tls"]["url"] == turn_up.urls[1]
    assert checks["bandwidth-down"]["detail"] == "over TURN/TLS"  # not the direct path a call would not take
    assert json.loads(out)["verdict"].startswith(
        "Every call from here goes through TURN (the kit's configuration names its own TURN relay): over TLS on port "
        f"{turn_up.tls_port}")


async def test_a_server_with_the_wrong_turn_secret_is_told_apart_from_an_unreachable_relay(
        tmp_path: Path, turn_up: Coturn) -> None:
    running, runner = await start_server(tmp_path, turn_urls=[turn_up.urls[0]], turn_static_auth_secret="not coturn's")
    try:
        token, _ = mint_doctor_token(running.hub.authority)
        report = await doctor_in_process(DoctorOptions(running.url, f"Bearer {token}", timeout=5, seconds=0.5))
    finally:
        await runner.cleanup()
    turn = report.get("turn-udp")
    assert turn is not None and not turn.ok
    assert "the TURN server answers but refused the credentials" in turn.detail
    assert verdict(report.checks)[0]  # direct UDP still carries the call


async def test_a_server_that_cannot_be_reached_means_no_call(tmp_path: Path) -> None:
    status, out, _ = await run_doctor(doctor_command(f"http://127.0.0.1:{free_port()}", "token"),
                                      {**os.environ, "PYTHONPATH": str(PROJECT)})
    assert status == 1
    assert "HTTP(S)         FAILED" in out and "cannot connect" in out
    assert "No call is possible from here. The server cannot be reached" in out


# --- who may open a test connection --------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_config(http: aiohttp.ClientSession, server: RunningServer, authorization: str | None,
                     ) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": authorization} if authorization else {}
    async with http.get(f"{server.url}/doctor/config", headers=headers) as response:
        return response.status, await response.json()


async def test_only_a_doctor_token_a_join_token_or_a_kit_credential_opens_the_checks(
        server: RunningServer, http: aiohttp.ClientSession) -> None:
    server.config.turn_urls = ["turn:turn.example.se:3478", "turns:turn.example.se:443?transport=tcp"]
    server.config.turn_static_auth_secret = "shared"
    doctor, _ = mint_doctor_token(server.hub.authority)
    room = server.consultation()
    kits = server.hub.devices
    assert kits is not None
    device, code = kits.store.create("Kit 7", time.time())
    device, secret = kits.store.enrol(code, time.time())

    for authorization in (f"Bearer {doctor}", f"Bearer {server.token(room, role='relative')}",
                          f"Device {device.id}:{secret}"):
        status, body = await get_config(http, server, authorization)
        assert status == 200, body
        kinds = [(t["kind"], t["url"]) for t in body["turn"]]
        assert kinds == [("turn-udp", server.config.turn_urls[0]), ("turn-tls", server.config.turn_urls[1])]
        expiry, _, name = body["turn"][0]["username"].partition(":")
        assert name == "doctor" and 3500 < int(expiry) - time.time() <= 3600  # coturn's time-limited credential
        assert body["turn"][0]["credential"] == time_limited_credential("shared", "doctor", 3600, int(expiry) - 3600)[1]

    forged = jwt.encode({"room": DOCTOR_ROOM, "sub": "x", "name": "x", "role": "observer", "iss": "nara",
                         "aud": "nara", "iat": int(time.time()), "exp": int(time.time()) + 60, "jti": "j"},
                        "another secret, long enough for HS256 keys", algorithm="HS256")
    refusals = {
        None: (401, "credential_missing"),
        f"Bearer {forged}": (403, "token_bad_signature"),
        "Bearer not-a-jwt": (403, "token_malformed"),
        f"Device {device.id}:wrong": (401, "device_credential_invalid"),
    }
    for authorization, (expected_status, code) in refusals.items():
        status, body = await get_config(http, server, authorization)
        assert (status, body["error"]["code"]) == (expected_status, code), authorization
    kits.store.revoke(device.id, time.time())
    status, body = await get_config(http, server, f"Device {device.id}:{secret}")
    assert (status, body["error"]["code"]) == (403, "device_revoked")

    # A doctor token opens nothing else: it is no way into a consultation.
    async with http.post(f"{server.url}/join/check", json={"room": DOCTOR_ROOM, "token": doctor}) as response:
        assert response.status == 404


async def test_a_refused_credential_is_said_plainly(server: RunningServer) -> None:
    report = await doctor_in_process(DoctorOptions(server.url, "Bearer not-a-token", timeout=5))
    assert [(c.kind, c.ok) for c in report.checks] == [("http", True), ("websocket", True), ("credential", False)]
    possible, words = verdict(report.checks)
    assert not possible
    assert words.startswith("The server did not accept the credential (token_malformed: The token is not a JWT.)")


async def test_doctor_tokens_come_from_the_admin_and_offers_are_rate_limited(
        server: RunningServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{server.url}/api/doctor/tokens", json={}) as response:
        assert response.status == 401
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    async with http.post(f"{server.url}/api/doctor/tokens", json={"ttl_seconds": 600}, headers=admin) as response:
        assert response.status == 201
        minted = await response.json()
    assert minted["doctor_url"] == f"{server.url}/doctor/#token={minted['token']}"
    assert 590 < minted["expires_at"] - time.time() <= 600
    authorised = {"Authorization": f"Bearer {minted['token']}"}
    async with http.post(f"{server.url}/doctor/offer", json={"sdp": "not sdp"}, headers=authorised) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (400, "sdp_invalid")
    codes = []
    for _ in range(OFFER_BURST):  # the burst counts every offer, refused ones too (the one above)
        async with http.post(f"{server.url}/doctor/offer", json={}) as response:
            codes.append((await response.json())["error"]["code"])
    assert codes == ["credential_missing"] * (OFFER_BURST - 1) + ["rate_limited"]


async def test_the_doctor_peer_keeps_its_limits(server: RunningServer, http: aiohttp.ClientSession) -> None:
    token, _ = mint_doctor_token(server.hub.authority)
    probe = ProbeConnection([], relay_only=False)
    try:
        await probe.connect(http, server.url, {"Authorization": f"Bearer {token}"}, relay=False, timeout=10)
        probe.channel.send(json.dumps({"type": "down", "seconds": 3600, "bytes": 10**9}))
        done = await probe.reply("down-done", MAX_SECONDS + 10)
        assert 0 < done["bytes"] <= MAX_BYTES and done["seconds"] <= MAX_SECONDS + 1
        for message, code in (("[1]", "message_malformed"), ('{"type": "shell"}', "type_unknown"),
                              ('{"type": "down", "seconds": -1}', "request_invalid"), ("x" * 2000, "message_too_long")):
            probe.channel.send(message)
            with pytest.raises(Exception, match=code):
                await probe.reply("never", 5)
        assert 0 < await probe.round_trip(3) < 1000  # and the peer still answers
    finally:
        await probe.close()


async def test_a_check_that_never_connects_gives_its_place_back_and_a_full_server_says_busy(
        server: RunningServer, http: aiohttp.ClientSession) -> None:
    client = RTCPeerConnection()
    client.createDataChannel("doctor")
    await client.setLocalDescription(await client.createOffer())
    closed = asyncio.Event()
    peer = DoctorPeer(lifetime=60, on_closed=lambda _: closed.set(), connect_within=0.5)
    try:
        await peer.answer(client.localDescription.sdp)  # and the client never takes the answer
        await asyncio.wait_for(closed.wait(), 10)
        assert peer.closed
    finally:
        await client.close()

    service = server.app[DOCTOR]
    holders = [DoctorPeer(lifetime=60) for _ in range(MAX_PEERS)]
    service.peers.update(holders)
    token, _ = mint_doctor_token(server.hub.authority)
    client = RTCPeerConnection()
    client.createDataChannel("doctor")
    try:
        await client.setLocalDescription(await client.createOffer())
        async with http.post(f"{server.url}/doctor/offer", json={"sdp": client.localDescription.sdp},
                             headers={"Authorization": f"Bearer {token}"}) as response:
            assert (response.status, (await response.json())["error"]["code"]) == (503, "doctor_busy")
    finally:
        await client.close()
        for holder in holders:
            await holder.close()


# --- what the results mean -------------------------------------------------------------

TLS = "turns:turn.example.se:443?transport=tcp"
REACHED = [Check("http", True, rtt_ms=30), Check("websocket", True, rtt_ms=40)]


@pytest.mark.parametrize(("checks", "possible", "words"), [
    ([*REACHED, Check("udp-direct", True, rtt_ms=41), Check("turn-udp", True, rtt_ms=50, url="turn:t.se")], True,
     "Every call from here goes through TURN (policy): over UDP on port 3478 (round trip 50 ms; +10 ms"),
    ([*REACHED, Check("udp-direct", True, rtt_ms=41), Check("turn-udp", False, detail="no answer")], False,
     "Every call from here goes through TURN (policy), and no TURN relay could be used (TURN/UDP: no answer)"),
])
def test_when_every_call_goes_through_turn_direct_udp_does_not_count(
        checks: list[Check], possible: bool, words: str) -> None:
    assert verdict(checks, "policy")[0] is possible
    assert words in verdict(checks, "policy")[1]


@pytest.mark.parametrize(("checks", "possible", "words"), [
    ([Check("http", False, detail="cannot connect: Connection refused")], False,
     "The server cannot be reached (cannot connect: Connection refused)"),
    ([REACHED[0], Check("websocket", False, detail="HTTP 400")], False, "blocks WebSocket upgrades"),
    ([*REACHED, Check("udp-direct", True, rtt_ms=41), Check("turn-udp", True, rtt_ms=45),
      Check("turn-tls", True, rtt_ms=48, url=TLS)], True, "Calls go directly over UDP (round trip 41 ms)."),
    ([*REACHED, Check("udp-direct", False, detail="no connection within 12 s"), Check("turn-udp", True, rtt_ms=55)],
     True, "Direct UDP to the media server is blocked: calls will go through TURN over UDP (round trip 55 ms; "
           "expect +15 ms"),
    ([*REACHED, Check("udp-direct", False, detail="x"), Check("turn-udp", False, detail="y"),
      Check("turn-tls", True, rtt_ms=70, url=TLS)], True,
     "UDP is blocked: calls will go through TURN over TLS on port 443 (round trip 70 ms; expect +30 ms"),
    ([*REACHED, Check("udp-direct", False, detail="x"), Check("turn-tls", False, detail="no relay address")],
     False, "No media path: direct UDP is blocked and no TURN relay could be used (TURN/TLS: no relay address)"),
    ([*REACHED, Check("udp-direct", False, detail="x")], False, "the server names no TURN relay"),
])
def test_the_verdict_says_in_plain_words_whether_and_how_a_call_goes(
        checks: list[Check], possible: bool, words: str) -> None:
    assert verdict(checks)[0] is possible
    assert words in verdict(checks)[1]


@pytest.mark.parametrize(("down", "up", "words"), [
    (1800, 1200, "enough for good video both ways"),
    (1800, 400, "video at reduced resolution"),
    (150, 2000, "audio and small, low-rate video only"),
    (80, 2000, "expect audio only"),
])
def test_the_verdict_says_what_the_bandwidth_allows(down: float, up: float, words: str) -> None:
    checks = [*REACHED, Check("udp-direct", True, rtt_ms=41), Check("bandwidth-down", True, kbps=down),
              Check("bandwidth-up", True, kbps=up)]
    assert words in verdict(checks)[1]
    table = render(Report("https://nara.example.se", checks))
    assert f"{down} kbit/s" in table and "Bandwidth up" in table and "A call is possible." in table
