// One picture in a frame that can be fitted, shown at 100 %, zoomed with the
// wheel or two fingers around the point under them, and dragged.
//
// The frame's data-zoom says which: "fit", "actual" (one image pixel per screen
// pixel) or "free" (zoomed by hand).

const MAX_SCALE = 8;

export class ZoomView {
  constructor(frame) {
    this.frame = frame;
    this.img = frame.querySelector("img");
    this.scale = 1;
    this.x = 0;
    this.y = 0;
    this.mode = "fit";
    this.pointers = new Map(); // pointer id -> {x, y}
    this.img.addEventListener("load", () => this.fit());
    frame.addEventListener("wheel", (e) => this.wheel(e), { passive: false });
    frame.addEventListener("pointerdown", (e) => this.down(e));
    frame.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
      frame.addEventListener(type, (e) => this.pointers.delete(e.pointerId));
    }
    frame.addEventListener("dblclick", (e) => this.toggle(this.local(e)));
    new ResizeObserver(() => { if (this.mode === "fit") this.fit(); }).observe(frame);
  }

  show(url) {
    this.img.src = url; // "load" fits it
  }

  get natural() { return { width: this.img.naturalWidth, height: this.img.naturalHeight }; }

  fitScale() {
    const { width, height } = this.natural;
    if (!width || !height) return 1;
    return Math.min(this.frame.clientWidth / width, this.frame.clientHeight / height);
  }

  fit() {
    this.mode = "fit";
    this.scale = this.fitScale();
    this.center();
  }

  // 100 %: one image pixel per screen pixel, around `at` (frame coordinates) or the middle.
  actual(at = null) {
    this.zoomAt(at ?? this.middle(), 1 / this.scale);
    this.mode = "actual";
    this.apply();
  }

  toggle(at = null) {
    if (this.mode === "fit") this.actual(at);
    else this.fit();
  }

  middle() { return { x: this.frame.clientWidth / 2, y: this.frame.clientHeight / 2 }; }

  center() {
    const { width, height } = this.natural;
    this.x = (this.frame.clientWidth - width * this.scale) / 2;
    this.y = (this.frame.clientHeight - height * this.scale) / 2;
    this.apply();
  }

  // Scale by `factor` keeping the image point under `at` where it is.
  zoomAt(at, factor) {
    const scale = Math.min(MAX_SCALE, Math.max(this.fitScale() / 2, this.scale * factor));
    this.x = at.x - (at.x - this.x) * (scale / this.scale);
    this.y = at.y - (at.y - this.y) * (scale / this.scale);
    this.scale = scale;
    this.mode = "free";
    this.apply();
  }

  local(event) {
    const box = this.frame.getBoundingClientRect();
    return { x: event.clientX - box.left, y: event.clientY - box.top };
  }

  wheel(event) {
    event.preventDefault();
    this.zoomAt(this.local(event), Math.exp(-event.deltaY / 300));
  }

  down(event) {
    this.frame.setPointerCapture(event.pointerId);
    this.pointers.set(event.pointerId, this.local(event));
  }

  move(event) {
    const before = this.pointers.get(event.pointerId);
    if (!before) return;
    const now = this.local(event);
    if (this.pointers.size === 1) {
      this.x += now.x - before.x;
      this.y += now.y - before.y;
      if (this.mode === "fit") this.mode = "free";
      this.apply();
    } else if (this.pointers.size === 2) {
      const other = [...this.pointers].find(([id]) => id !== event.pointerId)[1];
      const apart = (a) => Math.hypot(a.x - other.x, a.y - other.y);
      if (apart(before) > 0) {
        this.zoomAt({ x: (now.x + other.x) / 2, y: (now.y + other.y) / 2 }, apart(now) / apart(before));
      }
    }
    this.pointers.set(event.pointerId, now);
  }

  apply() {
    this.img.style.transform = `translate(${this.x}px, ${this.y}px) scale(${this.scale})`;
    this.frame.dataset.zoom = this.mode;
  }
}
