// (e) Generation on the page (ISSUE 3, item 6): the Generate panel streams tokens from the
// loaded model, on WebGPU and on the CPU fallback.
//   - Greedy generation of 24 tokens from ids 1,5,17 equals `bitlora generate --tokens 1,5,17
//     --max-tokens 24` exactly, on both backends (a flipped near-tie is reported with its step
//     and margin, and still fails).
//   - Streaming is real: every token reaches the page as its own DOM update, while the panel is
//     still generating, and the first one shows before the worker has made the last one.
//   - Stop ends a generation early and keeps what was made.

import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchBrowser, openPage, pageResult, generateOnPage, nativeGenerate, assertSameTokens, assertStreamed,
  screenshots, GEN_PROMPT, GEN_TOKENS,
} from './helpers.mjs';

/** Longest main-thread task allowed during generation (see its use): 5x the long-task line. */
const MAIN_THREAD_TASK_BOUND_MS = 250;

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

const BACKENDS = [
  { name: 'WebGPU', kind: 'webgpu', webgpu: true },
  { name: 'CPU fallback', kind: 'cpu', webgpu: false },
];

for (const b of BACKENDS) {
  describe(`generate on ${b.name}`, () => {
    let browser, page, context, log, native;
    before(async () => {
      native = nativeGenerate(GEN_PROMPT, GEN_TOKENS);
      browser = await launchBrowser({ webgpu: b.webgpu });
      ({ page, context, log } = await openPage(browser, `${server.url}?model=tiny`));
      const r = await pageResult(page);
      assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
      assert.equal(r.backend, b.kind, `expected ${b.kind}, got ${r.backendInfo?.label}: ${r.backendInfo?.fallbackReason}`);
    });
    after(async () => {
      await context?.close();
      await browser?.close();
    });

    test(`${b.name}: greedy 24 tokens from 1,5,17 equal bitlora generate, streamed token by token`, { timeout: 180_000 }, async () => {
      const run = await generateOnPage(page, {
        prompt: GEN_PROMPT.join(','),
        options: { 'max-tokens': GEN_TOKENS, temperature: 0, 'top-k': 0, 'top-p': 1, 'repetition-penalty': 1, seed: 0 },
        log,
      });
      assert.equal(run.gen.state, 'done', `${run.error}\n${log.join('\n')}`);
      const r = run.gen.result;
      assert.equal(r.backend, b.kind, `generation ran on ${r.backend}`);
      assert.deepEqual(r.promptTokens, GEN_PROMPT);
      assert.deepEqual(run.gen.tokens, r.tokens, 'streamed tokens differ from the final result');
      console.log(`${b.name} page:  ${r.tokens.join(' ')}`);
      console.log(`native CLI:      ${native.join(' ')}`);
      assertSameTokens(r.tokens, native, GEN_PROMPT, `${b.name} vs bitlora generate`);
      assert.equal(r.stoppedBy, 'max_tokens');
      // What a person sees: the ids, the progress bar full, the speed.
      assert.equal(await page.textContent('#gen-text'), native.join(' '));
      assert.equal(await page.getAttribute('#gen-progress', 'max'), String(GEN_TOKENS));
      assert.equal(await page.evaluate(() => document.getElementById('gen-progress').value), GEN_TOKENS);
      assert.match(run.stats, new RegExp(`^24 tokens in .* on ${b.kind === 'webgpu' ? 'WebGPU' : 'the CPU'} · \\d+(\\.\\d)? tokens/s`));
      console.log(`${b.name}: ${run.stats}`);
      assertStreamed(run, b.name, { overlap: b.kind === 'webgpu' });
      // The model runs in the worker, never on the page's own thread: that thread fetched no
      // wasm, and its work per token is the one DOM update assertStreamed counted above.
      assert.deepEqual(run.mainThreadWasm, [], 'the page\'s main thread loaded the wasm itself');
      // And no main-thread task was long enough to make the page stutter. The page's own work
      // per token is a few ms, but on a loaded machine (CI sharing 2 cores with builds) a task
      // is stretched by the time the thread waits for a core: one took 60 ms there. The bound
      // has a 5x margin over the 50 ms "long task" line; what it still catches is the model
      // (or anything per token that grows with the text) on the main thread.
      console.log(`${b.name}: main-thread tasks over 50 ms during generation: [${run.longTasks.join(', ')}] ms`);
      assert.ok(run.longTasks.every((ms) => ms <= MAIN_THREAD_TASK_BOUND_MS),
        `main-thread tasks over ${MAIN_THREAD_TASK_BOUND_MS} ms during generation: ${run.longTasks.join(', ')} ms`);
    });

    test(`${b.name}: Stop ends generation early and keeps the tokens made so far`, { timeout: 180_000 }, async () => {
      const max = 200;
      const full = nativeGenerate(GEN_PROMPT, max);
      const run = await generateOnPage(page, {
        prompt: GEN_PROMPT.join(','), options: { 'max-tokens': max }, log,
        // WebGPU (SwiftShader) makes a token every few tens of ms: a real Playwright click once
        // 3 tokens show. The tiny model on the CPU makes one in about a millisecond, faster than
        // a round trip from the test, so the page clicks Stop itself when 3 tokens show.
        ...(b.kind === 'webgpu'
          ? { onStart: async (p) => { await p.waitForFunction(() => window.__bitlora.generation.tokens.length >= 3); await p.click('#stop'); } }
          : { stopAfter: 3 }),
      });
      assert.equal(run.gen.state, 'done', `${run.error}\n${log.join('\n')}`);
      const r = run.gen.result;
      console.log(`${b.name}: Stop after ${b.kind === 'webgpu' ? 'a click at >= 3 tokens' : `${run.tokensAtStop} tokens shown`}: ` +
        `generation ended with ${r.tokens.length} of ${max} tokens (${r.stoppedBy}); ${run.stats}`);
      assert.equal(r.stoppedBy, 'stop');
      // Stop, clicked when 3 tokens showed, ended generation well before max: so the tokens
      // reached the page while the worker was still making more (streaming, also on the CPU).
      assert.ok(r.tokens.length >= 3 && r.tokens.length < max, `${r.tokens.length} tokens`);
      assert.deepEqual(r.tokens, full.slice(0, r.tokens.length), 'the tokens before Stop are not the greedy prefix');
      assert.equal(await page.textContent('#gen-text'), r.tokens.join(' '));
      assert.match(run.stats, /stopped$/);
      assert.equal(await page.isDisabled('#stop'), true);
      assert.equal(await page.isEnabled('#generate-btn'), true);
      // The panel works again after a Stop.
      const again = await generateOnPage(page, { options: { 'max-tokens': 5 }, log });
      assert.deepEqual(again.gen.result.tokens, full.slice(0, 5));
    });
  });
}

test('generate: screenshots at 1280x800 and 390x844 (WebGPU, after a generation)', { timeout: 180_000 }, async () => {
  const browser = await launchBrowser({ webgpu: true });
  try {
    await screenshots(browser, `${server.url}?model=tiny`, 'generate', async (p) => {
      await generateOnPage(p, { prompt: GEN_PROMPT.join(','), options: { 'max-tokens': GEN_TOKENS } });
    });
  } finally {
    await browser.close();
  }
});

test('generate: a token mismatch is reported with its step and the native margin there', () => {
  // The check itself, fed a page result that differs at step 5: it must fail, and say where and
  // by how much, so a flipped near-tie on some adapter can be told from a real bug.
  const native = nativeGenerate(GEN_PROMPT, GEN_TOKENS);
  const page = [...native];
  page[5] = (page[5] + 1) % 509;
  assert.throws(() => assertSameTokens(page, native, GEN_PROMPT, 'self-check'),
    (e) => {
      console.log(`self-check message: ${e.message.split('\n')[0]}`);
      return /first difference at step 5: page chose \d+ \(native logit -?\d/.test(e.message) &&
        /margin \d\.\d+e[-+]\d+/.test(e.message) && /near-tie|real mismatch/.test(e.message);
    });
});
