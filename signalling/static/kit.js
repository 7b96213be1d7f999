// The tablet kit page: a tablet in the patient's home takes the home kit's part. It
// joins the consultation's call with camera and microphone, shows the care team's
// requests for a photo, takes photos at the camera's full resolution (or through the
// camera app), asks for their details and sends them through its outbox, which keeps
// every photo until the server has it. The uploads go under a ceiling (the link's
// ?upload_kbps=, 2000 by default) and, in a call with the team, yield to it (pacer.js).
import { Call } from "./call.js";
import { LANGUAGES, language, onLanguageChange, setLanguage, t, translate } from "./i18n.js";
import { bodySiteName, bodySites, formatTime } from "./images.js";
import { Outbox } from "./outbox.js";
import { Pacer, ceilingFromQuery } from "./pacer.js";

const $ = (id) => document.getElementById(id);
const room = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() ?? "");
// The token leaves the address bar, but stays with this tab so a reload can go on sending.
const TOKEN_KEY = `nara.kit.token.${room}`;
const token = new URLSearchParams(location.hash.slice(1)).get("token")
  ?? (() => { try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; } })() ?? "";
try { if (token) sessionStorage.setItem(TOKEN_KEY, token); } catch { /* private mode: no reload */ }
history.replaceState(null, "", location.pathname + location.search);

const UPLOADERS = new Set(["kit", "nurse", "clinician"]);
const CALL_UP = new Set(["connecting", "connected", "reconnecting"]);

const page = {
  link: null,
  call: null,
  localStream: null,
  outbox: null,
  sites: [],
  request: null, // the care team's latest photo request
  draftUrl: null, // the preview of the photo whose details are asked for
  draftId: null,
  thumbs: new Map(), // photo id -> blob: URL of its thumbnail
  tiles: new Map(),
  refusal: null,
};
window.naraDebug = page;

function show(screen) {
  for (const s of document.querySelectorAll(".screen")) s.hidden = s.id !== `screen-${screen}`;
  page.screen = screen;
}

function refuse(code) {
  page.refusal = code;
  const key = `refusal.${code}`;
  $("refusal-text").textContent = t(key) === key ? t("refusal.other") : t(key);
  $("refusal-code").textContent = t("refusal.code", { code });
  $("status").textContent = "";
  show("refusal");
  renderOutbox();
}

async function start() {
  if (!token) return refuse("token_missing");
  if (!globalThis.crypto?.subtle || !globalThis.indexedDB) return refuse("insecure_page");
  let response;
  try {
    response = await fetch("/join/check", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ room, token }),
    });
  } catch {
    return setTimeout(start, 2000); // no network yet: try again
  }
  const body = await response.json().catch(() => null);
  if (!body) return setTimeout(start, 2000); // a proxy's error page: the server is not there yet
  // The outbox opens whatever the link says: photos already taken are shown, and sent once a good link comes.
  try {
    await openOutbox();
  } catch {
    return refuse("storage_unavailable");
  }
  if (!response.ok) return refuse(body.error.code);
  if (!UPLOADERS.has(body.participant.role)) return refuse("upload_not_allowed");
  page.link = body;
  $("room-title").textContent = body.room.title;
  show("kit");
  page.outbox.start();
  loadSites();
  await startCamera();
  joinCall();
}

async function openOutbox() {
  if (page.outbox) return;
  const pacer = new Pacer({
    ceilingKbps: ceilingFromQuery(location.search),
    // The uploads yield to a call with someone in it: audio nobody hears needs no room.
    call: () => (CALL_UP.has(page.call?.state) && page.call.participants.size > 0 ? page.call : null),
  });
  pacer.addEventListener("change", renderOutbox);
  page.outbox = new Outbox({ room, token, pacer });
  page.outbox.addEventListener("change", renderOutbox);
  await page.outbox.open();
}

async function loadSites() {
  try {
    page.sites = await bodySites();
  } catch {
    setTimeout(loadSites, 3000);
    return;
  }
  renderSites();
  renderOutbox();
}

// --- the call -------------------------------------------------------------------

async function startCamera() {
  try {
    page.localStream = await navigator.mediaDevices.getUserMedia({
      audio: true, video: { width: { ideal: 1280 }, height: { ideal: 720 }, facingMode: "user" },
    });
  } catch (err) {
    page.localStream = null;
    photoProblem(t("photo.no_camera", { reason: err.name }));
  }
  $("self-video").srcObject = page.localStream;
  $("self-view").hidden = !page.localStream;
  renderPhotoButtons();
}

function joinCall() {
  const call = new Call({ room, token, publish: page.link.may_publish && !!page.localStream,
    localStream: page.localStream });
  page.call = call;
  call.addEventListener("state", renderState);
  call.addEventListener("participants", renderTiles);
  call.addEventListener("refused", (e) => refuse(e.detail.code));
  call.addEventListener("message", (e) => {
    if (e.detail.type === "photo-requested") photoRequested(e.detail);
  });
  call.start();
}

function renderState() {
  const state = page.call?.state;
  if (!state || state === "refused" || page.refusal) return;
  $("status").textContent = state === "closed" ? "" : t(`state.${state}`);
  document.body.dataset.callState = state;
  renderTiles();
}

function renderTiles() {
  const call = page.call;
  if (!call) return;
  for (const [id, tile] of page.tiles) {
    if (!call.participants.has(id)) { tile.remove(); page.tiles.delete(id); }
  }
  for (const p of call.participants.values()) {
    let tile = page.tiles.get(p.id);
    if (!tile) {
      tile = $("kit-tile-template").content.firstElementChild.cloneNode(true);
      tile.dataset.participant = p.id;
      $("tiles").append(tile);
      page.tiles.set(p.id, tile);
    }
    const video = tile.querySelector("video");
    if (video.srcObject !== p.stream) video.srcObject = p.stream;
    tile.querySelector(".name").textContent = p.name;
    tile.querySelector(".role").textContent = `(${t(`role.${p.role}`)})`;
  }
  $("alone").hidden = call.participants.size > 0 || call.state !== "connected";
}

// --- photo requests from the care team ---------------------------------------------------

function photoRequested(message) {
  page.request = { ...message, at: new Date() };
  renderRequest();
  const form = $("photo-form");
  if (!form.hidden && message.body_site && !$("photo-site").value) $("photo-site").value = message.body_site;
}

function renderRequest() {
  const request = page.request;
  $("photo-request").hidden = !request;
  if (!request) return;
  const site = request.body_site ? bodySiteName(page.sites, request.body_site, language()) : "";
  const parts = [t(site ? "photo.requested_site" : "photo.requested", { name: request.by?.name ?? "", site })];
  if (request.note) parts.push(`”${request.note}”`);
  $("photo-request").textContent = parts.join(" ");
  $("photo-request").dataset.bodySite = request.body_site ?? "";
}

// --- taking a photo ---------------------------------------------------------------

function cameraTrack() {
  const track = page.localStream?.getVideoTracks()[0];
  return track && track.readyState === "live" ? track : null;
}

function renderPhotoButtons() {
  $("take-photo").hidden = !("ImageCapture" in globalThis) || !cameraTrack();
}

function photoProblem(text) {
  $("photo-problem").hidden = !text;
  $("photo-problem").textContent = text ?? "";
}

// The camera's own still picture at its largest size, where the browser can; else a frame of the video.
async function takePhoto() {
  const track = cameraTrack();
  if (!track) return;
  $("take-photo").disabled = true;
  photoProblem(null);
  try {
    const capture = new ImageCapture(track);
    let blob;
    try {
      const caps = await capture.getPhotoCapabilities();
      const size = caps.imageWidth?.max && caps.imageHeight?.max
        ? { imageWidth: caps.imageWidth.max, imageHeight: caps.imageHeight.max } : {};
      blob = await capture.takePhoto(size);
    } catch {
      const frame = await capture.grabFrame();
      const canvas = new OffscreenCanvas(frame.width, frame.height);
      canvas.getContext("2d").drawImage(frame, 0, 0);
      blob = await canvas.convertToBlob({ type: "image/jpeg", quality: 0.92 });
    }
    await page.outbox.capture(blob, { capturedAt: new Date() });
  } catch (err) {
    photoProblem(t("photo.failed", { reason: err.code ?? err.name }));
  }
  $("take-photo").disabled = false;
}

async function photoFromFile() {
  const input = $("photo-file");
  photoProblem(null);
  for (const file of input.files) {
    try {
      await page.outbox.capture(file, { filename: file.name, capturedAt: new Date(file.lastModified || Date.now()) });
    } catch (err) {
      photoProblem(t("photo.failed", { reason: err.code ?? err.name }));
    }
  }
  input.value = "";
}

// --- the details of the photo, and the outbox --------------------------------------------

function renderSites() {
  const select = $("photo-site");
  const chosen = select.value;
  select.replaceChildren(new Option(t("photo.choose_site"), ""),
    ...page.sites.map((s) => new Option(bodySiteName(page.sites, s.key, language()), s.key)));
  select.value = chosen;
}

function renderDraft() {
  const draft = page.outbox?.records.find((r) => r.state === "draft" && r.room === room);
  const form = $("photo-form");
  if (!draft) {
    form.hidden = true;
    page.draftId = null;
    return;
  }
  if (draft.id !== page.draftId) {
    page.draftId = draft.id;
    if (page.draftUrl) URL.revokeObjectURL(page.draftUrl);
    page.draftUrl = URL.createObjectURL(draft.thumb ?? draft.blob);
    $("photo-preview").src = page.draftUrl;
    form.reset();
    $("photo-site").value = page.request?.body_site ?? "";
    $("photo-form-problem").hidden = true;
  }
  form.dataset.photo = draft.id;
  form.hidden = false;
}

async function sendDraft() {
  const id = page.draftId;
  const body_site = $("photo-site").value;
  const consent = document.querySelector('input[name="consent"]:checked')?.value ?? null;
  const missing = [!body_site && t("photo.need_site"), !consent && t("photo.need_consent")].filter(Boolean);
  $("photo-form-problem").hidden = missing.length === 0;
  $("photo-form-problem").textContent = missing.join(" ");
  if (missing.length || !id) return;
  await page.outbox.describe(id, { body_site, note: $("photo-note").value.trim(), consent });
  if (page.request && (!page.request.body_site || page.request.body_site === body_site)) {
    page.request = null; // answered
    renderRequest();
  }
}

function stateText(record, outbox) {
  switch (record.state) {
    case "draft": return t("outbox.draft");
    case "delivered": return t("outbox.delivered", { time: formatTime(new Date(record.delivered_at).toISOString(), language()) });
    case "refused": {
      const key = `upload.error.${record.error?.code}`;
      const reason = t(key) === key ? record.error?.message ?? "" : t(key);
      return t("outbox.refused", { reason, code: record.error?.code ?? "" });
    }
    default:
      if (record.room !== room) return t("outbox.other_consultation");
      if (outbox.sending?.id === record.id && !outbox.waiting) {
        const percent = Math.floor((100 * record.offset) / Math.max(1, record.bytes));
        return t(outbox.pacer.inCall ? "outbox.sending_call" : "outbox.sending", { percent, kbps: outbox.pacer.kbps });
      }
      if (outbox.waiting) return t(`outbox.queued_${outbox.waiting}`);
      return t("outbox.queued");
  }
}

function renderOutbox() {
  const outbox = page.outbox;
  if (!outbox) return;
  const records = [...outbox.records].reverse(); // newest first
  const known = new Set(records.map((r) => r.id));
  for (const [id, url] of page.thumbs) if (!known.has(id)) { URL.revokeObjectURL(url); page.thumbs.delete(id); }
  $("outbox-list").replaceChildren(...records.map((record) => {
    const item = $("outbox-item-template").content.firstElementChild.cloneNode(true);
    item.dataset.photo = record.id;
    item.dataset.state = record.state;
    item.dataset.percent = String(Math.floor((100 * record.offset) / Math.max(1, record.bytes)));
    if (outbox.sending?.id === record.id) item.dataset.kbps = String(outbox.pacer.kbps);
    if (record.thumb && !page.thumbs.has(record.id)) page.thumbs.set(record.id, URL.createObjectURL(record.thumb));
    const img = item.querySelector("img");
    if (page.thumbs.has(record.id)) img.src = page.thumbs.get(record.id);
    else img.hidden = true;
    item.querySelector(".site").textContent = record.body_site
      ? bodySiteName(page.sites, record.body_site, language()) : t("outbox.no_site");
    item.querySelector(".when").textContent = formatTime(record.captured_at, language());
    item.querySelector(".state").textContent = stateText(record, outbox);
    const remove = item.querySelector(".remove");
    remove.hidden = record.state !== "refused";
    remove.textContent = t("outbox.remove");
    remove.addEventListener("click", () => confirm(t("photo.discard_confirm")) && outbox.discard(record.id));
    return item;
  }));
  $("outbox-empty").hidden = records.length > 0;
  const pending = records.filter((r) => r.state === "queued" || r.state === "draft").length;
  $("refusal-outbox").hidden = pending === 0;
  $("refusal-outbox").textContent = t("outbox.kept", { count: pending });
  $("outbox-waiting").hidden = !outbox.waiting;
  $("outbox-waiting").textContent = outbox.waiting ? t(`outbox.waiting_${outbox.waiting}`) : "";
  renderDraft();
}

// --- wiring ----------------------------------------------------------------------

function wire() {
  const select = $("lang-select");
  for (const [code, name] of Object.entries(LANGUAGES)) select.append(new Option(name, code, false, code === language()));
  select.addEventListener("change", () => setLanguage(select.value));
  onLanguageChange(() => {
    translate();
    if (page.refusal) refuse(page.refusal);
    renderState();
    renderTiles();
    renderSites();
    renderRequest();
    renderOutbox();
  });
  $("take-photo").addEventListener("click", takePhoto);
  $("photo-file").addEventListener("change", photoFromFile);
  $("photo-form").addEventListener("submit", (e) => { e.preventDefault(); sendDraft(); });
  $("photo-discard").addEventListener("click", () => {
    if (page.draftId && confirm(t("photo.discard_confirm"))) page.outbox.discard(page.draftId);
  });
}

translate();
wire();
show("check");
start();
