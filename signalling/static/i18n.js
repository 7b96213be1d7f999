// Texts by key, in the chosen language. Swedish first; English selectable.
import sv from "./lang/sv.js";
import en from "./lang/en.js";

export const LANGUAGES = { sv: "Svenska", en: "English" };
const TEXTS = { sv, en };
const listeners = new Set();
let current = initialLanguage();

function initialLanguage() {
  const asked = new URLSearchParams(location.search).get("lang");
  const saved = (() => { try { return localStorage.getItem("nara.lang"); } catch { return null; } })();
  for (const lang of [asked, saved]) if (lang in TEXTS) return lang;
  return "sv";
}

export function language() { return current; }

export function setLanguage(lang) {
  if (!(lang in TEXTS)) return;
  current = lang;
  try { localStorage.setItem("nara.lang", lang); } catch { /* private mode */ }
  document.documentElement.lang = lang;
  for (const listener of listeners) listener(lang);
}

export function onLanguageChange(listener) { listeners.add(listener); }

export function t(key, vars = {}) {
  const text = TEXTS[current][key] ?? TEXTS.sv[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

// Fill every element that names its text with data-i18n (and aria labels with data-i18n-label).
export function translate(root = document) {
  document.documentElement.lang = current;
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-label]")) {
    el.setAttribute("aria-label", t(el.dataset.i18nLabel));
  }
}
