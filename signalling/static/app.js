// The consultation page: check the link, get camera and microphone ready, join,
// show everyone, and keep the call going by itself.
import { Call } from "./call.js";
import { Gallery } from "./gallery.js";
import { LANGUAGES, language, onLanguageChange, setLanguage, t, translate } from "./i18n.js";
import { CARE_TEAM } from "./images.js";
import { StatsSampler } from "./quality.js";

const $ = (id) => document.getElementById(id);
const room = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() ?? "");
const token = new URLSearchParams(location.hash.slice(1)).get("token") ?? "";
// Keep the token out of the address bar, history and screenshots.
history.replaceState(null, "", location.pathname + location.search);

const page = {
  link: null, // answer of /join/check
  localStream: null,
  call: null,
  sampler: new StatsSampler(),
  stats: { participants: new Map(), self: null },
  refusal: null,
  tiles: new Map(), // participant id -> element
  activeSpeaker: null,
  stateLog: [], // every connection state the call went through, for IT staff
  kit: null, // the consultation's home kit, for clinicians and nurses: {device_id, name, online, called}
  gallery: null, // the consultation's images, for clinicians and nurses
};
window.naraDebug = page; // for IT staff in the console, and for the browser tests

function show(screen) {
  for (const s of document.querySelectorAll(".screen")) s.hidden = s.id !== `screen-${screen}`;
  page.screen = screen;
}

function setStatus(text) { $("status").textContent = text; }

function refuse(code) {
  page.refusal = code;
  $("kit-panel").hidden = true;
  const key = `refusal.${code}`;
  $("refusal-text").textContent = t(key) === key ? t("refusal.other") : t(key);
  $("refusal-code").textContent = t("refusal.code", { code });
  setStatus("");
  show("refusal");
}

// --- link check and preview ------------------------------------------------------

async function checkLink() {
  if (!token) return refuse("token_missing");
  let response;
  try {
    response = await fetch("/join/check", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ room, token }),
    });
  } catch {
    return setTimeout(checkLink, 2000); // no network yet: try again
  }
  const body = await response.json();
  if (!response.ok) return refuse(body.error.code);
  page.link = body;
  $("room-title").textContent = body.room.title;
  renderGreeting();
  show("prejoin");
  if (KIT_CALLERS.has(body.participant.role)) watchKit();
  if (CARE_TEAM.has(body.participant.role)) page.gallery = new Gallery({ room, token });
  $("join-button").disabled = true;
  if (body.may_publish) await startPreview();
  else showDeviceProblem(t("prejoin.watch_only"));
  $("join-button").disabled = false;
  $("join-button").focus();
}

function renderGreeting() {
  if (!page.link) return;
  const { participant, room: r } = page.link;
  $("prejoin-greeting").textContent = t("prejoin.greeting", {
    name: participant.name, role: t(`role.${participant.role}`), room: r.title,
  });
}

function showDeviceProblem(text) {
  $("device-problem").textContent = text;
  $("device-problem").hidden = false;
}

async function startPreview() {
  const camera = $("camera-select").value;
  const mic = $("mic-select").value;
  for (const track of page.localStream?.getTracks() ?? []) track.stop();
  try {
    page.localStream = await navigator.mediaDevices.getUserMedia({
      audio: mic ? { deviceId: { exact: mic } } : true,
      video: camera ? { deviceId: { exact: camera }, width: 640, height: 480 } : { width: 640, height: 480 },
    });
    $("device-problem").hidden = true;
  } catch (err) {
    page.localStream = null;
    showDeviceProblem(t("prejoin.no_devices", { reason: err.name }));
  }
  $("preview").srcObject = page.localStream;
  await listDevices();
}

async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [select, kind] of [[$("camera-select"), "videoinput"], [$("mic-select"), "audioinput"]]) {
    const chosen = page.localStream?.getTracks().find((tr) => `${tr.kind}input` === kind)?.getSettings().deviceId;
    select.replaceChildren(...devices.filter((d) => d.kind === kind).map((d, i) => {
      const option = new Option(d.label || `${kind} ${i + 1}`, d.deviceId);
      option.selected = d.deviceId === chosen;
      return option;
    }));
  }
}

// --- the call ----------------------------------------------------------------------

function join() {
  const call = new Call({ room, token, publish: page.link.may_publish && !!page.localStream, localStream: page.localStream });
  page.call = call;
  call.addEventListener("state", () => renderState());
  call.addEventListener("participants", () => { renderTiles(); renderKit(); });
  call.addEventListener("refused", (e) => refuse(e.detail.code));
  page.gallery?.attach(call);
  $("self-video").srcObject = page.localStream;
  $("self-view").hidden = !page.localStream;
  show("call");
  renderControls();
  renderTiles();
  call.start();
}

function renderState() {
  const state = page.call?.state;
  if (state && page.stateLog.at(-1) !== state) page.stateLog.push(state);
  if (!state || state === "refused") return;
  if (state === "closed") { setStatus(""); return; }
  setStatus(t(`state.${state}`));
  document.body.dataset.callState = state;
}

function renderTiles() {
  const call = page.call;
  if (!call) return;
  const container = $("tiles");
  for (const [id, tile] of page.tiles) {
    if (!call.participants.has(id)) { tile.remove(); page.tiles.delete(id); }
  }
  for (const p of call.participants.values()) {
    let tile = page.tiles.get(p.id);
    if (!tile) {
      tile = $("tile-template").content.firstElementChild.cloneNode(true);
      tile.dataset.participant = p.id;
      container.append(tile);
      page.tiles.set(p.id, tile);
    }
    const video = tile.querySelector("video");
    if (video.srcObject !== p.stream) video.srcObject = p.stream;
    // Video the server paused because our link cannot take it: say why, over the frozen picture.
    const pausedToUs = call.self && call.videoPaused(p.id, call.self.id) && !p.muted.video;
    const hasVideo = p.stream.getVideoTracks().length > 0 && !p.muted.video && !pausedToUs;
    const placeholder = tile.querySelector(".placeholder");
    placeholder.hidden = hasVideo;
    placeholder.textContent = pausedToUs ? t("call.video_paused_weak")
      : p.muted.video ? t("call.camera_is_off") : t("call.no_video");
    tile.dataset.videoPaused = String(Boolean(pausedToUs));
    tile.dataset.cameraOff = String(p.muted.video);
    // This participant's own link cannot take someone's video: everyone sees it on their tile.
    const missing = [...call.participants.keys(), call.self?.id].filter((pub) => pub && call.videoPaused(pub, p.id));
    const pausedBadge = tile.querySelector(".paused-badge");
    pausedBadge.hidden = missing.length === 0;
    pausedBadge.textContent = t("call.receives_no_video_weak");
    tile.dataset.muted = String(p.muted.audio);
    tile.querySelector(".name").textContent = p.name;
    tile.querySelector(".role").textContent = `(${t(`role.${p.role}`)})`;
    const mutedBadge = tile.querySelector(".muted-badge");
    mutedBadge.hidden = !p.muted.audio;
    mutedBadge.textContent = t("call.muted");
    tile.setAttribute("aria-label", [p.name, t(`role.${p.role}`), p.muted.audio ? t("call.muted") : ""].filter(Boolean).join(", "));
  }
  // Our own video paused for someone on a weak link: tell the sender too.
  const notSeeing = call.self ? call.pausedFor(call.self.id).map((id) => call.participants.get(id)?.name).filter(Boolean) : [];
  $("self-paused").hidden = notSeeing.length === 0;
  $("self-paused").textContent = t("call.your_video_paused_weak", { names: notSeeing.join(", ") });
  $("alone").hidden = call.participants.size > 0 || call.state !== "connected";
  container.dataset.count = String(call.participants.size);
  container.style.setProperty("--count", String(Math.max(1, call.participants.size)));
  renderQuality();
}

function renderControls() {
  const call = page.call;
  const canPublish = !!page.localStream && page.link.may_publish;
  for (const [button, kind, on, off] of [
    [$("mute-button"), "audio", "call.unmute", "call.mute"],
    [$("camera-button"), "video", "call.camera_on", "call.camera_off"],
  ]) {
    const muted = call?.muted[kind] ?? false;
    button.textContent = t(muted ? on : off);
    button.setAttribute("aria-pressed", String(muted));
    button.hidden = !canPublish;
  }
}

// --- the home kit: is it on, and "call the home kit" -----------------------------------

const KIT_CALLERS = new Set(["clinician", "nurse"]);
const KIT_POLL_MS = 5000;

async function kitRequest(method, path = "kit") {
  const response = await fetch(`/api/consultations/${encodeURIComponent(room)}/${path}`, {
    method, headers: { Authorization: `Bearer ${token}` },
  });
  const body = await response.json();
  if (!response.ok) throw Object.assign(new Error(body.error.message), { code: body.error.code });
  return body.kit;
}

async function watchKit() {
  if (page.refusal) return;
  try {
    page.kit = await kitRequest("GET");
    renderKit();
  } catch { /* no network just now: the next round tries again */ }
  setTimeout(watchKit, KIT_POLL_MS);
}

async function callKit() {
  $("call-kit-button").disabled = true;
  $("kit-problem").hidden = true;
  try {
    page.kit = await kitRequest("POST", "call-kit");
  } catch (err) {
    $("kit-problem").textContent = t("kit.call_failed", { code: err.code ?? err.name });
    $("kit-problem").hidden = false;
  }
  $("call-kit-button").disabled = false;
  renderKit();
}

function renderKit() {
  const kit = page.kit;
  $("kit-panel").hidden = !kit || Boolean(page.refusal);
  if (!kit) return;
  const inCall = page.call?.participants.has(kit.device_id) ?? false;
  const key = inCall ? "kit.in_call" : kit.called ? "kit.called" : kit.online ? "kit.online" : "kit.offline";
  $("kit-status").textContent = t(key, { name: kit.name });
  $("kit-status").dataset.online = String(kit.online);
  $("kit-panel").dataset.called = String(kit.called);
  $("call-kit-button").hidden = inCall;
}

// --- link quality and the active speaker --------------------------------------------

async function sampleStats() {
  const call = page.call;
  if (call?.pc && page.screen === "call") {
    const mids = new Map([...call.participants.keys()].map((id) => [id, call.midsOf(id)]));
    page.stats = await page.sampler.sample(call.pc, mids);
    let loudest = null;
    for (const [id, s] of page.stats.participants) {
      const p = call.participants.get(id);
      if (p && !p.muted.audio && s.audioLevel > 0.02 && (!loudest || s.audioLevel > loudest.level)) {
        loudest = { id, level: s.audioLevel };
      }
    }
    page.activeSpeaker = loudest?.id ?? null;
    renderQuality();
  }
  setTimeout(sampleStats, 1000);
}

function renderQuality() {
  for (const [id, tile] of page.tiles) {
    const s = page.stats.participants.get(id);
    const quality = s?.quality ?? "unknown";
    const badge = tile.querySelector(".quality");
    badge.dataset.quality = quality;
    badge.textContent = t(`quality.${quality}`);
    const speaking = page.activeSpeaker === id;
    tile.classList.toggle("speaking", speaking);
    const speakingBadge = tile.querySelector(".speaking-badge");
    speakingBadge.hidden = !speaking;
    speakingBadge.textContent = t("call.speaking");
  }
  const self = page.stats.self?.quality ?? "unknown";
  $("self-quality").dataset.quality = self;
  $("self-quality").textContent = t(`quality.${self}`);
  if (!$("details").hidden) renderDetails();
}

function renderDetails() {
  const rows = [];
  const fmt = (v, digits = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
  for (const [id, s] of page.stats.participants) {
    const p = page.call.participants.get(id);
    if (!p) continue;
    const row = document.createElement("tr");
    for (const value of [p.name, t(`quality.${s.quality}`), fmt(s.kbps), s.loss === null ? "–" : `${(s.loss * 100).toFixed(1)} %`, fmt(s.rttMs), fmt(s.fps)]) {
      row.append(Object.assign(document.createElement("td"), { textContent: value }));
    }
    rows.push(row);
  }
  $("details-body").replaceChildren(...rows);
}

// --- wiring ----------------------------------------------------------------------------

function wire() {
  const select = $("lang-select");
  for (const [code, name] of Object.entries(LANGUAGES)) select.append(new Option(name, code, false, code === language()));
  select.addEventListener("change", () => setLanguage(select.value));
  onLanguageChange(() => {
    translate();
    renderGreeting();
    if (page.refusal) refuse(page.refusal);
    renderState();
    renderTiles();
    renderControls();
    renderKit();
    page.gallery?.render();
  });
  $("call-kit-button").addEventListener("click", callKit);
  $("camera-select").addEventListener("change", async () => {
    await startPreview();
    if (page.call) await page.call.replaceLocalTrack("video", page.localStream?.getVideoTracks()[0] ?? null);
  });
  $("mic-select").addEventListener("change", startPreview);
  $("join-button").addEventListener("click", join);
  $("mute-button").addEventListener("click", () => {
    page.call.setMuted("audio", !page.call.muted.audio);
    renderControls();
  });
  $("camera-button").addEventListener("click", () => {
    page.call.setMuted("video", !page.call.muted.video);
    renderControls();
  });
  $("details-button").addEventListener("click", () => {
    const details = $("details");
    details.hidden = !details.hidden;
    $("details-button").setAttribute("aria-pressed", String(!details.hidden));
    renderDetails();
  });
  $("hangup-button").addEventListener("click", () => {
    page.call.hangup();
    page.call = null;
    for (const tile of page.tiles.values()) tile.remove();
    page.tiles.clear();
    show("left");
  });
  $("rejoin-button").addEventListener("click", join);
}

translate();
wire();
show("check");
checkLink();
sampleStats();
