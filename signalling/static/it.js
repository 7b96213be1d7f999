// IT staff's page: live consultations and each participant's link over the last ten minutes.
//
// Signed in with the admin key, which is typed in and kept in this tab's sessionStorage only
// (never in the URL). The figures come from GET /api/live every few seconds; the first answer
// carries the server's last ten minutes, later ones only the samples after the newest one shown.
// People appear by role and participant id: IT staff need no names or patient data.
import { drawChart } from "./charts.js";
import { LANGUAGES, language, onLanguageChange, setLanguage, t, translate } from "./i18n.js";

const KEY_STORAGE = "nara.it.key";
const POLL = 2000; // ms
const COLUMNS = ["up", "down", "loss_up", "loss_down", "rtt", "estimate"];
const COLORS = { up: "#ffd34d", down: "#7cc4ff", estimate: "#3ddc84", video: ["#ff9ad5", "#7cc4ff", "#ffd34d", "#3ddc84"] };

const page = {
  key: null,
  window: 600, // seconds shown (the server's history)
  until: null, // the newest sample's time
  consultations: [], // from the latest answer
  workers: [], // the media workers, from the latest answer (none: the SFU runs in the server's process)
  history: new Map(), // "consultation/participant" -> columns of samples
  polls: 0,
  problem: null,
  timer: null,
};
window.naraDebug = page; // for the browser tests

const $ = (id) => document.getElementById(id);

function show(screen) {
  $("screen-sign-in").hidden = screen !== "sign-in";
  $("screen-live").hidden = screen !== "live";
  $("sign-out").hidden = screen !== "live";
}

// --- signing in -------------------------------------------------------------------------

function storedKey() {
  try { return sessionStorage.getItem(KEY_STORAGE); } catch { return null; }
}

function keep(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  } catch { /* storage refused: the key lives in this page only */ }
}

async function ask(key, since) {
  const query = since === null ? "" : `?since=${encodeURIComponent(since)}`;
  return fetch(`/api/live${query}`, { headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
}

async function refusal(response) {
  const body = await response.json().catch(() => ({}));
  const code = body?.error?.code ?? `http_${response.status}`;
  const known = ["admin_key_missing", "admin_key_invalid"].includes(code);
  return { code, text: t(known ? `it.refused.${code}` : "it.refused.other") };
}

function showProblem(problem) {
  const box = $("sign-in-problem");
  box.hidden = !problem;
  box.textContent = problem ? `${problem.text} (${t("it.code", { code: problem.code })})` : "";
  box.dataset.code = problem?.code ?? "";
}

async function signIn(event) {
  event.preventDefault();
  const key = $("admin-key").value.trim();
  if (!key) return;
  let response;
  try {
    response = await ask(key, null);
  } catch {
    showProblem({ code: "network", text: t("it.offline") });
    return;
  }
  if (!response.ok) {
    showProblem(await refusal(response));
    return;
  }
  $("admin-key").value = "";
  showProblem(null);
  keep(key);
  start(key, await response.json());
}

function signOut(problem = null) {
  clearTimeout(page.timer);
  page.key = null;
  page.history.clear();
  page.consultations = [];
  page.until = null;
  keep(null);
  $("consultations").replaceChildren();
  $("status").textContent = "";
  showProblem(problem);
  show("sign-in");
}

// --- the figures ---------------------------------------------------------------------------

function start(key, first) {
  page.key = key;
  show("live");
  if (first) take(first);
  page.timer = setTimeout(poll, first ? POLL : 0);
}

async function poll() {
  if (!page.key) return;
  try {
    const response = await ask(page.key, page.until);
    if (response.status === 401 || response.status === 403) {
      signOut(await refusal(response));
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    take(await response.json());
    page.problem = null;
  } catch {
    page.problem = "offline";
    renderStatus();
  }
  if (page.key) page.timer = setTimeout(poll, POLL);
}

function take(report) {
  page.polls += 1;
  page.window = report.history ?? page.window;
  page.consultations = report.consultations;
  page.workers = report.workers ?? [];
  const live = new Set();
  for (const consultation of report.consultations) {
    for (const p of consultation.participants) {
      const key = `${consultation.id}/${p.id}`;
      live.add(key);
      const columns = page.history.get(key) ?? { t: [], video: {}, ...Object.fromEntries(COLUMNS.map((c) => [c, []])) };
      append(columns, p.samples);
      page.history.set(key, columns);
      if (p.samples.t.length) page.until = Math.max(page.until ?? 0, ...p.samples.t);
    }
  }
  for (const key of [...page.history.keys()]) if (!live.has(key)) page.history.delete(key);
  if (report.now) page.until = Math.max(page.until ?? 0, report.now);
  trim();
  render();
}

function append(columns, samples) {
  const before = columns.t.length;
  columns.t.push(...samples.t);
  for (const c of COLUMNS) columns[c].push(...samples[c]);
  const added = samples.t.length;
  for (const publisher of new Set([...Object.keys(columns.video), ...Object.keys(samples.video)])) {
    const values = columns.video[publisher] ?? new Array(before).fill(null);
    values.push(...(samples.video[publisher] ?? new Array(added).fill(null)));
    columns.video[publisher] = values;
  }
}

function trim() {
  const from = (page.until ?? 0) - page.window;
  for (const columns of page.history.values()) {
    const drop = columns.t.findIndex((time) => time >= from);
    const n = drop < 0 ? columns.t.length : drop;
    if (n === 0) continue;
    columns.t.splice(0, n);
    for (const c of COLUMNS) columns[c].splice(0, n);
    for (const values of Object.values(columns.video)) values.splice(0, n);
  }
}

// --- drawing ---------------------------------------------------------------------------------

const number = (value, digits = 0) => value.toLocaleString(language(), { maximumFractionDigits: digits });
const kbps = (bps) => (bps === null || bps === undefined ? "–" : `${number(bps / 1000)} kbit/s`);
const percent = (ratio) => (ratio === null || ratio === undefined ? "–" : `${number(ratio * 100, 1)} %`);
const ms = (seconds) => (seconds === null || seconds === undefined ? "–" : `${number(seconds * 1000)} ms`);
const clock = (unix) => new Date(unix * 1000).toLocaleTimeString(language(), { hour: "2-digit", minute: "2-digit" });

function renderStatus() {
  const status = $("status");
  if (page.problem) status.textContent = t("it.offline");
  else if (page.until) status.textContent = t("it.updated", { time: new Date(page.until * 1000).toLocaleTimeString(language()) });
}

function render() {
  renderStatus();
  renderWorkers();
  $("none").hidden = page.consultations.length > 0;
  const sections = page.consultations.map(renderConsultation);
  $("consultations").replaceChildren(...sections);
}

// Each media worker's share of its core; a saturated one gets new consultations only when no other has room.
function renderWorkers() {
  const line = $("workers");
  line.hidden = page.workers.length === 0;
  line.replaceChildren(`${t("it.workers")}: `, ...page.workers.flatMap((w, i) => {
    const text = !w.up ? t("it.worker_down", { index: w.index })
      : t("it.worker", { index: w.index, share: percent(w.cpu_share), count: w.participants });
    const item = element("span", { textContent: w.saturated ? `${text} (${t("it.saturated")})` : text });
    item.dataset.worker = String(w.index);
    item.dataset.saturated = String(Boolean(w.saturated));
    if (w.saturated) item.className = "warning";
    return i === 0 ? [item] : [" · ", item];
  }));
}

function element(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

function renderConsultation(consultation) {
  const section = element("section", { className: "it-consultation" });
  section.dataset.consultation = consultation.id;
  section.append(element("h2", {
    textContent: t("it.consultation", { id: consultation.id, time: clock(consultation.started_at),
                                        count: consultation.participants.length }),
  }));
  for (const p of consultation.participants) section.append(renderParticipant(consultation, p));
  return section;
}

function renderParticipant(consultation, p) {
  const card = element("article", { className: "it-participant" });
  card.dataset.participant = p.id;
  card.dataset.connection = p.connection;
  const route = p.route ? ` · ${t(`it.route.${p.route}`)}` : "";
  card.append(element("h3", {
    textContent: `${t(`role.${p.role}`)} · ${p.id} · ${t(`it.connection.${p.connection}`)}${route}`,
  }));
  const now = p.now;
  const videos = now.video.map((v) => t("it.video_from", {
    from: v.from, layer: v.paused ? t("it.paused") : v.layer === "starting" ? t("it.starting") : v.layer,
  }));
  card.append(element("p", { className: "it-now", textContent: [
    `${t("it.up")} ${kbps(now.up)}`, `${t("it.down")} ${kbps(now.down)}`,
    `${t("it.loss")} ${percent(now.loss_up)} / ${percent(now.loss_down)}`,
    `${t("it.rtt")} ${ms(now.rtt)}`, `${t("it.estimate")} ${kbps(now.estimate)}`, ...videos,
  ].join(" · ") }));
  const columns = page.history.get(`${consultation.id}/${p.id}`);
  const charts = element("div", { className: "it-charts" });
  const chart = (name, title, series, format, extra = {}) => {
    const canvas = element("canvas", { className: "it-chart" });
    canvas.dataset.chart = name;
    canvas.dataset.points = String(columns.t.length);
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", title);
    charts.append(element("figure", {}, element("figcaption", { textContent: title }), canvas));
    requestAnimationFrame(() => drawChart(canvas, {
      times: columns.t, window: page.window, until: page.until, series, format, ...extra,
    }));
  };
  chart("bitrate", t("it.chart.bitrate"), [
    { label: t("it.up"), color: COLORS.up, values: columns.up },
    { label: t("it.down"), color: COLORS.down, values: columns.down },
    { label: t("it.estimate"), color: COLORS.estimate, values: columns.estimate },
  ], kbps);
  chart("loss", t("it.chart.loss"), [
    { label: t("it.up"), color: COLORS.up, values: columns.loss_up },
    { label: t("it.down"), color: COLORS.down, values: columns.loss_down },
  ], percent, { max: Math.max(0.05, ...[...columns.loss_up, ...columns.loss_down].filter((v) => v !== null)) });
  chart("rtt", t("it.chart.rtt"), [{ label: t("it.rtt"), color: COLORS.down, values: columns.rtt }], ms);
  chart("video", t("it.chart.video"), Object.entries(columns.video).map(([from, values], i) => ({
    label: from, color: COLORS.video[i % COLORS.video.length], values,
  })), (height) => (height === 0 ? t("it.paused") : `${number(height)}p`), {
    max: Math.max(360, ...Object.values(columns.video).flat().filter((v) => v !== null)),
  });
  card.append(charts);
  return card;
}

// --- wiring ----------------------------------------------------------------------------------

function wire() {
  const select = $("lang-select");
  for (const [code, name] of Object.entries(LANGUAGES)) select.append(new Option(name, code, false, code === language()));
  select.addEventListener("change", () => setLanguage(select.value));
  onLanguageChange(() => {
    translate();
    if (page.key) render();
  });
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  translate();
  const key = storedKey();
  if (key) start(key, null); else show("sign-in");
}

wire();
