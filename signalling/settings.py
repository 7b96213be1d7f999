"""The server's configuration: one TOML file, environment overrides, command-line flags.

Precedence, lowest first: the embedded defaults (``ServerConfig``), the file
(``nara serve --config nara.toml`` or ``$NARA_CONFIG``), environment variables
named ``NARA_<SECTION>_<KEY>`` (``NARA_SERVER_PORT=9000``), then flags.

Sections and keys (every one documented in docs/configuration.md, with an
example in deploy/nara.toml)::

    [server]  host port public_url data_dir demo log_format log_level upload_max_size drain_timeout
    [tokens]  algorithm private_key public_key issuer audience
    [media]   addresses port_min port_max adaptation workers
    [turn]    urls username credential static_auth_secret ttl transport_policy
    [cluster] redis_url node_id node_url load_interval
    [metrics] enabled

Everything wrong is collected, never only the first mistake: each ``Problem``
names the field (``media.port_min``), a stable code and a sentence.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .config import ServerConfig
from .proxies import parse_networks

CONFIG_ENV = "NARA_CONFIG"
ENV_PREFIX = "NARA_"
ALGORITHMS = ("HS256", "EdDSA", "RS256")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
TRANSPORT_POLICIES = ("all", "relay")
REDIS_SCHEMES = ("redis", "rediss", "unix")
MIN_PARTICIPANTS = 2  # a port range must hold at least one call
UPLOAD_MAX_SIZE_RANGE = (1024, 4 * 1024**3)
TURN_TTL_RANGE = (60, 7 * 24 * 3600)
LOAD_INTERVAL_RANGE = (0.1, 60.0)
WORKERS_RANGE = (0, 256)  # SFU worker processes; 0: the SFU in the server's own process
NODE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # as cluster.py


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration."""

    field: str  # "media.port_min", or "config" for the file itself
    code: str  # stable: unknown_key, wrong_type, out_of_range, invalid_url, missing_file, ...
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.code}: {self.message}"


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: str  # "str", "int", "float", "bool", "list", "path"
    attribute: str  # the ServerConfig attribute it sets
    secret: bool = False
    optional: bool = False  # may be left unset (None)

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"


SCHEMA: tuple[Key, ...] = (
    Key("server", "host", "str", "host"),
    Key("server", "port", "int", "port"),
    Key("server", "public_url", "str", "public_url", optional=True),
    Key("server", "data_dir", "path", "data_dir"),
    Key("server", "demo", "bool", "demo"),
    Key("server", "log_format", "str", "log_format"),
    Key("server", "log_level", "str", "log_level"),
    Key("server", "upload_max_size", "int", "upload_max_size"),
    Key("server", "drain_timeout", "float", "drain_timeout"),
    Key("server", "trusted_proxies", "list", "trusted_proxies"),
    Key("tokens", "algorithm", "str", "token_algorithm"),
    Key("tokens", "private_key", "path", "token_private_key", optional=True),
    Key("tokens", "public_key", "path", "token_public_key", optional=True),
    Key("tokens", "issuer", "str", "issuer"),
    Key("tokens", "audience", "str", "audience"),
    Key("media", "addresses", "list", "media_addresses"),
    Key("media", "port_min", "int", "media_port_min", optional=True),
    Key("media", "port_max", "int", "media_port_max", optional=True),
    Key("media", "adaptation", "bool", "adaptation"),
    Key("media", "workers", "int", "media_workers", optional=True),
    Key("turn", "urls", "list", "turn_urls"),
    Key("turn", "username", "str", "turn_username", optional=True),
    Key("turn", "credential", "str", "turn_credential", secret=True, optional=True),
    Key("turn", "static_auth_secret", "str", "turn_static_auth_secret", secret=True, optional=True),
    Key("turn", "ttl", "int", "turn_ttl"),
    Key("turn", "transport_policy", "str", "ice_transport_policy"),
    Key("cluster", "redis_url", "str", "cluster_redis_url", secret=True),
    Key("cluster", "node_id", "str", "cluster_node_id"),
    Key("cluster", "node_url", "str", "cluster_node_url", optional=True),
    Key("cluster", "load_interval", "float", "cluster_load_interval"),
    Key("metrics", "enabled", "bool", "metrics_enabled"),
)
KEYS = {key.path: key for key in SCHEMA}
SECTIONS = tuple(dict.fromkeys(key.section for key in SCHEMA))
KIND_NAMES = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
              "list": "a list of text", "path": "a file or folder path (text)"}


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


# --- reading values: the file and the environment -------------------------------------


def _check_type(key: Key, value: Any) -> Any:
    """The value as the key's kind, or raise ValueError."""
    if key.kind == "bool":
        if isinstance(value, bool):
            return value
    elif key.kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif key.kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif key.kind == "list":
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
    elif isinstance(value, str):
        return Path(value) if key.kind == "path" else value
    raise ValueError(f"must be {KIND_NAMES[key.kind]}, not {_describe(value)}")


def _describe(value: Any) -> str:
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "text", list: "a list",
             dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _parse_env(key: Key, raw: str) -> Any:
    """An environment variable's text as the key's kind, or raise ValueError."""
    text = raw.strip()
    if key.kind == "bool":
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError("is not true or false")
    if key.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError("is not a whole number") from None
    if key.kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("is not a number") from None
    if key.kind == "list":
        if text.startswith("["):
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise ValueError('is not a list (write a,b or ["a", "b"])') from None
            return _check_type(key, value)
        return [item.strip() for item in text.split(",") if item.strip()]
    if key.kind == "path":
        return Path(raw)
    return raw


def read_file(path: Path) -> tuple[dict[str, Any], list[Problem]]:
    """The values a TOML file sets, by key path, and what is wrong in it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, [Problem("config", "missing_file", f"There is no configuration file {path}.")]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        return {}, [Problem("config", "unreadable_file", f"Cannot read {path}: {reason}.")]
    except tomllib.TOMLDecodeError as exc:
        return {}, [Problem("config", "toml_syntax", f"{path} is not valid TOML: {exc}.")]
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for section, table in data.items():
        if section not in SECTIONS:
            problems.append(Problem(section, "unknown_section", f"There is no section [{section}]."
                                    + _did_you_mean(section, SECTIONS) + f" Sections: {', '.join(SECTIONS)}."))
            continue
        if not isinstance(table, dict):
            problems.append(Problem(section, "wrong_type", f"{section} must be a table: [{section}]."))
            continue
        names = [key.name for key in SCHEMA if key.section == section]
        for name, value in table.items():
            key = KEYS.get(f"{section}.{name}")
            if key is None:
                problems.append(Problem(f"{section}.{name}", "unknown_key", f"[{section}] has no key {name!r}."
                                        + _did_you_mean(name, names)))
                continue
            try:
                values[key.path] = _check_type(key, value)
            except ValueError as exc:
                problems.append(Problem(key.path, "wrong_type", f"{key.path} {exc}."))
    return values, problems


def read_environment(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    """The values ``NARA_<SECTION>_<KEY>`` variables set, and the ones that do not parse or do not exist."""
    by_name = {key.env: key for key in SCHEMA}
    prefixes = tuple(f"{ENV_PREFIX}{section.upper()}_" for section in SECTIONS)
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for variable in sorted(environ):
        if not variable.startswith(prefixes):
            continue
        key = by_name.get(variable)
        if key is None:
            problems.append(Problem(variable, "unknown_key", f"The environment variable {variable} sets nothing."
                                    + _did_you_mean(variable, by_name)))
            continue
        try:
            values[key.path] = _parse_env(key, environ[variable])
        except ValueError as exc:
            shown = "(set)" if key.secret else repr(environ[variable])
            problems.append(Problem(key.path, "wrong_type", f"{variable}={shown} {exc}."))
    return values, problems


def apply_values(config: ServerConfig, values: Mapping[str, Any]) -> None:
    for path, value in values.items():
        key = KEYS[path]
        if key.attribute == "media_addresses" and value == ["all"]:
            value = None
        setattr(config, key.attribute, value)


def config_path(explicit: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    from_env = environ.get(CONFIG_ENV, "").strip()
    return Path(from_env) if from_env else None


def load(path: Path | None, environ: Mapping[str, str] | None = None,
         flags: Callable[[ServerConfig], None] | None = None) -> tuple[ServerConfig, list[Problem]]:
    """The effective configuration and everything wrong with it: defaults, file, environment, flags."""
    environ = os.environ if environ is None else environ
    config = ServerConfig()
    problems: list[Problem] = []
    if path is not None:
        values, found = read_file(path)
        problems += found
        apply_values(config, values)
    values, found = read_environment(environ)
    problems += found
    apply_values(config, values)
    if flags is not None:
        flags(config)
    wrong_type = {p.field for p in problems if p.code == "wrong_type"}
    problems += [p for p in validate(config) if p.field not in wrong_type]
    return config, problems


# --- checking the effective configuration --------------------------------------------


def _url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"{url!r} is not a valid URL ({exc})"
    if parts.scheme not in schemes:
        return f"{url!r} must start with {' or '.join(s + '://' for s in schemes)}"
    if parts.scheme != "unix" and not parts.hostname:
        return f"{url!r} has no host"
    if parts.scheme == "unix" and not parts.path:
        return f"{url!r} has no socket path"
    return None


def _turn_url_problem(url: str) -> str | None:
    """turn:host[:port][?transport=udp|tcp] or turns:... (RFC 7065)."""
    scheme, colon, rest = url.partition(":")
    if not colon or scheme not in ("turn", "turns"):
        return f"{url!r} must start with turn: or turns:"
    hostport, _, query = rest.partition("?")
    host, _, port = hostport.rpartition(":") if hostport.count(":") == 1 else (hostport, "", "")
    if not host or host.startswith("/") or "@" in host:
        return f"{url!r} must be turn:HOST[:PORT][?transport=udp|tcp] (no // and no user name)"
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return f"{url!r} has a port that is not 1-65535"
    if query:
        params = parse_qs(query)
        if set(params) != {"transport"} or params["transport"][0] not in ("udp", "tcp"):
            return f"{url!r}: the only query allowed is ?transport=udp or ?transport=tcp"
    return None


def _file_problem(key: str, path: Path) -> Problem | None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        return Problem(key, "missing_file", f"There is no file {path}.")
    except IsADirectoryError:
        return Problem(key, "unreadable_file", f"{path} is a folder, not a file.")
    except OSError as exc:
        return Problem(key, "unreadable_file", f"Cannot read {path}: {exc.strerror}.")
    return None


def _range(field: str, value: float, low: float, high: float, unit: str = "") -> Problem | None:
    if low <= value <= high:
        return None
    return Problem(field, "out_of_range", f"{field} is {value:g}{unit}; it must be from {low:g} to {high:g}{unit}.")


def _choice(field: str, value: str, choices: tuple[str, ...]) -> Problem | None:
    if value in choices:
        return None
    return Problem(field, "invalid_value", f"{field} is {value!r}; it must be one of {', '.join(choices)}."
                   + _did_you_mean(value, choices))


def ports_needed(participants: int, addresses: int) -> int:
    """UDP ports the SFU binds for this many participants at once: one ICE connection per participant
    (bundle and rtcp-mux put all of its media on one), one socket per media address."""
    return participants * max(1, addresses)


def validate(config: ServerConfig) -> list[Problem]:
    """Everything wrong with an effective configuration (types are already right)."""
    found: list[Problem | None] = [
        None if config.host.strip() else Problem("server.host", "invalid_value", "server.host is empty."),
        _range("server.port", config.port, 1, 65535),
        _choice("server.log_format", config.log_format, LOG_FORMATS),
        _choice("server.log_level", config.log_level, LOG_LEVELS),
        _range("server.upload_max_size", config.upload_max_size, *UPLOAD_MAX_SIZE_RANGE, " bytes"),
        _range("server.drain_timeout", config.drain_timeout, 0, 7 * 24 * 3600, " s"),
        _range("turn.ttl", config.turn_ttl, *TURN_TTL_RANGE, " s"),
        _choice("turn.transport_policy", config.ice_transport_policy, TRANSPORT_POLICIES),
        _range("cluster.load_interval", config.cluster_load_interval, *LOAD_INTERVAL_RANGE, " s"),
    ]
    if config.public_url is not None and (reason := _url_problem(config.public_url, ("http", "https"))):
        found.append(Problem("server.public_url", "invalid_url", reason + "."))
    if config.data_dir.exists() and not config.data_dir.is_dir():
        found.append(Problem("server.data_dir", "not_a_directory", f"{config.data_dir} is a file, not a folder."))
    found += [Problem("server.trusted_proxies", "invalid_network", f"server.trusted_proxies: {exc}.")
              for exc in _network_errors(config.trusted_proxies)]
    found += _token_problems(config)
    found += _media_problems(config)
    found += _turn_problems(config)
    found += _cluster_problems(config)
    return [p for p in found if p is not None]


def _network_errors(values: list[str]) -> list[ValueError]:
    errors = []
    for value in values:
        try:
            parse_networks([value])
        except ValueError as exc:
            errors.append(exc)
    return errors


def _token_problems(config: ServerConfig) -> list[Problem | None]:
    found: list[Problem | None] = [
        None if config.issuer else Problem("tokens.issuer", "invalid_value", "tokens.issuer is empty."),
        None if config.audience else Problem("tokens.audience", "invalid_value", "tokens.audience is empty."),
    ]
    if config.token_algorithm not in ALGORITHMS:
        found.append(Problem("tokens.algorithm", "unknown_algorithm",
                             f"tokens.algorithm is {config.token_algorithm!r}; Nära signs with "
                             f"{', '.join(ALGORITHMS)}." + _did_you_mean(config.token_algorithm, ALGORITHMS)))
        return found
    keys = (("tokens.private_key", config.token_private_key), ("tokens.public_key", config.token_public_key))
    if config.token_algorithm != "HS256" and config.token_public_key is None:
        found.append(Problem("tokens.public_key", "missing_key",
                             f"{config.token_algorithm} needs tokens.public_key (a PEM file) to verify join tokens."))
    unreadable = [_file_problem(name, path) for name, path in keys if path is not None]
    found += unreadable
    if config.token_algorithm != "HS256" and not any(unreadable):
        found += [_key_problem(config.token_algorithm, name, path) for name, path in keys if path is not None]
    return found


def _key_problem(algorithm: str, field: str, path: Path) -> Problem | None:
    """A PEM key file that does not hold a key of ``algorithm`` (Ed25519 for EdDSA, RSA for RS256)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    expected = (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey) if algorithm == "EdDSA" else (
        rsa.RSAPrivateKey, rsa.RSAPublicKey)
    what = "an Ed25519" if algorithm == "EdDSA" else "an RSA"
    try:
        data = path.read_bytes()
        key: object = load_pem_private_key(data, None) if field.endswith("private_key") else load_pem_public_key(data)
    except (ValueError, TypeError):
        return Problem(field, "invalid_key", f"{path} is not {what} PEM {field.split('.')[1].replace('_', ' ')} "
                                             "(or it is encrypted).")
    if not isinstance(key, expected):
        return Problem(field, "invalid_key", f"{path} holds a {type(key).__name__}, but {algorithm} needs {what} key.")
    return None


def _media_problems(config: ServerConfig) -> list[Problem | None]:
    found: list[Problem | None] = []
    addresses = config.media_addresses
    if addresses is not None:
        if not addresses:
            found.append(Problem("media.addresses", "invalid_value",
                                 'media.addresses is empty; give IP addresses or ["all"].'))
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                found.append(Problem("media.addresses", "invalid_address",
                                     f'{address!r} is not an IP address (or give ["all"] alone).'))
    if config.media_workers is not None:
        found.append(_range("media.workers", config.media_workers, *WORKERS_RANGE))
    low, high = config.media_port_min, config.media_port_max
    if (low is None) != (high is None):
        missing = "media.port_max" if high is None else "media.port_min"
        found.append(Problem(missing, "incomplete_range",
                             "Give both media.port_min and media.port_max, or neither (any ephemeral port)."))
    for name, port in (("media.port_min", low), ("media.port_max", high)):
        if port is not None:
            found.append(_range(name, port, 1024, 65535))
    if low is not None and high is not None and 1024 <= low <= 65535 and 1024 <= high <= 65535:
        count = len(addresses) if addresses else 1
        if low > high:
            found.append(Problem("media.port_min", "invalid_range",
                                 f"media.port_min ({low}) is above media.port_max ({high})."))
        elif high - low + 1 < ports_needed(MIN_PARTICIPANTS, count):
            found.append(Problem("media.port_max", "range_too_narrow",
                                 f"{low}-{high} holds {high - low + 1} ports; each participant needs one per media "
                                 f"address ({count}), so a call of {MIN_PARTICIPANTS} needs "
                                 f"{ports_needed(MIN_PARTICIPANTS, count)}. Allow one port per participant expected "
                                 "at once on this node, per address."))
        elif config.media_workers is not None and (workers := config.media_workers) > 1 and \
                (high - low + 1) // workers < ports_needed(MIN_PARTICIPANTS, count):
            found.append(Problem("media.port_max", "range_too_narrow",
                                 f"{low}-{high} is shared by {workers} media workers, each with its own slice of "
                                 f"{(high - low + 1) // workers} ports; a call of {MIN_PARTICIPANTS} on one needs "
                                 f"{ports_needed(MIN_PARTICIPANTS, count)}. Widen the range or set media.workers."))
    return found


def worker_count(config: ServerConfig) -> int:
    """SFU worker processes: ``media.workers``, else one per core, but no more than the port range has slices
    for a call each (a range that held a call before workers came still does)."""
    if config.media_workers is not None:
        return config.media_workers
    cores = os.cpu_count() or 1
    low, high = config.media_port_min, config.media_port_max
    if low is None or high is None or high < low:
        return cores
    per_call = ports_needed(MIN_PARTICIPANTS, len(config.media_addresses) if config.media_addresses else 1)
    return max(1, min(cores, (high - low + 1) // per_call))


def _turn_problems(config: ServerConfig) -> list[Problem | None]:
    found: list[Problem | None] = []
    for url in config.turn_urls:
        if reason := _turn_url_problem(url):
            found.append(Problem("turn.urls", "invalid_url", reason + "."))
    static = config.turn_username is not None or config.turn_credential is not None
    if static and (config.turn_username is None or config.turn_credential is None):
        missing = "turn.credential" if config.turn_credential is None else "turn.username"
        found.append(Problem(missing, "incomplete_credentials", "Give turn.username and turn.credential together."))
    if static and config.turn_static_auth_secret is not None:
        found.append(Problem("turn.static_auth_secret", "conflicting_keys",
                             "Give either turn.static_auth_secret or turn.username and turn.credential, not both."))
    if config.turn_urls and not static and config.turn_static_auth_secret is None:
        found.append(Problem("turn.urls", "missing_credentials",
                             "TURN servers need turn.static_auth_secret or turn.username and turn.credential."))
    if not config.turn_urls and (static or config.turn_static_auth_secret is not None):
        found.append(Problem("turn.urls", "missing_value", "TURN credentials are given but turn.urls is empty."))
    if config.ice_transport_policy == "relay" and not config.turn_urls:
        found.append(Problem("turn.transport_policy", "missing_value",
                             'transport_policy "relay" sends all media through TURN, but turn.urls is empty.'))
    return found


def _cluster_problems(config: ServerConfig) -> list[Problem | None]:
    found: list[Problem | None] = []
    if config.cluster_redis_url and (reason := _url_problem(config.cluster_redis_url, REDIS_SCHEMES)):
        found.append(Problem("cluster.redis_url", "invalid_url", redact_url(reason) + "."))
    if not NODE_ID.fullmatch(config.cluster_node_id):
        found.append(Problem("cluster.node_id", "invalid_value",
                             f"cluster.node_id {config.cluster_node_id!r} must be 1 to 64 letters, digits, '.', "
                             "':', '-' or '_'."))
    if config.cluster_node_url is not None and (reason := _url_problem(config.cluster_node_url, ("http", "https"))):
        found.append(Problem("cluster.node_url", "invalid_url", reason + "."))
    return found


# --- showing the effective configuration ---------------------------------------------


def redact_url(text: str) -> str:
    """A URL (or a sentence with one) with any password replaced: redis://:***@host."""
    return re.sub(r"(//[^/@\s:]*:)[^@\s/]*@", r"\1***@", text)


def shown_value(key: Key, config: ServerConfig) -> str:
    value = getattr(config, key.attribute)
    if key.attribute == "media_addresses" and value is None:
        return '["all"]'
    if value is None:
        return "(unset)"
    if key.secret and key.attribute != "cluster_redis_url":
        return "(set)"
    if key.attribute == "cluster_redis_url":
        return repr(redact_url(value)) if value else '"" (one process)'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, str, Path)):
        return repr(value if not isinstance(value, Path) else str(value)).replace("'", '"')
    return str(value)


def summary(config: ServerConfig) -> list[str]:
    """The effective settings, one ``section.key = value`` per line, secrets shown only as (set)."""
    lines = [f"{key.path} = {shown_value(key, config)}" for key in SCHEMA]
    low, high = config.media_port_min, config.media_port_max
    if low is not None and high is not None:
        count = len(config.media_addresses) if config.media_addresses else 1
        lines.append(f"# media: UDP {low}-{high} holds {(high - low + 1) // count} participants at once on this node")
    lines.append(f"# media: {worker_count(config)} SFU worker process(es)" if worker_count(config) else
                 "# media: the SFU runs inside the server's process (workers = 0)")
    return lines
