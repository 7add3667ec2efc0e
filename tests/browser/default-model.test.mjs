// The page's default model (web/models/default, bitlora-default-12m): it loads on WebGPU and on
// the CPU fallback, the model panel names it with its size, and greedy generation from a text
// prompt equals the CLI's text exactly (`bitlora generate --model web/models/default --prompt`).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchBrowser, openPage, pageResult, generateOnPage, nativeGenerateText, screenshots,
  DEFAULT_MODEL,
} from './helpers.mjs';

const PROMPT = 'The state of the Union';
const N = 20;

let server, expected;
before(async () => {
  server = await startServer();
  expected = nativeGenerateText(DEFAULT_MODEL, PROMPT, N);
  console.log(`native: ${JSON.stringify(PROMPT)} -> ${JSON.stringify(expected)}`);
});
after(async () => { await server?.stop(); });

for (const webgpu of [true, false]) {
  const label = webgpu ? 'WebGPU' : 'CPU fallback';
  test(`default model on ${label}: loads, is named with its size, greedy text equals the CLI`, { timeout: 300_000 }, async () => {
    const browser = await launchBrowser({ webgpu });
    try {
      const { page, log, requests } = await openPage(browser, server.url);
      const r = await pageResult(page);
      assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
      assert.equal(r.backend, webgpu ? 'webgpu' : 'cpu');
      assert.equal(r.model.name, 'bitlora-default-12m');
      assert.equal(r.model.backend, webgpu ? 'webgpu' : 'cpu', r.model.note ?? '');
      assert.equal(r.model.tokenizerVocabSize, 8192);
      assert.equal(await page.textContent('#model-name'), 'bitlora-default-12m');
      const size = await page.textContent('#model-size');
      assert.match(size, /^12\.6 M parameters · 8\.\d MiB · fetched from this page's server and stored in this browser$/);
      // Text prompts, since the model has a tokenizer.
      assert.equal(await page.textContent('#prompt-label'), 'Prompt');
      const run = await generateOnPage(page, { prompt: PROMPT, options: { 'max-tokens': N, temperature: 0 }, log });
      assert.equal(run.error, null, `${run.error}\n${log.join('\n')}`);
      assert.equal(run.gen.tokens.length, N);
      console.log(`${label}: page -> ${JSON.stringify(run.gen.text)}; ${run.stats}`);
      assert.equal(run.gen.text, expected, `${label}: page text differs from the CLI's`);
      assert.equal(await page.textContent('#gen-text'), expected);
      const origin = new URL(server.url).origin;
      assert.deepEqual(requests.filter((u) => !u.startsWith(origin) && !u.startsWith('data:')), [], 'requests to other origins');
      // Screenshots (both viewports, no sideways scroll) from the CPU run: each opens the
      // page and generates again, minutes on SwiftShader for the same layout.
      if (!webgpu) {
        await screenshots(browser, server.url, 'default-model', async (p) => {
          await generateOnPage(p, { prompt: PROMPT, options: { 'max-tokens': N } });
        });
      }
    } finally {
      await browser.close();
    }
  });
}
