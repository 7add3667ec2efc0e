// (b) The CPU (SIMD128) fallback. The real one: Chromium launched WITHOUT --enable-unsafe-webgpu
// grants no WebGPU adapter, so the page must notice and run the wasm CPU backend, and say why.
// Also the forced one: ?backend=cpu in a browser that does have WebGPU. The real fallback runs
// on both wasm builds (tools/build-web.sh): the threaded one the page takes by default (it is
// cross-origin isolated) and the single-thread one (?threads=1, as where isolation is missing);
// threads.test.mjs shows the two equal bit for bit.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchBrowser, openPage, pageResult, waitSettled, nativeLogits, assertLogitsClose, argmax,
  screenshots, TOLERANCE, DEFAULT_TOKENS,
} from './helpers.mjs';

let server, native;
before(async () => {
  native = nativeLogits(DEFAULT_TOKENS);
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

function checkCpuResult(r, log, label) {
  assert.equal(r.state, 'done', `page ended in state ${r.state}: ${r.error}\n${log.join('\n')}`);
  assert.equal(r.backend, 'cpu');
  assert.match(r.backendInfo.label, /^CPU \(SIMD128, \d+ threads?\)$/, 'the wasm was not built with +simd128 (use tools/build-web.sh)');
  assert.equal(r.ranOn, 'cpu');
  assert.deepEqual(r.tokens, DEFAULT_TOKENS);
  assertLogitsClose(r.logits, native, TOLERANCE.CPU_WASM, label);
  for (let t = 0; t < native.length; t++) {
    assert.equal(argmax(r.logits[t]), argmax(native[t]), `top-1 differs at position ${t}`);
  }
  assert.equal(r.top[0].token, argmax(native.at(-1)));
}

for (const build of ['threaded', 'single-thread']) {
  test(`CPU fallback (${build} build): no WebGPU adapter granted -> CPU (SIMD128), matches the native reference`, { timeout: 180_000 }, async () => {
    const browser = await launchBrowser({ webgpu: false });
    try {
      const query = build === 'threaded' ? '?model=tiny' : '?model=tiny&threads=1';
      const { page, log } = await openPage(browser, `${server.url}${query}`);
      const r = await pageResult(page);
      console.log(`fallback reason shown on the page: ${r.backendInfo?.fallbackReason}; ${r.backendInfo?.label}`);
      checkCpuResult(r, log, `CPU fallback page (${build}) vs native CPU`);
      const threads = r.backendInfo.threads;
      if (build === 'threaded') {
        assert.ok(threads > 1, `the threaded build runs on ${threads} thread(s): ${r.backendInfo.threadsNote}\n${log.join('\n')}`);
      } else {
        assert.equal(threads, 1);
      }
      assert.equal(await page.textContent('#backend-label'), `CPU (SIMD128, ${threads} thread${threads > 1 ? 's' : ''})`);
      const details = await page.textContent('#backend-details');
      assert.match(details, /Why not WebGPU/);
      assert.match(details, build === 'threaded' ? /CPU threads\d+ \(Web Workers sharing the wasm memory\)/ : /CPU threads1 \(single-thread build: one thread was asked for/);
      // The fallback must be the real one (the browser granted no adapter), not the ?backend=cpu
      // switch nor a build without WebGPU.
      assert.match(r.backendInfo.fallbackReason, /granted no adapter|navigator\.gpu is missing/);
      console.log(`CPU forward pass: ${r.ms.toFixed(1)} ms`);
      if (build === 'threaded') await screenshots(browser, `${server.url}?model=tiny`, 'cpu-fallback');
    } finally {
      await browser.close();
    }
  });
}

test('CPU forced with ?backend=cpu in a browser that has WebGPU', { timeout: 180_000 }, async () => {
  const browser = await launchBrowser({ webgpu: true });
  try {
    const { page, log } = await openPage(browser, `${server.url}?backend=cpu&model=tiny`);
    const r = await pageResult(page);
    checkCpuResult(r, log, '?backend=cpu page vs native CPU');
    assert.match(r.backendInfo.fallbackReason, /backend=cpu/);
  } finally {
    await browser.close();
  }
});

// Issue 13: a software WebGPU adapter trained at ~4 tokens/s where the CPU path did ~200, so by
// default (no ?backend) the page passes SwiftShader over for the CPU and says why; ?backend=webgpu
// still gets the adapter (every WebGPU test here opens its pages that way).
test('a software WebGPU adapter (SwiftShader) loses to the CPU by default, and ?backend=webgpu still uses it', { timeout: 180_000 }, async () => {
  const browser = await launchBrowser({ webgpu: true });
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    const log = [];
    page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
    await page.goto(`${server.url}?model=tiny`); // no ?backend: the default choice
    await waitSettled(page, log);
    const r = await pageResult(page);
    console.log(`default choice on SwiftShader: ${r.backendInfo?.label}; ${r.backendInfo?.fallbackReason}`);
    checkCpuResult(r, log, 'default choice on a software adapter vs native CPU');
    assert.match(r.backendInfo.fallbackReason, /software renderer \(.*swiftshader.*\).*\?backend=webgpu/i);
    assert.match(await page.textContent('#backend-details'), /software renderer/);
    await context.close();

    const { page: forced } = await openPage(browser, `${server.url}?backend=webgpu&model=tiny`);
    const f = await pageResult(forced);
    assert.equal(f.backendInfo.kind, 'webgpu', f.backendInfo.fallbackReason ?? '');
    assert.match(f.backendInfo.label, /software fallback adapter/);
  } finally {
    await browser.close();
  }
});
