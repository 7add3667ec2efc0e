// The fine-tuning panels' own logic, fast and without the model: index.html's markup and
// web/ui/panels.js mounted against a stub client (the shape of web/bitlora.d.ts) whose memory
// estimate can be told not to fit. Covers what the real model cannot show on a test machine:
// settings that do not fit the device (Start refused, the reason shown), and each bad setting
// named at its field. Served under the page's CSP; ui.test.mjs runs the real thing end to end.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { startServer, launchBrowser, REPO } from './helpers.mjs';

const CSP = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self'; " +
  "style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

// A stub of the Bitlora client: data is "tokenized" as 4 bytes a token, the memory estimate
// grows with rank x context and fits below GiB 1 unless the test says otherwise.
const STUB = `
const GiB = 2 ** 30;
export const calls = [];
export const client = {
  backend: { kind: 'cpu', training: 'cpu', label: 'CPU (SIMD128)' },
  model: { key: 'bundled:default', name: 'stub model', tokenizer: 'tokenizer.json', chatTemplate: false, maxPositions: 512 },
  limit: GiB,
  async prepareData(input, o) {
    calls.push(['prepareData', o]);
    const tokens = Math.ceil(input.text.length / 4);
    const seqs = Math.max(1, Math.ceil(tokens / o.context));
    const val = Math.round(seqs * o.valFraction);
    return { fileName: input.fileName, format: 'text', examples: 1, tokens, targetTokens: tokens, trainSequences: seqs - val,
      valSequences: val, trainTargetTokens: tokens, valTargetTokens: 0, truncated: 0, context: o.context,
      stepsPerEpoch: Math.ceil((seqs - val) / o.batch), bytes: input.text.length };
  },
  async estimateMemory(c) {
    calls.push(['estimateMemory', c]);
    const total = c.rank * c.context * 2 ** 20 / 4;
    const fits = total <= this.limit;
    return { backend: 'cpu', weights: 9e6, activations: total - 9e6, adapter: 1e5, total, adapterParams: c.rank * 7680, limit: this.limit,
      largestBuffer: 1e6, maxBinding: null, fits, message: fits ? null : 'Lower the rank or the context.' };
  },
  async createTrainer(o) { calls.push(['createTrainer', o]); throw new Error('stub: not training'); },
  async listRuns() { return []; },
  async listAdapters() { return []; },
  // Answers "answer N" (N counts the calls) as two streamed pieces, and records the prompt.
  generate(prompt, o) {
    calls.push(['generate', prompt, { adapter: o.adapter ?? null }]);
    const n = calls.filter((c) => c[0] === 'generate').length;
    const pieces = ['answer', ' ' + n];
    const result = (async () => {
      for (const [i, text] of pieces.entries()) {
        await new Promise((r) => setTimeout(r, 5));
        o.onToken?.({ index: i, token: 10 + i, text, ms: 1, at: performance.timeOrigin + performance.now() });
      }
      return { backend: 'cpu', adapter: o.adapter ?? null, promptTokens: [1], promptText: null, tokens: [10, 11], text: pieces.join(''),
        stoppedBy: 'stop_token', prefillMs: 1, decodeMs: 1, ms: 2, tokensPerSecond: null };
    })();
    return { result, stop() {} };
  },
};
`;

const BOOT = `
import { client, calls } from '/web/stub-client.js';
import { mountPanels } from '/web/ui/panels.js';
const state = (window.__bitlora = {});
window.__calls = calls;
window.__client = client;
const panels = mountPanels({ client: () => client, model: () => client.model, state, publish: () => {} });
window.__panels = panels;
panels.modelLoaded();
document.body.dataset.state = 'done';
`;

let server, browser, context, page;
const errors = [];
before(async () => {
  server = await startServer();
  browser = await launchBrowser({ webgpu: false });
  context = await browser.newContext({ viewport: { width: 390, height: 844 } });
  page = await context.newPage();
  page.on('pageerror', (e) => errors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  const html = readFileSync(path.join(REPO, 'index.html'), 'utf8').replace('src="web/main.js"', 'src="/web/panels-boot.js"');
  const js = (body) => (route) => route.fulfill({ status: 200, contentType: 'text/javascript', body, headers: { 'content-security-policy': CSP } });
  await page.route('**/panels-test.html', (r) => r.fulfill({ status: 200, contentType: 'text/html', body: html, headers: { 'content-security-policy': CSP } }));
  await page.route('**/web/panels-boot.js', js(BOOT));
  await page.route('**/web/stub-client.js', js(STUB));
  await page.goto(new URL('panels-test.html', server.url).href);
  await page.waitForFunction(() => document.body.dataset.state === 'done');
  await page.fill('#data-text', 'Some plain text to train on. '.repeat(200));
  await page.waitForFunction(() => document.body.dataset.data === 'ok');
  await page.evaluate(() => { document.getElementById('train-settings').open = true; });
});
after(async () => {
  await context?.close();
  await browser?.close();
  await server?.stop();
});

const memLine = () => page.evaluate(() => {
  const el = document.getElementById('mem-estimate');
  return { text: el.textContent, cls: el.className, start: document.getElementById('train-start').disabled, title: document.getElementById('train-start').title };
});

test('panels: presets fill every field; editing one selects Custom', async () => {
  await page.check('#train-form input[name="preset"][value="balanced"]');
  assert.equal(await page.inputValue('#train-rank'), '8');
  assert.equal(await page.inputValue('#train-length'), '150');
  assert.equal(await page.inputValue('#train-context'), '128');
  const targets = await page.$$eval('#train-form input[name="target"]:checked', (l) => l.map((i) => i.value));
  assert.deepEqual(targets, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
  assert.match(await page.textContent('#preset-hint'), /^Rank 8 on q, k, v, o, gate, up, down · 150 steps of 4 × 128 tokens · learning rate 1e-3 · about /);
  await page.fill('#train-rank', '12');
  assert.equal(await page.isChecked('#train-form input[name="preset"][value="custom"]'), true);
  await page.check('#train-form input[name="preset"][value="quick"]');
  assert.equal(await page.inputValue('#train-rank'), '4');
  // The data's sequence counts follow the context (the data panel asks again).
  await page.waitForFunction(() => /up to 64 tokens each/.test(document.getElementById('data-summary').textContent));
});

test('panels: settings that do not fit the device are refused before start, with the reason', async () => {
  await page.waitForFunction(() => /fits\.$/.test(document.getElementById('mem-estimate').textContent));
  let m = await memLine();
  assert.equal(m.cls, 'summary ok');
  assert.equal(m.start, false);
  await page.fill('#train-rank', '256');
  await page.fill('#train-context', '256');
  await page.waitForFunction(() => /does not fit/.test(document.getElementById('mem-estimate').textContent) && document.body.dataset.data === 'ok');
  m = await memLine();
  console.log(`does not fit: ${m.text}`);
  assert.match(m.text, /^Memory: about 16\.0 GiB .*the CPU backend can use about 1\.0 GiB \(WebAssembly memory\): does not fit\. Lower the rank or the context\.$/);
  assert.equal(m.cls, 'summary bad');
  assert.equal(m.start, true, 'Start is disabled');
  assert.match(m.title, /Does not fit in memory/);
  // Back within the limit: Start is offered again.
  await page.fill('#train-rank', '4');
  await page.waitForFunction(() => /fits\.$/.test(document.getElementById('mem-estimate').textContent) && document.body.dataset.data === 'ok');
  assert.equal((await memLine()).start, false);
});

test('panels: each bad setting is named at its field', async () => {
  const cases = [
    [{ 'train-rank': '' }, /^Rank: enter a number$/, 'train-rank'],
    [{ 'train-rank': '2.5' }, /^Rank: enter a whole number \(got 2\.5\)$/, 'train-rank'],
    [{ 'train-lr': '-1' }, /^Learning rate: at least 0 \(got -1\)$/, 'train-lr'],
    [{ 'train-context': '4096' }, /^Context: at most 512 tokens, this model's context \(got 4096\)$/, 'train-context'],
    [{ 'train-length': '0' }, /^Length: at least 1 step$/, 'train-length'],
  ];
  for (const [fields, want, id] of cases) {
    for (const [f, v] of Object.entries(fields)) await page.fill(`#${f}`, v);
    await page.click('#train-start');
    await page.waitForSelector('#train-error:not([hidden])');
    const r = await page.evaluate(() => ({
      text: document.getElementById('train-error-text').textContent,
      invalid: [...document.querySelectorAll('#train-form [aria-invalid="true"]')].map((e) => e.id),
      focused: document.activeElement.id,
    }));
    assert.match(r.text, want);
    assert.deepEqual(r.invalid, [id]);
    assert.equal(r.focused, id);
    await page.check('#train-form input[name="preset"][value="quick"]'); // back to valid values
    assert.equal(await page.isHidden('#train-error'), true, 'a change clears the error');
  }
  // No layer ticked.
  for (const box of await page.$$('#train-form input[name="target"]:checked')) await box.uncheck();
  await page.click('#train-start');
  await page.waitForSelector('#train-error:not([hidden])');
  assert.match(await page.textContent('#train-error-text'), /^Layers: tick at least one layer/);
  await page.check('#train-form input[name="preset"][value="quick"]');
  // A valid start reaches the client with the form's config and the data's options.
  await page.click('#train-start');
  await page.waitForFunction(() => document.body.dataset.train === 'error');
  assert.match(await page.textContent('#train-error-text'), /^stub: not training$/);
  const created = await page.evaluate(() => window.__calls.filter((c) => c[0] === 'createTrainer').at(-1)[1]);
  assert.equal(created.rank, 4);
  assert.equal(created.steps, 60);
  assert.deepEqual(created.targets, ['q_proj', 'v_proj']);
  assert.equal(created.valFraction, 0.1);
  assert.equal(created.data.fileName, 'pasted text');
  assert.deepEqual(errors, []);
});

test('panels: "Try the demo data" fetches the Devil\'s Dictionary set from the page\'s own server', async () => {
  await page.click('#data-demo');
  await page.waitForFunction(() => document.body.dataset.data === 'ok' && window.__bitlora.data.fileName === 'devil.jsonl');
  const text = await page.inputValue('#data-text');
  const lines = text.trim().split('\n');
  assert.equal(lines.length, 893, 'all 893 training examples');
  assert.equal(typeof JSON.parse(lines[0]).completion, 'string');
  const call = (await page.evaluate(() => window.__calls)).filter((c) => c[0] === 'prepareData').at(-1);
  assert.ok(call, 'the data was checked');
  await page.click('#data-clear');
  await page.fill('#data-text', 'Some plain text to train on. '.repeat(200));
  await page.waitForFunction(() => document.body.dataset.data === 'ok');
});

test('panels: data too small for the settings is warned about at the data', async () => {
  await page.fill('#data-text', 'Three tokens only.');
  await page.waitForFunction(() => document.body.dataset.data === 'ok');
  await page.waitForSelector('#data-warning:not([hidden])');
  assert.match(await page.textContent('#data-warning'), /^Only 5 tokens to learn from: too little/);
  // Enough tokens, but 60 steps would go over them many times.
  await page.fill('#data-text', 'Some plain text to train on. '.repeat(60));
  await page.waitForFunction(() => /go over it \d+ times/.test(document.getElementById('data-warning').textContent));
  assert.match(await page.textContent('#data-warning'), /^Your data is small for these settings: 60 steps go over it \d+ times/);
  await page.fill('#data-text', 'Some plain text to train on. '.repeat(200));
  await page.waitForFunction(() => document.body.dataset.data === 'ok' && document.getElementById('data-warning').hidden);
});

test('panels: the chat is a conversation; with a chat template each answerer sees the turns before', async () => {
  // Without a template (and without adapters: the base model answers), each message on its own.
  assert.equal(await page.isChecked('#compare-form input[name="compare-mode"][value="base"]'), true);
  const send = async (text) => {
    const want = await page.evaluate(() => window.__bitlora.compare.turns + 1);
    await page.fill('#compare-prompt', text);
    await page.click('#compare-btn');
    await page.waitForFunction((n) => document.body.dataset.compare === 'done' && window.__bitlora.compare.turns === n, want, { timeout: 10_000 })
      .catch(async (e) => {
        throw new Error(`${e.message}: ${JSON.stringify(await page.evaluate(() => ({ compare: window.__bitlora.compare, state: document.body.dataset.compare,
          error: document.getElementById('compare-error').textContent })))}`);
      });
  };
  const prompts = () => page.evaluate(() => window.__calls.filter((c) => c[0] === 'generate').map((c) => c[1]));
  await send('Hello');
  assert.deepEqual((await prompts()).at(-1), { text: 'Hello', chat: false });
  assert.match(await page.textContent('#chat-empty'), /this model has no chat template/);
  // A model with a chat template: the conversation is sent as messages, the earlier turns with it.
  await page.evaluate(() => { window.__client.model.chatTemplate = true; window.__panels.modelLoaded(); });
  assert.equal(await page.isChecked('#compare-chat'), true);
  assert.equal(await page.locator('#chat-log .turn').count(), 0, 'a new model starts a new conversation');
  await send('Hi');
  await send('And then?');
  const [first, second] = (await prompts()).slice(-2);
  assert.deepEqual(first, { messages: [{ role: 'user', content: 'Hi' }] });
  const n = (await prompts()).length - 1; // the answer to "Hi" was "answer N"
  assert.deepEqual(second, { messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: `answer ${n}` }, { role: 'user', content: 'And then?' }] });
  // The log: two "You" turns and two answers, each a labelled group; the answer streamed in.
  assert.equal(await page.locator('#chat-log .turn.user[role="group"][aria-label="You"]').count(), 2);
  assert.equal(await page.locator('#chat-log .turn.assistant [data-column="base"][aria-label="Base model"]').count(), 2);
  assert.equal(await page.textContent('#chat-log .turn.assistant:last-child .text'), `answer ${n + 1}`);
  // "New conversation" forgets it.
  await page.click('#chat-clear');
  assert.equal(await page.locator('#chat-log .turn').count(), 0);
  await send('Fresh');
  assert.deepEqual((await prompts()).at(-1), { messages: [{ role: 'user', content: 'Fresh' }] });
  await page.evaluate(() => { window.__client.model.chatTemplate = false; window.__panels.modelLoaded(); });
  assert.deepEqual(errors, []);
});
