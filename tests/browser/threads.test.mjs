// The CPU fallback's two wasm builds (tools/build-web.sh): web/pkg-threads, where rayon runs on a
// pool of Web Workers over shared memory, and web/pkg, one thread. Chromium without WebGPU, so
// the CPU runs everything:
// - on the cross-origin isolated page (`bitlora serve` sends COOP/COEP) the worker takes the
//   threaded build with one thread per core: Bitlora.backend says how many (rayon's pool, read
//   in wasm, not what the JS asked for) and the label says it, and the blocks of a parallel loop
//   run on that many distinct threads; ?threads=1 takes the single-thread build and says why;
// - the same 8 training steps (default model, seed, data) give the same losses and gradient
//   norms bit for bit on both, then the same logits (every f32) and the same greedy tokens
//   through the trained adapter: the kernels cut their outputs into blocks of whole rows, each
//   computed by the same code whatever the thread count (crates/core/src/par.rs);
// - a page that is not cross-origin isolated (its COOP/COEP headers stripped on the way) runs
//   the single-thread build and says why.
// No skipping: a machine that reports one core fails the threaded checks (they need >1 thread).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { REPO, startServer, launchBrowser } from './helpers.mjs';

const DATA = readFileSync(path.join(REPO, 'data/devil/train.jsonl'), 'utf8').split('\n').slice(0, 16).join('\n');
const STEPS = 8;
const CONFIG = {
  steps: STEPS, context: 32, rank: 8, alpha: 16, lr: 1e-2, schedule: 'constant', batch: 2, evalEvery: 0,
  valFraction: 0.25, completionOnly: true, seed: 5, checkpointEvery: 0,
};
const PROMPT_TOKENS = [5, 17, 42, 9, 100];

let server, browser;
before(async () => {
  server = await startServer();
  browser = await launchBrowser({ webgpu: false });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

/**
 * Opens web/examples/train.html (`query`: its URL parameters) in a fresh context (empty
 * IndexedDB) and waits until the default model is loaded. `strip`: drop the COOP/COEP headers.
 */
async function openExample(query, { strip = false } = {}) {
  const context = await browser.newContext();
  const log = [];
  if (strip) {
    await context.route('**/*', async (route) => {
      const response = await route.fetch();
      const headers = { ...response.headers() };
      delete headers['cross-origin-opener-policy'];
      delete headers['cross-origin-embedder-policy'];
      await route.fulfill({ response, headers });
    });
  }
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => log.push(`[worker console.${m.type()}] ${m.text()}`)));
  await page.goto(`${server.url}web/examples/train.html${query}`);
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 180_000 });
  const state = await page.evaluate(() => document.body.dataset.state);
  assert.equal(state, 'ready', `${await page.textContent('#status')}\n${log.join('\n')}`);
  const info = await page.evaluate(() => ({
    isolated: globalThis.crossOriginIsolated,
    cores: navigator.hardwareConcurrency,
    backend: window.bitlora.backend,
  }));
  return { context, page, log, info };
}

/** Trains CONFIG on the page, saves the adapter, then logits and greedy tokens through it. */
async function trainAndGenerate(page) {
  return page.evaluate(async ({ DATA, CONFIG, PROMPT_TOKENS }) => {
    const bl = window.bitlora;
    const t = await bl.createTrainer({ ...CONFIG, data: { text: DATA, fileName: 'devil.jsonl' } });
    const steps = [];
    t.on('progress', (p) => steps.push({ step: p.step, tokens: p.tokens, loss: p.loss, gradNorm: p.gradNorm, backend: p.backend, ms: p.ms }));
    const done = new Promise((resolve, reject) => { t.on('done', resolve); t.on('error', (e) => reject(new Error(e.message))); });
    await t.start();
    await done;
    await t.saveAdapter('threads');
    const base = await bl.forward(PROMPT_TOKENS);
    const tokens = [];
    for await (const e of bl.generate({ tokens: PROMPT_TOKENS }, { maxTokens: 16, adapter: 'threads' })) tokens.push(e.token);
    return { steps, backend: t.backend, logits: Array.from(base.logits), tokens };
  }, { DATA, CONFIG, PROMPT_TOKENS });
}

test('threaded and single-thread CPU builds: the pool is used, and training, logits and generation are equal bit for bit', { timeout: 900_000 }, async () => {
  const threaded = await openExample('?backend=cpu');
  const single = await openExample('?backend=cpu&threads=1');
  try {
    const t = threaded.info, s = single.info;
    console.log(`# threaded page: crossOriginIsolated ${t.isolated}, hardwareConcurrency ${t.cores}, ${t.backend.label}`);
    console.log(`# single page: ${s.backend.label} (${s.backend.threadsNote})`);
    assert.equal(t.isolated, true, 'bitlora serve\'s page is not cross-origin isolated');
    assert.ok(t.cores > 1, `the browser reports ${t.cores} core(s): the threaded build cannot be shown to use more than one`);
    assert.equal(t.backend.kind, 'cpu');
    assert.equal(t.backend.threads, Math.min(t.cores, 8), `rayon's pool has ${t.backend.threads} threads (${t.backend.threadsNote ?? ''})\n${threaded.log.join('\n')}`);
    assert.equal(t.backend.threadsNote, null);
    assert.equal(t.backend.label, `CPU (SIMD128, ${t.backend.threads} threads)`);
    assert.equal(s.backend.threads, 1);
    assert.equal(s.backend.label, 'CPU (SIMD128, 1 thread)');
    assert.match(s.backend.threadsNote, /threads: 1/);
    // The pool really runs: one parallel loop of 256 blocks (~0.5 ms each) in wasm, and the number
    // of distinct threads that ran them (rayon's thread index; the waiting caller runs none).
    const used = await threaded.page.evaluate(() => window.bitlora.request('threadsUsed', { blocks: 256 }));
    const usedSingle = await single.page.evaluate(() => window.bitlora.request('threadsUsed', { blocks: 256 }));
    console.log(`# one parallel loop of 256 blocks ran on ${used} threads (threaded build), ${usedSingle} (single-thread build)`);
    assert.equal(used, t.backend.threads, 'threads that ran the blocks of a parallel loop');
    assert.equal(usedSingle, 1);

    // One after the other, so each has the machine's cores to itself.
    const a = await trainAndGenerate(threaded.page);
    const b = await trainAndGenerate(single.page);
    assert.equal(a.backend, 'cpu');
    assert.equal(b.backend, 'cpu');
    assert.equal(a.steps.length, STEPS);
    assert.equal(b.steps.length, STEPS);
    const rate = (r) => r.steps.slice(2).reduce((n, x) => n + x.tokens, 0) / (r.steps.slice(2).reduce((n, x) => n + x.ms, 0) / 1000);
    console.log(`# threaded: ${a.steps.map((x) => `${x.step}: loss ${x.loss}, norm ${x.gradNorm}`).join('; ')}`);
    console.log(`# single:   ${b.steps.map((x) => `${x.step}: loss ${x.loss}, norm ${x.gradNorm}`).join('; ')}`);
    console.log(`# training: ${rate(a).toFixed(1)} target tok/s on ${t.backend.threads} threads, ${rate(b).toFixed(1)} on 1 (steps 3-${STEPS})`);
    for (const [k, x] of a.steps.entries()) {
      const y = b.steps[k];
      assert.equal(x.step, y.step);
      assert.equal(x.tokens, y.tokens, `step ${x.step}: the builds trained on different sequences`);
      assert.ok(Object.is(x.loss, y.loss), `step ${x.step}: loss ${x.loss} on ${t.backend.threads} threads, ${y.loss} on 1`);
      assert.ok(Object.is(x.gradNorm, y.gradNorm), `step ${x.step}: grad norm ${x.gradNorm} on ${t.backend.threads} threads, ${y.gradNorm} on 1`);
    }
    assert.equal(a.logits.length, b.logits.length);
    let differ = 0, first = -1;
    for (let i = 0; i < a.logits.length; i++) {
      if (!Object.is(a.logits[i], b.logits[i])) { differ++; if (first < 0) first = i; }
    }
    assert.equal(differ, 0, `${differ} of ${a.logits.length} logits differ, the first at ${first}: ${a.logits[first]} vs ${b.logits[first]}`);
    console.log(`# logits: all ${a.logits.length} equal; greedy tokens through the adapter: ${a.tokens.join(',')}`);
    assert.ok(a.tokens.length > 0, 'no token generated');
    assert.deepEqual(a.tokens, b.tokens, 'greedy tokens through the trained adapter');
  } finally {
    await threaded.context.close();
    await single.context.close();
  }
});

test('a page without cross-origin isolation runs the single-thread build and says why', { timeout: 300_000 }, async () => {
  const { context, page, info } = await openExample('?backend=cpu', { strip: true });
  try {
    console.log(`# not isolated: ${info.backend.label} (${info.backend.threadsNote})`);
    assert.equal(info.isolated, false);
    assert.equal(info.backend.threads, 1);
    assert.equal(info.backend.label, 'CPU (SIMD128, 1 thread)');
    assert.match(info.backend.threadsNote, /not cross-origin isolated/);
    // It still computes: one forward pass.
    const r = await page.evaluate(() => window.bitlora.forward([5, 17, 42]));
    assert.equal(r.rows, 3);
  } finally {
    await context.close();
  }
});
