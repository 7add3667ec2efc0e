// (f) Text generation: the tiny model picked together with a tokenizer.json (hand-written
// WordLevel JSON of 509 tokens, helpers.tinyTokenizer) and a tokenizer_config.json with a chat
// template. The page then takes text, streams text piece by piece (core's TextStream), and
// agrees with `bitlora generate --prompt` on the same folder, with and without --chat.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  startServer, launchBrowser, openPage, pageResult, waitSettled, generateOnPage, nativeGenerate,
  nativeGenerateText, assertSameTokens, assertStreamed, screenshots, tinyTokenizer, tinyTokenizerConfig,
  word, CHAT, TINY_MODEL, GEN_TOKENS,
} from './helpers.mjs';

let server, browser, page, log, dir, files;

before(async () => {
  // A model folder as Hugging Face ships it: config, weights, tokenizer, tokenizer config.
  dir = mkdtempSync(path.join(os.tmpdir(), 'bitlora-tokenizer-'));
  for (const f of ['config.json', 'model.safetensors']) copyFileSync(path.join(TINY_MODEL, f), path.join(dir, f));
  writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(tinyTokenizer()));
  writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(tinyTokenizerConfig()));
  files = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'].map((f) => path.join(dir, f));

  server = await startServer();
  browser = await launchBrowser({ webgpu: true });
  ({ page, log } = await openPage(browser, `${server.url}?model=tiny`));
  await page.evaluate(() => { document.body.dataset.state = 'test-pending'; });
  await page.setInputFiles('#files', files);
  await waitSettled(page, log);
  const r = await pageResult(page);
  assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
});
after(async () => {
  await browser?.close();
  await server?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const PROMPT = `${word(5)} ${word(17)}`; // encodes to <s> 5 17 = 1,5,17

test('text: the picker takes tokenizer.json and tokenizer_config.json; the panel switches to text', async () => {
  const r = await pageResult(page);
  assert.equal(r.model.tokenizer, 'tokenizer.json');
  assert.equal(r.model.tokenizerVocabSize, 509);
  assert.equal(r.model.chatTemplate, true);
  assert.match(await page.textContent('#model-label'), /tokenizer tokenizer\.json \(509 tokens\), chat template/);
  assert.equal(await page.textContent('#prompt-label'), 'Prompt');
  assert.equal(await page.isEnabled('#chat'), true);
  assert.equal(await page.isChecked('#chat'), true, 'chat is on by default when there is a template');
});

test('text: a plain prompt streams text, equal to bitlora generate --prompt', { timeout: 180_000 }, async () => {
  const run = await generateOnPage(page, { prompt: PROMPT, chat: false, options: { 'max-tokens': GEN_TOKENS }, log });
  assert.equal(run.gen.state, 'done', `${run.error}\n${log.join('\n')}`);
  const r = run.gen.result;
  assert.equal(r.backend, 'webgpu');
  assert.deepEqual(r.promptTokens, [1, 5, 17], 'the tokenizer (with its BOS post-processor) encoded the prompt differently');
  const ids = nativeGenerate([1, 5, 17], GEN_TOKENS);
  assertSameTokens(r.tokens, ids, [1, 5, 17], 'text prompt on WebGPU vs bitlora generate');
  const expected = ids.map(word).join(' ');
  const cli = nativeGenerateText(dir, PROMPT, GEN_TOKENS);
  console.log(`page text: ${r.text}\nCLI text:  ${cli}`);
  assert.equal(cli, expected);
  assert.equal(r.text, expected);
  assert.equal(run.gen.text, expected, 'the streamed pieces do not add up to the text');
  assert.equal(await page.textContent('#gen-text'), expected);
  assertStreamed(run, 'text prompt');
  // Pieces, not ids: the first update is the first word, the next ones add " word".
  const shown = run.updates.filter((u) => u.gen === 'generating' && u.text);
  assert.equal(shown[0].text, word(ids[0]));
  assert.equal(shown[1].text, `${word(ids[0])} ${word(ids[1])}`);
});

test('text: chat wraps the prompt in the template and stops at its end of turn, equal to --chat', { timeout: 180_000 }, async () => {
  const run = await generateOnPage(page, { prompt: PROMPT, chat: true, options: { 'max-tokens': GEN_TOKENS }, log });
  assert.equal(run.gen.state, 'done', `${run.error}\n${log.join('\n')}`);
  const r = run.gen.result;
  const tok = tinyTokenizer().model.vocab;
  const prompt = [tok[CHAT.user], 5, 17, tok[CHAT.end], tok[CHAT.assistant]];
  assert.equal(r.promptText, `${CHAT.user} ${PROMPT} ${CHAT.end} ${CHAT.assistant}`);
  assert.deepEqual(r.promptTokens, prompt, 'chat template + tokenizer (no BOS: the template writes its own)');
  assert.deepEqual(r.stopTokens, [2, tok[CHAT.end]], 'EOS and the end-of-turn token stop');
  const ids = nativeGenerate(prompt, GEN_TOKENS, { args: ['--stop', String(tok[CHAT.end])] });
  assertSameTokens(r.tokens, ids, prompt, 'chat prompt on WebGPU vs bitlora generate');
  const cli = nativeGenerateText(dir, PROMPT, GEN_TOKENS, ['--chat']);
  console.log(`chat page text: ${r.text}\nchat CLI text:  ${cli}`);
  assert.equal(r.text, cli);
  assert.equal(await page.textContent('#gen-text'), cli);
});

test('text: the tokenizer works on the CPU fallback too', { timeout: 180_000 }, async () => {
  const cpu = await launchBrowser({ webgpu: false });
  try {
    const { page: p, log: l } = await openPage(cpu, `${server.url}?model=tiny`);
    await p.evaluate(() => { document.body.dataset.state = 'test-pending'; });
    await p.setInputFiles('#files', files);
    await waitSettled(p, l);
    const run = await generateOnPage(p, { prompt: PROMPT, chat: false, options: { 'max-tokens': GEN_TOKENS }, log: l });
    assert.equal(run.gen.state, 'done', `${run.error}\n${l.join('\n')}`);
    assert.equal(run.gen.result.backend, 'cpu');
    assert.equal(run.gen.result.text, nativeGenerateText(dir, PROMPT, GEN_TOKENS));
    assertStreamed(run, 'text prompt, CPU', { overlap: false });
  } finally {
    await cpu.close();
  }
});

test('text: screenshots at 1280x800 and 390x844', { timeout: 180_000 }, async () => {
  await screenshots(browser, `${server.url}?model=tiny`, 'generate-text', async (p) => {
    await p.evaluate(() => { document.body.dataset.state = 'test-pending'; });
    await p.setInputFiles('#files', files);
    await waitSettled(p);
    await generateOnPage(p, { prompt: PROMPT, chat: false, options: { 'max-tokens': GEN_TOKENS } });
  });
});
