// The kit's screen: state from the agent over /events, pictures fetched as JPEGs.
"use strict";

let texts = {};
let language = null;

async function loadTexts(lang) {
  if (lang === language) return;
  const response = await fetch(`/static/lang/${lang}.json`);
  texts = await response.json();
  language = lang;
  document.documentElement.lang = lang;
  document.title = texts.title;
  document.getElementById("self-label").textContent = texts["self.label"];
  document.getElementById("remote-none").textContent = texts["remote.none"];
  const photo = document.getElementById("photo");
  photo.textContent = texts.photo;
  photo.title = texts["photo.later"];
}

function t(key) {
  return texts[key] || "";
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
