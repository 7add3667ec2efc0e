// Static deployment (README: "Host the page yourself"): the site tools/build-site.sh assembles,
// served by a plain static file server (tools/serve-static.mjs, which applies the site's
// `_headers` file as Netlify / Cloudflare Pages do), on the CPU fallback:
// - the site holds index.html, web/ and _headers, and none of the development files (type
//   declarations, tsconfig, the API example, the tiny test model);
// - deploy/_headers and deploy/nginx.conf give the headers `bitlora serve` sends, for the page,
//   the worker, the wasm and the service worker's script (so the three cannot drift apart);
// - the journey: the page loads and settles with the default model, cross-origin isolated
//   (SharedArrayBuffer available); every response carried COOP/COEP/CSP; through the site's own
//   API module the default model loads from the static server and greedy 12 tokens from
//   "The state of the Union" equal `bitlora generate` on web/models/default; no request leaves
//   the origin; `node tools/serve-static.mjs DIR --port 0` (the README's command) serves it too;
// - what breaks without the headers: served with no `_headers`, the page is not cross-origin
//   isolated and has no SharedArrayBuffer; with a CSP lacking 'wasm-unsafe-eval' the wasm is
//   refused and Bitlora.create rejects saying so.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO, DEFAULT_MODEL, startServer, launchBrowser, nativeGenerateText, waitSettled } from './helpers.mjs';
import { serveStatic, parseHeadersFile, headersFor } from '../../tools/serve-static.mjs';

const PROMPT = 'The state of the Union';
const N = 12;
let tmp, site;

before(() => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'bitlora-site-'));
  site = path.join(tmp, 'site');
  execFileSync(path.join(REPO, 'tools/build-site.sh'), [site], { cwd: REPO, stdio: 'pipe' });
});
after(() => { if (tmp) rmSync(tmp, { recursive: true, force: true }); });

/** Every file under dir, as paths relative to it. */
function listFiles(dir, base = dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? listFiles(p, base) : [path.relative(base, p)];
  });
}

test('build-site.sh: index.html, web/ and _headers, without the development files', () => {
  const files = listFiles(site).sort();
  for (const f of ['index.html', '_headers', 'web/main.js', 'web/bitlora.js', 'web/worker.js', 'web/pkg/bitlora_web.js',
    'web/pkg/bitlora_web_bg.wasm', 'web/pkg/models.json', 'web/models/default/model.safetensors',
    'web/models/default/tokenizer.json']) {
    assert.ok(files.includes(f), `${f} missing from the site: ${files.join(', ')}`);
  }
  const dev = files.filter((f) => f.endsWith('.d.ts') || /tsconfig/.test(f) || f.startsWith('web/examples/') ||
    f.startsWith('web/models/tiny/') || f.startsWith('tests/'));
  assert.deepEqual(dev, [], 'development files in the site');
  // Every module of the page is there: the same file list as web/ minus those.
  const web = listFiles(path.join(REPO, 'web')).filter((f) => !f.endsWith('.d.ts') && !/tsconfig/.test(f) &&
    !f.endsWith('.md') && !f.startsWith('examples/') && !f.startsWith('models/tiny/')).map((f) => `web/${f}`);
  assert.deepEqual(files.filter((f) => f.startsWith('web/')), web.sort());
  assert.equal(readFileSync(path.join(site, '_headers'), 'utf8'), readFileSync(path.join(REPO, 'deploy/_headers'), 'utf8'));
  const index = JSON.parse(readFileSync(path.join(site, 'web/pkg/models.json'), 'utf8'));
  assert.deepEqual(Object.keys(index), ['default'], 'models.json lists the shipped models only');
  for (const f of index.default) {
    assert.equal(statSync(path.join(site, 'web/models/default', f.name)).size, f.size, f.name);
  }
  console.log(`site: ${files.length} files, ${(files.reduce((n, f) => n + statSync(path.join(site, f)).size, 0) / 2 ** 20).toFixed(1)} MiB`);
});

/** The headers a host adds (not Content-Type, Length, ETag, Date, Connection...). */
const HOST_HEADERS = ['cross-origin-opener-policy', 'cross-origin-embedder-policy', 'cross-origin-resource-policy',
  'content-security-policy', 'x-content-type-options', 'referrer-policy', 'cache-control', 'service-worker-allowed'];
const pick = (headers) => Object.fromEntries(HOST_HEADERS.filter((h) => headers.get(h) != null).map((h) => [h, headers.get(h)]));

/** nginx.conf's add_header lines, by location. */
function nginxLocations(text) {
  const out = new Map();
  for (const m of text.matchAll(/^location\s+([^{]+?)\s*\{([\s\S]*?)^\}/gm)) {
    const headers = {};
    for (const h of m[2].matchAll(/^\s*add_header\s+(\S+)\s+"([^"]*)"\s+always;/gm)) headers[h[1].toLowerCase()] = h[2];
    out.set(m[1], headers);
  }
  return out;
}

test('deploy/_headers and deploy/nginx.conf give the headers bitlora serve sends', async () => {
  const rules = parseHeadersFile(readFileSync(path.join(REPO, 'deploy/_headers'), 'utf8'));
  const serve = await startServer({ args: ['--hub', 'https://huggingface.co'] });
  const paths = ['/', '/web/worker.js', '/web/pkg/bitlora_web_bg.wasm', '/web/models/default/config.json'];
  if (existsSync(path.join(REPO, 'web/sw.js'))) paths.push('/web/sw.js');
  const nginx = nginxLocations(readFileSync(path.join(REPO, 'deploy/nginx.conf'), 'utf8'));
  try {
    for (const p of paths) {
      const r = await fetch(new URL(p.slice(1), serve.url));
      assert.equal(r.status, 200, `bitlora serve ${p}`);
      const fromServe = pick(r.headers);
      const fromFile = Object.fromEntries(headersFor(rules, p).map(([k, v]) => [k.toLowerCase(), v]));
      assert.deepEqual(fromFile, fromServe, `${p}: deploy/_headers (left) vs bitlora serve (right); ` +
        'update deploy/_headers and deploy/nginx.conf (or rebuild target/debug/bitlora)');
      const loc = p === '/web/sw.js' ? '= /web/sw.js' : p.endsWith('.wasm') ? '~* \\.wasm$' : '/';
      assert.deepEqual(nginx.get(loc), fromServe, `${p}: deploy/nginx.conf's location ${loc} vs bitlora serve`);
    }
    console.log(`headers equal for ${paths.join(', ')}: ${Object.keys(pick((await fetch(serve.url)).headers)).join(', ')}`);
  } finally {
    await serve.stop();
  }
});

/** A browser context whose every request (page, worker, service worker) is logged. */
async function newContext(browser) {
  const context = await browser.newContext();
  const log = [];
  const requests = [];
  const responses = [];
  context.on('request', (r) => requests.push(r.url()));
  context.on('response', (r) => responses.push(r));
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => log.push(`[worker console.${m.type()}] ${m.text()}`)));
  return { context, page, log, requests, responses };
}

test('the journey on a plain static server with _headers (CPU fallback)', async () => {
  const server = await serveStatic(site);
  const origin = new URL(server.url).origin;
  const expected = nativeGenerateText(DEFAULT_MODEL, PROMPT, N);
  const browser = await launchBrowser({ webgpu: false });
  const { page, log, requests, responses } = await newContext(browser);
  try {
    await page.goto(server.url);
    await waitSettled(page, log);
    const state = await page.evaluate(() => document.body.dataset.state);
    assert.equal(state, 'done', `the page ended in ${state}\n${log.join('\n')}`);
    const iso = await page.evaluate(() => ({ coi: crossOriginIsolated, sab: typeof SharedArrayBuffer }));
    assert.deepEqual(iso, { coi: true, sab: 'function' }, 'cross-origin isolated, with SharedArrayBuffer');
    // The page loaded the default model from this server (a fresh context: nothing stored yet).
    const fetched = server.log.filter((r) => r.status === 200).map((r) => r.path);
    for (const f of ['/web/pkg/bitlora_web_bg.wasm', '/web/models/default/model.safetensors', '/web/models/default/tokenizer.json']) {
      assert.ok(fetched.includes(f), `${f} was not fetched from the static server: ${fetched.join(', ')}`);
    }
    // A short generation through the site's own API module (same origin, under the page's CSP).
    const gen = await page.evaluate(async ({ prompt, n }) => {
      const { Bitlora } = await import('/web/bitlora.js');
      const bl = await Bitlora.create({ preferGpu: false });
      try {
        const model = await bl.loadModel({ bundled: 'default' });
        const r = await bl.generate(prompt, { maxTokens: n }).result;
        return { key: model.key, name: model.name, backend: r.backend, text: r.text, tokens: r.tokens.length };
      } finally {
        bl.terminate();
      }
    }, { prompt: PROMPT, n: N });
    console.log(`static site: ${gen.name} on ${gen.backend}: ${JSON.stringify(gen.text)}`);
    assert.equal(gen.key, 'bundled:default');
    assert.equal(gen.text, expected, 'greedy text from the static site vs bitlora generate');
    // Every response of the origin carried the isolation and CSP headers.
    const own = responses.filter((r) => r.url().startsWith(origin));
    assert.ok(own.length >= 10, `only ${own.length} responses`);
    for (const r of own) {
      const h = r.headers();
      assert.equal(h['cross-origin-embedder-policy'], 'require-corp', r.url());
      assert.equal(h['cross-origin-opener-policy'], 'same-origin', r.url());
      assert.match(h['content-security-policy'] ?? '', /script-src 'self' 'wasm-unsafe-eval'/, r.url());
    }
    const foreign = requests.filter((u) => !u.startsWith(origin) && !u.startsWith('data:') && !u.startsWith('blob:'));
    assert.deepEqual(foreign, [], 'requests that left the origin');
    console.log(`${requests.length} requests, all to ${origin}; ${own.length} responses with COOP/COEP/CSP`);
    const missing = server.log.filter((r) => r.status >= 400).map((r) => `${r.path} ${r.status}`);
    if (missing.length) console.log(`not on the site (the page asked for them): ${missing.join(', ')}`);
  } finally {
    await browser.close();
    await server.stop();
  }
});

test('the README command: node tools/serve-static.mjs DIR --port 0', async () => {
  const child = spawn(process.execPath, [path.join(REPO, 'tools/serve-static.mjs'), site, '--port', '0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  try {
    const url = await new Promise((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`no URL within 10 s: ${out}`)), 10_000);
      child.stdout.on('data', (d) => {
        out += d;
        const m = out.match(/at (http:\/\/127\.0\.0\.1:\d+\/) with its _headers/);
        if (m) { clearTimeout(timer); resolve(m[1]); }
      });
      child.on('exit', (code) => reject(new Error(`exited with ${code}: ${out}`)));
    });
    const r = await fetch(url);
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type'), /^text\/html/);
    assert.equal(r.headers.get('cross-origin-embedder-policy'), 'require-corp');
    const wasm = await fetch(new URL('web/pkg/bitlora_web_bg.wasm', url), { method: 'HEAD' });
    assert.equal(wasm.headers.get('content-type'), 'application/wasm');
    const etag = wasm.headers.get('etag');
    assert.ok(etag, 'an ETag');
    assert.equal((await fetch(new URL('web/pkg/bitlora_web_bg.wasm', url), { headers: { 'If-None-Match': etag } })).status, 304);
    assert.equal((await fetch(new URL('_headers', url))).status, 404, '_headers is not served');
    assert.equal((await fetch(new URL('web/%2e%2e/%2e%2e/etc/passwd', url))).status, 404, 'no way out of the root');
  } finally {
    child.kill();
  }
});

test('what breaks without the headers: no isolation; no wasm without wasm-unsafe-eval', async () => {
  const browser = await launchBrowser({ webgpu: false });
  // No _headers at all (what `python3 -m http.server` gives).
  const bare = await serveStatic(site, { headersFile: null });
  try {
    const { page } = await newContext(browser);
    await page.goto(bare.url, { waitUntil: 'domcontentloaded' });
    const iso = await page.evaluate(() => ({ coi: crossOriginIsolated, sab: typeof SharedArrayBuffer }));
    assert.deepEqual(iso, { coi: false, sab: 'undefined' }, 'without COOP/COEP');
    await page.close();
  } finally {
    await bare.stop();
  }
  // The site's CSP without 'wasm-unsafe-eval'.
  const strict = await serveStatic(site, {
    edit: (headers) => headers.map(([k, v]) => [k, k.toLowerCase() === 'content-security-policy' ? v.replace(" 'wasm-unsafe-eval'", '') : v]),
  });
  try {
    const { page } = await newContext(browser);
    await page.goto(`${strict.url}web/pkg/models.json`); // a page of the origin that runs no module of its own
    const csp = await page.evaluate(async () => (await fetch('/')).headers.get('content-security-policy'));
    assert.doesNotMatch(csp, /wasm-unsafe-eval/);
    const err = await page.evaluate(async () => {
      const { Bitlora } = await import('/web/bitlora.js');
      try {
        (await Bitlora.create({ preferGpu: false })).terminate();
        return null;
      } catch (e) {
        return String(e.message);
      }
    });
    console.log(`without 'wasm-unsafe-eval': ${err}`);
    assert.ok(err, 'Bitlora.create should fail without wasm-unsafe-eval');
    assert.match(err, /WebAssembly|wasm|unsafe-eval/i);
  } finally {
    await strict.stop();
    await browser.close();
  }
});
