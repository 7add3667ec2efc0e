// (c) The demo server: `bitlora serve --port 0` serves the page with the right MIME types and
// security headers, and the page fetched from it over HTTP computes and shows a result, touching
// no other origin.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { startServer, launchBrowser, openPage, pageResult, DEFAULT_TOKENS } from './helpers.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

const SECURITY = {
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-embedder-policy': 'require-corp',
  'x-content-type-options': 'nosniff',
};

test('serve: MIME types and security headers', async () => {
  for (const [file, type] of [
    ['', 'text/html; charset=utf-8'],
    ['web/main.js', 'text/javascript; charset=utf-8'],
    ['web/worker.js', 'text/javascript; charset=utf-8'],
    ['web/pkg/bitlora_web.js', 'text/javascript; charset=utf-8'],
    ['web/pkg/bitlora_web_bg.wasm', 'application/wasm'],
    ['web/style.css', 'text/css; charset=utf-8'],
    ['web/models/tiny/config.json', 'application/json'],
    ['web/models/tiny/model.safetensors', 'application/octet-stream'],
    ['web/store.js', 'text/javascript; charset=utf-8'],
    ['web/pkg/models.json', 'application/json'],
  ]) {
    const res = await fetch(server.url + file);
    assert.equal(res.status, 200, file);
    assert.equal(res.headers.get('content-type'), type, file);
    for (const [h, v] of Object.entries(SECURITY)) assert.equal(res.headers.get(h), v, `${file}: ${h}`);
    const csp = res.headers.get('content-security-policy');
    assert.match(csp, /script-src 'self' 'wasm-unsafe-eval'/, file);
    assert.match(csp, /worker-src 'self'/, file);
    await res.arrayBuffer();
  }
  const missing = await fetch(server.url + 'web/no-such-file.js');
  assert.equal(missing.status, 404);
  const outside = await fetch(server.url + 'Cargo.toml');
  assert.equal(outside.status, 404, 'only index.html and web/ are public');
});

/** Raw HTTP, because fetch() would normalise `..` away before sending. */
function rawGet(target) {
  const { port } = new URL(server.url);
  return new Promise((resolve, reject) => {
    const sock = net.connect(Number(port), '127.0.0.1', () => {
      sock.write(`GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    });
    let data = '';
    sock.on('data', (d) => { data += d; });
    sock.on('end', () => resolve(data));
    sock.on('error', reject);
  });
}

test('serve: path traversal is refused', async () => {
  for (const target of ['/web/../Cargo.toml', '/../../etc/passwd', '/web/%2e%2e/%2e%2e/etc/passwd', '/.git/config']) {
    const res = await rawGet(target);
    assert.match(res, /^HTTP\/1\.1 40[34] /, `${target}: ${res.split('\r\n')[0]}`);
    assert.doesNotMatch(res, /\[workspace\]|root:x:0/, target);
  }
});

test('serve: the page fetched over HTTP shows the computed result', { timeout: 180_000 }, async () => {
  const browser = await launchBrowser({ webgpu: false });
  try {
    const { page, log, requests } = await openPage(browser, server.url);
    const r = await pageResult(page);
    assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
    // What a person sees: the backend, the top tokens with probabilities, the time taken.
    assert.match(await page.textContent('#backend-label'), /CPU \(SIMD128, \d+ threads?\)|WebGPU: /);
    assert.equal(await page.locator('#top li').count(), 10);
    assert.equal(await page.textContent('#top li:first-child .token'), `token ${r.top[0].token}`);
    assert.match(await page.textContent('#top li:first-child .prob'), /^\d+\.\d\d%$/);
    assert.match(await page.textContent('#timing'), /^3 tokens in \d+\.\d ms on /);
    const shown = JSON.parse(await page.textContent('#result-json'));
    assert.deepEqual(shown.tokens, DEFAULT_TOKENS);
    assert.equal(shown.top.length, 10);
    // COOP + COEP took effect (wasm threads will need this).
    assert.equal(await page.evaluate(() => crossOriginIsolated), true);
    // Nothing left this origin (no CDN, no telemetry).
    const origin = new URL(server.url).origin;
    const foreign = requests.filter((u) => !u.startsWith(origin) && !u.startsWith('data:'));
    assert.deepEqual(foreign, [], 'requests to other origins');
    console.log(`page over HTTP: ${requests.length} requests, all to ${origin}; top token ${r.top[0].token}`);
  } finally {
    await browser.close();
  }
});
