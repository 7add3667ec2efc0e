// Stored models stream into wasm one file at a time, tensor by tensor (worker.js loadModelFiles:
// Session beginLoad / addFile / addTensor / finishLoad), read from IndexedDB one 4 MiB chunk at
// a time (store.js StoredFile), so neither wasm memory nor the JS heap holds a whole safetensors
// file. For the default model from the store, on WebGPU and on the CPU fallback, in fresh
// workers: the streamed load gives the same logits as the whole-file path (Session.load,
// `wholeFiles`) and as the CLI, the same greedy text as the CLI; while the weights are built it
// grows wasm memory by the weight file's size (less two 64 KiB pages) less than the whole-file
// path does (and ends the load with less); and the JS heap never holds more than one store
// chunk plus the tensor in flight (store.heldBytes: WeakRefs on every chunk and copy, counted
// after a forced GC at each chunk read and each tensor handed over; Chromium runs with
// --js-flags=--expose-gc for it). Reading all of a file's chunks first, as the worker once did,
// holds the whole 8.3 MiB file and fails that bound.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, pageResult, waitSettled, nativeLogits, nativeGenerateText, assertLogitsClose,
  DEFAULT_MODEL, TOLERANCE,
} from './helpers.mjs';

const TOKENS = [5, 17, 42, 300, 8000];
const PROMPT = 'The state of the Union';
const N = 12;
const FILE_BYTES = statSync(path.join(DEFAULT_MODEL, 'model.safetensors')).size;
const CHUNK = 4 * 1024 * 1024; // store.js CHUNK_SIZE
// The files the loader reads whole, as wasm wants them: config.json first, the tokenizer's at
// the end for finishLoad.
const SMALL_FILES = ['config.json', 'tokenizer.json', 'tokenizer_config.json']
  .reduce((n, f) => n + statSync(path.join(DEFAULT_MODEL, f)).size, 0);
/** The largest tensor of the default model's weights, in bytes (from its safetensors header). */
const LARGEST_TENSOR = (() => {
  const file = readFileSync(path.join(DEFAULT_MODEL, 'model.safetensors'));
  const n = Number(file.readBigUInt64LE(0));
  const header = JSON.parse(file.subarray(8, 8 + n).toString('utf8'));
  return Math.max(...Object.entries(header).filter(([k]) => k !== '__metadata__')
    .map(([, t]) => t.data_offsets[1] - t.data_offsets[0]));
})();

let server, native, nativeText;
before(async () => {
  server = await startServer();
  native = nativeLogits(TOKENS, DEFAULT_MODEL);
  nativeText = nativeGenerateText(DEFAULT_MODEL, PROMPT, N);
});
after(async () => { await server?.stop(); });

/** In the page: a fresh worker loads the stored default model one way; its memory marks, logits, text. */
const loadInFreshWorker = (page, { wholeFiles, webgpu }) => page.evaluate(async ({ wholeFiles, webgpu, TOKENS, PROMPT, N }) => {
  const worker = new Worker(new URL('web/worker.js', location.href), { type: 'module' });
  let next = 1;
  const call = (type, args = {}) => new Promise((resolve, reject) => {
    const id = next++;
    const texts = [];
    const onMessage = ({ data }) => {
      if (data.id !== id) return;
      if (data.type === 'token') { texts.push(data.event.text ?? ''); return; }
      if (data.type) return; // progress
      worker.removeEventListener('message', onMessage);
      if (data.ok) resolve(data.result); else reject(new Error(data.error));
    };
    worker.addEventListener('message', onMessage);
    worker.postMessage({ id, type, ...args });
  });
  try {
    const backend = await call('init', { backend: webgpu ? 'webgpu' : 'cpu' });
    let model;
    try {
      model = await call('loadStored', { modelId: 'bundled:default', wholeFiles, measureHeldBytes: true });
    } catch (err) {
      // A failed load: what it said, and whether the worker kept a model from it.
      const forward = await call('forward', { tokens: TOKENS }).then(() => 'ran', (e) => e.message);
      return { error: err.message, forward };
    }
    const held = await call('heldBytes');
    const { load: marks } = await call('wasmMemory');
    const fwd = await call('forward', { tokens: TOKENS });
    const gen = await call('generate', { prompt: PROMPT, options: { max_tokens: N, temperature: 0 } });
    return {
      backend: backend.kind, modelBackend: model.backend, bytes: model.bytes, marks, held,
      rows: fwd.rows, vocab: fwd.vocab, logits: Array.from(fwd.logits), text: gen.text,
    };
  } finally {
    worker.terminate();
  }
}, { wholeFiles, webgpu, TOKENS, PROMPT, N });

for (const webgpu of [true, false]) {
  const label = webgpu ? 'WebGPU' : 'CPU fallback';
  test(`${label}: the stored default model streams tensor by tensor: same logits and text, less wasm memory`, { timeout: 300_000 }, async () => {
    const browser = await launchBrowser({ webgpu, args: ['--js-flags=--expose-gc'] });
    try {
      // The page stores the default model on its first visit.
      const { page, log } = await openPage(browser, server.url);
      const r = await pageResult(page);
      assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
      const streamed = await loadInFreshWorker(page, { wholeFiles: false, webgpu });
      const whole = await loadInFreshWorker(page, { wholeFiles: true, webgpu });
      for (const [name, x] of [['streamed', streamed], ['whole files', whole]]) {
        assert.equal(x.error, undefined, `${label} ${name}: the load failed`);
        assert.equal(x.backend, webgpu ? 'webgpu' : 'cpu');
        assert.equal(x.modelBackend, webgpu ? 'webgpu' : 'cpu');
        const rows = Array.from({ length: x.rows }, (_, t) => x.logits.slice(t * x.vocab, (t + 1) * x.vocab));
        assertLogitsClose(rows, native, webgpu ? TOLERANCE.WEBGPU : TOLERANCE.CPU_WASM, `${label} ${name} vs CLI`);
        assert.equal(x.text, nativeText, `${label} ${name}: greedy text differs from the CLI's`);
      }
      // The two paths build the same model: bit-identical logits on the same backend.
      assert.deepEqual(streamed.logits, whole.logits, 'streamed and whole-file loads give different logits');
      assert.equal(streamed.bytes, whole.bytes);
      // The session's marks of wasm memory during each load (Session.loadMemory): it only grows,
      // so each is a high-water mark. `weights`: once the model's tensors are built, before the
      // tokenizer and the GPU upload. The whole-file path peaks there with the file and the
      // model both in memory; streaming holds the model alone. Afterwards the whole-file path
      // reuses the freed file for the tokenizer and the GPU upload's staging, so the totals at
      // the end of the load differ by less than the file.
      const MiB = (n) => `${(n / 2 ** 20).toFixed(2)} MiB`;
      const grew = ({ marks: m }) => ({ weights: m.weights - m.before, total: m.after - m.before });
      const [gs, gw] = [grew(streamed), grew(whole)];
      console.log(`${label}: wasm memory grew by ${MiB(gs.weights)} streamed vs ${MiB(gw.weights)} with whole files ` +
        `once the weights were built (difference ${MiB(gw.weights - gs.weights)}; model.safetensors: ${MiB(FILE_BYTES)}); ` +
        `${MiB(gs.total)} vs ${MiB(gw.total)} at the end of the load (difference ${MiB(gw.total - gs.total)})`);
      // Streaming holds what the whole-file path does less the file, plus the 64 KiB piece it
      // decodes floats through; memory grows in 64 KiB pages. So: the file less two pages.
      const PAGE = 65536;
      assert.ok(gs.weights + FILE_BYTES - 2 * PAGE <= gw.weights,
        `streaming should save the file's ${FILE_BYTES} bytes (less two 64 KiB pages) of wasm memory while the weights ` +
        `are built: grew ${gs.weights} streamed vs ${gw.weights} whole`);
      assert.ok(gs.total < gw.total, `streamed load ended with more wasm memory: ${gs.total} vs ${gw.total}`);

      // The JS heap: bytes of model data (store chunks, and copies of ranges that cross chunks)
      // alive at once, measured after a forced GC at every chunk read and tensor handed over.
      const h = streamed.held;
      assert.ok(h && h.samples > 0, `no JS heap measurement: ${JSON.stringify(h)}`);
      console.log(`${label}: the JS heap held at most ${MiB(h.bytes)} of model data streamed (at most ${MiB(h.chunkBytes)} ` +
        `of it in store chunks) over ${h.samples} samples, vs ${MiB(whole.held.bytes)} with whole files; bound: one ` +
        `${MiB(CHUNK)} chunk + the largest tensor (${MiB(LARGEST_TENSOR)}) + the small files (${MiB(SMALL_FILES)}); ` +
        `model.safetensors ${MiB(FILE_BYTES)}. At the largest sample: ${h.held.join(', ')}`);
      // Store chunks: the one in hand, and the small files the loader keeps (their chunks).
      assert.ok(h.chunkBytes <= CHUNK + SMALL_FILES,
        `streaming held ${h.chunkBytes} bytes of store chunks at once; at most one ${CHUNK}-byte chunk and the small files ` +
        `(${SMALL_FILES}) expected. At the largest sample: ${h.held.join(', ')}`);
      // And the tensor in flight: a copy when it crosses chunks.
      assert.ok(h.bytes <= CHUNK + LARGEST_TENSOR + SMALL_FILES,
        `streaming held ${h.bytes} bytes of model data at once; at most a chunk, the tensor in flight and the small files, ` +
        `${CHUNK + LARGEST_TENSOR + SMALL_FILES}, expected. At the largest sample: ${h.held.join(', ')}`);
    } finally {
      await browser.close();
    }
  });
}

/** Flips one byte of chunk `index` of the stored default model's model.safetensors. */
const damageChunk = (page, index, byte) => page.evaluate(({ index, byte }) => new Promise((resolve, reject) => {
  const req = indexedDB.open('bitlora');
  req.onerror = () => reject(req.error);
  req.onsuccess = () => {
    const db = req.result;
    const tx = db.transaction('chunks', 'readwrite');
    const key = `bundled:default/model.safetensors/${index}`;
    const get = tx.objectStore('chunks').get(key);
    get.onsuccess = () => {
      const c = get.result;
      c[byte] ^= 0x40;
      tx.objectStore('chunks').put(c, key);
    };
    tx.oncomplete = () => { db.close(); resolve(); };
    tx.onerror = () => { db.close(); reject(tx.error); };
  };
}), { index, byte });

test('a damaged stored file fails its streamed load, naming the file, whether the damage is in its header or in a later chunk', { timeout: 300_000 }, async () => {
  const browser = await launchBrowser({ webgpu: false, args: ['--js-flags=--expose-gc'] });
  try {
    const { page, log } = await openPage(browser, server.url);
    // In the JSON header (chunk 0, byte 100): addFile itself fails, but the load reports the
    // sha256 mismatch it then checks for, the real cause. In chunk 1, after tensors of the file
    // were handed to wasm: the check at the file's end fails the load before finishLoad.
    for (const [index, byte, where] of [[0, 100, 'header'], [1, 12345, 'chunk 1']]) {
      const r = await pageResult(page); // the page (re)stores the default model
      assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
      await damageChunk(page, index, byte);
      const x = await loadInFreshWorker(page, { wholeFiles: false, webgpu: false });
      console.log(`damaged ${where}: ${x.error}; forward afterwards: ${x.forward}`);
      assert.match(x.error ?? 'loaded', /^bitlora-default-12m: model\.safetensors failed its sha256 check \(stored [0-9a-f]{12}…, read back [0-9a-f]{12}…\)\. It was removed from the store/,
        `damaged ${where}`);
      assert.notEqual(x.forward, 'ran', `damaged ${where}: the failed load left a model to run`);
      await page.reload();
      await waitSettled(page, log);
    }
  } finally {
    await browser.close();
  }
});
