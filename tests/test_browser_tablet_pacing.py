"""The tablet's photo uploads yield to its call, in real Chromium: the pacing policy (signalling/static/pacer.js)
driven with a synthetic clock and round trips; a photo sent beside the call over a throttled link; and the upload's
rate following the real call's round trip when the call's link gains delay and loses it again."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.profiles import profile
from bench.synthetic import ToneAudioTrack
from bench.turn import ImpairingTurnServer
from signalling.client import ConsultationClient

from .conftest import RunningServer, start_server
from .test_browser_client import ARTIFACTS, browser, open_page
from .test_browser_images import TABLET, consultation, images_of, wound_jpeg

__all__ = ["browser"]  # Chromium, with the same rule for when it may be missing

KIB = 1024

# The pacing policy in the page, on a clock of its own: round trips of 80 ms with the call alone,
# then a queue (180 ms), then a queue the audio can live with (110 ms), then the link clear again.
SCENARIO = """async () => {
  const { UploadPace, ceilingFromQuery } = await import("/static/pacer.js");
  const pace = new UploadPace({ ceiling: 250000 }, 0);
  const seen = { idle: pace.update(0, null, false) };
  let t = 0;
  const phase = (name, until, rtt) => {
    const rates = [];
    for (; t < until; t += 0.5) rates.push(pace.update(t, rtt === null ? null : { rtt, at: t }, true));
    seen[name] = rates;
  };
  phase("connecting", 2, null);
  phase("clear", 22, 0.080);
  phase("queue", 27, 0.180);
  phase("tolerable", 37, 0.110);
  phase("clear_again", 57, 0.080);
  phase("long_queue", 90, 0.300);
  seen.ended = pace.update(t, null, false);
  seen.queries = ["?upload_kbps=128", "?upload_kbps=7", "?upload_kbps=abc", ""].map(ceilingFromQuery);
  return seen;
}"""

# The pacer reading a call whose audio round trips stop coming after 1 s (as they did once under load) while
# the transport's STUN checks go on; at 8 s the link gains 200 ms.
STALLED = """async () => {
  const { Pacer, STALE_SECONDS } = await import("/static/pacer.js");
  let t = 0, audioCount = 0, checks = 0, transportRtt = 0.05;
  const stats = async () => new Map([
    ["a", { type: "remote-inbound-rtp", kind: "audio", roundTripTime: 0.06, roundTripTimeMeasurements: audioCount }],
    ["t", { type: "transport", selectedCandidatePairId: "p" }],
    ["p", { type: "candidate-pair", id: "p", currentRoundTripTime: transportRtt, responsesReceived: checks }],
  ]);
  const pacer = new Pacer({ call: () => ({ pc: { getStats: stats } }), clock: () => t });
  const seen = [];
  for (; t < 11; t += 0.5) {
    if (t < 1) audioCount += 1;
    checks += 1;
    if (t >= 8) transportRtt = 0.25;
    await pacer.observe();
    seen.push([t, pacer.sample.source, pacer.pace.queueing]);
  }
  return { seen, stale: STALE_SECONDS };
}"""

# A chunk leaves when the bytes before it are paid for at the rate: on a fast link (a chunk takes 50 ms)
# at 16 KiB/s, 60 seconds of chunks carry 60 seconds of the rate, and one chunk of ~half a second each.
PACED = """async () => {
  const { UploadPace } = await import("/static/pacer.js");
  const pace = new UploadPace({ ceiling: 250000 }, 0);
  pace.update(0, { rtt: 0.05, at: 0 }, true);
  pace.rate = 16 * 1024;
  pace.settings = { ...pace.settings, minStep: 0, growth: 0, slowStart: 0 };  // hold the rate still
  let t = 0;
  let bytes = 0;
  const chunks = [];
  while (t < 60) {
    t += pace.delay(t);
    pace.update(t, { rtt: 0.05, at: 0 }, true);
    const size = pace.chunk();
    pace.sent(size, t);
    chunks.push([t, size]);
    bytes += size;
    t += 0.05;
  }
  return { chunks, bytes, rate: pace.rate, idleChunk: new UploadPace({ ceiling: 250000 }, 0).chunk() };
}"""


async def test_the_pacing_gives_way_when_the_calls_round_trip_grows_and_takes_it_back_when_it_falls(
    server: RunningServer, browser: Any
) -> None:
    page = await (await browser.new_context()).new_page()
    await page.goto(f"{server.url}/body-sites")
    seen = await page.evaluate(SCENARIO)

    assert seen["idle"] == 250000, "outside a call the ceiling alone"
    assert set(seen["connecting"]) == {8 * KIB}, "a call begins low (64 kbit/s) and holds until measured"
    clear = seen["clear"]
    assert all(b >= a for a, b in pairwise(clear)) and clear[-1] > 2.5 * clear[0], "grows while clear"
    queue = seen["queue"]
    assert queue[-1] < 0.25 * clear[-1], "100 ms of queue: cut by a quarter a second, five times in 5 s"
    assert all(b <= a for a, b in pairwise(queue))
    tolerable = seen["tolerable"]
    assert tolerable[0] >= queue[-1] and tolerable[-1] > queue[-1], "30 ms of queue: growth, but slower"
    clear_again = seen["clear_again"]
    grew_tolerable = (tolerable[-1] - tolerable[0]) / len(tolerable)
    grew_clear = (clear_again[-1] - clear_again[0]) / len(clear_again)
    assert grew_clear > 1.5 * grew_tolerable, "a clear link brings the rate back faster"
    assert clear_again[-1] > 2 * tolerable[-1]
    assert min(seen["long_queue"]) == 2 * KIB, "a long queue leaves the floor (16 kbit/s), never nothing"
    assert seen["ended"] == 250000, "the call over, the ceiling again"
    assert seen["queries"] == [128, 2000, 2000, 2000], "the link's ?upload_kbps=, or 2000 kbit/s"

    stalled = await page.evaluate(STALLED)
    sources = {t: source for t, source, _ in stalled["seen"]}
    assert stalled["stale"] == 6
    assert {sources[t] for t in (0, 1, 6)} == {"audio"}, "the audio's round trip while it is measured"
    assert {sources[t] for t in (6.5, 7, 10.5)} == {"transport"}, "once it stops for 6 s, the transport's"
    assert max(q for t, _, q in stalled["seen"] if t < 8) < 0.01, "each source its own base: no queue read"
    assert stalled["seen"][-1][2] > 0.15, "the link's slowing is seen through the transport's round trip"

    paced = await page.evaluate(PACED)
    rate, chunks = paced["rate"], paced["chunks"]
    assert {size for _, size in chunks} == {8 * KIB}, "in a call a chunk carries half a second of the rate"
    for (at, _), (next_at, _) in pairwise(chunks):
        sent_before = sum(size for t, size in chunks if t < next_at)
        assert sent_before <= rate * next_at + 8 * KIB + 1, "never more than the rate and one chunk"
        assert next_at - at >= 0.5 - 1e-9
    assert abs(paced["bytes"] - rate * 60) <= 2 * 8 * KIB, "and the rate is used"
    assert paced["idleChunk"] == round(250000 * 1.5), "outside a call, 1.5 s of the ceiling"


async def test_a_photo_beside_the_call_on_a_throttled_link_goes_under_the_cap_and_arrives_whole(
    server: RunningServer, browser: Any, tmp_path: Path
) -> None:
    room = await consultation(server, "Hembesök")
    ceiling_kbps = 96
    token = server.token(room, "Surfplatta", "kit", participant_id="tablet")
    photo = tmp_path / "sår.jpg"
    photo.write_bytes(wound_jpeg(640, 480, 11))
    context = await browser.new_context(viewport=TABLET)
    tablet = await context.new_page()
    await tablet.goto(f"{server.url}/kit/{room}?upload_kbps={ceiling_kbps}#token={token}")
    await tablet.wait_for_function("() => naraDebug.call?.state === 'connected'", timeout=20000)
    doctor = await doctor_in_the_call(server, room)
    try:
        await tablet.wait_for_function("() => naraDebug.call.participants.has('doctor')", timeout=10000)
        # The call fully up: the server's receiver reports on the tablet's audio measure its round trip.
        await tablet.wait_for_function("() => naraDebug.call?.pc?.getStats().then(stats => [...stats.values()]"
                                       ".some(s => s.type === 'remote-inbound-rtp' && s.kind === 'audio'"
                                       " && s.roundTripTimeMeasurements > 0))", timeout=15000, polling=500)
        patches = await send_a_photo_over_a_throttled_link(context, tablet, photo)
        trace = await tablet.evaluate("() => ({rtt: naraDebug.outbox.pacer.sample, kbps: naraDebug.outbox.pacer.kbps})")
    finally:
        await doctor.close()
        await context.close()

    [stored] = await images_of(server, room)
    assert stored["sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest(), "the photo arrived intact"
    assert trace["rtt"]["source"] in ("audio", "transport") and trace["kbps"] <= ceiling_kbps, "steered by the call"

    # Paced: by each chunk's start, the bytes before it (with the first) went at most at the cap.
    start = patches[0][0]
    cap = ceiling_kbps * 1000 / 8
    for at, _ in patches[1:]:
        before = sum(size for t, size in patches if t < at)
        assert before <= cap * (at - start) * 1.02 + 512, (at - start, before)
    # And beside the call it started well under even the cap: at 64 kbit/s, growing slowly.
    early = [size for t, size in patches if t < start + 3.0]
    assert sum(early[:-1]) <= (80_000 / 8) * 3.0, patches
    last_at = patches[-1][0]
    average_kbps = (sum(size for _, size in patches[:-1]) * 8 / 1000) / max(1e-3, last_at - start)
    print(f"{len(patches)} chunks, {stored['bytes']} bytes in {last_at - start:.1f} s to the last chunk, "
          f"{average_kbps:.0f} kbit/s on average, {trace['kbps']} kbit/s at the end, "
          f"call round trip {trace['rtt']['rtt'] * 1000:.0f} ms")


async def test_the_tablets_upload_slows_when_its_calls_round_trip_grows_and_speeds_up_when_it_clears(
    tmp_path: Path, browser: Any
) -> None:
    # The call goes through a relay whose delay the test sets; the upload goes straight to the server.
    relay = ImpairingTurnServer(seed=7)
    await relay.start()
    ice = [{"urls": [relay.url], "username": "loopback/tablet", "credential": relay.password}]
    server, runner = await start_server(tmp_path, ice_servers=ice, ice_transport_policy="relay")
    photo = tmp_path / "sår.jpg"
    photo.write_bytes(wound_jpeg(1024, 768, 12))  # long enough to go on through all of it
    doctor: ConsultationClient | None = None
    try:
        room = await consultation(server, "Hembesök")
        token = server.token(room, "Surfplatta", "kit", participant_id="tablet")
        tablet = await open_page(browser, f"{server.url}/kit/{room}#token={token}", viewport=TABLET)
        await tablet.wait_for_function("() => naraDebug.call?.state === 'connected'", timeout=20000)
        doctor = await doctor_in_the_call(server, room)
        await tablet.wait_for_function("() => naraDebug.call.participants.has('doctor')", timeout=10000)
        await tablet.set_input_files("#photo-file", str(photo))
        await tablet.wait_for_selector('[data-testid="photo-form"]:not([hidden])')
        await tablet.select_option("#photo-site", "sacrum")
        await tablet.check('input[name="consent"][value="yes"]')
        await tablet.click("#photo-send")

        shown = '[data-testid="outbox-item"][data-kbps]'
        rate = f"() => Number(document.querySelector('{shown}')?.dataset.kbps ?? 0)"
        queueing = "() => naraDebug.outbox.pacer.pace.queueing"
        # A clear call: the upload grows from 64 kbit/s.
        await tablet.wait_for_function(f"() => ({rate})() >= 80 && ({queueing})() < 0.06", timeout=15000)
        clear = await tablet.evaluate(rate)

        # The call's link gains 300 ms toward the server: the tablet sees it in the call's round trip, and gives
        # way. (Under the whole suite's load the base round trip on loopback was read as 100 ms, and 150 ms more
        # read as 51 ms of queue.)
        set_delay(relay, 300)
        await wait_or_tell(tablet, relay, f"() => ({queueing})() > 0.06", timeout=20)
        await tablet.wait_for_function(f"() => ({rate})() <= {clear} * 0.5", timeout=6000)
        low = await tablet.evaluate(rate)

        # Clear again: it takes the room back.
        set_delay(relay, 0)
        await wait_or_tell(tablet, relay, f"() => ({queueing})() < 0.06", timeout=10)
        await tablet.wait_for_function(f"() => ({rate})() >= {low} * 1.3", timeout=10000)
        assert await tablet.get_attribute('[data-testid="outbox-item"]', "data-state") == "queued", "still going"
        again = await tablet.evaluate(rate)
        print(f"upload beside the call: {clear} kbit/s, {low} kbit/s with 300 ms more, then {again} kbit/s")
    finally:
        if doctor is not None:
            await doctor.close()
        await runner.cleanup()
        relay.close()


async def doctor_in_the_call(server: RunningServer, room: str) -> ConsultationClient:
    """A clinician in the call, talking: the tablet's uploads now have a call to give way to."""
    doctor = ConsultationClient(server.url, room, server.token(room, "Dr Berg", "clinician", participant_id="doctor"),
                                audio=ToneAudioTrack(440))
    await doctor.join()
    return doctor


def set_delay(relay: ImpairingTurnServer, delay_ms: float) -> None:
    """Each client's link to the relay, towards the server, takes ``delay_ms`` longer from now on: the links
    there are and those a reconnecting client is given."""
    for _, uplink, _ in relay.links():
        uplink.profile = replace(uplink.profile, delay_ms=delay_ms)
    named = profile("loopback")
    relay.profiles = lambda _: replace(named, uplink=replace(named.uplink, delay_ms=delay_ms))


async def wait_or_tell(tablet: Any, relay: ImpairingTurnServer, condition: str, timeout: float) -> None:
    """Wait for ``condition`` in the tablet's page; if it never comes, fail with what the page's pacer read
    and what the relay carried, so a failure says where the round trip went."""
    try:
        await tablet.wait_for_function(condition, timeout=timeout * 1000)
    except Exception as failure:
        seen = await tablet.evaluate("() => ({sample: naraDebug.outbox.pacer.sample, base: naraDebug.outbox.pacer"
                                     ".pace.base, queueing: naraDebug.outbox.pacer.pace.queueing,"
                                     " call: naraDebug.call?.state})")
        links = [(name, up.profile.delay_ms) for name, up, _ in relay.links(ever=True)]
        raise AssertionError(f"{condition} not within {timeout} s; the page's pacer: {seen}; "
                             f"the relay's allocations ever (name, delay ms): {links}") from failure


async def send_a_photo_over_a_throttled_link(context: Any, tablet: Any, photo: Path) -> list[tuple[float, int]]:
    """The nurse sends a photo over 256 kbit/s each way and 100 ms (Chromium's own throttling of this page's
    requests); when each PATCH left and how many bytes it carried."""
    cdp = await context.new_cdp_session(tablet)
    await cdp.send("Network.enable")
    await cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 100, "downloadThroughput": 32000, "uploadThroughput": 32000})
    patches: list[tuple[float, int]] = []
    tablet.on("request", lambda r: r.method == "PATCH" and patches.append(
        (time.monotonic(), len(r.post_data_buffer or b""))))

    await tablet.set_input_files("#photo-file", str(photo))
    await tablet.wait_for_selector('[data-testid="photo-form"]:not([hidden])')
    await tablet.select_option("#photo-site", "heel_right")
    await tablet.check('input[name="consent"][value="yes"]')
    await tablet.click("#photo-send")

    # While it goes, the nurse sees how far and how fast, and that the call goes first.
    sending = tablet.locator('[data-testid="outbox-item"][data-kbps]')
    await sending.wait_for(timeout=10000)
    shown = await sending.locator(".state").inner_text()
    assert shown.startswith("Skickar") and "kbit/s – samtalet går före" in shown, shown
    ARTIFACTS.mkdir(exist_ok=True)
    await tablet.screenshot(path=str(ARTIFACTS / "tablet-pacing.png"))
    await tablet.locator('[data-testid="outbox-item"][data-state="delivered"]').wait_for(timeout=40000)
    return patches
