// Link quality from getStats(): numbers for IT staff, one word for everyone else.

// good / weak / poor from what a person would notice: loss, delay, fluidity.
export function classify({ loss, rttMs, fps, receivingVideo }) {
  if (loss === null && rttMs === null) return "unknown";
  const l = loss ?? 0;
  const r = rttMs ?? 0;
  const f = receivingVideo ? fps ?? 0 : 30;
  if (l < 0.02 && r < 300 && f >= 12) return "good"; // the home kit sends 15 fps
  if (l < 0.08 && r < 800 && f >= 5) return "weak";
  return "poor";
}

// Samples a peer connection every call and reports per participant and for ourselves.
export class StatsSampler {
  constructor() {
    this.previous = new Map(); // stats id -> {bytes, packets, lost, at}
  }

  async sample(pc, midsByParticipant) {
    if (!pc) return { participants: new Map(), self: null };
    const report = await pc.getStats();
    let rttMs = null;
    const inbound = new Map(); // mid -> stats
    let outLoss = null;
    let outRtt = null;
    report.forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined) {
        rttMs = s.currentRoundTripTime * 1000;
      } else if (s.type === "inbound-rtp" && s.mid !== undefined) {
        inbound.set(s.mid, s);
      } else if (s.type === "remote-inbound-rtp") {
        if (s.fractionLost !== undefined) outLoss = Math.max(outLoss ?? 0, s.fractionLost);
        if (s.roundTripTime !== undefined) outRtt = s.roundTripTime * 1000;
      }
    });
    const now = performance.now();
    const participants = new Map();
    for (const [participantId, mids] of midsByParticipant) {
      const entry = { kbps: 0, loss: null, fps: null, rttMs, framesDecoded: 0, totalSamplesReceived: 0, audioLevel: 0, receivingVideo: false };
      let packets = 0;
      let lost = 0;
      for (const { mid, kind } of mids) {
        const s = inbound.get(mid);
        if (!s) continue;
        const before = this.previous.get(s.id);
        const current = { bytes: s.bytesReceived ?? 0, packets: s.packetsReceived ?? 0, lost: s.packetsLost ?? 0, at: now };
        this.previous.set(s.id, current);
        if (before && now > before.at) {
          entry.kbps += ((current.bytes - before.bytes) * 8) / (now - before.at);
          packets += current.packets - before.packets;
          lost += Math.max(0, current.lost - before.lost);
        }
        if (kind === "video") {
          entry.receivingVideo = true;
          entry.fps = s.framesPerSecond ?? 0;
          entry.framesDecoded = s.framesDecoded ?? 0;
        } else {
          entry.totalSamplesReceived = s.totalSamplesReceived ?? 0;
          entry.audioLevel = s.audioLevel ?? 0;
        }
      }
      if (packets + lost > 0) entry.loss = lost / (packets + lost);
      else if (hasStats(mids, inbound)) entry.loss = 0;
      entry.quality = classify(entry);
      participants.set(participantId, entry);
    }
    const self = { loss: outLoss, rttMs: outRtt ?? rttMs, fps: null, receivingVideo: false };
    self.quality = classify(self);
    return { participants, self };
  }
}

function hasStats(mids, inbound) {
  return mids.some(({ mid }) => inbound.has(mid));
}
