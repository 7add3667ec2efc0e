// @ts-check
// bitlora's service worker: the page works offline after the first visit.
//
// Registered by web/offline.js with scope `/` (the folder holding index.html). It lives at
// /web/sw.js, so its response must carry `Service-Worker-Allowed: /` (bitlora serve sends it for
// this file alone; a static host must be told to, see ARCHITECTURE.md
// "Offline after the first visit"; deploy/_headers does).
//
// What it keeps, in the Cache Storage cache `bitlora-offline-v<SCHEME>`: the app, i.e. every
// same-origin file index.html reaches (modules, worker, stylesheets, the wasm and its glue,
// pkg/models.json, the demo data), keyed by path (the server ignores query strings, so
// `/?backend=cpu` is `/`).
//
// What it does not keep: the models under web/models/. The worker already keeps the default
// model (and every other) in IndexedDB (web/store.js: chunks + sha256 manifest, checked against
// pkg/models.json on each load), and a reload reads it from there without requesting a model file
// (tests/browser/store.test.mjs). A second copy here would double the largest thing the page
// stores, and where IndexedDB has no room (same origin, same quota) the cache would not either.
// Requests for model files, Range requests, other methods and other origins (the Hugging Face
// hub) are not touched: they go to the network exactly as without a service worker.
//
// How it stays current ("versioned, updated when the server's files change"):
// - Install: the cache is filled by walking the app from index.html: <script src>/<link href>
//   in HTML, static `import`/`export ... from`, `import('...')` and `new URL('...',
//   import.meta.url)` in JS, `url()`/`@import` in CSS, each relative to its file. A reference that
//   turns out not to exist (a JSDoc `import('./protocol.js')` type) is a 404 and skipped; a
//   network error fails the install, so a half-filled cache never counts as ready (the browser
//   tries again on the next visit). The page's first visit is not controlled (no clients.claim():
//   a page must not change hands mid-load); the next load is.
// - Every request it handles is network-first: the server's answer is returned and, if it is a
//   200, stored; only when the network fails (server stopped, offline) does the cached copy answer.
//   Online, the page therefore always runs the server's current files, and each of them refreshes
//   the cache as it is fetched. A file is rewritten only when its version differs: the server's
//   ETag (bitlora serve: size + mtime), else Last-Modified + Content-Length, else always.
// - After each online load of a controlled page, offline.js asks for a refresh: the walk again,
//   with `cache: 'no-cache'` conditional requests (an unchanged file costs a 304), so files that
//   load did not fetch (the demo data) and newly referenced ones are current too.
// - SCHEME names this caching scheme; bump it when the layout of the cache changes, and activate
//   deletes the older `bitlora-offline-*` caches. An edited sw.js installs at once
//   (skipWaiting); with network-first nothing a running page holds goes stale by that.
//
// Why network-first for all of it, not cache-first for the big wasm: the server answers an
// unchanged file with a 304 (the HTTP cache then serves it), so online it costs a round trip, and
// a cache-first wasm could pair an old wasm with new JS glue after a rebuild. Training and
// generation never fetch anything once the page has loaded, so they never wait on the network.
//
// Messages (offline.js; types in offline-protocol.d.ts), each answered on the MessageChannel
// port sent with it: `hello` -> whether this page's load fell back to the cache; `refresh` -> the
// walk's summary (files kept, the paths rewritten, references that were 404).

const SCHEME = 1;
const CACHE = `bitlora-offline-v${SCHEME}`;

const sw = /** @type {ServiceWorkerGlobalScope} */ (/** @type {unknown} */ (self));
/** The site root the worker controls (index.html's folder). */
const ROOT = sw.registration.scope;
/** Model files: kept by the worker in IndexedDB, passed through here. */
const MODELS = new URL('models/', sw.location.href).href;
/** Clients (pages, their workers) that were answered from the cache because the network failed. */
const fellBack = new Set();
/** How many files the walk fetches at once. */
const WALK_PARALLEL = 6;

/** The cache key of a URL: origin + path (the server ignores `?` and `#`). */
function keyOf(/** @type {string} */ url) {
  const u = new URL(url);
  return u.origin + u.pathname;
}

/** Whether this worker handles a GET of `url`: same origin, inside the scope, not a model. */
function handles(/** @type {string} */ url) {
  const key = keyOf(url);
  return key.startsWith(ROOT) && !key.startsWith(MODELS) && key !== keyOf(sw.location.href);
}

/** Whether two responses are the same version of a file (see the header). */
function sameVersion(/** @type {Response} */ a, /** @type {Response} */ b) {
  const h = (/** @type {Response} */ r, /** @type {string} */ n) => r.headers.get(n);
  if (h(a, 'etag') && h(b, 'etag')) return h(a, 'etag') === h(b, 'etag');
  const lm = h(a, 'last-modified');
  return !!lm && lm === h(b, 'last-modified') && h(a, 'content-length') === h(b, 'content-length');
}

/**
 * Stores `resp` under `key` unless the cache already holds that version. True when it wrote.
 * @param {Cache} cache @param {string} key @param {Response} resp
 */
async function keep(cache, key, resp) {
  const old = await cache.match(key);
  if (old && sameVersion(old, resp)) {
    await resp.body?.cancel();
    return false;
  }
  await cache.put(key, resp);
  return true;
}

/** The same-origin URLs a file refers to (see the header), resolved against `base`. */
function references(/** @type {string} */ text, /** @type {string} */ type, /** @type {string} */ base) {
  /** @type {RegExp[]} */
  let patterns;
  if (type.includes('html')) {
    patterns = [/<(?:script|link)\b[^>]*?\s(?:src|href)\s*=\s*["']([^"']+)["']/gi];
  } else if (type.includes('javascript')) {
    patterns = [
      /\b(?:import|export)\s*(?:[\w$*{}\s,]*?\s*from\s*)?["']([^"'\n]+)["']/g,
      /\bimport\s*\(\s*["']([^"'\n]+)["']\s*\)/g,
      /\bnew\s+URL\s*\(\s*["']([^"'\n]+)["']\s*,\s*import\.meta\.url\s*\)/g,
    ];
  } else if (type.includes('css')) {
    patterns = [/url\(\s*["']?([^"')]+)["']?\s*\)/g, /@import\s+["']([^"']+)["']/g];
  } else {
    return [];
  }
  /** @type {string[]} */
  const out = [];
  for (const re of patterns) {
    for (const m of text.matchAll(re)) {
      const spec = m[1].trim();
      // Bare specifiers (an import map's names) and data:/blob: URLs are not files here.
      if (type.includes('javascript') && !/^(\.{0,2}\/|[\w-]+\.\w+$|[\w-]+\/)/.test(spec)) continue;
      let url;
      try {
        url = new URL(spec, base);
      } catch {
        continue;
      }
      if ((url.protocol === 'http:' || url.protocol === 'https:') && handles(url.href)) out.push(keyOf(url.href));
    }
  }
  return out;
}

/**
 * Walks the app from `roots` and brings the cache up to date (see the header). Throws on a
 * network error (the cache then holds what was fetched so far, and nothing is marked ready).
 * @param {string[]} roots
 * @returns {Promise<import('./offline-protocol').RefreshResult>}
 */
async function walk(roots) {
  const cache = await caches.open(CACHE);
  const seen = new Set(roots.map(keyOf).filter(handles));
  let frontier = [...seen];
  /** @type {string[]} */
  const updated = [], missing = [];
  let files = 0, bytes = 0;
  while (frontier.length) {
    /** @type {string[]} */
    const next = [];
    let i = 0;
    const fetchOne = async () => {
      while (i < frontier.length) {
        const url = frontier[i++];
        const resp = await fetch(url, { cache: 'no-cache', credentials: 'same-origin' });
        if (!resp.ok) {
          await resp.body?.cancel();
          missing.push(new URL(url).pathname);
          continue;
        }
        const type = resp.headers.get('content-type') ?? '';
        const text = /html|javascript|css/.test(type) ? await resp.clone().text() : null;
        files++;
        bytes += Number(resp.headers.get('content-length') ?? 0);
        if (await keep(cache, url, resp)) updated.push(new URL(url).pathname);
        if (text == null) continue;
        for (const ref of references(text, type, url)) {
          if (!seen.has(ref)) {
            seen.add(ref);
            next.push(ref);
          }
        }
      }
    };
    await Promise.all(Array.from({ length: WALK_PARALLEL }, fetchOne));
    frontier = next;
  }
  return { files, bytes, updated: updated.sort(), missing: missing.sort() };
}

/** Network first; the cached copy only when the network fails (see the header). */
async function networkFirst(/** @type {FetchEvent} */ event) {
  const req = event.request;
  const key = keyOf(req.url);
  let resp;
  try {
    resp = await fetch(req);
  } catch (err) {
    const cached = await caches.match(key, { cacheName: CACHE });
    if (!cached) throw err;
    fellBack.add(req.mode === 'navigate' ? event.resultingClientId : event.clientId);
    return cached;
  }
  if (resp.status === 200 && resp.type === 'basic') {
    const copy = resp.clone();
    event.waitUntil(caches.open(CACHE).then((cache) => keep(cache, key, copy)).catch(() => {}));
  }
  return resp;
}

sw.addEventListener('install', (event) => {
  event.waitUntil(walk([ROOT]).then(() => sw.skipWaiting()));
});

sw.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith('bitlora-offline-') && name !== CACHE) await caches.delete(name);
    }
  })());
});

sw.addEventListener('fetch', (event) => {
  const req = event.request;
  if (req.method !== 'GET' || req.headers.has('range') || !handles(req.url)) return;
  event.respondWith(networkFirst(event));
});

sw.addEventListener('message', (event) => {
  /** @type {import('./offline-protocol').ToWorker} */
  const msg = event.data;
  const port = event.ports[0];
  const source = /** @type {Client | null} */ (event.source);
  if (!port || !msg) return;
  /** @param {import('./offline-protocol').FromWorker} reply */
  const answer = (reply) => port.postMessage(reply);
  if (msg.type === 'hello') {
    answer({ type: 'hello', scheme: SCHEME, fromCache: !!source && fellBack.has(source.id) });
  } else if (msg.type === 'refresh') {
    const roots = [ROOT, ...(source?.url ? [source.url] : [])];
    event.waitUntil(walk(roots).then(
      (result) => answer({ type: 'refresh', result }),
      (err) => answer({ type: 'refresh', error: String(err?.message ?? err) }),
    ));
  }
});
