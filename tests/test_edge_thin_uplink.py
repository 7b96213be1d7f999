"""The kit on a thin uplink: once its photo upload finds a queue in front of the call at a low rate, the call's
audio goes in 60 ms packets (half the link for the same speech), in this call and the next, and back after."""

from __future__ import annotations

from edge.media import KitMedia
from mediaserver.encoders import NORMAL, THIN_UPLINK, OpusTrack
from mediaserver.opus import has_fec, packet_samples


async def packet_lengths(track: OpusTrack, count: int) -> list[int]:
    return [packet_samples(bytes(await track.recv())) for _ in range(count)]


async def test_the_calls_audio_goes_in_longer_packets_while_the_uplink_is_thin_and_back_after() -> None:
    media = await KitMedia.open("none", "synthetic", 320, 240, 15)
    try:
        audio, video = media.call_tracks()
        assert isinstance(audio, OpusTrack) and video is None
        assert await packet_lengths(audio, 3) == [960] * 3
        media.use_audio(THIN_UPLINK)
        lengths = await packet_lengths(audio, 6)
        assert lengths[0] == 960 and lengths[-4:] == [2880] * 4  # from the next packet's edge on
        assert any([has_fec(bytes(await audio.recv())) for _ in range(5)])  # FEC kept
        audio.stop()
        following, _ = media.call_tracks()  # the next call, after a dropped one: still thin
        assert isinstance(following, OpusTrack)
        assert (await packet_lengths(following, 3))[-1] == 2880
        media.use_audio(NORMAL)
        assert (await packet_lengths(following, 3))[-1] == 960
        following.stop()
    finally:
        await media.close()
