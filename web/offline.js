// @ts-check
// Offline use: registers the service worker (web/sw.js, whose header says what it keeps and how
// it stays current) and tells the visitor, in one line in the page's header, whether the page is
// kept in this browser or was just loaded from that copy because the server is not reachable.
//
// Loaded by index.html with its own <script type="module"> (no inline script: the CSP forbids
// it) and independent of the page's other modules: if service workers are unavailable (an
// insecure origin, a browser without them) or registration fails (a host that does not send
// `Service-Worker-Allowed: /` for web/sw.js), the page works as before, online only, and the
// reason goes to the console. window.__bitloraOffline (OfflineState) shows the state to tests.
//
// Registration waits for the page's `load` event so that the worker's first fill does not
// compete with the page's own start. After an online load of a page the worker already controls,
// it asks the worker to refresh the cache (conditional requests; unchanged files cost a 304).

/** @typedef {import('./offline-protocol').OfflineState} OfflineState */
/** @typedef {import('./offline-protocol').ToWorker} ToWorker */
/** @typedef {import('./offline-protocol').FromWorker} FromWorker */

const SW_URL = new URL('./sw.js', import.meta.url);
/** index.html's folder: the worker controls the page and everything under it. */
const SCOPE = new URL('../', import.meta.url);

const TEXT = {
  ready: 'Works offline: this page is kept in this browser.',
  fromCache: 'Offline: the server is not reachable, so this page runs from the copy kept in this browser.',
};

/** @type {OfflineState} */
const state = { state: 'registering', fromCache: false, refreshed: null, error: null };
/** @type {Window & { __bitloraOffline?: OfflineState }} */ (window).__bitloraOffline = state;

/** Shows `text` in the header's status line, which this module adds on first use. */
function show(/** @type {string} */ text) {
  let p = document.getElementById('offline-status');
  if (!p) {
    p = document.createElement('p');
    p.id = 'offline-status';
    p.className = 'hint';
    p.setAttribute('role', 'status');
    (document.querySelector('header') ?? document.body).append(p);
  }
  p.textContent = text;
}

/**
 * Sends `msg` to the service worker and resolves to its answer (on a MessageChannel), or to null
 * after `timeoutMs` (a worker being replaced may never answer).
 * @param {ServiceWorker} worker @param {ToWorker} msg @param {number} [timeoutMs]
 * @returns {Promise<FromWorker | null>}
 */
function ask(worker, msg, timeoutMs) {
  return new Promise((resolve) => {
    const { port1, port2 } = new MessageChannel();
    const timer = timeoutMs ? setTimeout(() => { port1.close(); resolve(null); }, timeoutMs) : undefined;
    port1.onmessage = (e) => {
      clearTimeout(timer);
      port1.close();
      resolve(e.data);
    };
    worker.postMessage(msg, [port2]);
  });
}

const loaded = () => new Promise((resolve) => {
  if (document.readyState === 'complete') resolve(undefined);
  else window.addEventListener('load', () => resolve(undefined), { once: true });
});

/** Resolves when `reg` has an active worker; rejects if its install fails (the worker is dropped). */
function activated(/** @type {ServiceWorkerRegistration} */ reg) {
  return new Promise((resolve, reject) => {
    const watch = (/** @type {ServiceWorker | null} */ w) => {
      if (!w) return;
      w.addEventListener('statechange', () => {
        if (w.state === 'activated') resolve(reg);
        else if (w.state === 'redundant' && !reg.active) reject(new Error('the service worker could not keep the page (its install failed; the next visit tries again)'));
      });
    };
    if (reg.active) return resolve(reg);
    watch(reg.installing ?? reg.waiting);
    reg.addEventListener('updatefound', () => watch(reg.installing));
  });
}

async function start() {
  const container = navigator.serviceWorker;
  if (!container) {
    state.state = 'unsupported';
    return;
  }
  if (container.controller) {
    const hello = await ask(container.controller, { type: 'hello' }, 5000);
    state.fromCache = hello?.type === 'hello' && hello.fromCache;
    if (state.fromCache) show(TEXT.fromCache);
  }
  await loaded();
  /** @type {ServiceWorkerRegistration} */
  let reg;
  try {
    // Loaded from the kept copy: the server is away, so there is nothing to register or update.
    // Otherwise register (again: a no-op when sw.js is unchanged); updateViaCache 'none' makes
    // the browser's update checks of sw.js always ask the server.
    reg = state.fromCache ? await container.ready
      : await container.register(SW_URL, { scope: SCOPE.href, updateViaCache: 'none' });
  } catch (err) {
    state.state = 'error';
    state.error = `registering ${SW_URL.pathname}: ${err?.message ?? err}`;
    console.warn(`bitlora: offline use is off: ${state.error}. A host must serve web/sw.js with the header ` +
      '`Service-Worker-Allowed: /` (ARCHITECTURE.md, "Offline after the first visit"; deploy/_headers).');
    return;
  }
  // Already active before this load: the first visit's fill is done, so bring it up to date.
  const wasActive = !!reg.active;
  try {
    await activated(reg);
  } catch (err) {
    state.state = 'error';
    state.error = err.message;
    console.warn(`bitlora: offline use is off for now: ${state.error}`);
    return;
  }
  state.state = 'ready';
  if (!state.fromCache) show(TEXT.ready);
  if (wasActive && !state.fromCache && reg.active) {
    const answer = await ask(reg.active, { type: 'refresh' });
    if (answer?.type === 'refresh') {
      state.refreshed = answer.result ?? null;
      state.error = answer.error ?? null;
    }
  }
}

start().catch((err) => {
  state.state = 'error';
  state.error = String(err?.message ?? err);
  console.warn(`bitlora: offline use: ${state.error}`);
});
