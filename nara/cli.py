"""The ``nara`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from signalling.tokens import DEFAULT_TTL, MAX_TTL, ROLES


def _apply_flags(config: Any, args: argparse.Namespace) -> None:
    """Command-line flags win over the configuration file and the environment."""
    if getattr(args, "data_dir", None) is not None:
        config.data_dir = Path(args.data_dir)
    for name in ("host", "port", "public_url", "token_algorithm", "issuer", "audience"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    if getattr(args, "token_private_key", None):
        config.token_private_key = Path(args.token_private_key)
    if getattr(args, "token_public_key", None):
        config.token_public_key = Path(args.token_public_key)
    if getattr(args, "media_address", None):
        config.media_addresses = None if args.media_address == ["all"] else args.media_address
    if getattr(args, "no_demo", False):
        config.demo = False
    if getattr(args, "adaptation", None) is not None:
        config.adaptation = args.adaptation == "on"
    if getattr(args, "workers", None) is not None:
        config.media_workers = args.workers


def _load_config(args: argparse.Namespace, file: str | None = None):  # type: ignore[no-untyped-def]
    """The effective configuration (defaults, file, NARA_* environment, flags) and its problems."""
    import os

    from signalling import settings

    path = settings.config_path(file or getattr(args, "config", None), os.environ)
    return settings.load(path, os.environ, lambda config: _apply_flags(config, args))


def _server_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The effective configuration; on any problem, each is printed and the command exits with 2."""
    config, problems = _load_config(args)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"nara {args.command}: {len(problems)} problem(s) in the configuration (see `nara check-config`); "
              "nothing was started.", file=sys.stderr)
        raise SystemExit(2)
    return config


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML configuration file (default: $NARA_CONFIG; see docs/configuration.md)")
    parser.add_argument("--data-dir", help="state directory (default: ./nara-data)")
    parser.add_argument("--token-algorithm", choices=("HS256", "EdDSA", "RS256"), help="default HS256")
    parser.add_argument("--token-private-key", help="PEM private key for EdDSA/RS256 tokens")
    parser.add_argument("--token-public-key", help="PEM public key for EdDSA/RS256 tokens")
    parser.add_argument("--issuer", help="token issuer (default: nara)")
    parser.add_argument("--audience", help="token audience (default: nara)")
    parser.add_argument("--public-url", help="URL participants use to reach this server")


def cmd_serve(args: argparse.Namespace) -> int:
    from signalling.app import run

    run(_server_config(args))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from signalling import settings

    config, problems = _load_config(args, args.file)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s).", file=sys.stderr)
        return 1
    import os

    source = settings.config_path(args.file, os.environ)
    print(f"The configuration is valid ({source or 'embedded defaults'}, NARA_* environment applied). "
          "Effective settings:")
    for line in settings.summary(config):
        print(f"  {line}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from signalling.config import DATABASE_FILE, prepare_data_dir, token_keys
    from signalling.store import ConsultationStore
    from signalling.tokens import TokenAuthority

    config = _server_config(args)
    prepare_data_dir(config)
    store = ConsultationStore(config.data_dir / DATABASE_FILE)
    try:
        if store.get(args.room) is None:
            print(f"nara token: no consultation {args.room!r} in {config.data_dir}", file=sys.stderr)
            return 2
    finally:
        store.close()
    authority = TokenAuthority(token_keys(config), config.issuer, config.audience)
    try:
        token, claims = authority.mint(args.room, args.name, args.role, args.ttl, args.participant_id)
    except ValueError as exc:
        print(f"nara token: {exc}", file=sys.stderr)
        return 2
    if args.link and args.role == "kit":
        from signalling.web import kit_url

        print(kit_url(config.base_url, args.room, token))  # the tablet kit page
    elif args.link:
        print(f"{config.base_url}/c/{args.room}#token={token}")
    else:
        print(token)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from mediaserver.aiortc_adapter import restrict_host_addresses
    from nara.doctor import DoctorOptions, run_doctor
    from nara.doctor_verdict import TABLE_HEADER, render_row, render_verdict, verdict

    server, authorization = args.server, None
    credential_file = args.credential
    kit_turn = None
    try:
        if args.kit_config:
            from edge.config import EdgeConfigError, load_config

            try:
                kit = load_config(Path(args.kit_config))
            except EdgeConfigError as exc:
                print(f"nara doctor: {args.kit_config}: {exc}", file=sys.stderr)
                return 2
            server, credential_file = server or kit.server, credential_file or kit.credential
            if kit.turn is not None:
                from signalling.doctor import turn_checks

                kit_turn = turn_checks([{"urls": kit.turn.url, "username": kit.turn.username,
                                         "credential": kit.turn.credential}])
        if credential_file:
            from edge.device_api import CredentialError, read_credential

            try:
                credential = read_credential(Path(credential_file))
            except CredentialError as exc:
                print(f"nara doctor: {exc}", file=sys.stderr)
                return 2
            server = server or credential.server
            authorization = f"Device {credential.device_id}:{credential.secret}"
        elif args.token or os.environ.get("NARA_DOCTOR_TOKEN"):
            authorization = f"Bearer {args.token or os.environ['NARA_DOCTOR_TOKEN']}"
    except OSError as exc:
        print(f"nara doctor: {exc}", file=sys.stderr)
        return 2
    if not server or authorization is None:
        print("nara doctor: give --server and one of --token (or NARA_DOCTOR_TOKEN), --credential or --kit-config",
              file=sys.stderr)
        return 2
    if args.local_address:
        restrict_host_addresses(args.local_address)
    options = DoctorOptions(server.rstrip("/"), authorization, timeout=args.timeout, seconds=args.seconds,
                            kit_turn=kit_turn)
    if args.json:
        report = asyncio.run(run_doctor(options))
        print(json.dumps(report.as_json(), ensure_ascii=False))
    else:  # the table grows as the checks finish; a check can take its whole time limit
        print(f"Nära network check of {options.server}\n\n{TABLE_HEADER}", flush=True)
        report = asyncio.run(run_doctor(options, on_check=lambda check: print(render_row(check), flush=True)))
        print(f"\n{render_verdict(report.checks, report.relay_only)}")
    return 0 if verdict(report.checks, report.relay_only)[0] else 1


def cmd_doctor_token(args: argparse.Namespace) -> int:
    from signalling.config import prepare_data_dir, token_keys
    from signalling.doctor import doctor_url, mint_doctor_token
    from signalling.tokens import TokenAuthority

    config = _server_config(args)
    prepare_data_dir(config)
    authority = TokenAuthority(token_keys(config), config.issuer, config.audience)
    try:
        token, _ = mint_doctor_token(authority, args.ttl)
    except ValueError as exc:
        print(f"nara doctor-token: {exc}", file=sys.stderr)
        return 2
    print(doctor_url(config.base_url, token) if args.link else token)
    return 0


def _admin_request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the running server's admin REST API with the admin key from --data-dir; DeviceCommandError on failure."""
    key_file = Path(args.data_dir) / "admin-key"
    try:
        key = key_file.read_text().strip()
    except OSError as exc:
        raise DeviceCommandError(f"cannot read the admin key in {key_file}: {exc.strerror}; "
                                 "use --data-dir of the server") from None
    request = urllib.request.Request(
        f"{args.server.rstrip('/')}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            error = json.load(exc)["error"]
            reason = f"{error['message']} ({error['code']})"
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {exc.code}"
        raise DeviceCommandError(reason) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = str(exc.reason if isinstance(exc, urllib.error.URLError) else exc)
        raise DeviceCommandError(f"cannot reach the server at {args.server}: {reason}") from None


class DeviceCommandError(Exception):
    pass


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if epoch else "never"


def cmd_device(args: argparse.Namespace) -> int:
    try:
        if args.device_command == "create":
            created = _admin_request(args, "POST", "/api/devices", {"name": args.name})
            if args.json:
                print(json.dumps(created, ensure_ascii=False))
            else:
                print(f"Created {created['device_id']} ({created['name']}).")
                print(f"Enrolment code: {created['enrolment_code']}  (works once, until "
                      f"{_when(created['code_expires_at'])})")
        elif args.device_command == "list":
            devices = _admin_request(args, "GET", "/api/devices")["devices"]
            if args.json:
                print(json.dumps(devices, ensure_ascii=False))
            for d in [] if args.json else devices:
                state = "revoked" if d["revoked"] else "enrolled" if d["enrolled"] else "awaiting enrolment"
                assigned = ", ".join(d["assigned_to"]) or "-"
                print(f"{d['device_id']}  {d['name']:<20} {state:<18} last seen {_when(d['last_seen']):<16} "
                      f"assigned to {assigned}")
        else:
            revoked = _admin_request(args, "POST", f"/api/devices/{urllib.parse.quote(args.device_id)}/revoke")
            print(json.dumps(revoked) if args.json else f"Revoked {revoked['device_id']}: it can no longer join, "
                  "and any call it was in has been closed.")
    except DeviceCommandError as exc:
        print(f"nara device {args.device_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from bench.forward import main as forward_main

    return forward_main(args)


def cmd_bench_run(args: argparse.Namespace) -> int:
    from bench.run import main as run_main

    return run_main(args)


def cmd_bench_adapt(args: argparse.Namespace) -> int:
    from bench.adapt import main as adapt_main

    return adapt_main(args)


def cmd_bench_encoders(args: argparse.Namespace) -> int:
    from bench.encoders import main as encoders_main

    return encoders_main(args)


def cmd_bench_edge(args: argparse.Namespace) -> int:
    from bench.edge import main as edge_main

    return edge_main(args)


def cmd_bench_upload(args: argparse.Namespace) -> int:
    from bench.upload import main as upload_main

    return upload_main(args)


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from bench.run import compare_main

    return compare_main(args)


def cmd_edge_check_config(args: argparse.Namespace) -> int:
    from edge.config import read_config

    _, errors = read_config(Path(args.file))
    for error in errors:
        print(f"{args.file}: {error.field}: {error.message}")
    if errors:
        return 2
    print(f"{args.file} is valid.")
    return 0


def cmd_edge_run(args: argparse.Namespace) -> int:
    from edge.service import main as edge_main

    return edge_main(Path(args.config))


def cmd_edge_photo(args: argparse.Namespace) -> int:
    from edge.intake import photo_main

    return photo_main(Path(args.config), Path(args.file), body_site=args.body_site, consent=args.consent,
                      note=args.note, consultation=args.consultation)


def cmd_edge_upload(args: argparse.Namespace) -> int:
    from edge.intake import upload_main

    return upload_main(Path(args.config), args.until_empty)


def cmd_edge_enrol(args: argparse.Namespace) -> int:
    import asyncio

    from edge.device_api import Refused, Unreachable, enrol, write_credential

    try:
        credential = asyncio.run(enrol(args.server, args.code))
    except Refused as exc:
        print(f"nara edge enrol: the server refused the code ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"nara edge enrol: cannot reach {args.server}: {exc.detail}", file=sys.stderr)
        return 1
    write_credential(Path(args.credential), credential)
    print(f"Enrolled as {credential.name!r} ({credential.device_id}); credential written to {args.credential}.")
    return 0


def cmd_edge_calibrate_camera(args: argparse.Namespace) -> int:
    import asyncio
    from datetime import UTC, datetime

    from edge.config import read_config
    from edge.photos import CALIBRATION_FILE, CalibrationError, calibrate_camera

    config, errors = read_config(Path(args.config))
    for error in errors:
        print(f"{args.config}: {error.field}: {error.message}", file=sys.stderr)
    if config is None:
        return 2
    try:
        calibration = asyncio.run(calibrate_camera(config, datetime.now(UTC), args.stills))
    except CalibrationError as exc:
        print(f"nara edge calibrate-camera: {exc}", file=sys.stderr)
        return 2
    print(f"Camera {config.camera!r} calibrated from {len(calibration.samples)} stills: median sharpness "
          f"{calibration.median:.0f}; photos below {calibration.sharpness_min:.0f} are called blurred. "
          f"Saved in {config.data_dir / CALIBRATION_FILE}.")
    return 0


def _add_edge(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    edge = sub.add_parser("edge", help="the home kit's agent",
                          description="The home kit: enrol it once, then run its agent.")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True)
    check = edge_sub.add_parser("check-config", help="check a kit configuration file",
                                description="Print every mistake in a kit configuration file (exit 2 if any).")
    check.add_argument("file")
    check.set_defaults(func=cmd_edge_check_config)
    run = edge_sub.add_parser("run", help="run the kit's agent",
                              description="Join the consultations the server assigns this kit, stay connected, "
                                          "and serve the kit's screen page (for systemd: Type=notify).")
    run.add_argument("--config", required=True, help="the kit's TOML configuration file")
    run.set_defaults(func=cmd_edge_run)
    enrol = edge_sub.add_parser("enrol", help="enrol this kit with a code from IT staff",
                                description="Exchange a one-time enrolment code for this kit's credential "
                                            "and write it (mode 0600).")
    enrol.add_argument("--server", required=True, help="the Nära server's address, e.g. https://nara.example.se")
    enrol.add_argument("--code", required=True, help="the enrolment code, e.g. ABCD-EFGH")
    enrol.add_argument("--credential", required=True, help="where to write the credential file")
    enrol.set_defaults(func=cmd_edge_enrol)
    photo = edge_sub.add_parser("photo", help="put an existing photo in the kit's outbox",
                                description="Check a photo file (a JPEG, PNG or WebP that decodes) and put it in the "
                                            "kit's durable outbox, beside a running agent, which delivers it.")
    photo.add_argument("--config", required=True, help="the kit's TOML configuration file")
    photo.add_argument("--file", required=True, help="the photo")
    photo.add_argument("--body-site", required=True, help="where on the body, e.g. sacrum (see docs/images.md)")
    photo.add_argument("--consent", required=True, choices=("yes", "no"),
                       help="the patient (or next of kin) agreed to the photo being taken and kept")
    photo.add_argument("--note", default="", help="free text, at most 2000 characters")
    photo.add_argument("--consultation", help="default: the consultation the kit was last assigned")
    photo.set_defaults(func=cmd_edge_photo)
    upload = edge_sub.add_parser("upload", help="deliver the kit's outbox without the rest of the agent",
                                 description="Deliver the photos in the kit's outbox to the server.")
    upload.add_argument("--config", required=True, help="the kit's TOML configuration file")
    upload.add_argument("--until-empty", action="store_true", help="return once nothing is waiting")
    upload.set_defaults(func=cmd_edge_upload)
    calibrate = edge_sub.add_parser(
        "calibrate-camera", help="measure the camera's sharpness for the photo checks",
        description="Take a few stills of a detailed, still, well-lit scene (a printed page on a table, the camera "
                    "on a stand) and store the sharpness below which this camera's photos are called blurred. "
                    "Stop the kit's agent first: it holds the camera.")
    calibrate.add_argument("--config", required=True, help="the kit's TOML configuration file")
    calibrate.add_argument("--stills", type=int, default=5, help="stills to take (default 5, at least 3)")
    calibrate.set_defaults(func=cmd_edge_calibrate_camera)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nara", description="Nära video consultations")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the signalling server and SFU",
                           description="Run the Nära server: embedded defaults, then the --config file, then "
                                       "NARA_<SECTION>_<KEY> environment variables, then these flags.")
    _add_common(serve)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--media-address", action="append",
                       help="address the SFU announces for media (repeatable; 'all' for every "
                            "interface; default 127.0.0.1)")
    serve.add_argument("--no-demo", action="store_true", help="do not create the demo consultation")
    serve.add_argument("--adaptation", choices=("on", "off"),
                       help="quality ladder and per-subscriber video levels (default on; off: forward only)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="SFU worker processes (default: one per core; 0: the SFU inside this process)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser(
        "check-config", help="check the server's configuration, field by field",
        description="Read the configuration file (FILE, else $NARA_CONFIG, else the embedded defaults) with its "
                    "NARA_<SECTION>_<KEY> environment overrides; print every problem, one per line (exit 1), or "
                    "the effective settings without secrets (exit 0).")
    check.add_argument("file", nargs="?", help="the TOML file (default: $NARA_CONFIG)")
    check.set_defaults(func=cmd_check_config)

    token = sub.add_parser("token", help="mint a join token",
                           description="Mint a join token for a consultation (signed with the "
                                       "server's key in --data-dir).")
    _add_common(token)
    token.add_argument("--room", required=True, help="consultation id")
    token.add_argument("--name", required=True, help="participant's display name")
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--ttl", type=int, default=DEFAULT_TTL, help=f"seconds (max {MAX_TTL})")
    token.add_argument("--participant-id", help="stable participant id (default: generated)")
    token.add_argument("--link", action="store_true",
                       help="print a join link instead of the token (for role kit: the tablet kit page, /kit/...)")
    token.set_defaults(func=cmd_token)

    doctor = sub.add_parser(
        "doctor", help="check whether calls can reach the server from here (UDP, TURN, round trip, bandwidth)",
        description="From where a kit or a browser stands: the server's HTTP(S) and WebSocket, a WebRTC "
                    "connection straight over UDP and through each TURN URL the server names (UDP, TCP, TLS), "
                    "round trips, and usable bandwidth both ways on the best path; a verdict in plain words. "
                    "Exit 0 if a call is possible, 1 if not, 2 on bad arguments. See docs/doctor.md.")
    doctor.add_argument("--server", help="the server's URL, e.g. https://nara.example.se (default: the kit's)")
    doctor.add_argument("--token", help="a doctor token (nara doctor-token) or a join token; "
                                        "or set NARA_DOCTOR_TOKEN")
    doctor.add_argument("--credential", help="a home kit's credential file (nara edge enrol)")
    doctor.add_argument("--kit-config", help="a home kit's TOML configuration: its server and credential")
    doctor.add_argument("--json", action="store_true", help="print the results as JSON, for scripts")
    doctor.add_argument("--timeout", type=float, default=12.0, help="seconds for each check (default 12)")
    doctor.add_argument("--seconds", type=float, default=3.0,
                        help="seconds of the bandwidth test in each direction (default 3, at most 5)")
    doctor.add_argument("--local-address", action="append",
                        help="gather ICE host candidates only on this address (repeatable; default: every "
                             "interface but loopback)")
    doctor.set_defaults(func=cmd_doctor)
    doctor_token = sub.add_parser(
        "doctor-token", help="mint a token for the network doctor (nara doctor, /doctor/)",
        description="Mint a token that opens the network checks and nothing else (signed with the server's "
                    "key in --data-dir).")
    _add_common(doctor_token)
    doctor_token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600, max 43200)")
    doctor_token.add_argument("--link", action="store_true", help="print the browser page's link instead")
    doctor_token.set_defaults(func=cmd_doctor_token)

    device = sub.add_parser(
        "device", help="home kits: create (prints the enrolment code), list, revoke",
        description="Manage home kits on a running server, with the admin key in --data-dir.")
    device_sub = device.add_subparsers(dest="device_command", required=True)
    for name, help_text in (("create", "a new kit and its one-time enrolment code (valid 24 h)"),
                            ("list", "every kit: enrolled, revoked, last seen, assigned consultations"),
                            ("revoke", "refuse a kit's credential from now on and close its call")):
        command = device_sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        command.add_argument("--server", default="http://127.0.0.1:8080", help="server URL (default %(default)s)")
        command.add_argument("--data-dir", default="nara-data", help="the server's data directory, for its admin key")
        command.add_argument("--json", action="store_true", help="print the server's JSON answer")
        command.set_defaults(func=cmd_device)
        if name == "create":
            command.add_argument("--name", required=True, help="the kit's name, e.g. 'Kit 7'")
        elif name == "revoke":
            command.add_argument("device_id", help="e.g. kit-k3m9xq2vwa (see nara device list)")

    bench = sub.add_parser("bench", help="benchmarks", description="Nära benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    forward = bench_sub.add_parser(
        "forward", help="SFU forwarding cost against a re-encoding relay",
        description="N subscribers receive one 640x480 publisher through the forwarding SFU "
                    "and through a naive relay that re-encodes per subscriber; reports server "
                    "CPU per subscriber and delivery for each N.")
    forward.add_argument("--subscribers", default="1,5,10,20", help="comma-separated N values")
    forward.add_argument("--naive-subscribers", default="1,2,4,8", help="N values for the naive relay")
    forward.add_argument("--duration", type=float, default=10.0, help="seconds measured per N")
    forward.add_argument("--bitrate", type=int, default=550_000, help="publisher video bitrate, bit/s")
    forward.add_argument("--generators", type=int, default=2, help="subscriber load processes")
    forward.add_argument("--room-size", type=int, default=0, metavar="K",
                         help="consultations of 1 publisher + K subscribers (default 0: one consultation for all)")
    forward.add_argument("--batch", type=int, default=24,
                         help="subscribers joining at once; each batch is on the original before the next joins")
    forward.add_argument("--small-batches-from", type=int, default=1_000_000, metavar="N",
                         help="from N subscribers on, one consultation joins at a time (a gentler climb near the top)")
    forward.add_argument("--workers", type=int, metavar="N", help="nara serve --workers N (default: its own)")
    forward.add_argument("--uvloop", action="store_true", help="run the server and its workers on uvloop")
    forward.add_argument("--pin", action="store_true",
                         help="media worker i alone on core i; generators and the server's main process on the rest")
    forward.add_argument("--profile", metavar="DIR",
                         help="py-spy every server process during each step's window (raw stacks into DIR)")
    forward.add_argument("--loop-watch", action="store_true",
                         help="report the media worker's callbacks over 1 ms and its garbage collections per step")
    forward.add_argument("--phases", default="independent",
                         help="comma-separated, each step measured once per phasing of the publishers' frames: "
                              "independent (each its own phase and place in the clip) or aligned (all at once, "
                              "the worst case)")
    forward.add_argument("--output", help="write the results as JSON here")
    forward.set_defaults(func=cmd_bench_forward)

    run = bench_sub.add_parser(
        "run", help="consultations over an emulated rural link",
        description="Run synthetic consultations whose participants reach the server only through "
                    "an impairing TURN relay, through Nära's SFU and peer to peer, and write "
                    "summary.json, per-second.csv and report.html.")
    run.add_argument("--profile", default="poor-3g", help="link profile (see bench/profiles.py)")
    run.add_argument("--rooms", type=int, default=1)
    run.add_argument("--participants", type=int, default=2, help="per room")
    run.add_argument("--duration", type=float, default=30.0, help="seconds")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--modes", default="sfu,p2p", help="sfu, p2p or both (default)")
    run.add_argument("--video", default="320x240", help="WIDTHxHEIGHT of the synthetic camera")
    run.add_argument("--fps", type=int, default=15)
    run.add_argument("--settle", type=float, default=5.0, help="seconds left out of the summaries")
    run.add_argument("--encoders", choices=("nara", "aiortc"), default="nara",
                     help="SFU participants' audio: Nära's Opus (24 kbit/s, FEC) or aiortc's default; "
                          "peer to peer always uses aiortc's defaults, the baseline")
    run.add_argument("--budget", help="TOML file of thresholds; exit 1 when the SFU run falls short")
    run.add_argument("--output", help="results folder (default bench-results/<profile>-<time>)")
    run.set_defaults(func=cmd_bench_run)

    adapt = bench_sub.add_parser(
        "adapt", help="link adaptation against its goals: six scenarios, three modes",
        description="Run the adaptation scenarios (step, loss5, thin150, burst10, mixed, layer-cpu), each "
                    "through the SFU with adaptation on and Nära's encoders (nara), the forwarding-only "
                    "SFU with aiortc's encoders (forward) and peer to peer (p2p); write summary.json and "
                    "per-second.csv and print each goal's pass or fail.")
    adapt.add_argument("--scenarios", default="step,loss5,thin150,burst10,mixed,layer-cpu",
                       help="comma-separated (default: all six)")
    adapt.add_argument("--modes", default="nara,forward,p2p", help="comma-separated (default: all three)")
    adapt.add_argument("--duration-scale", type=float, default=1.0,
                       help="every run's length and link schedule times this (e.g. 0.3 in CI)")
    adapt.add_argument("--seed", type=int, default=1)
    adapt.add_argument("--video", default="640x360", help="WIDTHxHEIGHT of the publisher's synthetic camera")
    adapt.add_argument("--fps", type=int, default=15)
    adapt.add_argument("--output", help="results folder (default bench-results/adapt-<time>)")
    adapt.set_defaults(func=cmd_bench_adapt)

    encoders = bench_sub.add_parser(
        "encoders", help="Nära's VP8 encoder against aiortc's: CPU per frame, rate changed on the fly",
        description="Encode the same frames with Nära's VP8 encoder and aiortc's; print CPU per frame and "
                    "the output rate after each change of target on a running encoder.")
    encoders.add_argument("--frames", type=int, default=150, help="frames per pass (default 150)")
    encoders.set_defaults(func=cmd_bench_encoders)

    edge_bench = bench_sub.add_parser(
        "edge", help="the home kit: recovery after outages, CPU against aiortc's stock pipeline, soak",
        description="Run `nara edge run` against a `nara serve`, its media through the impairing TURN relay and its "
                    "signalling through a TCP proxy; cut both for each outage and report the time from the link's "
                    "return to the first new kit picture at a clinician, the kit's CPU per second of streaming "
                    "against aiortc's stock pipeline, and (with --soak-minutes) growth of memory, tasks and files.")
    edge_bench.add_argument("--outages", default="5,30,120", help="outage lengths in seconds, comma-separated")
    edge_bench.add_argument("--trials", type=int, default=20, help="outages of each length (default 20)")
    edge_bench.add_argument("--soak-minutes", type=float, default=0.0, help="random outages for this long")
    edge_bench.add_argument("--cpu-seconds", type=float, default=20.0, help="CPU measurement window per pipeline")
    edge_bench.add_argument("--video", default="640x480")
    edge_bench.add_argument("--fps", type=int, default=15)
    edge_bench.add_argument("--profile", default="loopback", help="the kit's link profile (bench/profiles.py)")
    edge_bench.add_argument("--seed", type=int, default=1)
    edge_bench.add_argument("--output", help="write the results as JSON here")
    edge_bench.set_defaults(func=cmd_bench_edge)

    upload_bench = bench_sub.add_parser(
        "upload", help="a wound photo over a thin, lossy link with outages, beside the kit's audio call",
        description="Run `nara serve` and `nara edge run` (no camera, synthetic microphone) in network namespaces "
                    "joined by a packet-level emulated link (TUN devices; root needed, it starts itself in a "
                    "namespace of its own); a clinician in the call listens. After a baseline of the call alone, "
                    "put a photo in the kit's outbox and report whether it arrived intact, the total time, the "
                    "goodput against the link's rate, and the call's audio gaps against the baseline.")
    upload_bench.add_argument("--rate-kbps", type=float, default=256.0, help="the link's rate, both ways (default 256)")
    upload_bench.add_argument("--loss", type=float, default=10.0,
                              help="per cent of packets lost, both ways (default 10)")
    upload_bench.add_argument("--loss-burst", type=float, default=1.0,
                              help="mean loss burst in packets (default 1: independent losses)")
    upload_bench.add_argument("--rtt-ms", type=float, default=100.0, help="round-trip time (default 100)")
    upload_bench.add_argument("--queue-ms", type=float, default=500.0, help="the bottleneck's queue (default 500 ms)")
    upload_bench.add_argument("--outages", default="30:20,120:20",
                              help="outages as AT:LENGTH, seconds after the photo is put in, comma-separated "
                                   "(default 30:20,120:20); the baseline has one as long as the first")
    upload_bench.add_argument("--image-mb", type=float, default=5.0, help="the photo's size in MB (default 5)")
    upload_bench.add_argument("--baseline-seconds", type=float, default=60.0,
                              help="the call alone, before the upload (default 60)")
    upload_bench.add_argument("--upload-kbps", type=int, default=2000, help="the kit's upload ceiling (default 2000)")
    upload_bench.add_argument("--kit-tcp", default="reno",
                              help="the kit's TCP congestion control (default reno: cubic, a Raspberry Pi's, cannot "
                                   "be a namespace's default unless net.ipv4.tcp_allowed_congestion_control has it)")
    upload_bench.add_argument("--seed", type=int, default=1)
    upload_bench.add_argument("--output", help="results folder (default bench-results/upload-<time>)")
    upload_bench.set_defaults(func=cmd_bench_upload)

    compare = bench_sub.add_parser("compare", help="two result folders side by side",
                                   description="Print two runs' summaries side by side.")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.set_defaults(func=cmd_bench_compare)
    _add_edge(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
