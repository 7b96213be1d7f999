// The kit's screen: state from the agent over /events, pictures fetched as JPEGs, and the photo flow.
"use strict";

let texts = {};
let language = null;
let lastStatus = null;

async function loadTexts(lang) {
  if (lang === language) return;
  const response = await fetch(`/static/lang/${lang}.json`);
  texts = await response.json();
  language = lang;
  document.documentElement.lang = lang;
  document.title = texts.title;
  document.getElementById("self-label").textContent = texts["self.label"];
  document.getElementById("remote-none").textContent = texts["remote.none"];
  document.getElementById("photo").textContent = texts.photo;
  for (const [id, key] of [["photo-retake", "photo.retake"], ["photo-save", "photo.save"],
                           ["photo-cancel", "photo.cancel"], ["photo-site-label", "photo.site"],
                           ["photo-note-label", "photo.note"], ["photo-consent-label", "photo.consent"],
                           ["photo-consent-yes", "photo.consent.yes"], ["photo-consent-no", "photo.consent.no"],
                           ["photo-request-take", "photo.request.take"],
                           ["photo-request-later", "photo.request.later"]]) {
    document.getElementById(id).textContent = texts[key];
  }
  await fillSites();
}

function t(key, values = {}) {
  let text = texts[key] || "";
  for (const [name, value] of Object.entries(values)) text = text.replace(`{${name}}`, value);
  return text;
}

async function show(status) {
  await loadTexts(status.language || "sv");
  const header = document.getElementById("status");
  header.dataset.state = status.state;
  document.getElementById("state-text").textContent = t(`state.${status.state}`) || status.state;
  let hint = t(`hint.${status.state}`);
  if (status.state === "waiting" && status.next_call) {
    const when = new Date(status.next_call * 1000).toLocaleTimeString(language, {hour: "2-digit", minute: "2-digit"});
    hint = `${t("next_call")}: ${when}`;
  }
  document.getElementById("hint").textContent = hint;
  const notes = [];
  if (status.camera === "missing" || status.camera === "off") notes.push(t(`camera.${status.camera}`));
  if (status.microphone === "missing") notes.push(t("microphone.missing"));
  const note = document.getElementById("media-note");
  note.textContent = notes.join(" · ");
  note.hidden = notes.length === 0;
  lastStatus = status;
  document.getElementById("photo").disabled = status.camera !== "ok";
  showPhotos(status.photos || {});
}

function connect() {
  const ws = new WebSocket(`ws://${location.host}/events`);
  ws.onmessage = (event) => show(JSON.parse(event.data));
  ws.onclose = () => setTimeout(connect, 1000);
}

// Each picture is fetched again shortly after the last one arrived: at most about five a second.
function refresh(id, url, onEmpty) {
  const img = document.getElementById(id);
  let n = 0;
  const next = () => setTimeout(() => { img.src = `${url}?n=${n++}`; }, 200);
  img.onload = () => { onEmpty(false); next(); };
  img.onerror = () => { onEmpty(true); setTimeout(() => { img.src = `${url}?n=${n++}`; }, 1000); };
  img.src = `${url}?n=${n++}`;
}

connect();
refresh("remote-video", "/video/remote.jpg", (empty) => {
  document.getElementById("remote-none").hidden = !empty;
  document.getElementById("remote-video").hidden = empty;
});
refresh("self-video", "/video/self.jpg", (empty) => { document.getElementById("self-video").hidden = empty; });

// --- the photo flow ------------------------------------------------------------------------------

let sites = null;  // [{key, sv, en}], the fixed list, fetched once
let current = null;  // the photo on the screen: {id, ...}
let dismissedRequest = null;

function label(names) {
  return names ? (names[language] || names.sv) : "";
}

async function fillSites() {
  if (sites === null) sites = (await (await fetch("/photo/sites")).json()).body_sites;
  const select = document.getElementById("photo-site");
  const chosen = select.value;
  select.replaceChildren(new Option(t("photo.site.choose"), ""));
  for (const site of sites) select.add(new Option(site[language] || site.sv, site.key));
  select.value = chosen;
}

function showPhotos(photos) {
  const request = photos.request;
  const banner = document.getElementById("photo-request");
  const key = request ? JSON.stringify(request) : null;
  banner.hidden = !request || key === dismissedRequest || !document.getElementById("photo-flow").hidden;
  if (request) {
    const site = label(request.label);
    document.getElementById("photo-request-text").textContent = site ? `${t("photo.request")}: ${site}` : t("photo.request");
    document.getElementById("photo-request-note").textContent = request.note
      ? `${request.note}${request.by ? ` – ${request.by}` : ""}` : request.by;
  }
  const list = document.getElementById("photo-queue");
  list.replaceChildren(...(photos.queue || []).map(queueEntry));
}

function queueEntry(item) {
  const li = document.createElement("li");
  li.dataset.state = item.state;
  li.dataset.id = item.id;
  const when = new Date(item.captured_at).toLocaleTimeString(language, {hour: "2-digit", minute: "2-digit"});
  let state = t(`queue.${item.state}`, {percent: item.percent});
  if (item.state === "refused" || item.state === "damaged") {
    const why = t(`refused.${item.error}`) || item.message || item.error || "";
    state = why ? `${state}: ${why}` : state;
  }
  li.textContent = `${label(item.label)} ${when} – ${state}`;
  return li;
}

function setBusy(text) {
  const busy = document.getElementById("photo-busy");
  busy.textContent = text;
  busy.hidden = !text;
  document.getElementById("photo-save").disabled = Boolean(text) || current === null;
  document.getElementById("photo-retake").disabled = Boolean(text);
}

function openFlow(site) {
  document.getElementById("photo-form").reset();
  document.getElementById("photo-site").value = site || "";
  document.getElementById("photo-request").hidden = true;
  document.getElementById("photo-flow").hidden = false;
  take();
}

async function closeFlow() {
  if (current !== null) await fetch(`/photo/${current.id}/discard`, {method: "POST"});
  current = null;
  document.getElementById("photo-flow").hidden = true;
  if (lastStatus) showPhotos(lastStatus.photos || {});
}

async function take() {
  if (current !== null) await fetch(`/photo/${current.id}/discard`, {method: "POST"});
  current = null;
  const preview = document.getElementById("photo-preview");
  preview.removeAttribute("src");
  preview.hidden = true;
  const verdict = document.getElementById("photo-verdict");
  verdict.textContent = "";
  delete verdict.dataset.ok;
  document.getElementById("photo-scale").hidden = true;
  document.getElementById("photo-error").textContent = "";
  setBusy(t("photo.taking"));
  const response = await fetch("/photo/take", {method: "POST"});
  const answer = await response.json();
  if (!response.ok) {
    setBusy("");
    verdict.dataset.ok = "false";
    verdict.textContent = t(`still.${answer.error.code}`) || answer.error.message;
    return;
  }
  current = answer;
  preview.onload = () => setBusy("");
  preview.src = answer.preview;
  preview.hidden = false;
  verdict.dataset.ok = String(answer.ok);
  verdict.dataset.problems = answer.problems.map((p) => p.code).join(" ");
  verdict.textContent = answer.ok ? t("photo.good")
    : `${answer.problems.map((p) => p[language] || p.sv).join(" ")} ${t("photo.keep_anyway")}`;
  const scale = document.getElementById("photo-scale");
  if (answer.mm_per_pixel) {
    scale.textContent = t("photo.scale", {mm: answer.mm_per_pixel.toLocaleString(language, {maximumFractionDigits: 3})});
    scale.hidden = false;
  }
}

async function save() {
  if (current === null) return;
  const form = document.getElementById("photo-form");
  const consent = form.querySelector("input[name=consent]:checked");
  const body = {body_site: form.body_site.value, note: form.note.value, consent: consent ? consent.value : null};
  const error = document.getElementById("photo-error");
  error.textContent = "";
  setBusy(t("photo.saving"));
  const response = await fetch(`/photo/${current.id}/save`, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  setBusy("");
  if (!response.ok) {
    const answer = await response.json();
    error.textContent = t(`form.${answer.error.code}`) || t("form.outbox");
    error.dataset.code = answer.error.code;
    if (answer.error.field) form.querySelector(`[name=${answer.error.field}]`)?.focus();
    return;
  }
  current = null;
  document.getElementById("photo-flow").hidden = true;
  const toast = document.getElementById("photo-toast");
  toast.textContent = t("photo.saved");
  toast.hidden = false;
  setTimeout(() => { toast.hidden = true; }, 5000);
}

document.getElementById("photo").onclick = () => {
  const request = lastStatus && lastStatus.photos ? lastStatus.photos.request : null;
  openFlow(request ? request.body_site : "");  // a request put off for later still names its body site
};
document.getElementById("photo-retake").onclick = () => take();
document.getElementById("photo-save").onclick = () => save();
document.getElementById("photo-cancel").onclick = () => closeFlow();
document.getElementById("photo-request-take").onclick = () => {
  const request = lastStatus && lastStatus.photos ? lastStatus.photos.request : null;
  openFlow(request ? request.body_site : "");
};
document.getElementById("photo-request-later").onclick = () => {
  const request = lastStatus && lastStatus.photos ? lastStatus.photos.request : null;
  dismissedRequest = request ? JSON.stringify(request) : null;
  document.getElementById("photo-request").hidden = true;
};
