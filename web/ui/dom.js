// @ts-check
// Small DOM helpers shared by the panels: element lookup, error boxes that point at their input,
// and a debounce. No framework: each panel owns its section of index.html by id.

/**
 * The element `#id` of the page; `type` (e.g. HTMLInputElement) says, and checks, what it is.
 * @template {HTMLElement} [T=HTMLElement]
 * @param {string} id
 * @param {{ new (): T }} [type]
 * @returns {T}
 */
export const $ = (id, type) => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`page: #${id} is missing from index.html`);
  if (type && !(el instanceof type)) throw new Error(`page: #${id} is a <${el.tagName.toLowerCase()}>, not a ${type.name}`);
  // Without `type`, T is HTMLElement (its default), which every element is.
  return /** @type {T} */ (el);
};

/**
 * The elements of the page that `selector` matches, which are all of kind `type`.
 * @template {Element} T
 * @param {string} selector
 * @param {{ new (): T }} type
 * @param {ParentNode} [root]
 * @returns {T[]}
 */
export function $$(selector, type, root = document) {
  const all = [...root.querySelectorAll(selector)];
  for (const el of all) if (!(el instanceof type)) throw new Error(`page: ${selector} matched a <${el.tagName.toLowerCase()}>, not a ${type.name}`);
  return /** @type {T[]} */ (all);
}

/**
 * The element an input event came from: a form control of the page (an <input>, <select> or
 * <textarea>, all of which have `name` and `value`).
 * @param {Event} event
 */
export const control = (event) => /** @type {HTMLInputElement} */ (event.target);

/** Shows `message` in the error box `<div id="{box}">` (its text in #{box}-text); marks `inputId`. */
/**
 * @param {string} box
 * @param {string} message
 * @param {string | null} [inputId]
 */
export function showError(box, message, inputId = null) {
  $(`${box}-text`).textContent = message;
  $(box).hidden = false;
  if (inputId) {
    const input = document.getElementById(inputId);
    if (input) {
      input.setAttribute('aria-invalid', 'true');
      input.focus({ preventScroll: false });
    }
  }
}

/**
 * @param {string} box
 * @param {ParentNode | null} [scope]
 */
export function clearError(box, scope = null) {
  $(box).hidden = true;
  $(`${box}-text`).textContent = '';
  if (scope) for (const el of scope.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
}

/** An Error that says which input it is about (the panels mark and focus it). */
export const inputError = (/** @type {string} */ inputId, /** @type {string} */ message) => Object.assign(new Error(message), { inputId });

/**
 * Reads a number input: `{ integer, min, max }` are checked here so the message can name the
 * field as the page shows it. Empty is an error unless `optional`.
 */
/**
 * @overload
 * @param {string} id
 * @param {string} label
 * @param {{ integer?: boolean, min?: number, max?: number, optional: true }} options
 * @returns {number | null}
 */
/**
 * @overload
 * @param {string} id
 * @param {string} label
 * @param {{ integer?: boolean, min?: number, max?: number, optional?: false }} [options]
 * @returns {number}
 */
/**
 * @param {string} id
 * @param {string} label
 * @param {{ integer?: boolean, min?: number, max?: number, optional?: boolean }} [options]
 * @returns {number | null}
 */
export function readNumber(id, label, { integer = false, min = -Infinity, max = Infinity, optional = false } = {}) {
  const raw = $(id, HTMLInputElement).value.trim();
  if (raw === '') {
    if (optional) return null;
    throw inputError(id, `${label}: enter a number`);
  }
  const n = Number(raw);
  if (!Number.isFinite(n)) throw inputError(id, `${label}: "${raw}" is not a number`);
  if (integer && !Number.isInteger(n)) throw inputError(id, `${label}: enter a whole number (got ${raw})`);
  if (n < min) throw inputError(id, `${label}: at least ${min} (got ${raw})`);
  if (n > max) throw inputError(id, `${label}: at most ${max} (got ${raw})`);
  return n;
}

/** Calls `fn` once `ms` after the last call. */
/**
 * @template {unknown[]} A
 * @template R
 * @param {(...args: A) => R} fn
 * @param {number} ms
 * @returns {((...args: A) => void) & { now: (...args: A) => R }}
 */
export function debounce(fn, ms) {
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer = undefined;
  const wrapped = (/** @type {A} */ ...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => { timer = undefined; fn(...args); }, ms);
  };
  wrapped.now = (/** @type {A} */ ...args) => { clearTimeout(timer); timer = undefined; return fn(...args); };
  return wrapped;
}

/**
 * The Bitlora client, for controls that are enabled only once it runs (app.client() is null
 * while it starts).
 * @template T
 * @param {T | null} client
 * @returns {T}
 */
export function started(client) {
  if (client == null) throw new Error('bitlora is still starting; try again in a moment');
  return client;
}

/** Error messages from the worker, without a redundant "Error: " prefix. */
export const message = (err) => String(err?.message ?? err).replace(/^Error: /, '');
