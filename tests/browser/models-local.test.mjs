// Local files kept in the model store (worker 'importFiles', the model panel's picker and drop
// zone): picked files load and are stored with their sha256, survive a reload and load again
// from the store without any request for model files; dropped files (drag-and-drop) likewise;
// the list shows name, source, size and date; deleting one model leaves the others intact; an
// import that does not fit runs from memory and says so; "Delete all my data" empties the list.
// CPU backend (the store does not depend on the backend; hub downloads load on both in
// models-hub.test.mjs).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, unfold, pageResult, waitSettled, generateOnPage, nativeGenerateText,
  DEFAULT_MODEL, TINY_MODEL, MODEL_FILE_RE,
} from './helpers.mjs';

const PROMPT = 'The state of the Union';
const DEFAULT_FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'];

let server, browser;
before(async () => {
  server = await startServer();
  browser = await launchBrowser({ webgpu: false });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

const sha256 = (file) => createHash('sha256').update(readFileSync(file)).digest('hex');

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

async function waitImport(page, log) {
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.import), null, { timeout: 120_000 })
    .catch((e) => { throw new Error(`import did not end: ${e.message}\n${log.join('\n')}`); });
  await waitSettled(page, log);
  return pageResult(page);
}

/** Drops files on the drop zone as a browser does: a `drop` event whose DataTransfer holds Files. */
async function dropFiles(page, files) {
  const payload = files.map((f) => ({ name: path.basename(f), b64: readFileSync(f).toString('base64') }));
  await page.evaluate((payload) => {
    document.body.dataset.import = 'test-pending';
    const dt = new DataTransfer();
    for (const { name, b64 } of payload) {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      dt.items.add(new File([bytes], name));
    }
    const zone = document.getElementById('drop-zone');
    zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, payload);
}

test('local files: picked files load, are stored with their sha256, survive a reload and load from the store without a request', { timeout: 300_000 }, async () => {
  const { context, page, log, requests } = await openPage(browser, server.url);
  try {
    await page.evaluate(() => { document.body.dataset.import = 'test-pending'; });
    await page.setInputFiles('#files', DEFAULT_FILES.map((f) => path.join(DEFAULT_MODEL, f)));
    let r = await waitImport(page, log);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.deepEqual(r.model.source.from, 'files');
    assert.equal(r.model.source.stored, true, r.model.source.notes.join(' '));
    assert.match(await page.textContent('#model-size'), /your files, kept in this browser$/);
    const id = r.model.storeId;
    assert.match(id, /^local:/);
    let store = await readStore(page);
    const m = store.manifests[id];
    assert.equal(m.complete, true);
    assert.equal(m.source, 'local');
    for (const f of DEFAULT_FILES) {
      const entry = m.files.find((x) => x.name === f);
      assert.ok(entry, `${f} not stored`);
      assert.equal(entry.sha256, sha256(path.join(DEFAULT_MODEL, f)), `${f}: sha256`);
      assert.equal(store.chunkKeys.filter((k) => k.startsWith(`${id}/${f}/`)).length, entry.chunks);
    }
    const row = await page.textContent(`#models-list li[data-model-id="${id}"]`);
    assert.match(row, /^Your model\s*in useyour files · 8\.8 MiB · stored \w{3} \d+, \d{4}/, row);
    console.log(`stored: ${row}`);
    const first = await generateOnPage(page, { prompt: PROMPT, chat: false, options: { 'max-tokens': 12 }, log });

    // Reload: the page starts with the bundled model (from the store); our model is listed and
    // loads from the store: no request for any model file.
    const from = requests.length;
    await page.reload();
    await waitSettled(page, log);
    await unfold(page, 'model-more');
    await page.waitForSelector(`#models-list li[data-model-id="${id}"] button[data-action="load"]`);
    await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
    await unfold(page, 'model-more');
    await page.click(`#models-list li[data-model-id="${id}"] button[data-action="load"]`);
    await waitSettled(page, log);
    r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.storeId, id);
    assert.equal(r.model.source.from, 'store');
    assert.deepEqual(requests.slice(from).filter((u) => MODEL_FILE_RE.test(u)), [], 'model files were requested after the reload');
    const again = await generateOnPage(page, { prompt: PROMPT, chat: false, options: { 'max-tokens': 12 }, log });
    assert.equal(again.gen.result.text, first.gen.result.text);
    assert.equal(again.gen.result.text, nativeGenerateText(DEFAULT_MODEL, PROMPT, 12));

    // The same files imported again replace the stored copy instead of doubling it.
    await page.evaluate(() => { document.body.dataset.import = 'test-pending'; });
    await page.setInputFiles('#files', DEFAULT_FILES.map((f) => path.join(DEFAULT_MODEL, f)));
    r = await waitImport(page, log);
    assert.match(r.model.source.notes.join(' '), /replaces an identical copy/);
    store = await readStore(page);
    assert.equal(Object.values(store.manifests).filter((x) => x.source === 'local').length, 1);
  } finally {
    await context.close();
  }
});

test('local files: drag-and-drop imports; list and delete one model (others intact); an import that does not fit runs from memory; delete all', { timeout: 300_000 }, async () => {
  const { context, page, log } = await openPage(browser, server.url);
  try {
    await page.evaluate(() => { document.body.dataset.import = 'test-pending'; });
    await page.setInputFiles('#files', DEFAULT_FILES.map((f) => path.join(DEFAULT_MODEL, f)));
    let r = await waitImport(page, log);
    const big = r.model.storeId;
    await dropFiles(page, ['config.json', 'model.safetensors'].map((f) => path.join(TINY_MODEL, f)));
    r = await waitImport(page, log);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.source.stored, true);
    assert.equal(r.model.tokenizer, null, 'the tiny model has no tokenizer');
    const tiny = r.model.storeId;
    assert.notEqual(tiny, big);
    let store = await readStore(page);
    assert.equal(store.manifests[tiny].files.find((f) => f.name === 'model.safetensors').sha256, sha256(path.join(TINY_MODEL, 'model.safetensors')));
    const list = await page.evaluate(() => window.__bitlora.models.list.map((m) => `${m.id} ${m.source} ${m.complete}`));
    assert.equal(list.length, 3, list.join('\n'));
    assert.match(await page.textContent('#models-summary'), /^3 models, 17\.\d MiB\./);

    // Delete the big one (asked in place); the others' manifests and chunks are untouched.
    const keep = Object.fromEntries(Object.entries(store.manifests).filter(([id]) => id !== big));
    const keepChunks = store.chunkKeys.filter((k) => !k.startsWith(`${big}/`));
    const row = `#models-list li[data-model-id="${big}"]`;
    await unfold(page, 'model-more');
    await page.click(`${row} button[data-action="delete"]`);
    assert.match(await page.textContent(row), /Delete Your model\?/);
    await unfold(page, 'model-more');
    await page.click(`${row} button[data-action="confirm-delete"]`);
    await page.waitForFunction((id) => !window.__bitlora.models.list.some((m) => m.id === id), big);
    store = await readStore(page);
    assert.deepEqual(store.manifests, keep);
    assert.deepEqual(store.chunkKeys, keepChunks);
    assert.match(await page.textContent('#hub-note'), /^Deleted Your model from this browser \(8\.8 MiB\)\./);
    // The model in use (tiny) still runs.
    await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
    await unfold(page, 'developer');
    await page.fill('#tokens', '5,17,42');
    await page.click('#run');
    await waitSettled(page, log);
    assert.equal((await pageResult(page)).state, 'done');

    // Delete all my data: nothing listed, the database is gone.
    page.once('dialog', (d) => d.accept());
    await page.click('#delete-all');
    await page.waitForFunction(() => window.__bitlora.models.list.length === 0, null, { timeout: 20_000 });
    assert.match(await page.textContent('#models-summary'), /^None yet\./);
    assert.deepEqual((await page.evaluate(() => indexedDB.databases())).filter((d) => d.name === 'bitlora'), []);
  } finally {
    await context.close();
  }

  // Too little room (?free=1000): the import loads and runs from memory, and says why.
  const p = await openPage(browser, `${server.url}?free=1000`);
  try {
    await p.page.evaluate(() => { document.body.dataset.import = 'test-pending'; });
    await p.page.setInputFiles('#files', ['config.json', 'model.safetensors'].map((f) => path.join(TINY_MODEL, f)));
    const r = await waitImport(p.page, p.log);
    assert.equal(r.state, 'done', r.error);
    assert.equal(r.model.source.stored, false);
    const note = await p.page.textContent('#model-note');
    console.log(`does not fit: ${note}`);
    assert.match(note, /Not kept in this browser: this model needs 312 KiB, this browser allows this page 1000 B more\. It runs from memory/);
    assert.match(await p.page.textContent('#model-size'), /your files, running from memory$/);
    assert.equal((await readStore(p.page)).manifests[r.model.storeId ?? 'none'], undefined);
  } finally {
    await p.context.close();
  }
});
