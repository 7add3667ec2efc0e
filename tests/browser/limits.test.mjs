// A phone's WebGPU limits in the browser (issue 17, point 5): `Bitlora.create({ limits: 'phone' })`
// asks for a device with WebGPU's default limits, what Chrome on Android grants
// (maxStorageBufferBindingSize 128 MiB, maxBufferSize 256 MiB), which the device enforces.
// A model whose vocabulary x hidden tables are larger than one such binding (written by
// `bitlora random-model --config`: V = 68,000, C = 1,024, bf16 tables of 139 MB each, an
// untied head) loads, answers a forward pass, decodes greedily, trains two LoRA steps on WebGPU
// (not on the CPU fallback) and decodes through the trained adapter, on the phone device and on
// the unrestricted one (SwiftShader's own limits, 1 GiB bindings: the tables whole), each in a
// client of its own in one page:
// - the forward pass's logits are equal bit for bit (the split along V changes no sum of a logit);
// - greedy tokens, plain and with the adapter, are equal, and equal `bitlora generate` on the CPU;
// - the phone device recomputes activations in the backward (`recompute`'s default where memory
//   is short), the unrestricted one keeps them;
// - the first step's loss and gradient norm are equal bit for bit; the second step's within
//   TRAIN_STEP_SAME_KERNELS (crates/core/src/tolerance.rs, read from there): the head's backward
//   sums dX = dlogits . W chunk by chunk, so two chunks of the split add their sums where the whole
//   table sums in one run, which rounds the step's gradients differently in the last ulps
//   (crates/gpu/tests/limits.rs holds the whole run bit for bit where both devices split alike).
//   The exported adapters' normwise difference is logged.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync, rmSync, copyFileSync, statSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { REPO, BIN, startServer, launchBrowser, nativeGenerate } from './helpers.mjs';

/** The named tolerance of a training step on the same kernels, read from the Rust source that defines it. */
const TRAIN_STEP_SAME_KERNELS = Number(
  /pub const TRAIN_STEP_SAME_KERNELS: f32 = ([0-9.e-]+);/.exec(readFileSync(path.join(REPO, 'crates/core/src/tolerance.rs'), 'utf8'))?.[1]);
assert.ok(TRAIN_STEP_SAME_KERNELS > 0, 'TRAIN_STEP_SAME_KERNELS not found in crates/core/src/tolerance.rs');

const MIB = 2 ** 20;
const V = 68_000;
const C = 1_024;
const PROMPT = [1, 40, 67_999, 17, 33_000, 5];
const NEW_TOKENS = 8;
const TEXT = 'the cat sat on the mat. the dog sat on the log. '.repeat(20);
const TRAIN = {
  steps: 2, context: 16, rank: 4, alpha: 8, lr: 1e-2, schedule: 'constant', batch: 1, evalEvery: 0,
  valFraction: 0.1, seed: 3, checkpointEvery: 0,
};

let server, dir;
before(async () => {
  server = await startServer();
  dir = mkdtempSync(path.join(os.tmpdir(), 'bitlora-limits-'));
  const config = JSON.parse(readFileSync(path.join(REPO, 'web/models/tiny/config.json'), 'utf8'));
  Object.assign(config, {
    vocab_size: V, hidden_size: C, intermediate_size: 256, num_hidden_layers: 1,
    num_attention_heads: 8, num_key_value_heads: 4, head_dim: 128, max_position_embeddings: 64,
    tie_word_embeddings: false,
  });
  const configPath = path.join(dir, 'shape.json');
  writeFileSync(configPath, JSON.stringify(config));
  execFileSync(BIN, ['random-model', '--config', configPath, '--out', path.join(dir, 'model'), '--seed', '7'], { cwd: REPO });
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) {
    copyFileSync(path.join(REPO, 'tests/fixtures/byte-tokenizer', f), path.join(dir, 'model', f));
  }
});
after(async () => {
  await server?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** One client with `limits` in `page`: load, forward, decode, train, decode with the adapter. */
async function runClient(page, limits) {
  return page.evaluate(async ({ limits, PROMPT, NEW_TOKENS, TEXT, TRAIN }) => {
    const { Bitlora } = await import('/web/bitlora.js');
    const times = {};
    let t = performance.now();
    const lap = (name) => { const now = performance.now(); times[name] = Math.round(now - t); t = now; };
    const bl = await Bitlora.create({ backend: 'webgpu', limits });
    try {
      const input = /** @type {HTMLInputElement} */ (document.getElementById('limits-files'));
      const model = await bl.loadModel({ files: input.files });
      lap('load');
      const estimate = await bl.estimateMemory(TRAIN);
      const kept = await bl.estimateMemory({ ...TRAIN, recompute: false });
      const recomputed = await bl.estimateMemory({ ...TRAIN, recompute: true });
      const fwd = await bl.forward(PROMPT);
      const plain = await bl.generate({ tokens: PROMPT }, { maxTokens: NEW_TOKENS }).result;
      lap('forward + decode');
      const trainer = await bl.createTrainer({ ...TRAIN, data: { text: TEXT, fileName: 'limits.txt' }, name: `limits-${limits}` });
      const steps = [];
      trainer.on('progress', (p) => steps.push({ step: p.step, loss: p.loss, gradNorm: p.gradNorm, backend: p.backend, recompute: p.recompute }));
      await trainer.start();
      await trainer.finished;
      await trainer.saveAdapter(`limits-${limits}`);
      const exported = await bl.exportAdapter(`limits-${limits}`);
      lap('train');
      const tuned = await bl.generate({ tokens: PROMPT }, { maxTokens: NEW_TOKENS, adapter: `limits-${limits}` }).result;
      lap('decode with the adapter');
      // Kept in the page for the comparison (6 x 68,000 floats are too many to send back).
      /** @type {any} */ (window).__limits ??= {};
      /** @type {any} */ (window).__limits[limits] = fwd.logits;
      const safetensors = exported.find((f) => f.name === 'adapter_model.safetensors');
      return {
        backend: bl.backend, model: { name: model.name }, estimate, kept, recomputed,
        rows: fwd.rows, vocab: fwd.vocab, fwdBackend: fwd.backend,
        plain: plain.tokens, plainBackend: plain.backend, tuned: tuned.tokens,
        trainerBackend: trainer.backend, trainerNote: trainer.backendNote, steps,
        adapter: safetensors ? Array.from(safetensors.bytes) : null, times,
      };
    } finally {
      bl.terminate();
    }
  }, { limits, PROMPT, NEW_TOKENS, TEXT, TRAIN });
}

/** The f32 tensors of a safetensors file, by name. */
function readSafetensors(bytes) {
  const buf = Buffer.from(bytes);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    assert.equal(t.dtype, 'F32', `${name} is ${t.dtype}`);
    const [a, b] = t.data_offsets;
    const data = buf.subarray(8 + n + a, 8 + n + b);
    out[name] = new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
  }
  return out;
}

test('WebGPU with a phone\'s limits: a model over them trains and decodes as on the unrestricted device', { timeout: 900_000 }, async () => {
  const modelDir = path.join(dir, 'model');
  const bytes = statSync(path.join(modelDir, 'model.safetensors')).size;
  const table = 2 * V * C; // bf16 on the GPU (the random model's values are bf16)
  assert.ok(table > 128 * MIB, `the ${table} B table fits a phone's binding: the test would prove nothing`);
  const browser = await launchBrowser({ webgpu: true });
  const log = [];
  try {
    const page = await (await browser.newContext()).newPage();
    page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
    page.on('worker', (w) => w.on('console', (m) => log.push(`[worker console.${m.type()}] ${m.text()}`)));
    // Any page of the server's origin: the test drives the JS API itself.
    await page.goto(`${server.url}web/examples/train.css`);
    await page.evaluate(() => {
      const input = document.createElement('input');
      Object.assign(input, { type: 'file', id: 'limits-files', multiple: true });
      document.body.append(input);
    });
    await page.setInputFiles('#limits-files', ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
      .map((f) => path.join(modelDir, f)));

    const phone = await runClient(page, 'phone');
    const free = await runClient(page, 'adapter');
    for (const [name, r] of [['phone', phone], ['unrestricted', free]]) {
      console.log(`# ${name}: ${r.backend.label}, max storage binding ${r.backend.adapter?.max_storage_buffer_binding_size} B, ` +
        `max buffer ${r.backend.adapter?.max_buffer_size} B; estimate: largest buffer ${r.estimate.largestBuffer} B, ` +
        `maxBinding ${r.estimate.maxBinding}, fits ${r.estimate.fits}; times (ms) ${JSON.stringify(r.times)}`);
      assert.equal(r.backend.kind, 'webgpu', `${name}: ${r.backend.fallbackReason}`);
      assert.equal(r.fwdBackend, 'webgpu', `${name}: forward ran on ${r.fwdBackend}`);
      assert.equal(r.plainBackend, 'webgpu', `${name}: generation ran on ${r.plainBackend}`);
      assert.equal(r.trainerBackend, 'webgpu', `${name}: trained on ${r.trainerBackend} (${r.trainerNote})`);
      assert.deepEqual(r.steps.map((s) => s.backend), ['webgpu', 'webgpu'], `${name}: steps ran on ${JSON.stringify(r.steps)}`);
      assert.equal(r.rows, PROMPT.length);
      assert.equal(r.vocab, V);
    }
    // recompute (activations recomputed in the backward): by default on where memory is short, the
    // phone device, and off on the unrestricted one; the steps below are equal either way. (With
    // this one-layer model recomputing keeps as many bytes as keeping: only h is per layer.)
    for (const [name, r, on] of [['phone', phone, true], ['unrestricted', free, false]]) {
      assert.deepEqual(r.steps.map((s) => s.recompute), [on, on], `${name}: steps recomputed ${JSON.stringify(r.steps)}`);
      assert.ok(r.recomputed.activations <= r.kept.activations,
        `${name}: recomputing estimates ${r.recomputed.activations} B of activations, keeping ${r.kept.activations} B`);
      assert.deepEqual(r.estimate, on ? r.recomputed : r.kept, `${name}: the default estimate`);
    }
    assert.equal(phone.backend.adapter.max_storage_buffer_binding_size, 128 * MIB, 'the phone device\'s binding limit');
    assert.equal(phone.backend.adapter.max_buffer_size, 256 * MIB, 'the phone device\'s buffer limit');
    assert.ok(free.backend.adapter.max_storage_buffer_binding_size >= 4 * V * C,
      `the unrestricted device (${free.backend.adapter.max_storage_buffer_binding_size} B bindings) splits the table too: nothing to compare against`);

    // Logits, compared in the page.
    const same = await page.evaluate(() => {
      const { phone, adapter } = /** @type {any} */ (window).__limits;
      let differ = 0, maxAbs = 0;
      for (let i = 0; i < phone.length; i++) {
        if (Object.is(phone[i], adapter[i])) continue;
        differ += 1;
        maxAbs = Math.max(maxAbs, Math.abs(phone[i] - adapter[i]));
      }
      return { n: phone.length, differ, maxAbs };
    });
    assert.equal(same.differ, 0, `${same.differ} of ${same.n} logits differ (max abs ${same.maxAbs})`);

    // Tokens: phone == unrestricted == the CPU.
    const native = nativeGenerate(PROMPT, NEW_TOKENS, { model: modelDir });
    assert.deepEqual(phone.plain, free.plain, 'greedy tokens');
    assert.deepEqual(phone.plain, native, 'greedy tokens vs bitlora generate (CPU)');
    assert.deepEqual(phone.tuned, free.tuned, 'greedy tokens with the adapter');

    // Training steps.
    assert.equal(phone.steps[0].loss, free.steps[0].loss, 'step 1 loss');
    assert.equal(phone.steps[0].gradNorm, free.steps[0].gradNorm, 'step 1 gradient norm');
    let worst = 0;
    for (const [k, s] of phone.steps.entries()) {
      const f = free.steps[k];
      for (const [what, a, b] of [['loss', s.loss, f.loss], ['grad norm', s.gradNorm, f.gradNorm]]) {
        const rel = Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);
        worst = Math.max(worst, rel);
        assert.ok(rel <= TRAIN_STEP_SAME_KERNELS, `step ${s.step} ${what}: phone ${a} vs unrestricted ${b} (relative ${rel.toExponential(2)} > TRAIN_STEP_SAME_KERNELS ${TRAIN_STEP_SAME_KERNELS})`);
      }
    }
    // The adapters: how far apart (normwise per tensor), logged.
    const pa = readSafetensors(phone.adapter);
    const fa = readSafetensors(free.adapter);
    let adapterWorst = 0, equalTensors = 0;
    for (const [name, a] of Object.entries(pa)) {
      const b = fa[name];
      assert.ok(b && b.length === a.length, `${name} missing or of another size in the unrestricted run's adapter`);
      let err = 0, scale = 0, equal = true;
      for (let i = 0; i < a.length; i++) {
        err = Math.max(err, Math.abs(a[i] - b[i]));
        scale = Math.max(scale, Math.abs(b[i]));
        equal &&= Object.is(a[i], b[i]);
      }
      adapterWorst = Math.max(adapterWorst, err / Math.max(scale, 1e-30));
      equalTensors += Number(equal);
    }
    console.log(`# model: ${bytes} B file, bf16 tables of ${table} B (> ${128 * MIB} B), V x C = ${V} x ${C}`);
    console.log(`# logits of ${PROMPT.length} tokens: equal bit for bit (${same.n} values)`);
    console.log(`# greedy tokens ${JSON.stringify(phone.plain)} = unrestricted = bitlora generate (CPU); with the adapter ${JSON.stringify(phone.tuned)} = unrestricted`);
    console.log(`# steps: phone ${JSON.stringify(phone.steps)}; unrestricted ${JSON.stringify(free.steps)}; worst relative difference ${worst.toExponential(2)} (TRAIN_STEP_SAME_KERNELS ${TRAIN_STEP_SAME_KERNELS})`);
    console.log(`# adapters: ${equalTensors} of ${Object.keys(pa).length} tensors equal bit for bit, worst normwise difference ${adapterWorst.toExponential(2)}`);
  } catch (e) {
    e.message += `\n${log.slice(-30).join('\n')}`;
    throw e;
  } finally {
    await browser.close();
  }
});
