// The JavaScript API (web/bitlora.js, types in web/bitlora.d.ts) end to end, on WebGPU
// (SwiftShader) and on the CPU fallback (no adapter granted), through the example page
// web/examples/train.html (which exposes its client as window.bitlora):
// - the default model loads; prepareData detects the Devil's Dictionary JSONL, counts its tokens
//   and sequences, and names the line of a bad JSONL line; estimateMemory fits;
// - a run trains with the loss going down (mean loss of its last epoch below its first, over
//   the same sequences), pauses and resumes, checkpoints to IndexedDB every 4 steps, and a
//   generation runs while it trains;
// - the page reloads mid-run: the run is listed as interrupted at its last checkpoint and
//   resumeTrainer continues it to the end; on the CPU the losses equal, bit for bit, those of
//   the same run trained straight through;
// - the adapter is saved, exported as PEFT files (the safetensors header parses and names PEFT's
//   tensors with the model's shapes; adapter_config.json has PEFT's fields), imported back
//   (a duplicate name, a truncated file and a wrong rank are refused with clear messages), and
//   generation through it streams tokens and equals `bitlora generate --adapter` on the exported
//   files exactly, while the base model's text differs;
// - no request at all while training (the page's and the worker's request log).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { REPO, BIN, DEFAULT_MODEL, startServer, launchBrowser, gpuUrl, ARTIFACTS, waitExampleReady as waitReady } from './helpers.mjs';

// 8 examples: 6 training sequences and 2 for validation; 12 steps of one sequence = 2 epochs.
// On the CPU a step of the default model takes a few tens of ms, so the run there is 8 epochs
// (48 steps): it must still be running when the page reloads after step 5.
const DATA = readFileSync(path.join(REPO, 'data/devil/train.jsonl'), 'utf8').split('\n').slice(0, 8).join('\n');
const BASE_CONFIG = {
  context: 16, rank: 8, alpha: 16, lr: 1e-2, schedule: 'constant', batch: 1,
  valFraction: 0.25, completionOnly: true, seed: 7, checkpointEvery: 4,
};
const PROMPT = 'Define ABASEMENT.';
const GEN_TOKENS = 12;

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

/** Opens the example page and waits until its model is loaded; records every request with its time. */
async function openExample(context, log, requests) {
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => log.push(`[worker console.${m.type()}] ${m.text()}`)));
  page.on('request', (r) => requests.push({ url: r.url(), t: Date.now() }));
  await page.goto(gpuUrl(context.browser(), `${server.url}web/examples/train.html`));
  await waitReady(page, log);
  return page;
}

/** `promise`, or a failure naming `what` (with the page's log) after `ms`: page.evaluate has no timeout. */
function within(ms, what, promise, log) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms / 1000} s\n${log.slice(-40).join('\n')}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Parses a safetensors file: its JSON header and the data length. */
function parseSafetensors(bytes) {
  const n = Number(bytes.readBigUInt64LE(0));
  assert.ok(n > 2 && 8 + n <= bytes.length, `header length ${n} for a file of ${bytes.length} bytes`);
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
  return { header, dataBytes: bytes.length - 8 - n };
}

for (const webgpu of [true, false]) {
  const label = webgpu ? 'WebGPU' : 'CPU fallback';
  const backend = webgpu ? 'webgpu' : 'cpu';
  const STEPS = webgpu ? 12 : 48;
  const CONFIG = { ...BASE_CONFIG, steps: STEPS, evalEvery: STEPS / 2 };
  test(`API on ${label}: prepare data, train with pause/resume, reload and resume, adapters out and in, generate`, { timeout: 900_000 }, async () => {
    const browser = await launchBrowser({ webgpu });
    const log = [];
    const requests = [];
    const fail = (msg) => `${msg}\n${log.slice(-40).join('\n')}`;
    try {
      const context = await browser.newContext();
      let page = await openExample(context, log, requests);
      const info = await page.evaluate(() => ({ backend: window.bitlora.backend, model: window.bitlora.model }));
      assert.equal(info.backend.kind, backend, info.backend.fallbackReason ?? '');
      assert.equal(info.backend.training, backend);
      assert.equal(info.model.key, 'bundled:default');
      console.log(`${label}: ${info.backend.label}; model ${info.model.name} (${info.model.backend})`);

      // ---- data and memory ----
      const prep = await within(120_000, 'prepareData', page.evaluate(async ({ DATA, CONFIG }) => {
        const bl = window.bitlora;
        const summary = await bl.prepareData({ text: DATA, fileName: 'devil.jsonl' }, CONFIG);
        const bad = await bl.prepareData({ text: `${DATA.split('\n')[0]}\n{"prompt": "x", "completion": 3}\n`, fileName: 'bad.jsonl' })
          .then(() => null, (e) => ({ message: e.message, line: e.line, isError: e instanceof Error }));
        const badOption = await bl.prepareData({ text: DATA }, { context: 100000 }).then(() => null, (e) => e.message);
        // Errors carry the option at fault as `field`; whole numbers are refused when fractional.
        const fields = await Promise.all([
          bl.prepareData({ text: DATA }, { context: 100000 }),
          bl.estimateMemory({ rank: 1.5 }),
          bl.estimateMemory({ lerningRate: 1 }),
        ].map((p) => p.then(() => null, (e) => ({ message: e.message, field: e.field }))));
        const memory = await bl.estimateMemory(CONFIG);
        return { summary, bad, badOption, fields, memory };
      }, { DATA, CONFIG }), log);
      console.log(`${label}: prepareData ${JSON.stringify(prep.summary)}`);
      assert.equal(prep.summary.format, 'jsonl-prompt-completion');
      assert.equal(prep.summary.examples, 8);
      assert.equal(prep.summary.trainSequences, 6);
      assert.equal(prep.summary.valSequences, 2);
      assert.ok(prep.summary.truncated > 0 && prep.summary.targetTokens > 0 && prep.summary.tokens >= prep.summary.targetTokens);
      assert.deepEqual(prep.bad, {
        message: 'bad.jsonl: line 2: expected {"text"}, {"prompt", "completion"} or {"messages"} with string values',
        line: 2, isError: true,
      });
      assert.match(prep.badOption, /^training option `context` is 100000; the model's context is 512 positions$/);
      assert.deepEqual(prep.fields.map((f) => f.field), ['context', 'rank', 'lerningRate']);
      assert.equal(prep.fields[1].message, 'training option `rank` is 1.5; it must be a whole number of at least 1');
      assert.match(prep.fields[2].message, /^unknown training option `lerningRate`; the options are rank, alpha, /);
      console.log(`${label}: estimateMemory ${JSON.stringify(prep.memory)}`);
      assert.equal(prep.memory.fits, true);
      assert.equal(prep.memory.backend, backend);
      assert.equal(prep.memory.adapterParams, 325632);
      assert.ok(prep.memory.weights > 1e6 && prep.memory.activations > 0);
      // CPU (wasm memory): A, B, gradients, AdamW's m and v, validation's copy. WebGPU (all on the
      // GPU, from the trainer's table of buffers): A and B as the kernels bind them (1x), one
      // layer's gradients shared by the layers (1/L x), the resident optimizer's adapter,
      // gradients, m and v (4x, padded to whole rows) and the checkpoint readback (1x here: one
      // 4 MiB chunk at most, p, m and v read through it in turn), plus the pass readback of the
      // losses and the norm; that the table is what gets allocated is train-parity.test.mjs's
      // and crates/gpu/tests/memory.rs's.
      if (webgpu) {
        const p4 = 4 * prep.memory.adapterParams;
        assert.ok(prep.memory.adapter >= 6 * p4 && prep.memory.adapter < 6.3 * p4, `adapter ${prep.memory.adapter} B is not about 6.2 x ${p4}`);
      }
      else assert.equal(prep.memory.adapter, 5 * 4 * prep.memory.adapterParams);

      // ---- train: pause and resume, then reload mid-run ----
      const trainStart = Date.now();
      const first = await within(300_000, 'train until the first pause', page.evaluate(async ({ DATA, CONFIG }) => {
        const bl = window.bitlora;
        const t = await bl.createTrainer({ ...CONFIG, data: { text: DATA, fileName: 'devil.jsonl' }, name: 'api test' });
        window.__run = { id: t.runId, steps: 0, checkpoints: [], states: [] };
        t.on('progress', (p) => { window.__run.steps = p.step; });
        t.on('checkpoint', (c) => window.__run.checkpoints.push(c));
        t.on('state', (s) => window.__run.states.push(s.state));
        t.on('error', (e) => { window.__run.error = e.message; });
        // The base model's validation loss, before any step: kept with the run (initialValLoss).
        window.__run.v0 = await t.validate();
        await t.start();
        await new Promise((resolve) => { const off = t.on('progress', (p) => { if (p.step >= 2) { off(); resolve(); } }); });
        await t.pause();
        const paused = { state: t.state, step: t.step };
        await new Promise((r) => setTimeout(r, 300));
        const stepAfterWait = t.step;
        await t.resume();
        // Requests are served between training units (on WebGPU the model's buffers are shared
        // by the training step and generation: one pass at a time).
        const genDuring = await bl.generate('Define CAT.', { maxTokens: 4 }).result.then((r) => r.tokens.length, (e) => e.message);
        return { runId: t.runId, paused, stepAfterWait, genDuring, config: t.config, backend: t.backend, totalSteps: t.totalSteps, v0: window.__run.v0, initial: t.initialValLoss };
      }, { DATA, CONFIG }), log);
      console.log(`${label}: paused at step ${first.paused.step}; run on ${first.backend}`);
      assert.equal(first.backend, backend);
      assert.equal(first.totalSteps, STEPS);
      assert.equal(first.paused.state, 'paused');
      assert.ok(first.paused.step >= 2);
      assert.equal(first.stepAfterWait, first.paused.step, 'no step ran while paused');
      assert.equal(first.genDuring, 4, 'generation while training');
      // Reload while it runs, once step 5 is done (the checkpoint of step 4 is stored before step 5
      // starts). The run goes on until the page unloads: the last checkpoint may be a later one.
      try {
        await page.waitForFunction(() => window.__run.steps >= 5 || window.__run.error, null, { timeout: 300_000 });
      } catch (e) {
        throw new Error(fail(`training did not reach step 5: ${e.message}`));
      }
      const beforeReload = await page.evaluate(() => window.__run);
      assert.equal(beforeReload.error, undefined, fail(beforeReload.error));
      const stored = beforeReload.checkpoints.map((c) => c.step);
      console.log(`${label}: reloading at step ${beforeReload.steps}; checkpoints stored at steps ${stored.join(', ')}`);
      assert.ok(stored.includes(first.paused.step) && stored.includes(4), `checkpoints ${stored}`);
      assert.ok(beforeReload.checkpoints.every((c) => c.bytes > 0 && !c.error));
      assert.deepEqual(beforeReload.states.slice(0, 3), ['running', 'paused', 'running']);
      const reloadAt = Date.now();
      await page.reload();
      await waitReady(page, log);
      const resumeFrom = Date.now();

      const second = await within(300_000, 'resume after the reload and finish', page.evaluate(async ({ runId }) => {
        const bl = window.bitlora;
        const listed = (await bl.listRuns()).find((r) => r.id === runId);
        const t = await bl.resumeTrainer(runId);
        const resumedAt = t.step;
        const historyAtResume = t.history.map((p) => p.step);
        const initialValLoss = t.initialValLoss;
        await t.start();
        const done = await t.finished;
        return { listed, resumedAt, historyAtResume, initialValLoss, done, history: t.history, runs: await bl.listRuns() };
      }, { runId: first.runId }), log);
      const trainEnd = Date.now();
      console.log(`${label}: after the reload the run was ${second.listed.state} at checkpoint ${second.listed.checkpointStep}; resumed at step ${second.resumedAt}; done: ${JSON.stringify(second.done)}`);
      assert.equal(second.listed.state, 'interrupted');
      assert.equal(second.listed.name, 'api test');
      const cp = second.listed.checkpointStep;
      assert.ok(cp >= Math.max(...stored) && cp < STEPS && (cp % 4 === 0 || cp === first.paused.step), `checkpoint ${cp} (stored before the reload: ${stored})`);
      assert.equal(second.resumedAt, second.listed.checkpointStep);
      assert.deepEqual(second.historyAtResume, Array.from({ length: second.resumedAt }, (_, i) => i + 1));
      // The step-0 validation loss survived the reload, with the run and on the resumed handle.
      assert.ok(Number.isFinite(first.v0) && first.v0 > 0, `validate() at step 0 gave ${first.v0}`);
      assert.equal(first.initial, first.v0);
      assert.equal(second.listed.initialValLoss, first.v0);
      assert.equal(second.initialValLoss, first.v0);
      assert.equal(second.done.reason, 'done');
      assert.equal(second.done.step, STEPS);
      assert.equal(second.runs.find((r) => r.id === first.runId).state, 'done');
      const losses = second.history.map((p) => p.loss);
      assert.deepEqual(second.history.map((p) => p.step), Array.from({ length: STEPS }, (_, i) => i + 1));
      assert.ok(second.history.every((p) => p.backend === backend && Number.isFinite(p.loss) && p.tokensPerSec > 0 && p.eta >= 0 && Math.abs(p.lr - 1e-2) < 1e-8 && Number.isFinite(p.gradNorm)));
      const val = second.history.filter((p) => p.valLoss != null).map((p) => [p.step, p.valLoss]);
      assert.deepEqual(val.map((v) => v[0]), [STEPS / 2, STEPS], 'validation half way and at the end');
      const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
      const [epoch1, epoch2] = [mean(losses.slice(0, 6)), mean(losses.slice(-6))];
      console.log(`${label}: losses ${losses.map((l) => l.toFixed(3)).join(' ')}; epoch means ${epoch1.toFixed(3)} -> ${epoch2.toFixed(3)}; validation ${JSON.stringify(val)}`);
      assert.ok(epoch2 < epoch1 - 0.5, `the training loss did not go down: epoch means ${epoch1} -> ${epoch2}`);

      // No request at all while training (model, data and checkpoints are local): before the
      // reload, and from the resumed run's start to its end.
      const during = requests.filter((r) => (r.t >= trainStart && r.t < reloadAt) || (r.t >= resumeFrom && r.t <= trainEnd));
      assert.deepEqual(during.map((r) => r.url), [], 'requests made while training');
      const reloadFetches = requests.filter((r) => r.t >= reloadAt && r.t < resumeFrom).map((r) => r.url.replace(server.url, '/'));
      console.log(`${label}: no request while training (${requests.length} in all); the reload fetched ${reloadFetches.join(' ')}`);
      assert.ok(!reloadFetches.some((u) => /model\.safetensors/.test(u)), 'the reload fetched the model again');

      if (!webgpu) {
        // Bit-identical on the CPU: the same run trained straight through.
        const straight = await within(300_000, 'the straight run', page.evaluate(async ({ DATA, CONFIG }) => {
          const t = await window.bitlora.createTrainer({ ...CONFIG, data: { text: DATA, fileName: 'devil.jsonl' }, checkpointEvery: 0 });
          await t.start();
          await t.finished;
          const h = t.history.map((p) => [p.loss, p.valLoss ?? null, p.gradNorm]);
          await window.bitlora.deleteRun(t.runId);
          return h;
        }, { DATA, CONFIG }), log);
        assert.deepEqual(second.history.map((p) => [p.loss, p.valLoss ?? null, p.gradNorm]), straight,
          'a run resumed after a reload differs from the same run trained straight through');
        console.log(`${label}: resumed run equals the straight run bit for bit (${STEPS} losses, 2 validation losses, ${STEPS} gradient norms)`);
      }

      // ---- adapters: save, export, import, generate ----
      const ad = await within(300_000, 'adapters and generation', page.evaluate(async ({ runId, PROMPT_, N_ }) => {
        const bl = window.bitlora;
        const t = await bl.resumeTrainer(runId); // the finished run, to save its adapter
        const saved = await t.saveAdapter('devil');
        const files = await bl.exportAdapter('devil');
        const b64 = (u8) => { let s = ''; for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000)); return btoa(s); };
        const err = (p) => p.then(() => null, (e) => e.message);
        const cfg = files.find((f) => f.name === 'adapter_config.json');
        const st = files.find((f) => f.name === 'adapter_model.safetensors');
        const dup = await err(bl.importAdapter(files, 'devil'));
        const truncated = await err(bl.importAdapter([cfg, { name: st.name, bytes: st.bytes.subarray(0, 1000) }], 'broken'));
        const r4 = new TextEncoder().encode(new TextDecoder().decode(cfg.bytes).replace('"r": 8', '"r": 4'));
        const wrongRank = await err(bl.importAdapter([{ name: cfg.name, bytes: r4 }, st], 'wrong-rank'));
        const onlyOne = await err(bl.importAdapter([st], 'one-file'));
        const imported = await bl.importAdapter(files, 'devil-imported');
        const list = (await bl.listAdapters()).map((a) => a.name);
        const tokens = [];
        const g = bl.generate(PROMPT_, { adapter: 'devil-imported', maxTokens: N_, onToken: (e) => tokens.push(e.text) });
        let streamed = '';
        for await (const e of g) streamed += e.text;
        const tuned = await g.result;
        const base = await bl.generate(PROMPT_, { maxTokens: N_ }).result;
        const unknown = await err(bl.generate(PROMPT_, { adapter: 'nope' }).result);
        const badOpt = await err(bl.generate(PROMPT_, { maxToken: 3 }).result);
        await bl.deleteAdapter('devil');
        const afterDelete = (await bl.listAdapters()).map((a) => a.name);
        return {
          saved, imported, list, afterDelete, dup, truncated, wrongRank, onlyOne, unknown, badOpt,
          tuned, base, streamed, tokens,
          files: files.map((f) => ({ name: f.name, b64: b64(f.bytes) })),
        };
      }, { runId: first.runId, PROMPT_: PROMPT, N_: GEN_TOKENS }).catch((e) => { throw new Error(fail(e.message)); }), log);
      console.log(`${label}: saved adapter ${JSON.stringify(ad.saved)}`);
      assert.equal(ad.saved.name, 'devil');
      assert.equal(ad.saved.step, STEPS);
      assert.equal(ad.saved.r, 8);
      assert.deepEqual(ad.saved.model, { key: 'bundled:default', name: 'bitlora-default-12m' });
      assert.equal(ad.dup, 'an adapter named "devil" already exists; delete it or import under another name');
      console.log(`${label}: import errors:\n  ${[ad.truncated, ad.wrongRank, ad.onlyOne].join('\n  ')}`);
      assert.match(ad.truncated, /adapter_model\.safetensors: .*(truncated|not a safetensors file)/);
      assert.match(ad.wrongRank, /adapter_model\.safetensors: tensor `base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight` has shape \[8, 384\], expected \[4, 384\]/);
      assert.match(ad.onlyOne, /adapter_config\.json and adapter_model\.safetensors; got adapter_model\.safetensors/);
      assert.equal(ad.unknown, 'no adapter named "nope" in this browser');
      assert.match(ad.badOpt, /unknown generation option `maxToken`/);
      assert.deepEqual(ad.list.sort(), ['devil', 'devil-imported']);
      assert.deepEqual(ad.afterDelete, ['devil-imported']);
      assert.equal(ad.imported.source, 'imported');
      assert.equal(ad.imported.params, ad.saved.params);

      // The exported files parse as PEFT's.
      const dir = mkdtempSync(path.join(os.tmpdir(), 'bitlora-adapter-'));
      try {
        for (const f of ad.files) writeFileSync(path.join(dir, f.name), Buffer.from(f.b64, 'base64'));
        const cfg = JSON.parse(readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
        assert.equal(cfg.peft_type, 'LORA');
        assert.equal(cfg.task_type, 'CAUSAL_LM');
        assert.equal(cfg.r, 8);
        assert.equal(cfg.lora_alpha, 16);
        assert.equal(cfg.use_rslora, false);
        assert.deepEqual(cfg.target_modules, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
        assert.equal(cfg.base_model_name_or_path, 'bitlora-default-12m');
        const { header, dataBytes } = parseSafetensors(readFileSync(path.join(dir, 'adapter_model.safetensors')));
        const names = Object.keys(header).filter((k) => k !== '__metadata__');
        assert.equal(names.length, 6 * 7 * 2, 'A and B for 7 projections x 6 layers');
        let params = 0, end = 0;
        for (const n of names) {
          assert.match(n, /^base_model\.model\.model\.layers\.[0-5]\.(self_attn|mlp)\.[a-z_]+_proj\.lora_[AB]\.weight$/);
          const t = header[n];
          assert.equal(t.dtype, 'F32');
          const count = t.shape.reduce((a, b) => a * b, 1);
          assert.equal(t.data_offsets[1] - t.data_offsets[0], 4 * count, n);
          params += count;
          end = Math.max(end, t.data_offsets[1]);
        }
        assert.deepEqual(header['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'].shape, [8, 384]);
        assert.deepEqual(header['base_model.model.model.layers.5.mlp.down_proj.lora_B.weight'].shape, [384, 8]);
        assert.equal(end, dataBytes);
        assert.equal(params, ad.saved.params);
        console.log(`${label}: exported adapter: ${names.length} tensors, ${params} parameters, header parses; config ${JSON.stringify({ r: cfg.r, lora_alpha: cfg.lora_alpha, target_modules: cfg.target_modules.length })}`);

        // Generation through the imported adapter equals the CLI with the exported files.
        const native = execFileSync(BIN, ['generate', '--model', DEFAULT_MODEL, '--adapter', dir, '--prompt', PROMPT,
          '--max-tokens', String(GEN_TOKENS)], { cwd: REPO, encoding: 'utf8' }).replace(/\n$/, '');
        console.log(`${label}: with the adapter ${JSON.stringify(ad.tuned.text)} (native ${JSON.stringify(native)}); base ${JSON.stringify(ad.base.text)}`);
        assert.equal(ad.tuned.adapter, 'devil-imported');
        assert.equal(ad.tuned.backend, backend);
        assert.equal(ad.tuned.tokens.length, GEN_TOKENS);
        assert.equal(ad.tokens.length, GEN_TOKENS, 'onToken once per token');
        assert.equal(ad.streamed, ad.tuned.text, 'the async iterator streams the same text');
        assert.equal(ad.tuned.text, native, 'page generation with the adapter differs from `bitlora generate --adapter`');
        assert.equal(ad.base.adapter, null);
        assert.notEqual(ad.base.text, ad.tuned.text, 'the adapter does not change the greedy text');
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }

      // The example page's own buttons (CPU: fast enough for a 3-step run).
      if (!webgpu) {
        await page.fill('#steps', '3');
        await page.click('#train');
        await page.waitForFunction(() => ['trained', 'error'].includes(document.body.dataset.state), null, { timeout: 120_000 });
        assert.equal(await page.evaluate(() => document.body.dataset.state), 'trained', await page.textContent('#status'));
        assert.match(await page.textContent('#progress'), /step 3\/3 loss \d+\.\d+ val \d+\.\d+/);
        await page.click('#generate');
        await page.waitForFunction(() => document.getElementById('tuned').textContent.length > 10, null, { timeout: 60_000 });
        const shown = await page.evaluate(() => [document.getElementById('base').textContent, document.getElementById('tuned').textContent]);
        assert.match(shown[0], /^\[base\] /);
        assert.match(shown[1], /^\[example\] /);
        await page.screenshot({ path: path.join(ARTIFACTS, `api-example-${backend}.png`), fullPage: true });
      }
      await context.close();
    } finally {
      await browser.close();
    }
  });
}
