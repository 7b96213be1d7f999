// The image API as the browser uses it (docs/images.md): listings, image bytes and
// the body-site list. Every request carries the join token in the Authorization
// header, never in a URL; images reach <img> elements as blob: URLs.

export class ImageApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The error a refused answer carries, or one made up from its status.
export async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: a proxy's page */ }
  const code = body?.error?.code ?? `http_${response.status}`;
  return new ImageApiError(response.status, code, body?.error?.message ?? response.statusText);
}

export class ImageApi {
  constructor(room, token) {
    this.room = room;
    this.token = token;
  }

  headers() { return { Authorization: `Bearer ${this.token}` }; }

  // This consultation's images, newest first; with bodySite and history, the patient's
  // images of that body site from every consultation.
  async list({ bodySite = null, history = false } = {}) {
    const query = new URLSearchParams();
    if (bodySite) query.set("body_site", bodySite);
    if (history) query.set("history", "1");
    const suffix = query.toString() ? `?${query}` : "";
    const response = await fetch(`/api/consultations/${encodeURIComponent(this.room)}/images${suffix}`,
      { headers: this.headers(), cache: "no-store" });
    if (!response.ok) throw await errorOf(response);
    return (await response.json()).images;
  }

  // An image's (or thumbnail's) URL as the server gave it, naming this consultation.
  resolve(url) {
    const resolved = new URL(url, location.origin);
    if (!resolved.searchParams.has("consultation")) resolved.searchParams.set("consultation", this.room);
    return resolved.pathname + resolved.search;
  }

  // Fetch an image's bytes with the token; a blob: URL the caller revokes when done.
  async objectUrl(url) {
    const response = await fetch(this.resolve(url), { headers: this.headers() });
    if (!response.ok) throw await errorOf(response);
    return URL.createObjectURL(await response.blob());
  }
}

// The fixed list of body sites, from the server: [{key, label: {sv, en}}].
let bodySitesOnce = null;
export function bodySites() {
  bodySitesOnce ??= fetch("/body-sites").then(async (response) => {
    if (!response.ok) throw await errorOf(response);
    return (await response.json()).body_sites;
  }).catch((err) => { bodySitesOnce = null; throw err; });
  return bodySitesOnce;
}

// A body site's name in the page's language; the key itself if the list does not know it.
export function bodySiteName(sites, key, lang, label = null) {
  const names = label ?? sites?.find((s) => s.key === key)?.label;
  return names?.[lang] ?? names?.sv ?? key ?? "";
}

export function formatTime(iso, lang) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(lang === "sv" ? "sv-SE" : "en-GB", { dateStyle: "medium", timeStyle: "short" });
}

export const CARE_TEAM = new Set(["clinician", "nurse"]);
