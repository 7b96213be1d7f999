"""An impairing TURN relay: every packet of a client crosses its emulated access link.

The subset of RFC 8656 that WebRTC clients use (aiortc's aioice and browsers
with ``iceTransportPolicy: "relay"``): Allocate, Refresh, CreatePermission,
ChannelBind, Send and Data indications, ChannelData, and long-term credentials
(REALM, NONCE, MESSAGE-INTEGRITY). STUN encoding and integrity come from
aioice. UDP only, on loopback, for benchmarks and tests; not a production TURN
server (that is coturn, see deploy/).

The TURN username selects the link: ``<profile>`` or ``<profile>/<label>``
(the label tells clients apart and seeds their links differently). Traffic
from the client to a peer crosses the profile's uplink; traffic from a peer
to the client crosses its downlink. The link model decides when (or whether)
each packet comes out; the relay only schedules those deliveries.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioice import stun

from .link import Link
from .profiles import NamedProfile, profile

logger = logging.getLogger(__name__)

Address = tuple[str, int]
DEFAULT_LIFETIME = 600
PERMISSION_LIFETIME = 300
CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x7FFF
UDP_TRANSPORT = 17 << 24


def integrity_key(username: str, realm: str, password: str) -> bytes:
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


@dataclass
class Allocation:
    client: Address
    username: str
    key: bytes
    uplink: Link
    downlink: Link
    relay: asyncio.DatagramTransport | None = None
    relayed_address: Address = ("", 0)
    expires: float = 0.0
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, Address] = field(default_factory=dict)
    peer_channels: dict[Address, int] = field(default_factory=dict)

    def permitted(self, peer: Address, now: float) -> bool:
        return self.permissions.get(peer[0], 0.0) > now


class _RelaySocket(asyncio.DatagramProtocol):
    def __init__(self, server: ImpairingTurnServer, allocation: Allocation) -> None:
        self.server = server
        self.allocation = allocation

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._from_peer(self.allocation, data, (addr[0], addr[1]))


class ImpairingTurnServer(asyncio.DatagramProtocol):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        realm: str = "nara-bench",
        password: str = "nara-bench",
        seed: int = 0,
        profiles: Callable[[str], NamedProfile] = profile,
    ) -> None:
        self.host = host
        self.port = port
        self.realm = realm
        self.password = password
        self.seed = seed
        self.profiles = profiles
        self.nonce = secrets.token_hex(8).encode()
        self.allocations: dict[Address, Allocation] = {}
        self.history: list[Allocation] = []  # every allocation ever made, for the run's totals
        self.transport: asyncio.DatagramTransport | None = None
        self.epoch = 0.0  # every link's clock starts with the relay
        self.down = False  # a switch for tests: the whole relay carries nothing
        self.loop = asyncio.get_event_loop()

    # --- life cycle -----------------------------------------------------------

    async def start(self) -> Address:
        self.loop = asyncio.get_running_loop()
        self.epoch = self.loop.time()
        transport, _ = await self.loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self.host, self.port

    def close(self) -> None:
        for allocation in list(self.allocations.values()):
            self._free(allocation)
        if self.transport is not None:
            self.transport.close()

    @property
    def url(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=udp"

    def links(self, ever: bool = False) -> list[tuple[str, Link, Link]]:
        """(username, uplink, downlink) of the live allocations, or of every one made."""
        allocations = self.history if ever else list(self.allocations.values())
        return [(a.username, a.uplink, a.downlink) for a in allocations]

    # --- from clients -----------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        client = (addr[0], addr[1])
        if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
            self._channel_data(client, data)
            return
        try:
            message = stun.parse_message(data)
        except ValueError:
            return
        try:
            self._stun(client, message)
        except Exception:  # one bad client must not stop the relay
            logger.exception("TURN request from %s failed", client)

    def _channel_data(self, client: Address, data: bytes) -> None:
        allocation = self.allocations.get(client)
        if allocation is None:
            return
        channel, length = struct.unpack("!HH", data[:4])
        peer = allocation.channels.get(channel)
        if peer is None or len(data) < 4 + length:
            return
        self._to_peer(allocation, peer, data[4:4 + length])

    def _stun(self, client: Address, message: stun.Message) -> None:
        method, klass = message.message_method, message.message_class
        if klass == stun.Class.INDICATION and method == stun.Method.SEND:
            allocation = self.allocations.get(client)
            if allocation is not None and "XOR-PEER-ADDRESS" in message.attributes:
                self._to_peer(allocation, message.attributes["XOR-PEER-ADDRESS"],
                              message.attributes.get("DATA", b""))
            return
        if klass != stun.Class.REQUEST:
            return
        if method == stun.Method.BINDING:
            self._reply(client, message, {"XOR-MAPPED-ADDRESS": client})
            return
        key = self._authenticate(client, message)
        if key is None:
            return
        handler = {
            stun.Method.ALLOCATE: self._allocate,
            stun.Method.REFRESH: self._refresh,
            stun.Method.CREATE_PERMISSION: self._create_permission,
            stun.Method.CHANNEL_BIND: self._channel_bind,
        }.get(method)
        if handler is None:
            self._error(client, message, 400, "Bad Request", key)
            return
        handler(client, message, key)

    def _authenticate(self, client: Address, message: stun.Message) -> bytes | None:
        """The long-term credential key, or None after answering 401/438."""
        username = message.attributes.get("USERNAME")
        if "MESSAGE-INTEGRITY" not in message.attributes or username is None:
            self._error(client, message, 401, "Unauthorized")
            return None
        if message.attributes.get("NONCE") != self.nonce:
            self._error(client, message, 438, "Stale Nonce")
            return None
        key = integrity_key(username, self.realm, self.password)
        if not message.check_message_integrity(key):
            self._error(client, message, 401, "Unauthorized")
            return None
        return key

    def _allocate(self, client: Address, message: stun.Message, key: bytes) -> None:
        existing = self.allocations.get(client)
        if existing is not None:
            self._error(client, message, 437, "Allocation Mismatch", key)
            return
        if message.attributes.get("REQUESTED-TRANSPORT") != UDP_TRANSPORT:
            self._error(client, message, 442, "Unsupported Transport Protocol", key)
            return
        username = message.attributes["USERNAME"]
        name, _, label = username.partition("/")
        try:
            link_profile = self.profiles(name)
        except KeyError:
            self._error(client, message, 400, "Unknown link profile", key)
            return
        seed = zlib.crc32(f"{self.seed}/{username}".encode())
        allocation = Allocation(
            client, username, key,
            uplink=Link(link_profile.uplink, seed=seed, start=self.epoch),
            downlink=Link(link_profile.downlink, seed=seed + 1, start=self.epoch),
        )
        self.allocations[client] = allocation
        self.history.append(allocation)
        asyncio.ensure_future(self._open_relay(allocation, message))

    async def _open_relay(self, allocation: Allocation, message: stun.Message) -> None:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _RelaySocket(self, allocation), local_addr=(self.host, 0))
        allocation.relay = transport
        allocation.relayed_address = transport.get_extra_info("sockname")[:2]
        lifetime = min(message.attributes.get("LIFETIME", DEFAULT_LIFETIME), 3600)
        allocation.expires = self.loop.time() + lifetime
        self._reply(allocation.client, message, {
            "XOR-RELAYED-ADDRESS": allocation.relayed_address,
            "XOR-MAPPED-ADDRESS": allocation.client,
            "LIFETIME": lifetime,
        }, allocation.key)

    def _refresh(self, client: Address, message: stun.Message, key: bytes) -> None:
        allocation = self.allocations.get(client)
        if allocation is None:
            self._error(client, message, 437, "Allocation Mismatch", key)
            return
        lifetime = min(message.attributes.get("LIFETIME", DEFAULT_LIFETIME), 3600)
        if lifetime == 0:
            self._free(allocation)
        else:
            allocation.expires = self.loop.time() + lifetime
        self._reply(client, message, {"LIFETIME": lifetime}, key)

    def _create_permission(self, client: Address, message: stun.Message, key: bytes) -> None:
        allocation = self.allocations.get(client)
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        if allocation is None or peer is None:
            self._error(client, message, 437 if allocation is None else 400, "Bad Request", key)
            return
        allocation.permissions[peer[0]] = self.loop.time() + PERMISSION_LIFETIME
        self._reply(client, message, {}, key)

    def _channel_bind(self, client: Address, message: stun.Message, key: bytes) -> None:
        allocation = self.allocations.get(client)
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        channel = message.attributes.get("CHANNEL-NUMBER")
        if allocation is None or peer is None or channel is None or not CHANNEL_MIN <= channel <= CHANNEL_MAX:
            self._error(client, message, 400, "Bad Request", key)
            return
        if allocation.channels.get(channel, peer) != peer or allocation.peer_channels.get(peer, channel) != channel:
            self._error(client, message, 400, "Channel in use", key)
            return
        allocation.channels[channel] = peer
        allocation.peer_channels[peer] = channel
        allocation.permissions[peer[0]] = self.loop.time() + PERMISSION_LIFETIME
        self._reply(client, message, {}, key)

    def _free(self, allocation: Allocation) -> None:
        self.allocations.pop(allocation.client, None)
        if allocation.relay is not None:
            allocation.relay.close()

    # --- the emulated links ---------------------------------------------------------

    def _to_peer(self, allocation: Allocation, peer: Address, data: bytes) -> None:
        now = self.loop.time()
        if allocation.relay is None or not allocation.permitted(peer, now) or self.down:
            return
        arrival = allocation.uplink.send(len(data), now)
        if arrival is not None:
            self.loop.call_at(arrival, self._deliver_to_peer, allocation, peer, data)

    def _deliver_to_peer(self, allocation: Allocation, peer: Address, data: bytes) -> None:
        if allocation.relay is not None and not allocation.relay.is_closing():
            allocation.relay.sendto(data, peer)

    def _from_peer(self, allocation: Allocation, data: bytes, peer: Address) -> None:
        now = self.loop.time()
        if not allocation.permitted(peer, now) or self.down:
            return
        arrival = allocation.downlink.send(len(data), now)
        if arrival is not None:
            self.loop.call_at(arrival, self._deliver_to_client, allocation, peer, data)

    def _deliver_to_client(self, allocation: Allocation, peer: Address, data: bytes) -> None:
        if self.transport is None or allocation.client not in self.allocations:
            return
        channel = allocation.peer_channels.get(peer)
        if channel is not None:
            padding = b"\x00" * (-len(data) % 4)
            self.transport.sendto(struct.pack("!HH", channel, len(data)) + data + padding, allocation.client)
            return
        indication = stun.Message(stun.Method.DATA, stun.Class.INDICATION,
                                  attributes={"XOR-PEER-ADDRESS": peer, "DATA": data})
        self.transport.sendto(bytes(indication), allocation.client)

    # --- replies ---------------------------------------------------------------------

    def _reply(self, client: Address, request: stun.Message, attributes: dict[str, Any],
               key: bytes | None = None) -> None:
        response = stun.Message(request.message_method, stun.Class.RESPONSE,
                                transaction_id=request.transaction_id, attributes=dict(attributes))
        self._send(client, response, key)

    def _error(self, client: Address, request: stun.Message, code: int, reason: str,
               key: bytes | None = None) -> None:
        attributes: dict[str, Any] = {"ERROR-CODE": (code, reason)}
        if code in (401, 438):
            attributes.update({"REALM": self.realm, "NONCE": self.nonce})
        response = stun.Message(request.message_method, stun.Class.ERROR,
                                transaction_id=request.transaction_id, attributes=attributes)
        self._send(client, response, key)

    def _send(self, client: Address, message: stun.Message, key: bytes | None) -> None:
        if key is not None:
            message.add_message_integrity(key)
        else:
            message.add_fingerprint()
        if self.transport is not None:
            self.transport.sendto(bytes(message), client)
