// How fast the tablet may upload photos: beside the call, never in its way.
//
// The same policy as the Python kit's (edge/pacing.py). Outside a call the upload
// has a configured ceiling. While a call is up the upload is a scavenger, like
// LEDBAT (RFC 6817): it watches the call's round-trip time against the lowest seen
// lately (the base); queueing delay over `target` (60 ms) means the upload is filling
// the link's queue ahead of the call's audio, so the rate is cut by a quarter (at most
// once a second). Below the target it grows slowly, by at most `growth` of itself a
// second (and at least `minStep`), in proportion to how far below the target the delay
// is. It never goes under `floor`, so a photo still arrives on the worst link.
//
// A browser cannot pace the bytes inside one request over HTTP/1.1 (a streamed request
// body needs HTTP/2), so a PATCH leaves as one burst and the pacing is between chunks:
// the next chunk goes when the bytes already sent have been paid for at the rate. In a
// call the chunks are short (about half a second of bytes), because a burst waits in
// the link's queue ahead of the audio for as long as the link takes to carry it.
//
// `UploadPace` decides, from the time, the call's round trips and the bytes sent; it
// takes the time as an argument and touches nothing else. `Pacer` is the thin shell
// around it: the clock, the call's getStats() and the waiting.

export const KIB = 1024;
export const DEFAULT_CEILING_KBPS = 2000;

// Rates in bytes a second, times in seconds.
export const SETTINGS = {
  ceiling: (DEFAULT_CEILING_KBPS * 1000) / 8,
  floor: 2 * KIB, // 16 kbit/s
  target: 0.060, // queueing delay the call's audio may be given
  baseWindow: 120, // the base round trip is the lowest of this many seconds
  cut: 0.75,
  cutInterval: 1,
  growth: 0.08, // at most this fraction of the rate, a second
  slowStart: 0.7, // until the first sign of a queue in a call the rate doubles every 1/0.7 s
  minStep: 1 * KIB, // bytes a second, a second
  callStart: 8 * KIB, // where the rate starts when a call begins (64 kbit/s)
  maxElapsed: 1, // growth counts at most this long between two looks (none while nothing is sent)
  chunkSeconds: 1.5, // a chunk's bytes at the rate, outside a call
  callChunkSeconds: 0.5, // in a call: a chunk's burst queues ahead of the audio
  minChunk: 16 * KIB,
  callMinChunk: 4 * KIB,
  maxChunk: 4096 * KIB,
};

// The kit page's link may set the ceiling: ?upload_kbps=<16..100000>; anything else is the default.
export function ceilingFromQuery(search) {
  const value = Number(new URLSearchParams(search).get("upload_kbps") ?? "");
  return Number.isInteger(value) && value >= 16 && value <= 100000 ? value : DEFAULT_CEILING_KBPS;
}

export class UploadPace {
  constructor(settings = {}, now = 0) {
    this.settings = { ...SETTINGS, ...settings };
    this.rate = this.settings.ceiling;
    this.inCall = false;
    this.starting = false; // in slow start: no queue seen yet in this call
    this.base = null; // the call's lowest recent round trip
    this.queueing = null; // the latest round trip over the base
    // Per source of round trips (the audio's, the transport's: each has a base of its own), [at, rtt] of
    // recent samples, increasing in rtt: the first is the base.
    this.histories = new Map();
    this.last = null;
    this.updatedAt = now;
    this.cutAt = -Infinity;
    this.debt = 0; // bytes sent and not yet paid for at the rate
    this.paidAt = now;
  }

  // The rate at `now`. `sample` is the call's latest round trip {rtt, at} (the same sample
  // again until a new one is measured), or null; `inCall` says a call is up, even before
  // its first measurement (the rate then holds at the call's starting rate).
  update(now, sample, inCall = sample !== null) {
    const s = this.settings;
    this.pay(now);
    if (!inCall) {
      this.histories.clear();
      this.last = this.base = this.queueing = null;
      this.inCall = false;
      this.rate = s.ceiling;
      this.updatedAt = now;
      return this.rate;
    }
    if (!this.inCall) {
      this.inCall = this.starting = true;
      this.rate = Math.max(s.floor, Math.min(this.rate, s.callStart)); // a call begins: start low, grow
      this.updatedAt = now;
    }
    if (!sample) {
      this.updatedAt = now;
      return this.rate; // nothing measured yet: hold
    }
    if (!this.last) this.updatedAt = now; // growth counts from the first measurement
    if (!this.last || sample.rtt !== this.last.rtt || sample.at !== this.last.at) this.learn(sample);
    this.base = this.histories.get(sample.source ?? "")[0][1];
    this.last = sample;
    const queueing = Math.max(0, sample.rtt - this.base);
    this.queueing = queueing;
    const elapsed = Math.min(s.maxElapsed, Math.max(0, now - this.updatedAt));
    this.updatedAt = now;
    if (queueing > s.target) {
      this.starting = false;
      if (now - this.cutAt >= s.cutInterval) {
        this.rate *= s.cut;
        this.cutAt = now;
      }
    } else if (this.starting && queueing < s.target / 2) {
      this.rate *= 2 ** (s.slowStart * elapsed); // a clear link: find its room in seconds, as the kit does
    } else {
      this.starting = false;
      const offTarget = 1 - queueing / s.target;
      this.rate += offTarget * Math.max(s.minStep, s.growth * this.rate) * elapsed;
    }
    this.rate = Math.min(s.ceiling, Math.max(s.floor, this.rate));
    return this.rate;
  }

  // A round trip measured: its source's base follows it (also for a source the rate is not steered by
  // now, so that if it takes over, its base is known).
  learn(sample) {
    const key = sample.source ?? "";
    if (!this.histories.has(key)) this.histories.set(key, []);
    const history = this.histories.get(key);
    while (history.length && history[history.length - 1][1] >= sample.rtt) history.pop();
    history.push([sample.at, sample.rtt]);
    while (history[0][0] < sample.at - this.settings.baseWindow) history.shift();
  }

  // `bytes` went out at `now` (a chunk, with its request's headers).
  sent(bytes, now) {
    this.pay(now);
    this.debt += bytes;
  }

  // Seconds to wait at `now` before the next chunk may go.
  delay(now) {
    this.pay(now);
    return this.debt / this.rate;
  }

  // Bytes for the next chunk: its share of seconds at the rate, within the bounds.
  chunk() {
    const s = this.settings;
    const seconds = this.inCall ? s.callChunkSeconds : s.chunkSeconds;
    const smallest = this.inCall ? s.callMinChunk : s.minChunk;
    return Math.round(Math.min(s.maxChunk, Math.max(smallest, this.rate * seconds)));
  }

  pay(now) {
    this.debt = Math.max(0, this.debt - Math.max(0, now - this.paidAt) * this.rate);
    this.paidAt = now;
  }
}

// --- the shell: the clock, the call's round trip, the waiting ---------------------

const OBSERVE_SECONDS = 0.25; // a wait looks at the call this often, so a cut takes effect at once
const seconds = () => performance.now() / 1000;

// A source of round trips that has measured nothing new for this long has stopped: the audio's, from the
// server's receiver reports, came four times and then no more in one run under load, and the pacer, reading
// the same stale sample, never saw the call's link slow down.
export const STALE_SECONDS = 6;

// Round trips are read from the audio while it measures them, else from the transport; whichever
// is in use stays in use while it measures.

// The call's latest round trips from getStats(): the audio sender's, from the server's receiver
// reports, and the transport's, from its STUN checks; each {rtt, count, source} or null, where
// `count` grows with each new measurement.
export async function callRoundTrips(pc) {
  let audio = null;
  let selected = null;
  const pairs = new Map();
  for (const s of (await pc.getStats()).values()) {
    if (s.type === "remote-inbound-rtp" && s.kind === "audio" && s.roundTripTime !== undefined) audio = s;
    else if (s.type === "transport" && s.selectedCandidatePairId) selected = s.selectedCandidatePairId;
    else if (s.type === "candidate-pair") pairs.set(s.id, s);
  }
  const pair = pairs.get(selected);
  return {
    audio: audio && { rtt: audio.roundTripTime, count: audio.roundTripTimeMeasurements ?? 0, source: "audio" },
    transport: pair?.currentRoundTripTime === undefined ? null
      : { rtt: pair.currentRoundTripTime, count: pair.responsesReceived ?? 0, source: "transport" },
  };
}

// `call()` answers null without a call, or the call: {pc} (pc null while it connects).
// Events: "change" when the rate changed.
export class Pacer extends EventTarget {
  constructor({ ceilingKbps = DEFAULT_CEILING_KBPS, call = () => null, clock = seconds } = {}) {
    super();
    this.clock = clock;
    this.call = call;
    this.pace = new UploadPace({ ceiling: (ceilingKbps * 1000) / 8 }, clock());
    this.ceilingKbps = ceilingKbps;
    this.sample = null; // {rtt, at, count, source}
    this.seen = {}; // source -> {count, at}: its latest measurement, and when it was first seen
  }

  get kbps() {
    return Math.round((this.pace.rate * 8) / 1000);
  }

  get inCall() {
    return this.pace.inCall;
  }

  // Look at the call now and steer the rate.
  async observe() {
    const call = this.call();
    let found = { audio: null, transport: null };
    if (call?.pc) {
      try { found = await callRoundTrips(call.pc); } catch { /* the connection closed meanwhile */ }
    }
    const now = this.clock();
    const fresh = {};
    for (const source of ["audio", "transport"]) {
      const got = found[source];
      fresh[source] = got !== null && got.count !== this.seen[source]?.count;
      if (fresh[source]) this.seen[source] = { count: got.count, at: now };
    }
    // The source in use while it keeps measuring (a source that joins later has no base from before a queue
    // that is already there: the audio's first round trips came after the link had slowed, and read none).
    const alive = (source) => found[source] !== null && now - this.seen[source].at < STALE_SECONDS;
    const order = this.sample?.source === "transport" ? ["transport", "audio"] : ["audio", "transport"];
    const source = order.find(alive) ?? order.find((name) => found[name] !== null);
    const measured = source === undefined ? null : found[source];
    for (const other of ["audio", "transport"]) {
      if (call && fresh[other] && found[other] !== measured) this.pace.learn({ ...found[other], at: now });
    }
    if (!call) {
      this.sample = null;
      this.seen = {};
    } else if (measured && (measured.source !== this.sample?.source || measured.count !== this.sample?.count)) {
      this.sample = { rtt: measured.rtt, at: now, count: measured.count, source: measured.source };
    }
    const before = this.kbps;
    this.pace.update(now, this.sample, !!call);
    if (this.kbps !== before) this.dispatchEvent(new CustomEvent("change"));
  }

  // Resolves when the next chunk may go.
  async ready() {
    for (;;) {
      await this.observe();
      const wait = this.pace.delay(this.clock());
      if (wait <= 0) return;
      await new Promise((resolve) => setTimeout(resolve, Math.min(wait, OBSERVE_SECONDS) * 1000));
    }
  }

  chunk() {
    return this.pace.chunk();
  }

  sent(bytes) {
    this.pace.sent(bytes, this.clock());
  }
}
