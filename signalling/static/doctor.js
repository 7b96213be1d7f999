// The network doctor's page: from where this browser stands, can calls reach the server, by which
// path, and how fast? The same checks as `nara doctor` (docs/doctor.md), with RTCPeerConnection:
// host candidates only for direct UDP, iceTransportPolicy "relay" for each TURN URL the server names.
import { LANGUAGES, language, onLanguageChange, setLanguage, t, translate } from "./i18n.js";

const $ = (id) => document.getElementById(id);
let token = new URLSearchParams(location.hash.slice(1)).get("token") ?? "";
// Keep the token out of the address bar, history and screenshots.
history.replaceState(null, "", location.pathname + location.search);

const PATH_ORDER = ["udp-direct", "turn-udp", "turn-tcp", "turn-tls"]; // the order ICE prefers them in
const PINGS = 5;
const CHUNK = 16 * 1024;
const BUFFERED_HIGH = 64 * 1024; // bytes queued in the channel before the sender waits
const CHECK_TIMEOUT = 12000; // ms for a connection to open
const GATHER_TIMEOUT = 6000; // ms for candidates (a TURN server that does not answer)
const asked = Number(new URLSearchParams(location.search).get("seconds"));
const BANDWIDTH_SECONDS = asked > 0 ? Math.min(asked, 5) : 3; // each direction

const page = { checks: [], done: false, possible: null, verdict: "", startedAt: null, relayOnly: false };
window.naraDoctor = page; // for IT staff in the console, and for the browser tests

class CheckFailed extends Error {
  constructor(key, vars = {}) { super(key); this.key = key; this.vars = vars; }
}

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
const ms = (value) => (value == null ? "?" : value < 10 ? `${value.toFixed(1)} ms` : `${Math.round(value)} ms`);

function withTimeout(promise, timeout, failure) {
  let timer;
  const expired = new Promise((_, reject) => { timer = setTimeout(() => reject(failure()), timeout); });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

function turnPort(url) {
  const hostport = (url ?? "").split(":").slice(1).join(":").split("?")[0];
  const port = hostport.includes(":") ? hostport.split(":").pop() : "";
  return port || (url?.startsWith("turns:") ? "5349" : "3478");
}

// --- one test connection to the server's doctor peer ---------------------------------

// Bytes arriving in a bandwidth test, counted in a window of `seconds` from the first message (what is
// still queued after it drains slowly on a thin link and says nothing about the rate).
class Receipt {
  constructor(seconds, onWindowEnd) {
    this.window = seconds * 1000; this.onWindowEnd = onWindowEnd;
    this.first = null; this.last = null; this.bytes = 0;
  }
  add(size) {
    const now = performance.now();
    if (this.first === null) {
      this.first = now;
      setTimeout(this.onWindowEnd, this.window);
    } else if (now - this.first <= this.window) {
      this.bytes += size;
    } else {
      return;
    }
    this.last = now;
  }
  get seconds() { return this.first === null ? 0 : (this.last - this.first) / 1000; }
}

async function sendFor(channel, seconds, size) {
  const payload = new Uint8Array(CHUNK);
  const deadline = performance.now() + seconds * 1000;
  channel.bufferedAmountLowThreshold = BUFFERED_HIGH / 2;
  let sent = 0;
  while (sent < size && performance.now() < deadline && channel.readyState === "open") {
    if (channel.bufferedAmount > BUFFERED_HIGH) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, Math.max(0, deadline - performance.now()));
        channel.onbufferedamountlow = () => { clearTimeout(timer); resolve(); };
      });
      continue;
    }
    const piece = payload.subarray(0, Math.min(CHUNK, size - sent));
    channel.send(piece);
    sent += piece.byteLength;
  }
  channel.onbufferedamountlow = null;
  return sent;
}

class Probe {
  constructor(iceServers, relay) {
    this.relay = relay;
    this.pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: relay ? "relay" : "all" });
    this.channel = this.pc.createDataChannel("doctor");
    this.channel.binaryType = "arraybuffer";
    this.control = [];
    this.waiters = [];
    this.receipt = null;
    this.candidateErrors = [];
    this.pc.addEventListener("icecandidateerror", (e) => this.candidateErrors.push(e.errorCode));
    this.channel.onmessage = (e) => {
      if (typeof e.data !== "string") {
        this.receipt?.add(e.data.byteLength);
        return;
      }
      try { this.control.push(JSON.parse(e.data)); } catch { return; }
      for (const wake of this.waiters.splice(0)) wake();
    };
  }

  gathered() {
    if (this.pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, GATHER_TIMEOUT);
      this.pc.addEventListener("icegatheringstatechange", () => {
        if (this.pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
      });
    });
  }

  async connect() {
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await this.gathered();
    const offer = this.pc.localDescription.sdp;
    if (this.relay && !/ typ relay /.test(offer)) {
      if (this.candidateErrors.includes(401)) throw new CheckFailed("doctor.fail.turn_credentials");
      if (this.candidateErrors.includes(701)) {
        // For turns: the browser gives the same code for a certificate it does not trust.
        const tls = this.pc.getConfiguration().iceServers.some((s) => String(s.urls).startsWith("turns:"));
        throw new CheckFailed(tls ? "doctor.fail.turn_unreachable_tls" : "doctor.fail.turn_unreachable");
      }
      throw new CheckFailed("doctor.fail.no_relay");
    }
    const response = await fetch("/doctor/offer", {
      method: "POST", headers: { ...authorization(), "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: offer }),
    });
    const body = await response.json();
    if (!response.ok) throw new CheckFailed("doctor.fail.refused", { code: body.error?.code ?? response.status });
    await this.pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
    const addresses = [...body.sdp.matchAll(/^a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ/gim)]
      .map((m) => `${m[1]}:${m[2]}`).join(", ") || "-";
    const failure = () => new CheckFailed(this.relay ? "doctor.fail.no_connection_relay" : "doctor.fail.no_connection",
      { addresses, seconds: CHECK_TIMEOUT / 1000 });
    const opened = new Promise((resolve, reject) => {
      if (this.channel.readyState === "open") resolve();
      this.channel.onopen = resolve;
      this.pc.onconnectionstatechange = () => { if (this.pc.connectionState === "failed") reject(failure()); };
    });
    await withTimeout(opened, CHECK_TIMEOUT, failure);
  }

  async reply(type, timeout) {
    const deadline = performance.now() + timeout;
    for (;;) {
      const index = this.control.findIndex((m) => m.type === type || m.type === "error");
      if (index >= 0) {
        const [message] = this.control.splice(index, 1);
        if (message.type === "error") throw new CheckFailed("doctor.fail.refused", { code: message.code });
        return message;
      }
      const left = deadline - performance.now();
      if (left <= 0) throw new CheckFailed("doctor.fail.no_answer");
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => { clearTimeout(timer); resolve(); });
      });
    }
  }

  async roundTrip() {
    const times = [];
    for (let seq = 0; seq < PINGS; seq++) {
      const start = performance.now();
      this.channel.send(JSON.stringify({ type: "ping", seq }));
      while ((await this.reply("pong", 5000)).seq !== seq) { /* an earlier answer */ }
      times.push(performance.now() - start);
    }
    return median(times);
  }

  async download(seconds, bytes) {
    let windowEnd;
    const ended = new Promise((resolve) => { windowEnd = resolve; });
    const receipt = (this.receipt = new Receipt(seconds, windowEnd));
    this.channel.send(JSON.stringify({ type: "down", seconds, bytes }));
    const done = this.reply("down-done", (seconds + 15) * 1000);
    const answer = await Promise.race([done, ended]).catch(() => null);
    done.catch(() => {}); // what is still queued drains by itself; its result is not needed
    this.receipt = null;
    if (receipt.seconds >= 0.05) return (receipt.bytes * 8) / receipt.seconds / 1000;
    if (answer?.type === "down-done") return (answer.bytes * 8) / Math.max(answer.seconds, 0.001) / 1000;
    throw new CheckFailed("doctor.fail.no_answer");
  }

  async upload(seconds, bytes) {
    this.channel.send(JSON.stringify({ type: "up", seconds, bytes }));
    await sendFor(this.channel, seconds, bytes);
    this.channel.send(JSON.stringify({ type: "up-end" }));
    const done = await this.reply("up-done", (seconds + 15) * 1000);
    return (done.bytes * 8) / Math.max(done.seconds, 0.001) / 1000;
  }

  close() { this.pc.close(); }
}

// --- the checks ------------------------------------------------------------------------

function authorization() { return { Authorization: `Bearer ${token}` }; }

function newCheck(kind, url = null) {
  const check = { kind, url, state: "waiting", rttMs: null, kbps: null, via: null, detail: null };
  page.checks.push(check);
  render();
  return check;
}

async function runCheck(check, measure) {
  check.state = "running";
  render();
  try {
    Object.assign(check, await measure());
    check.state = "ok";
  } catch (error) {
    check.state = "failed";
    check.detail = error instanceof CheckFailed ? { key: error.key, vars: error.vars }
      : { key: "doctor.fail.other", vars: { message: String(error?.message ?? error) } };
  }
  render();
}

async function checkHttp() {
  const start = performance.now();
  let response;
  try {
    response = await fetch("/healthz", { cache: "no-store" });
  } catch {
    throw new CheckFailed("doctor.fail.network");
  }
  if (!response.ok) throw new CheckFailed("doctor.fail.http", { status: response.status });
  await response.text();
  return { rttMs: performance.now() - start };
}

async function checkWebSocket() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  try {
    await withTimeout(new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new CheckFailed("doctor.fail.websocket"));
    }), CHECK_TIMEOUT, () => new CheckFailed("doctor.fail.no_answer"));
    const times = [];
    for (let seq = 0; seq < 3; seq++) {
      const start = performance.now();
      const pong = new Promise((resolve) => {
        ws.onmessage = (e) => {
          const message = JSON.parse(e.data);
          if (message.type === "pong" && message.id === seq) resolve();
        };
      });
      ws.send(JSON.stringify({ type: "ping", id: seq }));
      await withTimeout(pong, 5000, () => new CheckFailed("doctor.fail.no_answer"));
      times.push(performance.now() - start);
    }
    return { rttMs: median(times) };
  } finally {
    ws.close();
  }
}

async function fetchConfig() {
  const response = await fetch("/doctor/config", { headers: authorization(), cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new CheckFailed("doctor.fail.credential", { code: body.error?.code ?? response.status });
  return body;
}

async function run() {
  Object.assign(page, { checks: [], done: false, possible: null, verdict: "", startedAt: new Date(), relayOnly: false });
  $("again").disabled = true;
  $("token-form").hidden = true;
  $("status").textContent = t("doctor.running");
  try {
    await runCheck(newCheck("http"), checkHttp);
    await runCheck(newCheck("websocket"), checkWebSocket);
    if (page.checks.some((c) => c.state !== "ok")) return;
    let config;
    try {
      config = await fetchConfig();
    } catch (error) {
      const credential = newCheck("credential");
      credential.state = "failed";
      credential.detail = { key: error.key ?? "doctor.fail.other", vars: error.vars ?? { message: String(error) } };
      return;
    }
    const direct = newCheck("udp-direct");
    page.relayOnly = config.transport_policy === "relay"; // every call goes through TURN
    const paths = [{ check: direct, iceServers: [] }];
    for (const turn of config.turn.slice().sort((a, b) => PATH_ORDER.indexOf(a.kind) - PATH_ORDER.indexOf(b.kind))) {
      paths.push({ check: newCheck(turn.kind, turn.url),
                   iceServers: [{ urls: turn.url, username: turn.username, credential: turn.credential }] });
    }
    let best = null;
    for (const path of paths) {
      const probe = new Probe(path.iceServers, path.check.kind !== "udp-direct");
      await runCheck(path.check, async () => {
        await probe.connect();
        return { rttMs: await probe.roundTrip() };
      });
      const callPath = path.check.kind !== "udp-direct" || !page.relayOnly; // the path a call would take
      if (path.check.state === "ok" && best === null && callPath) best = { probe, check: path.check };
      else probe.close();
    }
    if (best !== null) {
      const seconds = Math.min(BANDWIDTH_SECONDS, config.limits.seconds);
      const via = best.check.kind;
      await runCheck(newCheck("bandwidth-down"), async () => ({ kbps: await best.probe.download(seconds, config.limits.bytes), via }));
      await runCheck(newCheck("bandwidth-up"), async () => ({ kbps: await best.probe.upload(seconds, config.limits.bytes), via }));
      best.probe.close();
    }
  } finally {
    page.done = true;
    $("again").disabled = false;
    $("token-form").hidden = !page.checks.some((c) => c.kind === "credential"); // refused: paste another
    $("status").textContent = "";
    render();
  }
}

// --- what the results mean ------------------------------------------------------------------

function label(kind) { return t(`doctor.kind.${kind}`); }
function detailText(check) { return check.detail ? t(check.detail.key, check.detail.vars) : ""; }

function speedWords(down, up) {
  const known = [down, up].filter((v) => v != null);
  if (known.length === 0) return "";
  const slowest = Math.min(...known);
  if (slowest >= 1000) return t("doctor.speed.good");
  if (slowest >= 300) return t("doctor.speed.reduced");
  if (slowest >= 100) return t("doctor.speed.small");
  return t("doctor.speed.audio");
}

function verdict(checks) {
  const byKind = Object.fromEntries(checks.map((c) => [c.kind, c]));
  const { http, websocket: ws } = byKind;
  if (!http || http.state !== "ok") return [false, t("doctor.verdict.unreachable", { reason: http ? detailText(http) : "-" })];
  if (!ws || ws.state !== "ok") return [false, t("doctor.verdict.no_websocket", { reason: detailText(ws ?? {}) })];
  if (byKind.credential?.state === "failed") {
    return [false, t("doctor.verdict.credential", { reason: detailText(byKind.credential) })];
  }
  const turns = checks.filter((c) => c.kind.startsWith("turn-"));
  const failed = turns.filter((c) => c.state === "failed").map((c) => `${label(c.kind)}: ${detailText(c)}`).join("; ");
  const speed = speedWords(byKind["bandwidth-down"]?.kbps, byKind["bandwidth-up"]?.kbps);
  if (page.relayOnly) return relayedVerdict(turns, ws, failed, speed);
  const path = PATH_ORDER.map((k) => byKind[k]).find((c) => c?.state === "ok");
  if (!path) {
    return [false, turns.length === 0 ? t("doctor.verdict.no_path_no_turn") : t("doctor.verdict.no_path", { failures: failed })];
  }
  const words = [];
  if (path.kind === "udp-direct") {
    words.push(t("doctor.verdict.direct", { rtt: ms(path.rttMs) }));
    if (failed) words.push(t("doctor.verdict.no_fallback", { failures: failed }));
  } else {
    const extra = ws.rttMs != null ? t("doctor.verdict.extra", { ms: Math.max(0, Math.round(path.rttMs - ws.rttMs)) }) : "";
    const vars = { rtt: ms(path.rttMs), extra, port: turnPort(path.url) };
    if (path.kind === "turn-udp") words.push(t("doctor.verdict.turn_udp", vars));
    else words.push(t(path.kind === "turn-tls" ? "doctor.verdict.turn_tls" : "doctor.verdict.turn_tcp", vars));
  }
  if (speed) words.push(speed);
  return [true, words.join(" ")];
}

// The server's transport policy is relay: direct UDP is shown but is no way for a call.
function relayedVerdict(turns, ws, failed, speed) {
  const path = PATH_ORDER.map((k) => turns.find((c) => c.kind === k && c.state === "ok")).find(Boolean);
  if (!path) return [false, t("doctor.verdict.relayed_none", { failures: failed || "-" })];
  const extra = ws.rttMs != null ? t("doctor.verdict.extra", { ms: Math.max(0, Math.round(path.rttMs - ws.rttMs)) }) : "";
  const how = { "turn-udp": "UDP", "turn-tcp": "TCP", "turn-tls": "TLS" }[path.kind];
  const words = [t("doctor.verdict.relayed", { how, port: turnPort(path.url), rtt: ms(path.rttMs), extra })];
  if (path.kind !== "turn-udp") words.push(t("doctor.verdict.tcp_note"));
  if (speed) words.push(speed);
  return [true, words.join(" ")];
}

// --- showing it ------------------------------------------------------------------------------

function measured(check) {
  if (check.kbps != null) return `${Math.round(check.kbps)} kbit/s`;
  return check.rttMs != null ? ms(check.rttMs) : "";
}

function render() {
  const rows = $("rows");
  rows.replaceChildren(...page.checks.map((check) => {
    const row = document.createElement("tr");
    row.dataset.kind = check.kind;
    row.dataset.state = check.state;
    row.dataset.testid = `check-${check.kind}`;
    const detail = [check.url, check.via ? t("doctor.via", { path: label(check.via) }) : "", detailText(check)]
      .filter(Boolean).join(" – ");
    for (const [text, cls] of [[label(check.kind), "kind"], [t(`doctor.state.${check.state}`), "state"],
                               [measured(check), "measured"], [detail, "detail"]]) {
      const cell = document.createElement("td");
      cell.className = cls;
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }));
  if (page.done) [page.possible, page.verdict] = verdict(page.checks);
  $("verdict").textContent = page.done
    ? `${t(page.possible ? "doctor.possible" : "doctor.impossible")} ${page.verdict}` : "";
  $("summary").value = summary();
}

function summary() {
  const lines = [`${t("doctor.title")}: ${location.origin}`, `${t("doctor.time")}: ${page.startedAt?.toISOString() ?? ""}`,
                 `${t("doctor.browser")}: ${navigator.userAgent}`, ""];
  for (const c of page.checks) {
    const detail = [c.url, detailText(c)].filter(Boolean).join(" – ");
    lines.push(`${label(c.kind).padEnd(16)} ${t(`doctor.state.${c.state}`).padEnd(14)} ${measured(c).padStart(14)}  ${detail}`.trimEnd());
  }
  if (page.done) lines.push("", `${t(page.possible ? "doctor.possible" : "doctor.impossible")} ${page.verdict}`);
  return lines.join("\n");
}

async function copySummary() {
  try {
    await navigator.clipboard.writeText($("summary").value);
    $("status").textContent = t("doctor.copied");
  } catch {
    $("summary").select(); // the clipboard is not ours (http, or refused): selected for Ctrl+C
    $("status").textContent = t("doctor.copy_by_hand");
  }
}

function start() {
  const select = $("lang-select");
  for (const [code, name] of Object.entries(LANGUAGES)) select.append(new Option(name, code, false, code === language()));
  select.addEventListener("change", () => setLanguage(select.value));
  onLanguageChange(() => { translate(); render(); });
  translate();
  $("copy").addEventListener("click", copySummary);
  $("again").addEventListener("click", run);
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const pasted = $("token-input").value.trim();
    token = pasted.includes("#token=") ? pasted.split("#token=")[1] : pasted;
    $("token-input").value = "";
    if (token) run();
  });
  if (token) run();
  else $("token-form").hidden = false;
}

start();
