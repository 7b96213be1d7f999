// The consultation's images, for the care team: a gallery that shows a new image as
// soon as the server announces it ("image-added"), a viewer at full resolution with
// its metadata, side-by-side comparison with earlier images of the same body site,
// and the "Ta bild" button that asks the home for a photo ("request-photo").
import { language, t } from "./i18n.js";
import { bodySiteName, bodySites, formatTime, ImageApi } from "./images.js";
import { ZoomView } from "./zoom.js";

const $ = (id) => document.getElementById(id);

// A refusal or failure as a sentence, with its code for IT staff.
export function problemText(err) {
  const code = err?.code ?? (err instanceof TypeError ? "network" : err?.name ?? "unknown");
  const key = `images.error.${code}`;
  const text = t(key) === key ? t("images.error.other") : t(key);
  return `${text} (${t("refusal.code", { code })})`;
}

export class Gallery {
  constructor({ room, token }) {
    this.api = new ImageApi(room, token);
    this.images = []; // newest first
    this.thumbnails = new Map(); // image id -> Promise of a blob: URL
    this.items = new Map(); // image id -> <li>
    this.sites = null;
    this.call = null;
    this.open = matchMedia("(min-width: 900px)").matches;
    this.unseen = 0;
    this.viewer = new Viewer(this);
    this.lastRequest = null; // {at, body_site, confirmed}
    $("gallery-button").addEventListener("click", () => this.setOpen(!this.open));
    $("request-photo").addEventListener("submit", (e) => { e.preventDefault(); this.requestPhoto(); });
    bodySites().then((sites) => { this.sites = sites; this.render(); }).catch(() => { /* names stay keys */ });
  }

  // Follow a call's messages: the list again on every (re)join, new images at once.
  attach(call) {
    this.call = call;
    call.addEventListener("message", (e) => this.handle(e.detail));
    this.setOpen(this.open);
    $("gallery-button").hidden = false;
    $("request-photo").hidden = false;
  }

  handle(message) {
    switch (message.type) {
      case "joined": return this.load();
      case "image-added": return this.add(message.image);
      case "photo-requested": return this.requested(message);
      case "error":
        if (message.code === "photo_not_allowed") this.requestStatus("refused", problemText(message));
        return undefined;
      default: return undefined;
    }
  }

  async load() {
    try {
      const images = await this.api.list();
      // Anything announced while the listing was on its way stays.
      const known = new Set(images.map((i) => i.id));
      this.images = [...this.images.filter((i) => !known.has(i.id)), ...images];
      this.showProblem(null);
    } catch (err) {
      this.showProblem(err);
    }
    this.render();
  }

  add(image) {
    if (!image?.id || image.consultation !== this.api.room) return;
    const fresh = !this.images.some((i) => i.id === image.id);
    this.images = [image, ...this.images.filter((i) => i.id !== image.id)];
    if (fresh) {
      if (!this.open) this.unseen++;
      $("gallery-news").textContent = t("gallery.new_image", { site: this.siteName(image) });
    }
    this.render();
    if (fresh) this.items.get(image.id)?.classList.add("new");
  }

  setOpen(open) {
    this.open = open;
    if (open) this.unseen = 0;
    $("gallery").hidden = !open;
    $("screen-call").classList.toggle("with-gallery", open);
    $("gallery-button").setAttribute("aria-pressed", String(open));
    this.renderButton();
  }

  siteName(image) { return bodySiteName(this.sites, image.body_site, language(), image.body_site_label); }

  showProblem(err) {
    $("gallery-problem").hidden = !err;
    $("gallery-problem").textContent = err ? problemText(err) : "";
  }

  renderButton() {
    $("gallery-button").textContent = this.unseen ? t("gallery.button_new", { count: this.unseen })
      : t("gallery.button");
  }

  render() {
    this.renderButton();
    this.renderSiteChoice();
    const list = $("gallery-list");
    for (const [id, item] of this.items) {
      if (!this.images.some((i) => i.id === id)) { item.remove(); this.items.delete(id); }
    }
    const items = this.images.map((image) => {
      let item = this.items.get(image.id);
      if (!item) {
        item = imageItem(this, image, () => this.viewer.show(image));
        this.items.set(image.id, item);
      }
      describeItem(item, image, this.siteName(image));
      return item;
    });
    list.replaceChildren(...items);
    $("gallery-empty").hidden = this.images.length > 0 || !$("gallery-problem").hidden;
    $("gallery").dataset.count = String(this.images.length);
    this.viewer.render();
    this.renderRequest();
  }

  renderSiteChoice() {
    const select = $("request-site");
    const chosen = select.value;
    select.replaceChildren(new Option(t("request.any_site"), ""),
      ...(this.sites ?? []).map((s) => new Option(bodySiteName(this.sites, s.key, language()), s.key)));
    select.value = chosen;
  }

  thumbnail(image) {
    if (!this.thumbnails.has(image.id)) {
      const url = this.api.objectUrl(image.thumbnail_url ?? `/api/images/${image.id}/thumbnail`);
      url.catch(() => this.thumbnails.delete(image.id)); // asked again next time
      this.thumbnails.set(image.id, url);
    }
    return this.thumbnails.get(image.id);
  }

  // --- asking the home for a photo ------------------------------------------------

  requestPhoto() {
    const message = { type: "request-photo" };
    const site = $("request-site").value;
    const note = $("request-note").value.trim();
    if (site) message.body_site = site;
    if (note) message.note = note;
    if (!this.call?.send(message)) {
      this.requestStatus("not_sent", t("request.not_connected"));
      return;
    }
    this.lastRequest = { at: new Date(), body_site: site || null, confirmed: false };
    $("request-note").value = "";
    this.renderRequest();
  }

  requested(message) {
    if (message.by?.id === this.call?.self?.id && this.lastRequest) {
      this.lastRequest.confirmed = true;
      this.renderRequest();
    } else {
      const site = message.body_site ? bodySiteName(this.sites, message.body_site, language()) : "";
      this.requestStatus("other", t(site ? "request.by_other_site" : "request.by_other",
        { name: message.by?.name ?? "", site }));
    }
  }

  renderRequest() {
    const request = this.lastRequest;
    if (!request) return;
    const time = request.at.toLocaleTimeString(language() === "sv" ? "sv-SE" : "en-GB",
      { hour: "2-digit", minute: "2-digit" });
    const site = request.body_site ? bodySiteName(this.sites, request.body_site, language()) : "";
    const key = request.confirmed ? "request.delivered" : "request.sent";
    this.requestStatus(request.confirmed ? "delivered" : "sent",
      t(key, { time }) + (site ? ` – ${site}` : ""));
  }

  requestStatus(state, text) {
    $("request-status").dataset.state = state;
    $("request-status").textContent = text;
  }
}

function imageItem(gallery, image, open) {
  const item = $("gallery-item-template").content.firstElementChild.cloneNode(true);
  item.dataset.image = image.id;
  item.querySelector("button").addEventListener("click", open);
  const img = item.querySelector("img");
  gallery.thumbnail(image).then((url) => { img.src = url; })
    .catch((err) => { item.querySelector(".thumb-problem").textContent = problemText(err); });
  return item;
}

function describeItem(item, image, siteName) {
  item.querySelector(".site").textContent = siteName;
  const when = item.querySelector(".when");
  when.dateTime = image.captured_at ?? "";
  when.textContent = formatTime(image.captured_at, language());
  const consent = item.querySelector(".consent-no");
  consent.hidden = image.consent !== "no";
  consent.textContent = t("viewer.consent_no");
  item.querySelector("button").setAttribute("aria-label", `${siteName}, ${when.textContent}`);
}

// The full image, its metadata, and an earlier image of the same body site beside it.
class Viewer {
  constructor(gallery) {
    this.gallery = gallery;
    this.dialog = $("viewer");
    this.image = null;
    this.earlier = null;
    this.history = null; // the other images of this body site, once asked for
    this.urls = [];
    this.generation = 0; // bumps when another image is shown: late answers are dropped
    this.panes = {
      current: new ZoomView($("pane-current").querySelector(".zoom-frame")),
      earlier: new ZoomView($("pane-earlier").querySelector(".zoom-frame")),
    };
    $("viewer-close").addEventListener("click", () => this.dialog.close());
    this.dialog.addEventListener("close", () => this.clear());
    $("viewer-zoom").addEventListener("click", () => {
      const actual = this.panes.current.mode === "fit";
      for (const pane of Object.values(this.panes)) if (actual) pane.actual(); else pane.fit();
      this.render();
    });
    $("viewer-compare").addEventListener("click", () => this.pickEarlier());
    for (const frame of this.dialog.querySelectorAll(".zoom-frame")) {
      new MutationObserver(() => this.renderZoomButton()).observe(frame, { attributeFilter: ["data-zoom"] });
    }
  }

  async show(image) {
    this.clear();
    const generation = ++this.generation;
    this.image = image;
    this.render();
    if (!this.dialog.open) this.dialog.showModal();
    await this.load(this.panes.current, image, generation);
  }

  async load(pane, image, generation) {
    const frame = pane.frame;
    frame.dataset.loaded = "false";
    try {
      const url = await this.gallery.api.objectUrl(image.url ?? `/api/images/${image.id}`);
      if (generation !== this.generation) { URL.revokeObjectURL(url); return; }
      this.urls.push(url);
      pane.img.addEventListener("load", () => { frame.dataset.loaded = "true"; }, { once: true });
      pane.show(url);
      this.problem(null);
    } catch (err) {
      if (generation === this.generation) this.problem(err);
    }
  }

  async pickEarlier() {
    const image = this.image;
    if (!image) return;
    const generation = this.generation;
    $("viewer-compare").disabled = true;
    try {
      const all = await this.gallery.api.list({ bodySite: image.body_site, history: true });
      if (generation !== this.generation) return;
      this.history = all.filter((i) => i.id !== image.id);
      this.problem(null);
    } catch (err) {
      if (generation === this.generation) this.problem(err);
    }
    $("viewer-compare").disabled = false;
    this.render();
  }

  async compareWith(earlier) {
    this.earlier = earlier;
    this.history = null;
    this.render();
    await this.load(this.panes.earlier, earlier, this.generation);
  }

  clear() {
    this.generation++;
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
    for (const pane of Object.values(this.panes)) {
      pane.img.removeAttribute("src");
      pane.frame.dataset.loaded = "false";
    }
    this.image = null;
    this.earlier = null;
    this.history = null;
  }

  problem(err) {
    $("viewer-problem").hidden = !err;
    $("viewer-problem").textContent = err ? problemText(err) : "";
  }

  render() {
    const image = this.image;
    if (!image) return;
    const lang = language();
    const name = this.gallery.siteName(image);
    $("viewer-title").textContent = `${name} – ${formatTime(image.captured_at, lang)}`;
    caption($("pane-current"), image, lang, this.earlier ? t("viewer.this_image") : "");
    $("pane-earlier").hidden = !this.earlier;
    if (this.earlier) caption($("pane-earlier"), this.earlier, lang, t("viewer.earlier_image"));
    this.dialog.dataset.comparing = String(Boolean(this.earlier));
    $("viewer-compare").textContent = t(this.earlier ? "viewer.compare_other" : "viewer.compare");
    $("viewer-compare").hidden = !image.patient_ref;
    this.renderHistory();
    this.renderZoomButton();
    metadata($("viewer-meta"), image, name, lang);
  }

  renderZoomButton() {
    const fit = this.panes.current.mode === "fit";
    $("viewer-zoom").textContent = t(fit ? "viewer.actual_size" : "viewer.fit");
    $("viewer-zoom").setAttribute("aria-pressed", String(!fit));
  }

  renderHistory() {
    const section = $("viewer-history");
    section.hidden = this.history === null;
    if (this.history === null) return;
    $("history-none").hidden = this.history.length > 0;
    $("history-none").textContent = t("viewer.no_earlier", { site: this.gallery.siteName(this.image) });
    $("history-list").replaceChildren(...this.history.map((image) => {
      const item = imageItem(this.gallery, image, () => this.compareWith(image));
      describeItem(item, image, this.gallery.siteName(image));
      item.dataset.testid = "history-item";
      return item;
    }));
  }
}

function caption(figure, image, lang, label) {
  const text = figure.querySelector("figcaption");
  text.replaceChildren();
  if (label) text.append(Object.assign(document.createElement("strong"), { textContent: `${label}: ` }));
  const when = Object.assign(document.createElement("time"), {
    dateTime: image.captured_at ?? "", textContent: formatTime(image.captured_at, lang),
  });
  when.className = "captured";
  text.append(when);
}

function metadata(list, image, siteName, lang) {
  const rows = [
    ["viewer.body_site", siteName],
    ["viewer.captured_at", formatTime(image.captured_at, lang)],
    ["viewer.received_at", formatTime(image.received_at, lang)],
    ["viewer.note", image.note || "–"],
    ["viewer.consent", t(image.consent === "yes" ? "viewer.consent_yes" : "viewer.consent_no")],
    ["viewer.device", image.device || "–"],
    ["viewer.uploaded_by", image.uploaded_by ? `${image.uploaded_by.name} (${t(`role.${image.uploaded_by.role}`)})` : "–"],
    ["viewer.size", image.width && image.height
      ? t("viewer.size_value", { width: image.width, height: image.height, kb: Math.round((image.bytes ?? 0) / 1024) })
      : "–"],
  ];
  if (image.mm_per_pixel) {
    rows.push(["viewer.scale", t("viewer.scale_value", { mm: Number(image.mm_per_pixel).toFixed(3) })]);
  }
  list.replaceChildren(...rows.flatMap(([key, value]) => [
    Object.assign(document.createElement("dt"), { textContent: t(key) }),
    Object.assign(document.createElement("dd"), { textContent: value, className: `meta-${key.split(".")[1]}` }),
  ]));
}
