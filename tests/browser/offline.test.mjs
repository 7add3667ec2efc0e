// Offline after the first visit (issue 13, item 2): the service worker (web/sw.js, registered by
// web/offline.js) keeps the app in Cache Storage and the worker keeps the default model in
// IndexedDB (web/store.js), so a reload with the server stopped loads the page and the model and
// generates the same greedy text as online; after a file changes on the server the next online
// visit brings the kept copy up to date (and an unchanged visit rewrites nothing); no request
// leaves the origin, the service worker's own included (context-level request log, which
// Playwright fills from the service worker too: the test checks that it saw the worker's requests).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  REPO, DEFAULT_MODEL, MODEL_FILE_RE, startServer, launchBrowser, waitSettled, pageResult, generateOnPage,
  nativeGenerateText,
} from './helpers.mjs';

const PROMPT = 'The state of the Union';
const N = 12;
/** The threaded wasm build, which the isolated page runs (its glue, wasm and pool-worker script). */
const THREADED = ['/web/pkg-threads/bitlora_web.js', '/web/pkg-threads/bitlora_web_bg.wasm'];
/**
 * The app files a reload needs (the page, its modules, the worker and both wasm builds: the
 * single-thread one is the fallback where the threaded one cannot start) and the demo data.
 */
const MUST_KEEP = ['/', '/web/main.js', '/web/offline.js', '/web/bitlora.js', '/web/worker.js', '/web/store.js',
  '/web/style.css', '/web/pkg/bitlora_web.js', '/web/pkg/bitlora_web_bg.wasm', ...THREADED, '/web/pkg/models.json',
  '/web/pkg/demo/devil.jsonl'];

let expected;
let browser;
before(async () => {
  expected = nativeGenerateText(DEFAULT_MODEL, PROMPT, N);
  console.log(`native: ${JSON.stringify(PROMPT)} -> ${JSON.stringify(expected)}`);
  browser = await launchBrowser({ webgpu: false });
});
after(async () => { await browser?.close(); });

/**
 * A fresh context and page with logs: every request the context sees (the page's, its worker's
 * and the service worker's) with who made it, and every response with whether the service worker
 * answered it.
 */
async function open(url) {
  const context = await browser.newContext();
  const requests = [];
  const responses = [];
  const log = [];
  context.on('request', (r) => requests.push({ url: r.url(), sw: !!r.serviceWorker() }));
  context.on('response', (r) => responses.push({ url: r.url(), status: r.status(), fromSW: r.fromServiceWorker() }));
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  await page.goto(url);
  await waitSettled(page, log);
  return { context, page, log, requests, responses };
}

/** The server with a stop() that may be called twice (helpers' stop() waits for an exit once). */
function once(server) {
  let stopped = null;
  return { ...server, stop: () => (stopped ??= server.stop()) };
}

/** Waits until offline.js is ready (and, with `refresh`, until its refresh answered). */
async function offlineReady(page, log, { refresh = false } = {}) {
  try {
    await page.waitForFunction((refresh) => {
      const s = window.__bitloraOffline;
      return s && (s.state === 'error' || (s.state === 'ready' && (!refresh || s.refreshed || s.error)));
    }, refresh, { timeout: 120_000 });
  } catch (e) {
    throw new Error(`offline.js never got ready: ${e.message}\n${log.join('\n')}`);
  }
  const s = await page.evaluate(() => window.__bitloraOffline);
  assert.equal(s.state, 'ready', `offline.js: ${s.error}\n${log.join('\n')}`);
  assert.equal(s.error, null, 'offline.js reported an error');
  return s;
}

/** The kept copy: { path: { size, etag } } of the service worker's cache. */
const cached = (page) => page.evaluate(async () => {
  const names = (await caches.keys()).filter((n) => n.startsWith('bitlora-offline-'));
  const out = {};
  for (const name of names) {
    const cache = await caches.open(name);
    for (const req of await cache.keys()) {
      const resp = await cache.match(req);
      out[new URL(req.url).pathname] = { size: (await resp.arrayBuffer()).byteLength, etag: resp.headers.get('etag') };
    }
  }
  return { names, files: out };
});

/** The kept copy of one file as text. */
const cachedText = (page, p) => page.evaluate(async (p) => {
  const r = await caches.match(new URL(p, location.origin).href);
  return r ? r.text() : null;
}, p);

function assertSameOrigin(requests, origin, label) {
  const foreign = requests.filter((r) => !r.url.startsWith(origin) && !/^(data|blob):/.test(r.url));
  assert.deepEqual(foreign, [], `${label}: requests to other origins`);
}

/** Opens the folded Developer section so the Generate panel's controls can be used. */
const openGenerate = (page) => page.evaluate(() => {
  for (let e = document.getElementById('prompt'); e; e = e.parentElement) if (e instanceof HTMLDetailsElement) e.open = true;
});

async function generate(page, log) {
  await openGenerate(page);
  const run = await generateOnPage(page, { prompt: PROMPT, options: { 'max-tokens': N, temperature: 0 }, log });
  assert.equal(run.error, null, `${run.error}\n${log.join('\n')}`);
  assert.equal(run.gen.tokens.length, N);
  return run.gen;
}

test('offline: after the first visit, a reload with the server stopped loads the page and the default model and generates as online', { timeout: 400_000 }, async () => {
  const server = once(await startServer());
  const origin = new URL(server.url).origin;
  const { context, page, log, requests, responses } = await open(server.url);
  try {
    // 1. First visit: the model comes from the server and is stored; the service worker
    //    installs with the app kept, scoped to the whole site, and does not take over this page.
    let r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.source.from, 'network');
    assert.equal(r.model.source.stored, true);
    await offlineReady(page, log);
    const reg = await page.evaluate(async () => {
      const g = await navigator.serviceWorker.getRegistration();
      return { scope: g?.scope, script: g?.active?.scriptURL, controlled: !!navigator.serviceWorker.controller };
    });
    assert.deepEqual(reg, { scope: server.url, script: `${server.url}web/sw.js`, controlled: false });
    assert.equal(await page.textContent('#offline-status'), 'Works offline: this page is kept in this browser.');
    assert.equal(await page.getAttribute('#offline-status', 'role'), 'status');
    const kept = await cached(page);
    assert.deepEqual(kept.names, ['bitlora-offline-v1']);
    for (const p of MUST_KEEP) assert.ok(kept.files[p], `${p} is not kept; kept: ${Object.keys(kept.files).join(' ')}`);
    assert.equal(kept.files['/web/pkg/bitlora_web_bg.wasm'].size, statSync(path.join(REPO, 'web/pkg/bitlora_web_bg.wasm')).size);
    const modelsKept = Object.keys(kept.files).filter((p) => p.startsWith('/web/models/'));
    assert.deepEqual(modelsKept, [], 'model files are kept by IndexedDB, not twice');
    const swRequests = requests.filter((q) => q.sw);
    assert.ok(swRequests.length >= MUST_KEEP.length, `the request log saw ${swRequests.length} service worker requests`);
    const keptBytes = Object.values(kept.files).reduce((n, f) => n + f.size, 0);
    console.log(`first visit: ${requests.length} requests (${swRequests.length} by the service worker); ` +
      `kept ${Object.keys(kept.files).length} files, ${(keptBytes / 2 ** 20).toFixed(1)} MiB: ${Object.keys(kept.files).join(' ')}`);
    const online = await generate(page, log);
    console.log(`online: ${JSON.stringify(online.text)}`);
    assert.equal(online.text, expected, 'online text differs from the CLI\'s');

    // 2. The server stops; the reload comes from this browser: the page, its modules, the worker
    //    and the wasm from the service worker, the model from IndexedDB.
    await server.stop();
    const from = { req: requests.length, resp: responses.length };
    await page.reload();
    await waitSettled(page, log);
    r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.name, 'bitlora-default-12m');
    assert.equal(r.model.source.from, 'store');
    const state = await offlineReady(page, log);
    assert.equal(state.fromCache, true);
    assert.match(await page.textContent('#offline-status'), /^Offline: the server is not reachable/);
    assert.equal(await page.evaluate(() => !!navigator.serviceWorker.controller && crossOriginIsolated), true,
      'controlled, and still cross-origin isolated (the kept responses keep their headers)');
    const offlineResponses = responses.slice(from.resp);
    // The page is isolated offline too, so the worker runs the threaded build, its pool workers
    // started from the kept script.
    assert.ok(r.backendInfo.threads > 1, `offline the CPU runs on ${r.backendInfo.threads} thread(s): ${r.backendInfo.threadsNote}`);
    const poolScript = Object.keys(kept.files).find((p) => /^\/web\/pkg-threads\/snippets\/[^/]+\/src\/threads\.js$/.test(p));
    assert.ok(poolScript, 'the pool workers\' script is not kept');
    for (const p of ['/', '/web/main.js', '/web/offline.js', '/web/worker.js', ...THREADED, poolScript, '/web/pkg/models.json']) {
      const hit = offlineResponses.find((x) => new URL(x.url).pathname === p);
      assert.ok(hit, `${p} was not requested on the offline reload`);
      assert.deepEqual({ status: hit.status, fromSW: hit.fromSW }, { status: 200, fromSW: true }, p);
    }
    const offlineRequests = requests.slice(from.req);
    assert.deepEqual(offlineRequests.filter((q) => MODEL_FILE_RE.test(q.url)), [], 'a model file was requested');

    // 3. Generation works offline, and gives the same greedy tokens.
    const offline = await generate(page, log);
    console.log(`offline: ${JSON.stringify(offline.text)}; ${offlineRequests.length} requests, ` +
      `${offlineResponses.filter((x) => x.fromSW).length} answered by the service worker`);
    assert.deepEqual(offline.tokens, online.tokens);
    assert.equal(offline.text, online.text);
    assertSameOrigin(requests, origin, 'offline test');
  } finally {
    await context.close();
    await server.stop();
  }
});

test('offline: a file changed on the server is picked up on the next online visit, an unchanged visit rewrites nothing, and the new version works offline', { timeout: 400_000 }, async () => {
  // A copy of the served files, so the test can change them.
  const root = mkdtempSync(path.join(os.tmpdir(), 'bitlora-offline-'));
  cpSync(path.join(REPO, 'index.html'), path.join(root, 'index.html'));
  cpSync(path.join(REPO, 'web'), path.join(root, 'web'), { recursive: true });
  const server = once(await startServer({ args: ['--root', root] }));
  const origin = new URL(server.url).origin;
  const { context, page, log, requests } = await open(server.url);
  try {
    await offlineReady(page, log);
    const demo = 'web/pkg/demo/devil.jsonl';
    const v1 = readFileSync(path.join(root, demo), 'utf8');
    assert.equal(await cachedText(page, `/${demo}`), v1);
    assert.equal(await page.locator('meta[name="test-version"]').count(), 0);

    // Version 2: the page (fetched on every load) and the demo data (not fetched by a load).
    const html = readFileSync(path.join(root, 'index.html'), 'utf8');
    writeFileSync(path.join(root, 'index.html'), html.replace('<head>', '<head>\n  <meta name="test-version" content="2">'));
    const v2 = `${v1}{"prompt": "OFFLINE-TEST", "completion": "version 2"}\n`;
    writeFileSync(path.join(root, demo), v2);

    // An online visit: the server's new files, and the kept copy brought up to date.
    await page.reload();
    await waitSettled(page, log);
    assert.equal(await page.getAttribute('meta[name="test-version"]', 'content'), '2');
    let s = await offlineReady(page, log, { refresh: true });
    console.log(`refresh after the change: ${s.refreshed.files} files, rewrote ${s.refreshed.updated.join(' ')}; ` +
      `404: ${s.refreshed.missing.join(' ') || 'none'}`);
    assert.ok(s.refreshed.updated.includes(`/${demo}`), `the changed demo data was not rewritten: ${s.refreshed.updated}`);
    assert.equal(await cachedText(page, `/${demo}`), v2);
    assert.match(await cachedText(page, '/'), /<meta name="test-version" content="2">/);

    // Nothing changed since: the refresh revalidates every file and rewrites none.
    await page.reload();
    await waitSettled(page, log);
    s = await offlineReady(page, log, { refresh: true });
    assert.deepEqual(s.refreshed.updated, [], 'an unchanged server rewrote kept files');
    assert.ok(s.refreshed.files >= MUST_KEEP.length, `${s.refreshed.files} files walked`);

    // Offline (the browser's network off this time): version 2 from the kept copy.
    await context.setOffline(true);
    await page.reload();
    await waitSettled(page, log);
    const r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal((await offlineReady(page, log)).fromCache, true);
    assert.equal(await page.getAttribute('meta[name="test-version"]', 'content'), '2');
    assert.equal(await page.evaluate((p) => fetch(p).then((x) => x.text()), demo), v2);
    assertSameOrigin(requests, origin, 'update test');
  } finally {
    await context.close();
    await server.stop();
    rmSync(root, { recursive: true, force: true });
  }
});
