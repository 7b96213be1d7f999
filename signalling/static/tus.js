// The browser's side of the upload protocol: tus 1.0.0 with the creation and
// checksum extensions, as docs/images.md describes it for /api/uploads.
//
// Each function is one request; the outbox (outbox.js) decides what to do next.

export const TUS_VERSION = "1.0.0";
export const ENDPOINT = "/api/uploads";

// A refused request: `status`, `code` from the server's JSON (or made up from the
// status), and the server's Upload-Offset when it sent one (409 offset_mismatch).
export class UploadError extends Error {
  constructor(status, code, message, serverOffset = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.serverOffset = serverOffset;
  }
}

async function refusal(response) {
  let body = null;
  try { body = await response.json(); } catch { /* HEAD, or not JSON */ }
  const code = body?.error?.code ?? `http_${response.status}`;
  const offset = response.headers.get("Upload-Offset");
  return new UploadError(response.status, code, body?.error?.message ?? response.statusText,
    offset === null ? null : Number(offset));
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// Upload-Metadata: comma-separated "key base64(UTF-8 value)"; empty values are left out.
export function encodeMetadata(metadata) {
  const encoder = new TextEncoder();
  return Object.entries(metadata)
    .filter(([, value]) => value !== null && value !== undefined && value !== "")
    .map(([key, value]) => `${key} ${base64(encoder.encode(String(value)))}`)
    .join(",");
}

export async function sha256(buffer) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", buffer));
}

export function hex(bytes) {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function headers(token, extra = {}) {
  return { "Tus-Resumable": TUS_VERSION, Authorization: `Bearer ${token}`, ...extra };
}

function imageIdOf(response) {
  return response.headers.get("Nara-Image-Id");
}

// POST: create the upload, or find the one this image_id already has (the server is
// idempotent on consultation and image_id). {url, offset, imageId (when already complete)}.
export async function create(token, length, metadata, signal) {
  const response = await fetch(ENDPOINT, {
    method: "POST",
    headers: headers(token, { "Upload-Length": String(length), "Upload-Metadata": encodeMetadata(metadata) }),
    signal,
  });
  if (response.status !== 201) throw await refusal(response);
  const location = response.headers.get("Location");
  if (!location) throw new UploadError(response.status, "location_missing", "The server named no upload.");
  return {
    url: new URL(location, globalThis.location.href).pathname,
    offset: Number(response.headers.get("Upload-Offset") ?? 0),
    imageId: imageIdOf(response),
  };
}

// HEAD: how far the server has got. {offset, length}.
export async function head(token, url, signal) {
  const response = await fetch(url, { method: "HEAD", headers: headers(token), cache: "no-store", signal });
  if (response.status !== 200) throw await refusal(response);
  return {
    offset: Number(response.headers.get("Upload-Offset")),
    length: Number(response.headers.get("Upload-Length")),
  };
}

// PATCH one chunk at `offset`, with its SHA-256. {offset (the server's new one), imageId (after the last byte)}.
export async function patch(token, url, offset, chunk, signal) {
  const bytes = new Uint8Array(await chunk.arrayBuffer());
  const checksum = base64(await sha256(bytes));
  const response = await fetch(url, {
    method: "PATCH",
    headers: headers(token, {
      "Content-Type": "application/offset+octet-stream",
      "Upload-Offset": String(offset),
      "Upload-Checksum": `sha256 ${checksum}`,
    }),
    body: bytes,
    signal,
  });
  if (response.status !== 204) throw await refusal(response);
  return { offset: Number(response.headers.get("Upload-Offset")), imageId: imageIdOf(response) };
}
