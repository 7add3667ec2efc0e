// The model store (web/store.js): the first visit fetches the bundled model from the page's own
// server and keeps it in IndexedDB (4 MiB chunks + a manifest with sizes, sha256 and a complete
// flag); a reload loads it from there without requesting the model again; a corrupted chunk or
// an incomplete manifest is detected, discarded and fetched again with a note; "Delete all my
// data" empties the store; a store that does not fit says so and runs from memory. The default
// model on the CPU backend (fast), with the request log checked for foreign origins throughout.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, pageResult, waitSettled, DEFAULT_MODEL, MODEL_FILE_RE,
} from './helpers.mjs';

const ID = 'bundled:default';
const FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'];
const CHUNK = 4 * 1024 * 1024;

let server, browser;
before(async () => {
  server = await startServer();
  browser = await launchBrowser({ webgpu: false });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

/** Reads the store from the page: { manifest, chunkKeys } (null manifest when absent). */
const readStore = (page) => page.evaluate((id) => new Promise((resolve, reject) => {
  const req = indexedDB.open('bitlora');
  req.onerror = () => reject(req.error);
  req.onsuccess = () => {
    const db = req.result;
    if (!db.objectStoreNames.contains('manifests')) { db.close(); return resolve({ manifest: null, chunkKeys: [] }); }
    const tx = db.transaction(['manifests', 'chunks']);
    const m = tx.objectStore('manifests').get(id);
    const k = tx.objectStore('chunks').getAllKeys();
    tx.oncomplete = () => { db.close(); resolve({ manifest: m.result ?? null, chunkKeys: k.result }); };
    tx.onerror = () => { db.close(); reject(tx.error); };
  };
}), ID);

/** Changes the stored data from the page: `what` is 'flip-byte' (a chunk) or 'incomplete' (the manifest). */
const tamper = (page, what) => page.evaluate(({ id, what }) => new Promise((resolve, reject) => {
  const req = indexedDB.open('bitlora');
  req.onerror = () => reject(req.error);
  req.onsuccess = () => {
    const db = req.result;
    const tx = db.transaction(['manifests', 'chunks'], 'readwrite');
    if (what === 'older-version') {
      // A consistent stored copy of a different config.json (as if the model was updated on the
      // server since): its chunk, size and sha256 all agree, only the server's index differs.
      const chunks = tx.objectStore('chunks');
      const manifests = tx.objectStore('manifests');
      const old = new TextEncoder().encode('{"older": true}');
      chunks.put(old, `${id}/config.json/0`);
      const get = manifests.get(id);
      get.onsuccess = () => {
        const m = get.result;
        const f = m.files.find((x) => x.name === 'config.json');
        Object.assign(f, { size: old.length, sha256: window.__oldSha, chunks: 1 });
        manifests.put(m);
      };
    } else if (what === 'flip-byte') {
      const chunks = tx.objectStore('chunks');
      const key = `${id}/model.safetensors/1`;
      const get = chunks.get(key);
      get.onsuccess = () => {
        const c = get.result;
        c[12345] ^= 0x40;
        chunks.put(c, key);
      };
    } else {
      const manifests = tx.objectStore('manifests');
      const get = manifests.get(id);
      get.onsuccess = () => manifests.put({ ...get.result, complete: false });
    }
    tx.oncomplete = () => { db.close(); resolve(); };
    tx.onerror = () => { db.close(); reject(tx.error); };
  };
}), { id: ID, what });

function assertSameOrigin(requests, label) {
  const origin = new URL(server.url).origin;
  assert.deepEqual(requests.filter((u) => !u.startsWith(origin) && !u.startsWith('data:')), [], `${label}: requests to other origins`);
}

const modelRequests = (requests) => requests.filter((u) => MODEL_FILE_RE.test(u));

/** Reloads and returns the requests made by the new page load only. */
async function reload(page, log, requests) {
  const from = requests.length;
  await page.reload();
  await waitSettled(page, log);
  return requests.slice(from);
}

test('store: first visit fetches and stores; reload loads from IndexedDB without fetching; tampering is caught; delete-all clears', { timeout: 300_000 }, async () => {
  const { context, page, log, requests } = await openPage(browser, server.url);
  try {
    // 1. First visit: every model file fetched from this origin once, then stored.
    let r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.deepEqual(r.model.source, { from: 'network', stored: true, notes: r.model.source.notes });
    const fetched = modelRequests(requests).map((u) => path.basename(new URL(u).pathname)).sort();
    assert.deepEqual(fetched, [...FILES].sort(), 'first visit: each model file requested once');
    const phases = r.loadProgress.map((p) => p.phase);
    assert.deepEqual(phases, ['fetch', 'store', 'build'], `progress phases: ${phases}`);
    // The progress line as last shown for each phase: bytes, and the rate once measurable (the
    // line reads "ETA ..." while running and "done in ..." at the end).
    const fetchLine = r.loadProgress[0].text;
    assert.match(fetchLine, /^Fetching from this page's server · 8\.\d MiB \/ 8\.\d MiB/);
    if (r.loadProgress[0].end - r.loadProgress[0].at > 100) assert.match(fetchLine, / MiB\/s · done in \d+(\.\d)? m?s$/);
    assert.match(r.loadProgress[1].text, /^Storing in this browser \(IndexedDB\) · 8\.\d MiB \/ 8\.\d MiB/);
    console.log(`progress lines: ${r.loadProgress.map((p) => JSON.stringify(p.text)).join(', ')}`);
    const firstTop = r.top;
    let { manifest, chunkKeys } = await readStore(page);
    assert.equal(manifest.complete, true);
    assert.equal(manifest.chunkSize, CHUNK);
    for (const f of manifest.files) {
      const bytes = readFileSync(path.join(DEFAULT_MODEL, f.name));
      assert.equal(f.size, bytes.length, f.name);
      assert.equal(f.sha256, createHash('sha256').update(bytes).digest('hex'), `${f.name}: sha256 in the manifest`);
      assert.equal(f.chunks, Math.ceil(bytes.length / CHUNK), f.name);
    }
    assert.equal(chunkKeys.length, manifest.files.reduce((n, f) => n + f.chunks, 0));
    assert.match(await page.textContent('#data-status'), /Kept in this browser \(IndexedDB\): bitlora-default-12m, 8\.\d MiB/);
    console.log(`first visit: ${requests.length} requests, model files ${fetched.join(', ')}; ${chunkKeys.length} chunks stored; ` +
      r.loadProgress.map((p) => `${p.phase} ${(p.end - p.at).toFixed(0)} ms`).join(', '));

    // 2. Reload: nothing of the model is requested; it comes from the store and still works.
    let again = await reload(page, log, requests);
    r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.deepEqual(modelRequests(again), [], 'reload: model files were requested again');
    assert.equal(r.model.source.from, 'store');
    assert.deepEqual(r.model.source.notes, []);
    assert.deepEqual(r.top, firstTop, 'reload: same next-token result');
    assert.match(await page.textContent('#model-size'), /loaded from this browser's storage$/);
    assert.deepEqual(r.loadProgress.map((p) => p.phase), ['read', 'build']);
    console.log(`reload: ${again.length} requests (${again.map((u) => new URL(u).pathname).join(' ')}), none for the model`);

    // 3. A corrupted chunk: sha256 mismatch, discarded with a note, fetched again, works.
    await tamper(page, 'flip-byte');
    again = await reload(page, log, requests);
    r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.source.from, 'network');
    assert.equal(r.model.source.stored, true);
    assert.match(r.model.source.notes.join(' '), /model\.safetensors failed its sha256 check.*Fetching it again/);
    assert.match(await page.textContent('#model-note'), /failed its sha256 check/);
    assert.deepEqual(modelRequests(again).map((u) => path.basename(new URL(u).pathname)).sort(), [...FILES].sort());
    assert.deepEqual(r.top, firstTop, 'after re-fetch: same next-token result');
    ({ manifest } = await readStore(page));
    assert.equal(manifest.complete, true);
    console.log(`corrupted chunk: ${r.model.source.notes.join(' ')}`);

    // 3b. A stored copy of an older version of the model (its sha256 differs from the
    // server's pkg/models.json): discarded, the current one fetched.
    await page.evaluate(async () => {
      const d = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode('{"older": true}')));
      window.__oldSha = Array.from(d, (x) => x.toString(16).padStart(2, '0')).join('');
    });
    await tamper(page, 'older-version');
    again = await reload(page, log, requests);
    r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.match(r.model.source.notes.join(' '), /older version/);
    assert.equal(modelRequests(again).length, FILES.length);
    assert.deepEqual(r.top, firstTop);

    // 4. An incomplete manifest (a visit interrupted while storing): discarded, fetched again.
    await tamper(page, 'incomplete');
    again = await reload(page, log, requests);
    r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.match(r.model.source.notes.join(' '), /incomplete/);
    assert.equal(modelRequests(again).length, FILES.length);
    assert.equal((await readStore(page)).manifest.complete, true);

    // 5. Delete all my data: the store is emptied; the next visit fetches again.
    page.once('dialog', (d) => d.accept());
    await page.click('#delete-all');
    await page.waitForFunction(() => /^(Deleted|Could not)/.test(document.getElementById('data-status').textContent), null, { timeout: 10_000 })
      .catch(async (e) => { throw new Error(`${e.message}: ${await page.textContent('#data-status')}\n${log.join('\n')}`); });
    assert.match(await page.textContent('#data-status'), /^Deleted: 1 model \(8\.\d MiB\)/);
    const dbs = await page.evaluate(() => indexedDB.databases());
    assert.deepEqual(dbs.filter((d) => d.name === 'bitlora'), [], 'the bitlora database still exists');
    ({ manifest } = await readStore(page));
    assert.equal(manifest, null);
    again = await reload(page, log, requests);
    r = await pageResult(page);
    assert.equal(r.model.source.from, 'network');
    assert.equal(modelRequests(again).length, FILES.length);
    assertSameOrigin(requests, 'store test');
  } finally {
    await context.close();
  }
});

test('store: a model that does not fit is not stored, the page says so and runs from memory', { timeout: 120_000 }, async () => {
  const { context, page, log, requests } = await openPage(browser, `${server.url}?free=1000`);
  try {
    const r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.source.stored, false);
    const note = await page.textContent('#model-note');
    assert.match(note, /Not stored: this model needs 8\.\d MiB but only 1000 B of browser storage is free here\. It runs from memory/);
    assert.match(await page.textContent('#model-size'), /running from memory$/);
    assert.equal((await readStore(page)).manifest, null);
    assert.equal(r.top.length, 10);
    assertSameOrigin(requests, 'quota test');
    console.log(`does not fit: ${note}`);
  } finally {
    await context.close();
  }
});

test('store: a download that does not match the server\'s index is refused with a clear message and not stored', { timeout: 120_000 }, async () => {
  const context = await browser.newContext();
  const good = readFileSync(path.join(DEFAULT_MODEL, 'model.safetensors'));
  const bad = Buffer.from(good);
  bad[5000] ^= 1;
  await context.route('**/web/models/default/model.safetensors', (route) => route.fulfill({
    status: 200, contentType: 'application/octet-stream', body: bad,
    headers: { 'cross-origin-resource-policy': 'same-origin' },
  }));
  const page = await context.newPage();
  const log = [];
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  try {
    await page.goto(server.url);
    await waitSettled(page, log);
    let r = await pageResult(page);
    assert.equal(r.state, 'error', 'a corrupt download must not load');
    assert.match(r.error, /models\/default\/model\.safetensors: the download is 8689112 bytes with sha256 [0-9a-f]{12}…, but the server's index \(pkg\/models\.json\) says 8689112 bytes, 2b01e43b7e45…; reload to try again/);
    assert.equal((await readStore(page)).manifest, null, 'nothing stored');
    console.log(`corrupt download: ${r.error}`);
    // Without the corruption the same tab recovers on reload.
    await context.unroute('**/web/models/default/model.safetensors');
    await page.reload();
    await waitSettled(page, log);
    r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal((await readStore(page)).manifest.complete, true);
  } finally {
    await context.close();
  }
});
