// One participant's side of a consultation: the signalling protocol
// (docs/protocol.md), the peer connection, and getting back in by itself.
//
// The server always offers; this side only answers. Events (CustomEvent):
//   "state"        detail: "connecting" | "connected" | "reconnecting" | "offline" | "closed" | "refused"
//   "participants" the set of others, their streams, mute state or paused video changed
//   "refused"      detail: {code, message}: the server will not let us in
//   "message"      detail: every message from the server, for the page's own features (images, photo requests)

const REFUSALS = new Set([
  "token_missing", "token_malformed", "token_alg_none", "token_alg_not_allowed", "token_bad_signature",
  "token_expired", "token_not_yet_valid", "token_wrong_audience", "token_wrong_issuer", "token_wrong_room",
  "token_claims_invalid", "token_invalid", "room_not_found", "publish_not_allowed", "replaced",
]);
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10000;

export class Call extends EventTarget {
  constructor({ room, token, publish, localStream }) {
    super();
    this.room = room;
    this.token = token;
    this.publish = publish;
    this.localStream = localStream;
    this.state = "idle";
    this.self = null;
    this.participants = new Map(); // id -> {id, name, role, muted: {audio, video}, stream}
    // Video the server has paused because a link cannot take it: "publisher>subscriber".
    this.pausedVideo = new Set();
    this.owners = new Map(); // mid -> {participant_id, kind}
    this.pc = null;
    this.ws = null;
    this.muted = { audio: false, video: false };
    this.retryMs = FIRST_RETRY_MS;
    this.retryTimer = null;
    this.heartbeat = null;
    this.lastHeard = 0;
    this.ended = false;
    this.generation = 0; // bumps on every reconnect, so stale callbacks do nothing
    // The server that holds the consultation, once another server of a cluster has sent us there
    // (a "redirect"); null: the page's own. A second redirect before "joined" is an error.
    this.server = null;
    this.redirected = false;
    addEventListener("online", () => this.state === "offline" && this.reconnectNow());
    addEventListener("offline", () => this.state !== "closed" && this.state !== "refused" && this.setState("offline"));
  }

  start() {
    this.ended = false;
    this.connect();
  }

  hangup() {
    this.ended = true;
    this.send({ type: "leave" });
    this.teardown();
    this.participants.clear();
    this.setState("closed");
    this.emit("participants");
  }

  setMuted(kind, muted) {
    this.muted[kind] = muted;
    for (const track of this.localStream?.getTracks() ?? []) {
      if (track.kind === kind) track.enabled = !muted;
    }
    this.send({ type: "mute", kind, muted });
  }

  async replaceLocalTrack(kind, track) {
    if (!this.pc) return;
    for (const transceiver of this.pc.getTransceivers()) {
      if (transceiver.sender.track?.kind === kind) await transceiver.sender.replaceTrack(track);
    }
  }

  // --- connection -----------------------------------------------------------

  connect() {
    const generation = ++this.generation;
    this.setState(this.state === "idle" || this.state === "closed" ? "connecting" : "reconnecting");
    const server = new URL(this.server ?? location.href);
    const scheme = server.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${server.host}/ws`);
    this.ws = ws;
    ws.onopen = () => {
      this.send({ type: "join", room: this.room, token: this.token, publish: this.publish });
    };
    ws.onmessage = (event) => {
      if (generation !== this.generation) return;
      this.lastHeard = Date.now();
      this.handle(JSON.parse(event.data)).catch((err) => {
        console.warn("Nära: could not handle a message", err);
        this.scheduleReconnect();
      });
    };
    ws.onclose = () => {
      if (generation === this.generation && !this.ended) this.scheduleReconnect();
    };
  }

  // Send a message if the connection is open; whether it went.
  send(message) {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  teardown() {
    clearInterval(this.heartbeat);
    clearTimeout(this.retryTimer);
    this.heartbeat = null;
    this.generation++;
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close();
      this.ws = null;
    }
    if (this.pc) {
      this.pc.onconnectionstatechange = null;
      this.pc.close();
      this.pc = null;
    }
    this.owners.clear();
  }

  scheduleReconnect() {
    if (this.ended) return;
    this.teardown();
    this.setState(navigator.onLine === false ? "offline" : "reconnecting");
    const delay = this.retryMs * (0.5 + Math.random() / 2);
    this.retryMs = Math.min(this.retryMs * 2, MAX_RETRY_MS);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  reconnectNow() {
    this.retryMs = FIRST_RETRY_MS;
    this.teardown();
    this.connect();
  }

  // --- protocol -------------------------------------------------------------

  async handle(message) {
    this.dispatchEvent(new CustomEvent("message", { detail: message }));
    switch (message.type) {
      case "joined": return this.joined(message);
      case "offer": return this.answer(message);
      case "participant-joined":
        this.participants.set(message.participant.id, this.newParticipant(message.participant));
        return this.emit("participants");
      case "participant-left":
        this.participants.delete(message.participant_id);
        return this.emit("participants");
      case "mute": {
        const p = this.participants.get(message.participant_id);
        if (p) p.muted[message.kind] = message.muted;
        return this.emit("participants");
      }
      case "video-paused":
      case "video-resumed": {
        const key = `${message.participant_id}>${message.subscriber_id}`;
        if (message.type === "video-paused") this.pausedVideo.add(key);
        else this.pausedVideo.delete(key);
        return this.emit("participants");
      }
      case "redirect":
        return this.follow(message);
      case "error":
        if (REFUSALS.has(message.code)) {
          this.refuse(message);
        } else {
          console.warn("Nära:", message.code, message.message);
        }
        return;
      default:
        return; // pong, track-published, track-unpublished, image events: nothing to do here
    }
  }

  // Another server of the cluster holds the consultation: join there, once.
  follow(message) {
    if (this.redirected) {
      return this.refuse({ code: "redirect_loop", message: "The server sent the join elsewhere a second time." });
    }
    this.redirected = true;
    this.server = message.url;
    this.teardown();
    this.connect();
  }

  refuse(detail) {
    this.ended = true;
    this.teardown();
    this.setState("refused");
    this.dispatchEvent(new CustomEvent("refused", { detail }));
  }

  joined(message) {
    this.redirected = false;
    this.self = message.participant;
    this.participants = new Map(message.participants.map((p) => [p.id, this.newParticipant(p)]));
    this.pausedVideo = new Set(message.participants.flatMap(
      (p) => (p.video_paused_from ?? []).map((publisher) => `${publisher}>${p.id}`)));
    this.pc = new RTCPeerConnection({
      iceServers: message.ice_servers,
      iceTransportPolicy: message.ice_transport_policy ?? "all",
      bundlePolicy: "max-bundle",
    });
    const generation = this.generation;
    this.pc.onconnectionstatechange = () => {
      if (generation !== this.generation) return;
      const state = this.pc?.connectionState;
      if (state === "connected") {
        this.retryMs = FIRST_RETRY_MS;
        this.setState("connected");
      } else if (state === "failed") {
        this.scheduleReconnect();
      }
    };
    this.pc.ontrack = () => this.attachTracks();
    const interval = message.heartbeat_interval * 1000;
    this.lastHeard = Date.now();
    this.heartbeat = setInterval(() => {
      if (Date.now() - this.lastHeard > interval * 2.5) return this.scheduleReconnect();
      this.send({ type: "ping", id: Date.now() });
    }, interval);
    // Tell the others our mute state again after a reconnect.
    for (const kind of ["audio", "video"]) if (this.muted[kind]) this.send({ type: "mute", kind, muted: true });
    this.emit("participants");
  }

  // Is the video from `publisher` to `subscriber` paused for a weak connection?
  videoPaused(publisher, subscriber) {
    return this.pausedVideo.has(`${publisher}>${subscriber}`);
  }

  // Who cannot receive `publisher`'s video right now.
  pausedFor(publisher) {
    return [...this.pausedVideo].filter((key) => key.startsWith(`${publisher}>`)).map((key) => key.split(">")[1]);
  }

  newParticipant(p) {
    const muted = { audio: false, video: false, ...(p.muted ?? {}) };
    return { id: p.id, name: p.name, role: p.role, muted, stream: new MediaStream() };
  }

  async answer(offer) {
    await this.pc.setRemoteDescription({ type: "offer", sdp: offer.sdp });
    for (const [kind, mid] of Object.entries(offer.publish ?? {})) {
      const transceiver = this.pc.getTransceivers().find((t) => t.mid === mid);
      const track = this.localStream?.getTracks().find((t) => t.kind === kind);
      if (!transceiver) continue;
      if (track) {
        await transceiver.sender.replaceTrack(track);
        transceiver.direction = "sendonly";
      } else {
        transceiver.direction = "inactive";
      }
    }
    this.owners = new Map((offer.tracks ?? []).map((t) => [t.mid, t]));
    const answer = await this.pc.createAnswer();
    await this.pc.setLocalDescription(answer);
    this.send({ type: "answer", sdp: this.pc.localDescription.sdp });
    this.attachTracks();
  }

  // Put each receiving transceiver's track into its owner's stream, as the latest offer says.
  attachTracks() {
    if (!this.pc) return;
    const wanted = new Map(); // participant id -> tracks
    for (const transceiver of this.pc.getTransceivers()) {
      const owner = this.owners.get(transceiver.mid);
      if (!owner || !transceiver.receiver.track) continue;
      if (!wanted.has(owner.participant_id)) wanted.set(owner.participant_id, []);
      wanted.get(owner.participant_id).push(transceiver.receiver.track);
    }
    for (const p of this.participants.values()) {
      const tracks = wanted.get(p.id) ?? [];
      for (const track of p.stream.getTracks()) if (!tracks.includes(track)) p.stream.removeTrack(track);
      for (const track of tracks) if (!p.stream.getTracks().includes(track)) p.stream.addTrack(track);
    }
    this.emit("participants");
  }

  midsOf(participantId) {
    return [...this.owners].filter(([, o]) => o.participant_id === participantId).map(([mid, o]) => ({ mid, kind: o.kind }));
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  emit(name) {
    this.dispatchEvent(new CustomEvent(name));
  }
}
