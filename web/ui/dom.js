// Small DOM helpers shared by the panels: element lookup, error boxes that point at their input,
// and a debounce. No framework: each panel owns its section of index.html by id.

export const $ = (id) => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`page: #${id} is missing from index.html`);
  return el;
};

/** Shows `message` in the error box `<div id="{box}">` (its text in #{box}-text); marks `inputId`. */
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

export function clearError(box, scope = null) {
  $(box).hidden = true;
  $(`${box}-text`).textContent = '';
  if (scope) for (const el of scope.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
}

/** An Error that says which input it is about (the panels mark and focus it). */
export const inputError = (inputId, message) => Object.assign(new Error(message), { inputId });

/**
 * Reads a number input: `{ integer, min, max }` are checked here so the message can name the
 * field as the page shows it. Empty is an error unless `optional`.
 */
export function readNumber(id, label, { integer = false, min = -Infinity, max = Infinity, optional = false } = {}) {
  const raw = $(id).value.trim();
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
export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => { timer = null; fn(...args); }, ms);
  };
  wrapped.now = (...args) => { clearTimeout(timer); timer = null; return fn(...args); };
  return wrapped;
}

/** Error messages from the worker, without a redundant "Error: " prefix. */
export const message = (err) => String(err?.message ?? err).replace(/^Error: /, '');
