// (a) WebGPU: with --enable-unsafe-webgpu headless Chromium grants a SwiftShader adapter; the page
// must run the bundled model on it and agree with the native CPU reference. No adapter is a
// failure, not a skip: a skipped GPU test is a bug (CONVENTIONS.md 11).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchBrowser, openPage, pageResult, nativeLogits, assertLogitsClose, argmax,
  screenshots, TOLERANCE, DEFAULT_TOKENS,
} from './helpers.mjs';

let server, browser, native;
before(async () => {
  native = nativeLogits(DEFAULT_TOKENS);
  server = await startServer();
  browser = await launchBrowser({ webgpu: true });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

test('WebGPU: page runs on a WebGPU adapter and matches the native CPU reference', { timeout: 180_000 }, async () => {
  const { page, context, log } = await openPage(browser, `${server.url}?model=tiny`);
  const r = await pageResult(page);
  assert.equal(r.state, 'done', `page ended in state ${r.state}: ${r.error}\n${log.join('\n')}`);
  assert.equal(r.backend, 'webgpu',
    `no WebGPU adapter: the page fell back to ${r.backendInfo?.label} because: ${r.backendInfo?.fallbackReason}`);
  const a = r.backendInfo.adapter;
  console.log(`WebGPU adapter: ${a.name} (backend ${a.backend}, ${a.device_type}, ` +
    `maxStorageBufferBindingSize ${a.max_storage_buffer_binding_size}, features [${a.features.join(', ')}])`);
  assert.match(await page.textContent('#backend-label'), /^WebGPU: /);
  assert.equal(r.ranOn, 'webgpu', `the model was loaded but ran on ${r.ranOn}: ${r.model?.note}`);
  assert.deepEqual(r.tokens, DEFAULT_TOKENS);

  assertLogitsClose(r.logits, native, TOLERANCE.WEBGPU, 'WebGPU page vs native CPU');
  for (let t = 0; t < native.length; t++) {
    assert.equal(argmax(r.logits[t]), argmax(native[t]), `top-1 differs at position ${t}`);
  }
  assert.equal(r.top[0].token, argmax(native.at(-1)), 'the page\'s top next token is not the native top-1');
  console.log(`WebGPU forward pass: ${r.ms.toFixed(1)} ms, top-1 token ${r.top[0].token} (p=${r.top[0].prob.toFixed(4)})`);
  await context.close();
});

test('WebGPU: screenshots at 1280x800 and 390x844', { timeout: 180_000 }, async () => {
  await screenshots(browser, `${server.url}?model=tiny`, 'webgpu');
});
