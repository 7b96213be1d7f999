// The tablet's outbox: a photo is in IndexedDB from the moment it is taken until the
// server has confirmed it, so a closed tab, a reload or a flat battery loses nothing.
// One tab at a time sends (a Web Lock), over tus (tus.js): it asks the server how far
// an upload got and goes on from there, after network errors and after a reload. Its
// chunks are paced (pacer.js): under a ceiling, and in a call yielding to the call.
//
// A photo's state: "draft" (taken, its details not yet given), "queued" (waiting or
// being sent), "delivered" (the server has stored it) or "refused" (the server will
// not take it; the code says why). Events: "change" whenever any of it changed.
import { Pacer } from "./pacer.js";
import { create, head, hex, patch, sha256 } from "./tus.js";

const DATABASE = "nara-kit";
const STORE = "photos";
const TYPES = new Set(["image/jpeg", "image/png", "image/webp"]);
const FIRST_RETRY_MS = 1000;
const MAX_RETRY_MS = 30000;
const CHUNK_SECONDS = 2; // a chunk takes about this long at the rate measured, so an outage costs little
const MIN_CHUNK = 16 * 1024;
const MAX_CHUNK = 4 * 1024 * 1024;
const FIRST_CHUNK = 64 * 1024;
const KEEP_DELIVERED_MS = 24 * 3600 * 1000;
// Refusals worth asking again after a while: the server or a proxy is busy or restarting.
const TRANSIENT = new Set([408, 423, 425, 429, 500, 502, 503, 504]);
const TRANSIENT_CODES = new Set(["upload_interrupted", "offset_mismatch", "checksum_mismatch"]);
const RESYNCS = 5; // offsets taken from the server in a row before waiting a while
const REQUEST_HEADERS = 400; // a PATCH's bytes besides its body and the token, for the pacer

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function openDatabase() {
  const req = indexedDB.open(DATABASE, 1);
  req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
  return request(req);
}

// A photo type the server takes; anything else the browser can decode becomes a JPEG.
async function storable(blob) {
  if (TYPES.has(blob.type)) return blob;
  try {
    const bitmap = await createImageBitmap(blob);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    return await canvas.convertToBlob({ type: "image/jpeg", quality: 0.92 });
  } catch {
    throw Object.assign(new Error("This file is not a picture the page can read."), { code: "not_an_image" });
  }
}

async function thumbnailOf(blob) {
  try {
    const bitmap = await createImageBitmap(blob, { resizeWidth: 240, resizeQuality: "medium" });
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    return await canvas.convertToBlob({ type: "image/jpeg", quality: 0.8 });
  } catch {
    return null;
  }
}

export function deviceDescription() {
  const brands = navigator.userAgentData?.brands?.filter((b) => !/not.a.brand/i.test(b.brand)) ?? [];
  const browser = brands.length ? brands.map((b) => `${b.brand} ${b.version}`).join(", ") : navigator.userAgent;
  const platform = navigator.userAgentData?.platform ?? navigator.platform ?? "";
  return `Nära kit page (browser): ${browser}${platform ? ` on ${platform}` : ""}`.slice(0, 128);
}

export class Outbox extends EventTarget {
  constructor({ room, token, pacer = new Pacer() }) {
    super();
    this.room = room;
    this.token = token;
    this.pacer = pacer;
    this.db = null;
    this.records = []; // every photo, oldest first
    this.sending = null; // {id, offset, bytes} while a photo is on its way
    this.waiting = null; // why sending has stopped for now: null, "network" or "link"
    this.retryMs = FIRST_RETRY_MS;
    this.chunk = FIRST_CHUNK;
    this.rate = null; // bytes a second the last chunks went at
    this.wakeUp = () => {};
    this.channel = "BroadcastChannel" in globalThis ? new BroadcastChannel("nara-outbox") : null;
    if (this.channel) this.channel.onmessage = () => this.reload();
    addEventListener("online", () => this.wake());
  }

  async open() {
    this.db = await openDatabase();
    navigator.storage?.persist?.().catch(() => {}); // ask the browser never to evict the outbox
    const old = Date.now() - KEEP_DELIVERED_MS;
    for (const record of await this.all()) {
      if (record.state === "delivered" && record.delivered_at < old) await this.write("delete", record.id);
    }
    await this.reload();
  }

  async all() {
    const records = await request(this.db.transaction(STORE).objectStore(STORE).getAll());
    return records.sort((a, b) => a.created_at - b.created_at);
  }

  async reload() {
    this.records = await this.all();
    this.emit();
  }

  async write(method, value) {
    const tx = this.db.transaction(STORE, "readwrite");
    await request(tx.objectStore(STORE)[method](value));
    await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error); });
    this.channel?.postMessage("changed");
  }

  async update(id, changes) {
    const record = await request(this.db.transaction(STORE).objectStore(STORE).get(id));
    if (!record) return null;
    Object.assign(record, changes);
    await this.write("put", record);
    await this.reload();
    return record;
  }

  // A photo just taken: stored at once, before anyone is asked for its details.
  async capture(blob, { filename = "", capturedAt = new Date() } = {}) {
    const image = await storable(blob);
    const digest = hex(await sha256(await image.arrayBuffer()));
    const record = {
      id: crypto.randomUUID(),
      room: this.room,
      blob: image,
      thumb: await thumbnailOf(image),
      bytes: image.size,
      content_type: image.type,
      sha256: digest,
      filename: filename || `nara-${capturedAt.toISOString().replace(/[:.]/g, "-")}.${image.type.split("/")[1]}`,
      captured_at: capturedAt.toISOString(),
      device: deviceDescription(),
      body_site: null,
      note: "",
      consent: null,
      state: "draft",
      upload_url: null,
      offset: 0,
      server_image_id: null,
      error: null,
      created_at: Date.now(),
      delivered_at: null,
    };
    await this.write("put", record);
    await this.reload();
    return record;
  }

  // The nurse gave the photo's details: it may go.
  async describe(id, { body_site, note, consent }) {
    await this.update(id, { body_site, note, consent, state: "queued" });
    this.wake();
  }

  // Only a photo that will never go (a draft, or one the server refused) may be thrown away.
  async discard(id) {
    const record = this.records.find((r) => r.id === id);
    if (!record || !["draft", "refused"].includes(record.state)) return;
    await this.write("delete", id);
    await this.reload();
  }

  // --- sending ----------------------------------------------------------------

  // Send for as long as the page is open; in one tab at a time.
  start() {
    const run = () => this.run();
    if (navigator.locks) navigator.locks.request("nara-outbox", run);
    else run();
  }

  wake() {
    this.retryMs = FIRST_RETRY_MS;
    this.wakeUp();
  }

  pause(ms = null) {
    return new Promise((resolve) => {
      this.wakeUp = resolve;
      if (ms !== null) setTimeout(resolve, ms);
    });
  }

  async run() {
    for (;;) {
      await this.reload();
      const next = this.records.find((r) => r.state === "queued" && r.room === this.room);
      if (!next) {
        await this.pause();
        continue;
      }
      try {
        await this.send(next);
        this.setWaiting(null);
        this.retryMs = FIRST_RETRY_MS;
      } catch (err) {
        this.sending = null;
        if (String(err.code ?? "").startsWith("token_")) {
          this.setWaiting("link"); // only a new link helps: the photos wait in the outbox for it
          await this.pause();
        } else if (err instanceof TypeError || err.name === "TimeoutError" || TRANSIENT.has(err.status)
                   || TRANSIENT_CODES.has(err.code)) {
          this.setWaiting("network");
          await this.pause(this.retryMs * (0.5 + Math.random() / 2));
          this.retryMs = Math.min(this.retryMs * 2, MAX_RETRY_MS);
        } else {
          await this.update(next.id, { state: "refused", error: { code: err.code ?? err.name, message: err.message } });
        }
      }
    }
  }

  metadata(record) {
    return {
      consultation: record.room,
      image_id: record.id,
      sha256: record.sha256,
      content_type: record.content_type,
      body_site: record.body_site,
      captured_at: record.captured_at,
      consent: record.consent,
      device: record.device,
      note: record.note,
      filename: record.filename,
    };
  }

  async send(record) {
    let url = record.upload_url;
    let offset = null;
    if (url) {
      try {
        ({ offset } = await head(this.token, url, AbortSignal.timeout(30000)));
      } catch (err) {
        if (err.code !== "upload_not_found") throw err;
        url = null; // removed on the server (unfinished for a week): start it again
      }
    }
    if (!url || offset >= record.bytes) {
      const created = await create(this.token, record.bytes, this.metadata(record), AbortSignal.timeout(30000));
      ({ url, offset } = created);
      if (created.imageId && offset >= record.bytes) return this.delivered(record, created.imageId);
      await this.update(record.id, { upload_url: url, offset });
    }
    let mismatches = 0;
    let wholeMismatches = 0;
    let resyncs = 0;
    while (offset < record.bytes) {
      this.progress(record, offset);
      await this.pacer.ready();
      const size = Math.min(this.chunk, this.pacer.chunk(), record.bytes - offset);
      this.pacer.sent(size + REQUEST_HEADERS + this.token.length);
      const started = performance.now();
      let answer;
      try {
        const timeout = 30000 + (4000 * size) / Math.max(this.rate ?? 0, 8000);
        answer = await patch(this.token, url, offset, record.blob.slice(offset, offset + size),
          AbortSignal.timeout(timeout));
      } catch (err) {
        // The server has another offset (a chunk broke off, or another tab sent): go on from its.
        const resync = err.code === "offset_mismatch" || err.code === "upload_interrupted";
        if (resync && err.serverOffset !== null && ++resyncs <= RESYNCS) { offset = err.serverOffset; continue; }
        if (err.code === "chunk_too_large" && this.chunk > MIN_CHUNK) {
          this.chunk = Math.max(MIN_CHUNK, Math.floor(this.chunk / 2));
          continue;
        }
        if (err.code === "checksum_mismatch" && ++mismatches <= 3) continue; // damaged on the way: again
        if (err.code === "image_checksum_mismatch" && ++wholeMismatches <= 2) { offset = 0; continue; }
        throw err;
      }
      this.measure(size, performance.now() - started);
      resyncs = 0;
      offset = answer.offset;
      await this.update(record.id, { offset });
      if (answer.imageId) return this.delivered(record, answer.imageId);
    }
    // Every byte is there but the answer that named the image was lost: the server says again.
    const again = await create(this.token, record.bytes, this.metadata(record), AbortSignal.timeout(30000));
    if (!again.imageId) throw Object.assign(new Error("The upload is complete but has no image yet."), { status: 503 });
    return this.delivered(record, again.imageId);
  }

  async delivered(record, imageId) {
    this.sending = null;
    // The server has the image: the tablet keeps only what the list shows.
    await this.update(record.id, {
      state: "delivered", server_image_id: imageId, blob: null, offset: record.bytes, delivered_at: Date.now(),
    });
  }

  // Chunks that take about CHUNK_SECONDS each at the rate the last one went.
  measure(bytes, ms) {
    if (ms <= 0) return;
    const rate = (bytes * 1000) / ms;
    this.rate = this.rate ? 0.5 * this.rate + 0.5 * rate : rate;
    this.chunk = Math.round(Math.min(MAX_CHUNK, Math.max(MIN_CHUNK, this.rate * CHUNK_SECONDS)));
  }

  progress(record, offset) {
    this.sending = { id: record.id, offset, bytes: record.bytes };
    this.emit();
  }

  setWaiting(reason) {
    if (this.waiting === reason) return;
    this.waiting = reason;
    this.emit();
  }

  emit() {
    this.dispatchEvent(new CustomEvent("change"));
  }
}
