// Downloads from a Hugging Face-style hub (web/hub.js) into the model store (web/store.js), driven
// through the page's model panel (web/models-panel.js), against tests/browser/hub-server.mjs:
// a connection cut midway through a file resumes from the stored chunks and completes with the
// right sha256, then the model loads and generates what the CLI generates (CPU and WebGPU); a tab
// closed mid-download resumes after reopening; pause / resume / cancel; a corrupt file, a full
// quota (estimate too small, and QuotaExceededError on a write), a missing repo, a gated repo, a
// model that is not BitNet and a hub the CSP does not allow each give a clear message and leave
// the other stored models intact.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, unfold, pageResult, waitSettled, generateOnPage, nativeGenerateText,
  DEFAULT_MODEL, ARTIFACTS,
} from './helpers.mjs';
import { startHubServer, fileSha256 } from './hub-server.mjs';

const CHUNK = 4 * 1024 * 1024;
const PROMPT = 'The state of the Union';
const GEN = 20;

let hub, server, cpu, native;
before(async () => {
  // pageSize 3: the file lists come in pages (Link: rel="next"), as huggingface.co's can.
  hub = await startHubServer({ pageSize: 3 });
  server = await startServer({ args: ['--hub', hub.url] });
  cpu = await launchBrowser({ webgpu: false });
  native = nativeGenerateText(DEFAULT_MODEL, PROMPT, GEN);
});
after(async () => {
  await cpu?.close();
  await server?.stop();
  await hub?.stop();
});

const idOf = (repo) => `hub:${hub.url}/${repo}@main`;
const pageUrl = (base = server.url, query = '') => `${base}?hub=${encodeURIComponent(hub.url)}${query}`;
const resetFaults = () => Object.assign(hub.faults, { cut: null, stall: null, rate: null });
/** The hub's requests for a file's bytes (the CDN leg of LFS files, or resolve for the others). */
const fileRequests = (from, repo, file) => hub.log.slice(from).filter((e) =>
  (e.path.startsWith(`/cdn/${repo}/`) && file.endsWith('.safetensors')) || e.path === `/${repo}/resolve/main/${file}`)
  .filter((e) => e.status !== 302);

/** Types a repo into the panel, clicks Download, waits for the end (and the load that follows). */
async function download(page, repo, log) {
  await page.evaluate(() => { document.body.dataset.download = 'test-pending'; });
  await unfold(page, 'model-more');
  await page.fill('#hub-repo', repo);
  await page.click('#hub-download');
  await waitDownload(page, log);
  await waitSettled(page, log);
  return pageResult(page);
}
async function waitDownload(page, log) {
  try {
    await page.waitForFunction(() => ['done', 'error', 'paused', 'cancelled'].includes(document.body.dataset.download), null, { timeout: 180_000 });
  } catch (e) {
    throw new Error(`the download did not end: ${e.message}\n${await page.textContent('#hub-stats')}\n${log.join('\n')}`);
  }
}

/** The store as the page sees it: { manifests: {id: manifest}, chunkKeys }. */
const readStore = (page) => page.evaluate(() => new Promise((resolve, reject) => {
  const req = indexedDB.open('bitlora');
  req.onerror = () => reject(req.error);
  req.onsuccess = () => {
    const db = req.result;
    if (!db.objectStoreNames.contains('manifests')) { db.close(); return resolve({ manifests: {}, chunkKeys: [] }); }
    const tx = db.transaction(['manifests', 'chunks']);
    const m = tx.objectStore('manifests').getAll();
    const k = tx.objectStore('chunks').getAllKeys();
    tx.oncomplete = () => { db.close(); resolve({ manifests: Object.fromEntries(m.result.map((x) => [x.id, x])), chunkKeys: k.result }); };
    tx.onerror = () => { db.close(); reject(tx.error); };
  };
}));

/** The manifest of a completely downloaded repo matches the hub's files, sizes and sha256. */
function assertStored(store, repo, files) {
  const m = store.manifests[idOf(repo)];
  assert.ok(m, `${repo} is not in the store: ${Object.keys(store.manifests)}`);
  assert.equal(m.complete, true, `${repo}: manifest not complete`);
  assert.deepEqual(m.files.map((f) => f.name).sort(), [...files].sort());
  for (const f of m.files) {
    const bytes = hub.repos[repo].files[f.name];
    assert.equal(f.size, bytes.length, `${repo}/${f.name}: size`);
    assert.equal(f.sha256, fileSha256(hub.repos, repo, f.name), `${repo}/${f.name}: sha256`);
    const keys = store.chunkKeys.filter((k) => k.startsWith(`${m.id}/${f.name}/`));
    assert.equal(keys.length, Math.max(1, Math.ceil(bytes.length / CHUNK)), `${repo}/${f.name}: chunks`);
  }
  return m;
}

/** Collects every text #hub-stats shows (progress lines) into window.__hubLines. */
const recordLines = (page) => page.evaluate(() => {
  window.__hubLines = [];
  new MutationObserver(() => window.__hubLines.push(document.getElementById('hub-stats').textContent))
    .observe(document.getElementById('hub-stats'), { childList: true, characterData: true, subtree: true });
});

const DEFAULT_FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'];

async function cutResumeLoadGenerate(browser, backend) {
  resetFaults();
  const { context, page, log } = await openPage(browser, pageUrl());
  try {
    const from = hub.log.length;
    // Cut the connection once, 6 MB into model.safetensors (its first 4 MiB chunk is stored by
    // then), and send at ~3 MB/s so the rate and ETA show.
    hub.faults.cut = { file: 'model.safetensors', at: 6_000_000, times: 1 };
    hub.faults.rate = 3_000_000;
    await recordLines(page);
    const r = await download(page, 'bitlora/default-12m', log);
    assert.equal(r.models.download.state, 'done', `${r.models.download.error}\n${log.join('\n')}`);
    const reqs = fileRequests(from, 'bitlora/default-12m', 'model.safetensors');
    console.log(`${backend}: model.safetensors requests: ${reqs.map((e) => `${e.range} -> ${e.status}, ${e.sent} B${e.cut ? ' (cut)' : ''}`).join('; ')}`);
    assert.equal(reqs.length, 2, 'one cut request, one resumed request');
    assert.ok(reqs[0].cut && reqs[0].range === 'bytes=0-8689111');
    assert.equal(reqs[1].range, `bytes=${CHUNK}-8689111`, 'the resumed request starts after the stored chunk');
    assert.equal(reqs[1].status, 206);
    const store = await readStore(page);
    assertStored(store, 'bitlora/default-12m', DEFAULT_FILES);
    const lines = await page.evaluate(() => window.__hubLines);
    const live = lines.find((l) => /^model\.safetensors · [\d.]+ MiB \/ 8\.8 MiB · [\d.]+ (MiB|KiB)\/s · ETA \d/.test(l));
    assert.ok(live, `no progress line with rate and ETA among:\n${lines.slice(-8).join('\n')}`);
    console.log(`${backend}: progress e.g. "${live}"`);

    // It was loaded at once and runs on this backend, from the store.
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.storeId, idOf('bitlora/default-12m'));
    assert.equal(r.model.source.from, 'store');
    assert.equal(r.model.backend, backend);
    assert.match(await page.textContent('#hub-note'), /Downloaded bitlora\/default-12m \(8\.8 MiB\): every file's size and SHA-256 checked/);
    const run = await generateOnPage(page, { prompt: PROMPT, chat: false, options: { 'max-tokens': GEN }, log });
    assert.equal(run.gen.state, 'done', run.error);
    assert.equal(run.gen.result.text, native, `${backend}: the downloaded model generates what bitlora generate does`);
    console.log(`${backend}: ${JSON.stringify(PROMPT)} -> ${JSON.stringify(run.gen.result.text)}`);
  } finally {
    resetFaults();
    await context.close();
  }
}

test('hub: a download cut midway resumes from the stored chunks, completes with the right sha256, loads and generates (CPU)', { timeout: 300_000 }, () =>
  cutResumeLoadGenerate(cpu, 'cpu'));

test('hub: the same on WebGPU', { timeout: 300_000 }, async () => {
  const gpu = await launchBrowser({ webgpu: true });
  try {
    await cutResumeLoadGenerate(gpu, 'webgpu');
  } finally {
    await gpu.close();
  }
});

test('hub: a tab closed mid-download resumes in a new tab from where it stopped', { timeout: 300_000 }, async () => {
  resetFaults();
  const context = await cpu.newContext();
  const log = [];
  try {
    let page = await context.newPage();
    page.on('console', (m) => log.push(`[console] ${m.text()}`));
    await page.goto(pageUrl());
    await waitSettled(page, log);
    // The hub goes silent 6 MB into the weights; close the tab once the first chunk is stored.
    hub.faults.stall = { file: 'model.safetensors', at: 6_000_000 };
    await unfold(page, 'model-more');
    await page.fill('#hub-repo', 'bitlora/default-12m');
    await page.click('#hub-download');
    const id = idOf('bitlora/default-12m');
    for (let i = 0; ; i++) {
      const m = (await readStore(page)).manifests[id];
      if (m?.files.find((f) => f.name === 'model.safetensors')?.have >= 1) break;
      assert.ok(i < 600, 'the first chunk of model.safetensors was never stored');
      await new Promise((r) => setTimeout(r, 100));
    }
    await page.close();
    resetFaults();

    const from = hub.log.length;
    page = await context.newPage();
    page.on('console', (m) => log.push(`[console] ${m.text()}`));
    await page.goto(pageUrl());
    await waitSettled(page, log);
    await unfold(page, 'model-more');
    await page.waitForSelector(`#models-list li[data-model-id="${id}"] button[data-action="resume"]`);
    const row = await page.textContent(`#models-list li[data-model-id="${id}"]`);
    assert.match(row, /partial: 4\.5 MiB of 8\.8 MiB \(51%\)/, row);
    console.log(`after reopening: ${row}`);
    await page.evaluate(() => { document.body.dataset.download = 'test-pending'; });
    await unfold(page, 'model-more');
    await page.click(`#models-list li[data-model-id="${id}"] button[data-action="resume"]`);
    await waitDownload(page, log);
    await waitSettled(page, log);
    const r = await pageResult(page);
    assert.equal(r.models.download.state, 'done', r.models.download.error);
    const weights = fileRequests(from, 'bitlora/default-12m', 'model.safetensors');
    assert.deepEqual(weights.map((e) => e.range), [`bytes=${CHUNK}-8689111`], 'only the rest of the weights was fetched');
    assert.deepEqual(fileRequests(from, 'bitlora/default-12m', 'tokenizer.json'), [], 'a stored file is not fetched again');
    assertStored(await readStore(page), 'bitlora/default-12m', DEFAULT_FILES);
    assert.equal(r.model.storeId, id);
    assert.equal(r.state, 'done', r.error);
  } finally {
    resetFaults();
    await context.close();
  }
});

test('hub: pause keeps what is stored and resume completes it; cancel deletes it; screenshots of the panel', { timeout: 300_000 }, async () => {
  resetFaults();
  const { context, page, log } = await openPage(cpu, pageUrl());
  try {
    const id = idOf('bitlora/default-12m');
    hub.faults.rate = 2_000_000;
    await page.evaluate(() => { document.body.dataset.download = 'test-pending'; });
    await unfold(page, 'model-more');
    await page.fill('#hub-repo', 'bitlora/default-12m');
    await page.click('#hub-download');
    // Wait for the first 4 MiB chunk of the weights in the store.
    for (let i = 0; ; i++) {
      const m = (await readStore(page)).manifests[id];
      if (m?.files.find((f) => f.name === 'model.safetensors')?.have >= 1) break;
      assert.ok(i < 600, 'no chunk stored');
      await new Promise((r) => setTimeout(r, 100));
    }
    await unfold(page, 'model-more');
    await page.click('#hub-pause');
    await waitDownload(page, log);
    let r = await pageResult(page);
    assert.equal(r.models.download.state, 'paused');
    assert.match(await page.textContent('#hub-note'), /^Paused: 4\.\d MiB of 8\.8 MiB of bitlora\/default-12m stored\. Resume continues from there/);
    const row = `#models-list li[data-model-id="${id}"]`;
    await page.waitForSelector(`${row} button[data-action="resume"]`);

    // Screenshots with a partial model in the list, at desktop and phone width.
    mkdirSync(ARTIFACTS, { recursive: true });
    for (const viewport of [{ width: 390, height: 844 }, { width: 1280, height: 800 }]) {
      await page.setViewportSize(viewport);
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `the page at ${viewport.width}px overflows horizontally by ${overflow}px`);
      await page.locator('#model').screenshot({ path: path.join(ARTIFACTS, `models-panel-${viewport.width}x${viewport.height}.png`) });
    }

    resetFaults();
    const from = hub.log.length;
    await page.evaluate(() => { document.body.dataset.download = 'test-pending'; });
    await unfold(page, 'model-more');
    await page.click(`${row} button[data-action="resume"]`);
    await waitDownload(page, log);
    await waitSettled(page, log);
    r = await pageResult(page);
    assert.equal(r.models.download.state, 'done', r.models.download.error);
    assert.equal(fileRequests(from, 'bitlora/default-12m', 'model.safetensors')[0].range, `bytes=${CHUNK}-8689111`);
    assertStored(await readStore(page), 'bitlora/default-12m', DEFAULT_FILES);

    // Cancel: a slow download of the sharded repo, cancelled midway, leaves nothing behind.
    hub.faults.rate = 100_000;
    await page.evaluate(() => { document.body.dataset.download = 'test-pending'; });
    await unfold(page, 'model-more');
    await page.fill('#hub-repo', 'bitlora/sharded');
    await page.click('#hub-download');
    await page.waitForFunction(() => /model-0000\d-of-00003\.safetensors · /.test(document.getElementById('hub-stats').textContent), null, { timeout: 60_000 });
    await unfold(page, 'model-more');
    await page.click('#hub-cancel');
    await waitDownload(page, log);
    r = await pageResult(page);
    assert.equal(r.models.download.state, 'cancelled');
    const store = await readStore(page);
    assert.equal(store.manifests[idOf('bitlora/sharded')], undefined, 'a cancelled download is deleted');
    assert.deepEqual(store.chunkKeys.filter((k) => k.startsWith(idOf('bitlora/sharded'))), []);
    assertStored(store, 'bitlora/default-12m', DEFAULT_FILES);
    assert.equal(r.models.list.some((m) => m.id === idOf('bitlora/sharded')), false);
  } finally {
    resetFaults();
    await context.close();
  }
});

test('hub: a corrupt file (sha256 mismatch) gives a clear message; other stored models stay intact and load', { timeout: 300_000 }, async () => {
  resetFaults();
  const { context, page, log } = await openPage(cpu, pageUrl());
  try {
    let r = await download(page, 'bitlora/sharded', log);
    assert.equal(r.models.download.state, 'done', r.models.download.error);
    const shardFiles = ['config.json', 'model.safetensors.index.json', 'model-00001-of-00003.safetensors',
      'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors'];
    const good = assertStored(await readStore(page), 'bitlora/sharded', shardFiles);
    assert.equal(r.model.storeId, idOf('bitlora/sharded'), 'the sharded model loaded');

    r = await download(page, 'bitlora/corrupt-12m', log);
    assert.equal(r.models.download.state, 'error');
    const shown = await page.textContent('#hub-error');
    console.log(`corrupt: ${shown}`);
    assert.match(shown, /model\.safetensors from bitlora\/corrupt-12m failed its sha256 check: the hub lists 2b01e43b7e45d339… but the downloaded bytes hash to [0-9a-f]{16}…\. The damaged file was not kept \(other stored models are untouched\)/);
    assert.equal(await page.isVisible('#hub-error'), true);
    const store = await readStore(page);
    assert.deepEqual(store.manifests[idOf('bitlora/sharded')], good, 'the other model\'s manifest changed');
    const bad = store.manifests[idOf('bitlora/corrupt-12m')];
    assert.equal(bad.complete, false);
    assert.equal(bad.files.find((f) => f.name === 'model.safetensors').have, 0, 'the damaged file is forgotten');
    assert.deepEqual(store.chunkKeys.filter((k) => k.startsWith(`${bad.id}/model.safetensors/`)), []);
    // The sharded model still loads from the store.
    await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
    await unfold(page, 'model-more');
    await page.click(`#models-list li[data-model-id="${idOf('bitlora/sharded')}"] button[data-action="load"]`);
    await waitSettled(page, log);
    r = await pageResult(page);
    assert.equal(r.state, 'done', r.error);
    assert.equal(r.model.storeId, idOf('bitlora/sharded'));
    assert.deepEqual(r.model.files, shardFiles.filter((f) => f.endsWith('.safetensors')));
    // The partial corrupt download can be deleted from the list (asked in place).
    const row = `#models-list li[data-model-id="${bad.id}"]`;
    await unfold(page, 'model-more');
    await page.click(`${row} button[data-action="delete"]`);
    await unfold(page, 'model-more');
    await page.click(`${row} button[data-action="confirm-delete"]`);
    await page.waitForFunction((id) => !window.__bitlora.models.list.some((m) => m.id === id), bad.id);
    assert.equal((await readStore(page)).manifests[bad.id], undefined);
  } finally {
    await context.close();
  }
});

/** Serves web/store.js with `code` appended (runs in the worker, and harmlessly in the page). */
async function injectIntoStore(context, code) {
  await context.route('**/web/store.js', async (route) => {
    const resp = await route.fetch();
    const body = `${await resp.text()}\n;if (typeof WorkerGlobalScope !== 'undefined') { ${code} }\n`;
    await route.fulfill({ response: resp, body, headers: { ...resp.headers(), 'content-length': String(Buffer.byteLength(body)) } });
  });
}

test('hub: an exceeded quota (estimate too small; QuotaExceededError mid-write) gives a clear message; stored models stay intact; the partial download resumes', { timeout: 300_000 }, async () => {
  resetFaults();
  const { context, page, log } = await openPage(cpu, pageUrl());
  try {
    let r = await download(page, 'bitlora/sharded', log);
    assert.equal(r.models.download.state, 'done', r.models.download.error);
    const before = await readStore(page);
    const sharded = before.manifests[idOf('bitlora/sharded')];

    // 1. The browser says 2,000,000 bytes are left: nothing starts.
    await injectIntoStore(context, 'navigator.storage.estimate = async () => ({ quota: 6_000_000, usage: 4_000_000 });');
    await page.reload();
    await waitSettled(page, log);
    let from = hub.log.length;
    r = await download(page, 'bitlora/default-12m', log);
    assert.equal(r.models.download.state, 'error');
    let shown = await page.textContent('#hub-error');
    console.log(`estimate: ${shown}`);
    assert.match(shown, /Not downloaded: bitlora\/default-12m needs 8\.8 MiB, this browser allows this page 1\.9 MiB more\. Delete stored models you no longer need/);
    assert.deepEqual(fileRequests(from, 'bitlora/default-12m', 'model.safetensors'), [], 'no weights were requested');
    let store = await readStore(page);
    assert.equal(store.manifests[idOf('bitlora/default-12m')], undefined, 'nothing of it was stored');
    assert.deepEqual(store.manifests[idOf('bitlora/sharded')], sharded);

    // 2. The estimate is fine but a write fails with QuotaExceededError after ~6 MB of chunks.
    await context.unrouteAll({ behavior: 'wait' });
    await injectIntoStore(context, `
      const put = IDBObjectStore.prototype.put;
      let written = 0;
      IDBObjectStore.prototype.put = function (value, key) {
        if (this.name === 'chunks' && value instanceof Uint8Array && (written += value.length) > 6_000_000) {
          throw new DOMException('Simulated by the test: the quota has been exceeded.', 'QuotaExceededError');
        }
        return put.call(this, value, key);
      };`);
    await page.reload();
    await waitSettled(page, log);
    r = await download(page, 'bitlora/default-12m', log);
    assert.equal(r.models.download.state, 'error');
    shown = await page.textContent('#hub-error');
    console.log(`QuotaExceededError: ${shown}`);
    assert.match(shown, /This browser's storage for this page is full: bitlora\/default-12m stopped after 4\.5 MiB of 8\.8 MiB\. What was stored is kept \(press Resume once there is room\), and other stored models are untouched/);
    store = await readStore(page);
    assert.deepEqual(store.manifests[idOf('bitlora/sharded')], sharded, 'the other model changed');
    const partial = store.manifests[idOf('bitlora/default-12m')];
    assert.equal(partial.complete, false);
    assert.equal(partial.files.find((f) => f.name === 'model.safetensors').have, 1);

    // 3. Room again: Resume completes it from the stored chunk.
    await context.unrouteAll({ behavior: 'wait' });
    await page.reload();
    await waitSettled(page, log);
    from = hub.log.length;
    await page.evaluate(() => { document.body.dataset.download = 'test-pending'; });
    await unfold(page, 'model-more');
    await page.click(`#models-list li[data-model-id="${idOf('bitlora/default-12m')}"] button[data-action="resume"]`);
    await waitDownload(page, log);
    await waitSettled(page, log);
    r = await pageResult(page);
    assert.equal(r.models.download.state, 'done', r.models.download.error);
    assert.deepEqual(fileRequests(from, 'bitlora/default-12m', 'model.safetensors').map((e) => e.range), [`bytes=${CHUNK}-8689111`]);
    store = await readStore(page);
    assertStored(store, 'bitlora/default-12m', DEFAULT_FILES);
    assert.deepEqual(store.manifests[idOf('bitlora/sharded')], sharded);
  } finally {
    await context.close();
  }
});

test('hub: repo not found, gated, not a BitNet model, a bad repo id and a hub the CSP does not allow: clear messages, nothing stored', { timeout: 300_000 }, async () => {
  resetFaults();
  const { context, page, log } = await openPage(cpu, pageUrl());
  const other = await startServer(); // the default CSP: only huggingface.co
  try {
    const cases = [
      ['bitlora/no-such-model', /repo not found: http:\/\/127\.0\.0\.1:\d+ has no model bitlora\/no-such-model\. Check the spelling: owner\/name/],
      ['bitlora/gated-12m', /bitlora\/gated-12m is gated: http:\/\/127\.0\.0\.1:\d+ answered 401 for config\.json\. .*accept them while logged in, then give an access token \(Advanced\)/],
      ['bitlora/gpt2-like', /bitlora\/gpt2-like is not a BitNet model: its config\.json has model_type "gpt2" \(architectures GPT2LMHeadModel\)\. bitlora runs BitNet b1\.58 models.*Its weights were not downloaded and nothing was stored\./],
      ['not a repo!', /"not a repo!" is not a repo id: use owner\/name/],
    ];
    for (const [repo, re] of cases) {
      const from = hub.log.length;
      const r = await download(page, repo, log);
      assert.equal(r.models.download.state, 'error', repo);
      const shown = await page.textContent('#hub-error');
      console.log(`${repo}: ${shown}`);
      assert.match(shown, re);
      assert.equal(hub.log.slice(from).some((e) => e.path.startsWith('/cdn/')), false, `${repo}: weights were requested`);
    }
    const store = await readStore(page);
    assert.deepEqual(Object.keys(store.manifests), ['bundled:default'], 'only the bundled model is stored');
    assert.equal((await pageResult(page)).state, 'done', 'the page still runs its model');

    // A page whose CSP does not list the hub: the browser refuses, the page says how to allow it.
    const p2 = await openPage(cpu, pageUrl(other.url));
    try {
      const r = await download(p2.page, 'bitlora/sharded', p2.log);
      assert.equal(r.models.download.state, 'error');
      const shown = await p2.page.textContent('#hub-error');
      console.log(`CSP: ${shown}`);
      assert.match(shown, /this page's Content-Security-Policy does not allow it to connect to http:\/\/127\.0\.0\.1:\d+ \(connect-src\)\. If you serve the page with bitlora, start it with `bitlora serve --hub http:\/\/127\.0\.0\.1:\d+`/);
    } finally {
      await p2.context.close();
    }
  } finally {
    await other.stop();
    await context.close();
  }
});
