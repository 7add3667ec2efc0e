// (d) Bad input on the page: broken files picked in "Your own model" (and bad token ids) must
// each show a clear error that names the file and the problem, and the page must keep working:
// the previously loaded model still runs afterwards and the worker never crashes.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, unfold, pageResult, waitSettled, screenshots, generateOnPage, nativeGenerate,
  tinyTokenizer, TINY_MODEL, GEN_PROMPT,
} from './helpers.mjs';

let server, browser, page, log, tmp, baseline;

before(async () => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'bitlora-bad-input-'));
  server = await startServer();
  browser = await launchBrowser({ webgpu: true });
  ({ page, log } = await openPage(browser, `${server.url}?model=tiny`));
  baseline = await pageResult(page);
  assert.equal(baseline.state, 'done', `${baseline.error}\n${log.join('\n')}`);
});
after(async () => {
  await browser?.close();
  await server?.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

const tinyConfig = () => JSON.parse(readFileSync(path.join(TINY_MODEL, 'config.json'), 'utf8'));
const tinyWeights = () => readFileSync(path.join(TINY_MODEL, 'model.safetensors'));

/** Writes `entries` ({name: bytes}) into a fresh folder tmp/dir and returns the file paths. */
function writeFiles(dir, entries) {
  const d = path.join(tmp, dir);
  mkdirSync(d, { recursive: true });
  return Object.entries(entries).map(([name, bytes]) => {
    const p = path.join(d, name);
    writeFileSync(p, bytes);
    return p;
  });
}

/** Picks files in the page's file input and waits for the page to settle; returns its state. */
async function pick(paths) {
  await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
  await page.setInputFiles('#files', paths);
  await waitSettled(page, log);
  return pageResult(page);
}

/** After an error the page must still run the model it had: same logits as before. */
async function assertStillWorks(label) {
  await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
  await unfold(page, 'developer');
  await page.fill('#tokens', baseline.tokens.join(','));
  await page.click('#run');
  await waitSettled(page, log);
  const r = await pageResult(page);
  assert.equal(r.state, 'done', `${label}: the page no longer runs: ${r.error}\n${log.join('\n')}`);
  assert.deepEqual(r.logits, baseline.logits, `${label}: the bundled model's logits changed`);
  assert.equal(await page.isHidden('#error'), true, `${label}: the error stayed on screen after a good run`);
  assert.equal(await page.isHidden('#run-error'), true, `${label}: the error stayed on screen after a good run`);
}

// Each case: the files to pick, and what the error must say (the file's name and the problem).
const CASES = [
  {
    name: 'truncated safetensors',
    files: () => {
      const w = tinyWeights();
      return writeFiles('truncated', {
        'config.json': JSON.stringify(tinyConfig()),
        'model.safetensors': w.subarray(0, Math.floor(w.length / 2)),
      });
    },
    expect: [/model\.safetensors/, /truncated/i],
  },
  {
    name: 'not a safetensors file',
    files: () => writeFiles('not-safetensors', {
      'config.json': JSON.stringify(tinyConfig()),
      'notes.safetensors': 'These are my notes, not tensors.\n'.repeat(20),
    }),
    expect: [/notes\.safetensors/, /not a safetensors file/i],
  },
  {
    name: 'config.json missing a field',
    files: () => {
      const c = tinyConfig();
      delete c.hidden_size;
      return writeFiles('missing-field', { 'config.json': JSON.stringify(c), 'model.safetensors': tinyWeights() });
    },
    expect: [/config\.json/, /hidden_size/],
  },
  {
    name: 'unsupported model_type',
    files: () => writeFiles('gpt2', {
      'config.json': JSON.stringify({ ...tinyConfig(), model_type: 'gpt2' }),
      'model.safetensors': tinyWeights(),
    }),
    expect: [/config\.json/, /model_type/, /gpt2/],
  },
  {
    name: 'tokenizer.json bigger than the model vocabulary',
    files: () => {
      const tok = tinyTokenizer();
      for (let i = 509; i < 600; i++) tok.model.vocab[`extra${i}`] = i;
      return writeFiles('big-tokenizer', {
        'config.json': JSON.stringify(tinyConfig()), 'model.safetensors': tinyWeights(), 'tokenizer.json': JSON.stringify(tok),
      });
    },
    expect: [/tokenizer\.json/, /600 tokens/, /vocabulary .* has only 509/],
  },
  {
    name: 'tokenizer.json that is not a tokenizer',
    files: () => writeFiles('bad-tokenizer', {
      'config.json': JSON.stringify(tinyConfig()), 'model.safetensors': tinyWeights(),
      'tokenizer.json': JSON.stringify({ model: { type: 'Nonsense' } }),
    }),
    expect: [/tokenizer\.json/, /not a tokenizers JSON file/],
  },
  {
    name: 'no config.json picked',
    files: () => writeFiles('no-config', { 'model.safetensors': tinyWeights() }),
    expect: [/config\.json/, /model\.safetensors/],
  },
];

for (const c of CASES) {
  test(`bad input: ${c.name} -> clear error, page keeps working`, { timeout: 120_000 }, async () => {
    const r = await pick(c.files());
    assert.equal(r.state, 'error', `expected an error for ${c.name}, got state ${r.state}`);
    const shown = await page.textContent('#error');
    console.log(`${c.name}: ${shown.trim()}`);
    assert.equal(await page.isVisible('#error'), true);
    for (const re of c.expect) assert.match(shown, re);
    assert.doesNotMatch(shown, /unreachable|RuntimeError|panicked/i, 'a wasm trap is not a clear error');
    await assertStillWorks(c.name);
  });
}

test('bad input: token ids out of range or not numbers -> clear error, page keeps working', { timeout: 120_000 }, async () => {
  for (const [tokens, re] of [['5,17,99999', /99999.*out of range|out of range.*99999/], ['5,abc', /"abc" is not a whole number/]]) {
    await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
    await unfold(page, 'developer');
    await page.fill('#tokens', tokens);
    await page.click('#run');
    await waitSettled(page, log);
    // A token-id error shows in the Next-token panel, at the field that caused it.
    const shown = await page.textContent('#run-error');
    assert.equal(await page.isVisible('#run-error'), true);
    console.log(`tokens ${tokens}: ${shown.trim()}`);
    assert.equal((await pageResult(page)).state, 'error');
    assert.match(shown, re);
  }
  await assertStillWorks('bad tokens');
});

// Generate panel: each bad option gives an error that names it (core's SamplingOptions checks),
// marks its input, and the next good generation works.
const BAD_OPTIONS = [
  { name: 'top-p 0', options: { 'top-p': 0 }, input: 'top-p', expect: [/sampling option `top_p` is 0; it must be in \(0, 1\]/] },
  { name: 'negative temperature', options: { temperature: -1 }, input: 'temperature', expect: [/sampling option `temperature` is -1; use 0 \(greedy\) or a positive number/] },
  { name: 'repetition penalty 0', options: { 'repetition-penalty': 0 }, input: 'repetition-penalty', expect: [/`repetition_penalty` is 0; it must be positive/] },
  { name: 'fractional top-k', options: { 'top-k': 2.5 }, input: 'top-k', expect: [/`top_k` is 2\.5; it must be a whole number of at least 0/] },
  { name: 'max tokens 0', options: { 'max-tokens': 0 }, input: 'max-tokens', expect: [/`max_tokens` is 0; it must be a whole number of at least 1/] },
  { name: 'max tokens beyond the context', options: { 'max-tokens': 300 }, input: 'max-tokens', expect: [/sampling option `max_tokens` is 300; with the prompt's 3 tokens that exceeds the model's context of 256 positions: use at most 253/] },
  { name: 'empty max tokens', options: { 'max-tokens': '' }, input: 'max-tokens', expect: [/Max tokens: enter a number/] },
  { name: 'prompt token out of range', prompt: '1,5,999', input: 'prompt', expect: [/token id 999 at position 2 is out of range: the vocabulary has 509 tokens/] },
  { name: 'prompt not ids', prompt: '1, five', input: 'prompt', expect: [/Prompt: "five" is not a whole number/] },
];
const GOOD = { 'max-tokens': 5, temperature: 0, 'top-k': 0, 'top-p': 1, 'repetition-penalty': 1, seed: 0 };

for (const c of BAD_OPTIONS) {
  test(`bad input: generate with ${c.name} -> clear error, the next generation works`, { timeout: 120_000 }, async () => {
    const run = await generateOnPage(page, { prompt: c.prompt ?? GEN_PROMPT.join(','), options: { ...GOOD, ...c.options }, log });
    assert.equal(run.gen.state, 'error', `expected an error for ${c.name}, got ${run.gen.state}`);
    console.log(`${c.name}: ${run.error}`);
    for (const re of c.expect) assert.match(run.error, re);
    assert.doesNotMatch(run.error, /unreachable|RuntimeError|panicked/i);
    assert.equal(await page.getAttribute(`#${c.input}`, 'aria-invalid'), 'true', `#${c.input} not marked invalid`);
    const good = await generateOnPage(page, { prompt: GEN_PROMPT.join(','), options: GOOD, log });
    assert.equal(good.gen.state, 'done', good.error);
    assert.deepEqual(good.gen.result.tokens, nativeGenerate(GEN_PROMPT, 5));
    assert.equal(await page.isHidden('#gen-error'), true, 'the error stayed on screen after a good run');
    assert.equal(await page.getAttribute(`#${c.input}`, 'aria-invalid'), null);
  });
}

test('bad input: nothing crashed along the way', () => {
  const crashes = log.filter((l) => /panicked|RuntimeError|unreachable|pageerror|worker restarted/i.test(l));
  assert.deepEqual(crashes, []);
});

test('bad input: screenshots of an error at 1280x800 and 390x844', { timeout: 180_000 }, async () => {
  const gpt2 = CASES.find((c) => c.name === 'unsupported model_type').files();
  await screenshots(browser, `${server.url}?model=tiny`, 'bad-input', async (p) => {
    await p.evaluate(() => { document.body.dataset.state = 'test-pending'; });
    await p.setInputFiles('#files', gpt2);
    await waitSettled(p);
    await generateOnPage(p, { options: { 'top-p': 0 } });
  });
});
