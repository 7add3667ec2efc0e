// GGUF in the page (issue 18): a picked .gguf (TQ2_0, TQ1_0, I2_S: the t256 fixture of
// tests/fixtures/gguf) loads through the model panel's picker, streamed tensor by tensor as
// safetensors are (Session.beginGguf / addTensor / finishLoad), and gives the same logits as the
// same model loaded from its safetensors in the page (bit for bit: the ternary part is exact and
// the rest is the same f32 maths) and as the native CLI (CPU_WASM); it is kept in the model store
// and loads from there after a reload; on WebGPU (SwiftShader) too. A malformed .gguf (bad magic,
// truncated) shows core's error on the page and the loaded model stays. An adapter exported as
// GGUF from the page (JS API exportAdapter, both targets) is byte for byte what
// `bitlora export --format gguf` writes for the same PEFT files. A .gguf picked alone (no
// tokenizer files) takes its tokenizer from tokenizer.ggml.* and its chat template from
// tokenizer.chat_template, and chats as `bitlora generate --chat` does on the same file.
// One Chromium launch (with WebGPU; the CPU pages ask for ?backend=cpu).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, pageResult, waitSettled, nativeLogits, assertLogitsClose,
  generateOnPage, nativeGenerateText, BIN, REPO, TOLERANCE, DEFAULT_TOKENS,
} from './helpers.mjs';

const T256 = path.join(REPO, 'tests/fixtures/gguf/t256');
const TYPES = ['tq2_0', 'tq1_0', 'i2_s'];
const EXACT = { name: 'EXACT', atol: 0, rtol: 0 };
const TMP = mkdtempSync(path.join(tmpdir(), 'bitlora-gguf-'));

let server, browser;
before(async () => {
  server = await startServer();
  browser = await launchBrowser({ webgpu: true });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

/** Picks `files` in the model panel and waits for the import to end; resolves to window.__bitlora. */
async function pick(page, log, files) {
  await page.evaluate(() => {
    document.body.dataset.import = 'test-pending';
    document.body.dataset.state = 'test-pending';
  });
  await page.setInputFiles('#files', files);
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.import), null, { timeout: 120_000 })
    .catch((e) => { throw new Error(`import did not end: ${e.message}\n${log.join('\n')}`); });
  await waitSettled(page, log);
  return pageResult(page);
}

test('GGUF: tq2_0, tq1_0 and i2_s load in the page with the safetensors logits (CPU), are stored, reload; bad files say why', { timeout: 300_000 }, async () => {
  const tokens = DEFAULT_TOKENS;
  const native = nativeLogits(tokens, T256);
  const { context, page, log } = await openPage(browser, `${server.url}?model=tiny&backend=cpu&tokens=${tokens.join(',')}`);
  try {
    const st = await pick(page, log, [path.join(T256, 'config.json'), path.join(T256, 'model.safetensors')]);
    assert.equal(st.state, 'done', `${st.error}\n${log.join('\n')}`);
    assert.equal(st.model.ggufArchitecture, null);
    assertLogitsClose(st.logits, native, TOLERANCE.CPU_WASM, 'page safetensors vs native');
    const stored = {};
    for (const ty of TYPES) {
      const r = await pick(page, log, [path.join(T256, `${ty}.gguf`)]);
      assert.equal(r.state, 'done', `${ty}: ${r.error}\n${log.join('\n')}`);
      assert.equal(r.backend, 'cpu');
      assert.deepEqual(r.model.files, [`${ty}.gguf`]);
      assert.ok(r.model.ggufArchitecture, `${ty}: no ggufArchitecture in ${JSON.stringify(r.model)}`);
      assert.equal(r.model.ggufConfig.hidden_size, 256);
      assert.equal(r.model.source.stored, true, r.model.source.notes.join(' '));
      assertLogitsClose(r.logits, st.logits, EXACT, `page ${ty}.gguf vs page safetensors`);
      assertLogitsClose(r.logits, native, TOLERANCE.CPU_WASM, `page ${ty}.gguf vs native safetensors`);
      stored[ty] = r.model.storeId;
    }

    // Malformed files: core's error on the page; the model loaded before stays.
    const good = readFileSync(path.join(T256, 'tq2_0.gguf'));
    const badMagic = Buffer.from(good);
    badMagic.write('GGUX', 0, 'latin1');
    const cases = [
      ['bad-magic.gguf', badMagic, /bad-magic\.gguf: not a GGUF file/],
      ['truncated.gguf', good.subarray(0, good.length - 1000), /truncated\.gguf: truncated: the data of tensor `[^`]+`/],
      ['header-cut.gguf', good.subarray(0, 40), /header-cut\.gguf: the tensor count is \d+, but the rest of the file can hold at most \d+/],
    ];
    for (const [name, bytes, re] of cases) {
      const file = path.join(TMP, name);
      writeFileSync(file, bytes);
      const r = await pick(page, log, [file]);
      assert.equal(await page.evaluate(() => document.body.dataset.import), 'error', `${name} loaded`);
      const shown = await page.textContent('body');
      assert.match(r.error ?? '', re, `${name}: ${r.error}`);
      assert.match(shown, re, `${name}: the error is not shown on the page`);
      console.log(`${name}: ${r.error}`);
      assert.deepEqual(r.model.files, ['i2_s.gguf'], `${name}: the loaded model changed`);
    }

    // Stored: after a reload each loads from the store, with the same logits.
    await page.reload();
    await waitSettled(page, log);
    for (const ty of TYPES) {
      await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
      if (!(await page.locator('#model-more').evaluate((d) => d.open))) await page.click('#model-more > summary');
      await page.click(`#models-list li[data-model-id="${stored[ty]}"] button[data-action="load"]`);
      await waitSettled(page, log);
      const r = await pageResult(page);
      assert.equal(r.state, 'done', `${ty} from the store: ${r.error}\n${log.join('\n')}`);
      assert.equal(r.model.source.from, 'store');
      assertLogitsClose(r.logits, st.logits, EXACT, `page ${ty}.gguf from the store vs page safetensors`);
    }
  } finally {
    await context.close();
  }
});

test('GGUF on WebGPU (SwiftShader): tq1_0 gives the native logits', { timeout: 300_000 }, async () => {
  const tokens = DEFAULT_TOKENS;
  const native = nativeLogits(tokens, T256);
  const { context, page, log } = await openPage(browser, `${server.url}?model=tiny&backend=webgpu&tokens=${tokens.join(',')}`);
  try {
    const r = await pick(page, log, [path.join(T256, 'tq1_0.gguf')]);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.backend, 'webgpu', `${r.model.note}\n${log.join('\n')}`);
    assertLogitsClose(r.logits, native, TOLERANCE.WEBGPU, 'page tq1_0.gguf on WebGPU vs native safetensors');
  } finally {
    await context.close();
  }
});

/** A PEFT adapter for the t256 model (r 2 on every projection), values from a fixed LCG. */
function peftAdapter() {
  const [C, KV, F, L, R] = [256, 128, 256, 2, 2];
  const shapes = { 'self_attn.q_proj': [C, C], 'self_attn.k_proj': [KV, C], 'self_attn.v_proj': [KV, C], 'self_attn.o_proj': [C, C],
    'mlp.gate_proj': [F, C], 'mlp.up_proj': [F, C], 'mlp.down_proj': [C, F] };
  let seed = 12345;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31 - 0.5) * 0.1;
  const tensors = [];
  for (let l = 0; l < L; l++) {
    for (const [m, [o, i]] of Object.entries(shapes)) {
      const pre = `base_model.model.model.layers.${l}.${m}`;
      tensors.push([`${pre}.lora_A.weight`, [R, i]], [`${pre}.lora_B.weight`, [o, R]]);
    }
  }
  const header = {};
  let offset = 0;
  for (const [name, shape] of tensors) {
    const n = shape[0] * shape[1] * 4;
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + n] };
    offset += n;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const data = new Float32Array(offset / 4).map(rand);
  const st = Buffer.alloc(8 + json.length + offset);
  st.writeBigUInt64LE(BigInt(json.length), 0);
  st.write(json, 8, 'latin1');
  Buffer.from(data.buffer).copy(st, 8 + json.length);
  const config = JSON.stringify({
    peft_type: 'LORA', r: R, lora_alpha: 4, lora_dropout: 0, bias: 'none', task_type: 'CAUSAL_LM', use_rslora: false,
    target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], base_model_name_or_path: 't256',
  });
  return { config: Buffer.from(config), weights: st };
}

test('GGUF adapter export: the page writes what `bitlora export --format gguf` writes (llama and qvac)', { timeout: 300_000 }, async () => {
  const { config, weights } = peftAdapter();
  const dir = path.join(TMP, 'adapter');
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, 'adapter_config.json'), config);
  writeFileSync(path.join(dir, 'adapter_model.safetensors'), weights);
  const model = path.join(T256, 'tq2_0.gguf');
  const { context, page, log } = await openPage(browser, `${server.url}?model=tiny&backend=cpu`);
  try {
    const out = await page.evaluate(async ({ gguf, config, weights }) => {
      const { Bitlora } = await import('/web/bitlora.js');
      const c = await Bitlora.create({ backend: 'cpu' });
      const bytes = (b64) => Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
      const info = await c.loadModel({ files: [new File([bytes(gguf)], 'tq2_0.gguf')] });
      await c.importAdapter([{ name: 'adapter_config.json', bytes: bytes(config) }, { name: 'adapter_model.safetensors', bytes: bytes(weights) }], 'g');
      const b64 = (u8) => { let s = ''; for (const x of u8) s += String.fromCharCode(x); return btoa(s); };
      const res = { arch: info.ggufArchitecture };
      for (const target of ['llama', 'qvac']) {
        const files = await c.exportAdapter('g', { format: 'gguf', target });
        res[target] = { names: files.map((f) => f.name), bytes: b64(files[0].bytes) };
      }
      try {
        await c.exportAdapter('g', { format: 'gguf', target: 'ollama' });
        res.badTarget = null;
      } catch (err) {
        res.badTarget = { message: err.message, field: err.field };
      }
      await c.deleteAdapter('g');
      return res;
    }, { gguf: readFileSync(model).toString('base64'), config: config.toString('base64'), weights: weights.toString('base64') });
    for (const target of ['llama', 'qvac']) {
      assert.deepEqual(out[target].names, [`g-${target}.gguf`]);
      const cli = path.join(TMP, `cli-${target}.gguf`);
      execFileSync(BIN, ['export', '--adapter', dir, '--model', model, '--format', 'gguf', '--target', target, '--arch', out.arch, '--out', cli], { cwd: REPO });
      const page = Buffer.from(out[target].bytes, 'base64');
      assert.equal(page.subarray(0, 4).toString('latin1'), 'GGUF');
      assert.ok(page.includes(Buffer.from('blk.1.ffn_down.weight.lora_b')), `${target}: no blk.1.ffn_down.weight.lora_b`);
      assert.ok(Buffer.compare(page, readFileSync(cli)) === 0, `${target}: the page's ${page.length} bytes differ from the CLI's ${readFileSync(cli).length}`);
      console.log(`export ${target}: page and CLI agree on all ${page.length} bytes`);
    }
    assert.notDeepEqual(out.llama.bytes, out.qvac.bytes, 'qvac must scale B');
    assert.equal(out.badTarget?.field, 'target', JSON.stringify(out.badTarget));
  } catch (err) {
    throw new Error(`${err.message}\n${log.join('\n')}`);
  } finally {
    await context.close();
  }
});

test('GGUF chat template: a .gguf picked alone chats with its tokenizer.chat_template, as `bitlora generate --chat` does', { timeout: 180_000 }, async () => {
  // A model merged to GGUF by the CLI from a folder with tokenizer.json and a
  // tokenizer_config.json with a chat template: model.gguf carries both (tokenizer.ggml.*,
  // tokenizer.chat_template). BOS/EOS 256 (<|endoftext|>), which the GGUF names by id.
  const base = path.join(TMP, 'chat-base');
  mkdirSync(base, { recursive: true });
  const formats = path.join(REPO, 'tests/fixtures/formats/master-f32-untied');
  const config = JSON.parse(readFileSync(path.join(formats, 'config.json'), 'utf8'));
  Object.assign(config, { bos_token_id: 256, eos_token_id: 256 });
  writeFileSync(path.join(base, 'config.json'), JSON.stringify(config));
  writeFileSync(path.join(base, 'model.safetensors'), readFileSync(path.join(formats, 'model.safetensors')));
  writeFileSync(path.join(base, 'tokenizer.json'), readFileSync(path.join(REPO, 'tests/fixtures/byte-tokenizer/tokenizer.json')));
  const template = '{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}';
  writeFileSync(path.join(base, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<|endoftext|>', eos_token: '<|endoftext|>', chat_template: template }));
  const merged = path.join(TMP, 'chat-merged');
  execFileSync(BIN, ['merge', '--model', base, '--adapter', path.join(REPO, 'tests/fixtures/peft-roundtrip/adapter'),
    '--out', merged, '--out-format', 'gguf', '--gguf-arch', 'bitnet-b1.58'], { cwd: REPO, stdio: 'pipe' });
  const alone = path.join(TMP, 'chat-alone');
  mkdirSync(alone, { recursive: true });
  const gguf = path.join(alone, 'chat.gguf');
  writeFileSync(gguf, readFileSync(path.join(merged, 'model.gguf')));

  const { context, page, log } = await openPage(browser, `${server.url}?model=tiny&backend=cpu`);
  try {
    const r = await pick(page, log, [gguf]);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    assert.equal(r.model.chatTemplate, true, JSON.stringify(r.model));
    assert.equal(r.model.tokenizerConfig, null);
    assert.match(r.model.tokenizer, /tokenizer\.ggml/);
    const run = await generateOnPage(page, { prompt: 'Hi there', chat: true, options: { 'max-tokens': 6 }, log });
    assert.equal(run.gen.state, 'done', `${run.error}\n${log.join('\n')}`);
    const g = run.gen.result;
    assert.equal(g.promptText, '<|endoftext|><|user|>Hi there<|endoftext|><|assistant|>');
    const cli = nativeGenerateText(gguf, 'Hi there', 6, ['--chat']);
    console.log(`GGUF chat: prompt ${JSON.stringify(g.promptText)} (${g.promptTokens.length} tokens); page ${JSON.stringify(g.text)}, CLI ${JSON.stringify(cli)}`);
    assert.equal(g.text, cli);
  } finally {
    await context.close();
  }
});
