// Faults while training in the browser (issue 15 item 5), each end to end through the JS API
// (web/examples/train.html's client, window.bitlora) on WebGPU (SwiftShader) and on the CPU
// fallback, with the default model and a few steps of 16 tokens:
// - the tab closed while training, and while a checkpoint is being written (the worker's
//   IndexedDB transaction held open, as a slow disk would, when the tab goes): the next visit
//   lists the run as interrupted at its last complete checkpoint, whose bytes are whole, and
//   resumes and finishes it from there;
// - (CPU fallback) the storage quota exhausted while checkpointing (each checkpoint transaction aborted with a
//   QuotaExceededError, injected into the worker's IndexedDB as Chromium reports it at commit):
//   the checkpoint event says "browser storage is full: ...", training goes on, the stored
//   checkpoint and the run's record stay those of the last good one, byte for byte, and once
//   there is room again the next checkpoint is stored;
// - the WebGPU device lost mid-run (Session.debugLoseGpu: GPUDevice.destroy(), as a driver
//   reset would): the run continues from its last checkpoint on a new WebGPU device, or on the
//   CPU when the browser grants none, the 'recovered' event tells why, and the run finishes;
//   on the CPU fallback there is no device to lose and the hook says so;
// - a learning rate of 1e30 (the loss goes non-finite): the steps are reported as skipped with
//   the reason, every number in the stored checkpoint and the saved adapter is finite, and the
//   run can be resumed from it.
// No test waits on a clock: each waits for the page's events.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { REPO, startServer, launchBrowser, gpuUrl, waitExampleReady } from './helpers.mjs';

// 8 examples: 6 training sequences and 2 for validation (unused: evalEvery 0).
const DATA = readFileSync(path.join(REPO, 'data/devil/train.jsonl'), 'utf8').split('\n').slice(0, 8).join('\n');
// Three steps, a checkpoint after each: a step on SwiftShader takes seconds, so few of them.
const CONFIG = {
  steps: 3, context: 16, rank: 4, alpha: 8, lr: 1e-2, schedule: 'constant', batch: 1, evalEvery: 0,
  valFraction: 0.25, completionOnly: true, seed: 11, checkpointEvery: 1,
};

let server;
const browsers = {};
before(async () => {
  server = await startServer();
});
after(async () => {
  for (const b of Object.values(browsers)) await b.close();
  await server?.stop();
});

/** The shared browser of a backend: WebGPU (SwiftShader, ?backend=webgpu) or none granted. */
async function browserFor(webgpu) {
  const key = webgpu ? 'webgpu' : 'cpu';
  browsers[key] ??= await launchBrowser({ webgpu });
  return browsers[key];
}

/** Opens the example page in `context` and waits for its model. */
async function openExample(context, log) {
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => log.push(`[worker console.${m.type()}] ${m.text()}`)));
  await page.goto(gpuUrl(context.browser(), `${server.url}web/examples/train.html`));
  await waitExampleReady(page, log);
  return page;
}

/** The bitlora module worker of `page`. */
function bitloraWorker(page) {
  const w = page.workers().find((x) => /\/web\/worker\.js/.test(x.url()));
  assert.ok(w, `no bitlora worker among ${page.workers().map((x) => x.url())}`);
  return w;
}

/**
 * Starts a run in the page: its events are collected in window.__run (progress steps,
 * checkpoints, states, recovered, skipped reasons, error, done).
 */
async function startRun(page, config, { start = true } = {}) {
  return page.evaluate(async ({ DATA, config, start }) => {
    const t = await window.bitlora.createTrainer({ ...config, data: { text: DATA, fileName: 'devil.jsonl' }, name: 'faults' });
    window.__watch(t);
    if (start) await t.start();
    return { runId: t.runId, backend: t.backend, totalSteps: t.totalSteps };
  }, { DATA, config, start });
}

/** Defines window.__watch(trainer) in the page, which records the trainer's events. */
async function installWatch(page) {
  await page.evaluate(() => {
    window.__watch = (t) => {
      const r = (window.__run = { runId: t.runId, steps: [], ms: [], checkpoints: [], states: [], recovered: [], skipped: [], error: null, done: null });
      window.__trainer = t;
      t.on('progress', (p) => { r.steps.push(p.step); r.ms.push(Math.round(p.ms)); if (p.skipped) r.skipped.push(p.skipped); });
      t.on('checkpoint', (c) => r.checkpoints.push(c));
      t.on('state', (s) => r.states.push(s.state));
      t.on('recovered', (e) => r.recovered.push(e));
      t.on('error', (e) => { r.error = e.message; });
      t.finished.then((d) => { r.done = d; }, () => {});
    };
  });
}

/**
 * Waits until `pred(window.__run)` holds in the page (or the run failed); returns window.__run.
 * (A function with the run as a handle: the page's CSP has no 'unsafe-eval' for a string.)
 */
async function waitRun(page, log, what, pred) {
  const run = await page.evaluateHandle(() => window.__run);
  try {
    await Promise.race([
      page.waitForFunction(pred, run, { timeout: 120_000 }),
      page.waitForFunction((r) => r.error, run, { timeout: 120_000 }),
    ]);
  } catch (e) {
    throw new Error(`${what}: ${e.message}\n${JSON.stringify(await page.evaluate(() => window.__run).catch(() => null))}\n${log.slice(-40).join('\n')}`);
  }
  const r = await page.evaluate(() => window.__run);
  assert.equal(r.error, null, `${what}: the run failed: ${r.error}\n${log.slice(-40).join('\n')}`);
  return r;
}

/**
 * What IndexedDB holds for the run: its record's state and steps, and its checkpoint (step,
 * length, sha256, and whether it is a whole safetensors file with only finite F32 numbers).
 */
function readStored(page, runId) {
  return page.evaluate(async (runId) => {
    const db = await new Promise((resolve, reject) => {
      const req = indexedDB.open('bitlora-training');
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    const tx = db.transaction(['runs', 'checkpoints']);
    const rec = tx.objectStore('runs').get(runId);
    const ck = tx.objectStore('checkpoints').get(runId);
    await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error); });
    db.close();
    const c = ck.result;
    let checkpoint = null;
    if (c) {
      const bytes = c.bytes;
      const hex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, '0')).join('');
      checkpoint = { step: c.step, length: bytes.length, sha256: hex(await crypto.subtle.digest('SHA-256', bytes)), ...window.__scan(bytes) };
    }
    const r = rec.result;
    return { record: r && { state: r.state, step: r.step, checkpointStep: r.checkpointStep, bytes: r.bytes }, checkpoint };
  }, runId);
}

/**
 * Defines window.__scan(bytes) in the page: parses a safetensors file (header length, JSON
 * header, every tensor's offsets inside the data) and counts the non-finite F32 numbers.
 */
async function installScan(page) {
  await page.evaluate(() => {
    window.__scan = (bytes) => {
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const n = Number(view.getBigUint64(0, true));
      if (n < 2 || 8 + n > bytes.length) return { whole: false, why: `header length ${n} for ${bytes.length} bytes` };
      const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
      const data = 8 + n;
      let tensors = 0, floats = 0, nonFinite = 0;
      for (const [name, t] of Object.entries(header)) {
        if (name === '__metadata__') continue;
        const [start, end] = t.data_offsets;
        if (!(start <= end && data + end <= bytes.length)) return { whole: false, why: `${name}: offsets ${start}..${end} past the file` };
        tensors += 1;
        if (t.dtype !== 'F32') continue;
        const f = new Float32Array(bytes.slice(data + start, data + end).buffer);
        floats += f.length;
        for (const x of f) if (!Number.isFinite(x)) nonFinite += 1;
      }
      return { whole: true, tensors, floats, nonFinite };
    };
  });
}

async function open(context, log) {
  const page = await openExample(context, log);
  await installWatch(page);
  await installScan(page);
  return page;
}

for (const webgpu of [true, false]) {
  const label = webgpu ? 'WebGPU' : 'CPU fallback';
  const backend = webgpu ? 'webgpu' : 'cpu';

  test(`faults on ${label}: the tab closed while training and while a checkpoint is written; the next visit resumes from the last complete checkpoint`, { timeout: 300_000 }, async () => {
    const browser = await browserFor(webgpu);
    const context = await browser.newContext();
    const log = [];
    try {
      // 1. Closed while training. On the CPU (a step takes 0.04-0.1 s, so 40 of them: 8 were
      // all done before the close once the softmax tail was flushed) once the checkpoint of
      // step 1 is stored; on SwiftShader, whose first step takes a
      // minute (it compiles the training pipelines), during that step: the checkpoint the run
      // was created with (step 0) is the last complete one.
      let page = await open(context, log);
      const run = await startRun(page, { ...CONFIG, steps: webgpu ? 3 : 40 });
      assert.equal(run.backend, backend);
      let r = await waitRun(page, log, 'the run starts', webgpu ? ((r) => r.states.includes('running')) : ((r) => r.checkpoints.some((c) => c.step === 1)));
      await page.close();
      page = await open(context, log);
      let listed = (await page.evaluate(() => window.bitlora.listRuns())).find((x) => x.id === run.runId);
      let stored = await readStored(page, run.runId);
      console.log(`${label}: closed at step ${r.steps.at(-1)} (checkpoints ${r.checkpoints.map((c) => c.step)}); listed ${listed.state} at checkpoint ${listed.checkpointStep}; stored ${JSON.stringify(stored.checkpoint)}`);
      assert.equal(listed.state, 'interrupted');
      assert.ok(listed.checkpointStep >= (webgpu ? 0 : 1), `checkpoint step ${listed.checkpointStep}`);
      assert.equal(stored.checkpoint.step, listed.checkpointStep, 'the record names the stored checkpoint');
      if (listed.checkpointStep > 0) {
        // The checkpoint stored is one the page heard of, with its size; or, on a fast CPU, a
        // later one that the worker finished between the last event the test read and the
        // close (whole, as checked below): never an earlier or a half-written one.
        const heard = r.checkpoints.find((c) => c.step === listed.checkpointStep);
        if (heard) assert.equal(heard.bytes, stored.checkpoint.length, 'a checkpoint the page heard was stored');
        else assert.ok(listed.checkpointStep > Math.max(...r.checkpoints.map((c) => c.step)), `checkpoint ${listed.checkpointStep}: neither heard nor later than those heard`);
      }
      assert.equal(stored.checkpoint.whole, true, stored.checkpoint.why);
      assert.equal(stored.checkpoint.nonFinite, 0);

      // 2. Resumed, then closed while the next checkpoint's transaction is open: the worker's
      // IndexedDB write of the checkpoint is held (its transaction kept busy, so it cannot
      // commit) and the tab closes meanwhile.
      const before = stored.checkpoint;
      const resumed = await page.evaluate(async (runId) => {
        const t = await window.bitlora.resumeTrainer(runId);
        window.__watch(t);
        return { step: t.step, backend: t.backend };
      }, run.runId);
      assert.equal(resumed.step, before.step, 'resumed at the checkpoint\'s step');
      const held = new Promise((resolve) => {
        const onConsole = (m) => {
          const hit = /^faults: holding the checkpoint write of step (\d+)/.exec(m.text());
          if (hit) resolve(Number(hit[1]));
        };
        bitloraWorker(page).on('console', onConsole);
      });
      await bitloraWorker(page).evaluate(() => {
        const put = IDBObjectStore.prototype.put;
        IDBObjectStore.prototype.put = function (value, key) {
          const req = put.call(this, value, key);
          if (this.name === 'checkpoints') {
            // Requests one after another on the same transaction keep it from committing.
            const store = this;
            const spin = () => { store.count().onsuccess = spin; };
            spin();
            console.log(`faults: holding the checkpoint write of step ${value.step}`);
          }
          return req;
        };
      });
      await page.evaluate(() => window.__trainer.start());
      const heldStep = await held;
      await page.close();
      page = await open(context, log);
      listed = (await page.evaluate(() => window.bitlora.listRuns())).find((x) => x.id === run.runId);
      stored = await readStored(page, run.runId);
      console.log(`${label}: closed during the write of the checkpoint of step ${heldStep}; listed ${listed.state} at checkpoint ${listed.checkpointStep}; stored ${JSON.stringify(stored.checkpoint)}`);
      assert.ok(heldStep > before.step);
      assert.equal(listed.state, 'interrupted');
      assert.equal(listed.checkpointStep, before.step, 'the run still names the last complete checkpoint');
      assert.deepEqual(stored.checkpoint, before, 'the last complete checkpoint is there, byte for byte');

      // 3. It resumes from there and finishes.
      // (On SwiftShader only resumed: finishing would compile the pipelines a third time.)
      const last = await page.evaluate(async ({ runId, finish }) => {
        const t = await window.bitlora.resumeTrainer(runId);
        window.__watch(t);
        const step = t.step;
        if (!finish) return { step, state: t.state };
        await t.start();
        const done = await t.finished;
        return { step, done };
      }, { runId: run.runId, finish: !webgpu });
      r = await page.evaluate(() => window.__run);
      assert.equal(last.step, before.step);
      if (webgpu) {
        assert.equal(last.state, 'paused');
        console.log(`${label}: resumed at step ${last.step}; step times ${r.ms.join(', ')} ms`);
        return;
      }
      assert.equal(last.done.reason, 'done');
      assert.equal(last.done.step, run.totalSteps);
      assert.deepEqual(r.steps, Array.from({ length: run.totalSteps - before.step }, (_, i) => before.step + 1 + i), 'every step after the checkpoint, once');
      stored = await readStored(page, run.runId);
      assert.equal(stored.checkpoint.step, run.totalSteps);
      assert.equal(stored.record.state, 'done');
      console.log(`${label}: resumed at step ${last.step} and finished ${last.done.step} steps, loss ${last.done.loss}; step times ${r.ms.join(', ')} ms`);
    } finally {
      await context.close();
    }
  });

  // The quota path is the worker's IndexedDB code, the same whatever trains: it runs on the
  // CPU fallback only (on SwiftShader it took ~1.5 minutes of CI). WebGPU's checkpoints (the
  // adapter and Adam's moments read back from the GPU) are stored and resumed by the tests
  // around it.
  if (!webgpu) test(`faults on ${label}: storage full while checkpointing says so, training goes on, the previous checkpoint stays whole`, { timeout: 300_000 }, async () => {
    const browser = await browserFor(webgpu);
    const context = await browser.newContext();
    const log = [];
    try {
      const page = await open(context, log);
      // Two steps: the first one's checkpoint is refused, the second step runs after it.
      const run = await startRun(page, { ...CONFIG, steps: 2 }, { start: false });
      const good = await readStored(page, run.runId);
      const pausedAt = good.checkpoint.step;
      // Storage full: each transaction that writes a checkpoint aborts with a
      // QuotaExceededError, as Chromium's IndexedDB does at commit when the origin's quota is
      // exceeded (injected into the worker's IndexedDB: Chromium's own quota, lowered through
      // DevTools' Storage.overrideQuotaForOrigin, is checked against a figure of the space left
      // that it caches for about a minute, so it refused writes only a minute later).
      await bitloraWorker(page).evaluate(() => {
        const put = IDBObjectStore.prototype.put;
        self.__storageFull = true;
        IDBObjectStore.prototype.put = function (value, key) {
          const req = put.call(this, value, key);
          if (this.name === 'checkpoints' && self.__storageFull) {
            const tx = this.transaction;
            Object.defineProperty(tx, 'error', { value: new DOMException('The quota has been exceeded.', 'QuotaExceededError') });
            tx.abort();
          }
          return req;
        };
      });
      // Training goes on with storage full: each checkpoint it takes is refused.
      const tries = await page.evaluate(() => window.__trainer.checkpoint()).then((c) => c.error);
      assert.ok(tries, 'a checkpoint with storage full was not refused');
      await page.evaluate(() => window.__trainer.start());
      let r = await waitRun(page, log, 'the run ends with storage full', (r) => r.done);
      const after = await readStored(page, run.runId);
      const refused = r.checkpoints.filter((c) => c.error);
      console.log(`${label}: checkpoints ${r.checkpoints.map((c) => `${c.step}${c.error ? ' refused' : ''}`).join(', ')}: "${refused[0].error}"; stored checkpoint step ${after.checkpoint.step}, record at ${after.record.checkpointStep}`);
      assert.ok(refused.length >= 2);
      for (const c of refused) {
        assert.equal(c.error, 'browser storage is full: delete old training runs, adapters or models, then try again');
        assert.equal(c.bytes, 0);
      }
      assert.ok(refused.some((c) => c.step > pausedAt), 'a checkpoint while training was refused');
      assert.equal(r.done.step, run.totalSteps, 'training went on to the end');
      assert.deepEqual(after.checkpoint, good.checkpoint, 'the previous checkpoint is untouched');
      assert.equal(after.record.checkpointStep, pausedAt, 'the stored run names the checkpoint that is there');
      // Room again: the next checkpoint is stored, from the state training kept in memory.
      await bitloraWorker(page).evaluate(() => { self.__storageFull = false; });
      const ck = await page.evaluate(() => window.__trainer.checkpoint());
      assert.equal(ck.error, undefined, ck.error);
      assert.equal(ck.step, run.totalSteps);
      const final = await readStored(page, run.runId);
      assert.equal(final.checkpoint.step, run.totalSteps);
      assert.equal(final.record.checkpointStep, run.totalSteps);
      assert.equal(final.checkpoint.whole, true);
      assert.equal(final.checkpoint.nonFinite, 0);
      console.log(`${label}: with room again, the checkpoint of step ${ck.step} is stored (${ck.bytes} B)`);
    } finally {
      await context.close();
    }
  });

  test(`faults on ${label}: a GPU device lost mid-run; the run continues from its last checkpoint and says so`, { timeout: 300_000 }, async () => {
    // On the CPU fallback the browser grants WebGPU no adapter, so there is no device to lose;
    // the WebGPU browser is used with the browser refusing a new adapter after the loss, which
    // is the fallback path: the run continues on the CPU.
    const browser = await browserFor(true);
    const context = await browser.newContext();
    const log = [];
    try {
      const page = await open(context, log);
      // On a new device, lost during the first step (recovering from the run's first
      // checkpoint, step 0); the CPU one after the checkpoint of step 1. (Each device's first
      // step on SwiftShader compiles the training pipelines, a minute.)
      const run = await startRun(page, { ...CONFIG, steps: 2 });
      assert.equal(run.backend, 'webgpu');
      await waitRun(page, log, 'the run starts', webgpu ? ((r) => r.states.includes('running')) : ((r) => r.checkpoints.some((c) => c.step === 1)));
      if (!webgpu) {
        // The browser grants no adapter from now on (as on a machine whose GPU went away).
        await bitloraWorker(page).evaluate(() => { navigator.gpu.requestAdapter = async () => null; });
      }
      await page.evaluate(() => window.bitlora.request('debugLoseGpu', {}));
      let r = await waitRun(page, log, 'the recovered event', (r) => r.recovered.length > 0);
      const rec = r.recovered[0];
      const from = rec.step;
      assert.ok(from >= (webgpu ? 0 : 1) && from < run.totalSteps, `recovered from step ${from}`);
      r = await waitRun(page, log, 'the run finishes after the loss', (r) => r.done);
      const after = await page.evaluate(() => ({ backend: window.bitlora.backend, trainer: window.__trainer.backend }));
      console.log(`${label}: ${rec.message} Session now ${after.backend.label}; steps ${r.steps.join(' ')}`);
      assert.match(rec.reason, /^the WebGPU device was destroyed/);
      assert.equal(rec.backend, backend);
      assert.equal(after.trainer, backend);
      assert.equal(after.backend.kind, backend);
      if (!webgpu) assert.match(after.backend.fallbackReason, /^the WebGPU device was destroyed.*and the browser granted no new one/);
      assert.match(rec.message, new RegExp(`^The WebGPU device was destroyed.*Training continues from the checkpoint at step ${from} ` +
        `${webgpu ? 'on a new WebGPU device' : 'on the CPU'}; the steps after it run again\\.$`));
      if (from > 0) assert.ok(r.checkpoints.some((c) => c.step === from && !c.error), `recovered from step ${from}, a stored checkpoint`);
      assert.equal(r.done.step, run.totalSteps);
      // Every step after the checkpoint ran (again) after the loss.
      const afterLoss = r.steps.slice(r.steps.lastIndexOf(from + 1));
      assert.deepEqual(afterLoss, Array.from({ length: run.totalSteps - from }, (_, i) => from + 1 + i));
      const stored = await readStored(page, run.runId);
      assert.equal(stored.checkpoint.step, run.totalSteps);
      assert.equal(stored.checkpoint.nonFinite, 0);
      // The session works on: a generation after the loss.
      const gen = await page.evaluate(() => window.bitlora.generate('Define CAT.', { maxTokens: 4 }).result);
      assert.equal(gen.tokens.length, 4);
      assert.equal(gen.backend, backend);
    } finally {
      await context.close();
    }
  });

  test(`faults on ${label}: a NaN run (lr 1e30) skips its non-finite steps, says why, and never stores a NaN`, { timeout: 300_000 }, async () => {
    const browser = await browserFor(webgpu);
    const context = await browser.newContext();
    const log = [];
    try {
      const page = await open(context, log);
      if (!webgpu) {
        // The CPU fallback has no WebGPU device: the device-loss hook says so.
        const lose = await page.evaluate(() => window.bitlora.request('debugLoseGpu', {}).then(() => null, (e) => e.message));
        assert.equal(lose, 'this session has no WebGPU device to lose (it runs on the CPU)');
      }
      const run = await startRun(page, { ...CONFIG, lr: 1e30, steps: 2 });
      const r = await waitRun(page, log, 'the NaN run ends', (r) => r.done);
      const stored = await readStored(page, run.runId);
      console.log(`${label}: lr 1e30: ${r.skipped.length} of ${r.steps.length} steps skipped (${r.skipped[0]}); done ${JSON.stringify(r.done)}; stored checkpoint ${JSON.stringify(stored.checkpoint)}`);
      assert.ok(r.skipped.length > 0, 'no step was skipped');
      assert.match(r.skipped[0], /^the (loss is (NaN|inf|-inf) on training sequence \d+|gradient norm is (NaN|inf))/);
      assert.equal(stored.checkpoint.whole, true, stored.checkpoint.why);
      assert.equal(stored.checkpoint.nonFinite, 0, 'non-finite numbers in the stored checkpoint');
      // The adapter saved from it is finite too, and the run resumes from its checkpoint.
      const adapter = await page.evaluate(async (runId) => {
        await window.__trainer.saveAdapter('nan run');
        const files = await window.bitlora.exportAdapter('nan run');
        const st = files.find((f) => f.name === 'adapter_model.safetensors');
        await window.__trainer.dispose();
        const t = await window.bitlora.resumeTrainer(runId).then((x) => ({ step: x.step }), (e) => ({ error: e.message }));
        return { scan: window.__scan(st.bytes), resumed: t };
      }, run.runId);
      assert.equal(adapter.scan.nonFinite, 0, 'non-finite numbers in the saved adapter');
      assert.deepEqual(adapter.resumed, { step: run.totalSteps });
    } finally {
      await context.close();
    }
  });
}
