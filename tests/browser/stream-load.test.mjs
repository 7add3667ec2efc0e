// Stored models stream into wasm tensor by tensor (worker.js loadIntoSession: Session beginLoad /
// addFile / addTensor / finishLoad), cut out of the store's 4 MiB chunks, so wasm memory never
// holds a whole safetensors file. For the default model from the store, on WebGPU and on the CPU
// fallback, in fresh workers: the streamed load gives the same logits as the whole-file path
// (Session.load, `wholeFiles`) and as the CLI, the same greedy text as the CLI, and, while the
// weights are built, grows wasm memory by the weight file's size (less two 64 KiB pages) less
// than the whole-file path does (and ends the load with less).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, pageResult, nativeLogits, nativeGenerateText, assertLogitsClose,
  DEFAULT_MODEL, TOLERANCE,
} from './helpers.mjs';

const TOKENS = [5, 17, 42, 300, 8000];
const PROMPT = 'The state of the Union';
const N = 12;
const FILE_BYTES = statSync(path.join(DEFAULT_MODEL, 'model.safetensors')).size;

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
    const backend = await call('init', { preferGpu: webgpu });
    const model = await call('loadStored', { modelId: 'bundled:default', wholeFiles });
    const { load: marks } = await call('wasmMemory');
    const fwd = await call('forward', { tokens: TOKENS });
    const gen = await call('generate', { prompt: PROMPT, options: { max_tokens: N, temperature: 0 } });
    return {
      backend: backend.kind, modelBackend: model.backend, bytes: model.bytes, marks,
      rows: fwd.rows, vocab: fwd.vocab, logits: Array.from(fwd.logits), text: gen.text,
    };
  } finally {
    worker.terminate();
  }
}, { wholeFiles, webgpu, TOKENS, PROMPT, N });

for (const webgpu of [true, false]) {
  const label = webgpu ? 'WebGPU' : 'CPU fallback';
  test(`${label}: the stored default model streams tensor by tensor: same logits and text, less wasm memory`, { timeout: 300_000 }, async () => {
    const browser = await launchBrowser({ webgpu });
    try {
      // The page stores the default model on its first visit.
      const { page, log } = await openPage(browser, server.url);
      const r = await pageResult(page);
      assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
      const streamed = await loadInFreshWorker(page, { wholeFiles: false, webgpu });
      const whole = await loadInFreshWorker(page, { wholeFiles: true, webgpu });
      for (const [name, x] of [['streamed', streamed], ['whole files', whole]]) {
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
    } finally {
      await browser.close();
    }
  });
}
