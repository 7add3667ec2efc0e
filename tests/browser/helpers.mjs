// Shared pieces of the browser tests: start `bitlora serve`, launch Debian's Chromium, open the
// page and wait for its result, compare logits with the native CPU reference.

import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = path.resolve(REPO, process.env.BITLORA_BIN ?? 'target/release/bitlora');
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
export const TINY_MODEL = path.join(REPO, 'web/models/tiny');
export const DEFAULT_TOKENS = [5, 17, 42];
export const ARTIFACTS = path.join(REPO, 'tests/browser/artifacts');

/**
 * Named tolerances for page-vs-native logits: |page - native| <= atol + rtol * |native|.
 *
 * CPU_WASM: the page's CPU backend is the same Rust code as the native reference, but natively
 * core's f32 matmul takes an AVX2+FMA path (8 partial sums, fused multiply-add) while wasm sums
 * in plain scalar order, and libm's exp/sin/cos may differ by an ulp. The ternary products are
 * integers and exact. Measured for the bundled model and tokens 5,17,42: max |diff| 2e-7 to
 * 3e-6 (scalar native vs wasm: 0). 1e-5 keeps the check tight enough that any change in the maths
 * shows, while the printed max diff shows drift before it fails.
 *
 * WEBGPU: the GPU sums f32 products in a different order (workgroup reductions, maybe FMA), so
 * norms and activation scales differ by ~1e-7..1e-6 relative. Measured on SwiftShader for the
 * bundled model and tokens 5,17,42: max |diff| 1e-6 to 3e-6. 1e-4 leaves a wide margin for
 * other adapters' rounding. What it must NOT absorb: an int8 activation code rounded to the other
 * side of a .5 boundary moves logits of a small random model by 1-3% (DESIGN.md, Correctness
 * oracles); if that happens on these fixed inputs, investigate it rather than widen this.
 */
export const TOLERANCE = {
  CPU_WASM: { name: 'CPU_WASM', atol: 1e-5, rtol: 1e-5 },
  WEBGPU: { name: 'WEBGPU', atol: 1e-4, rtol: 1e-4 },
};

// Fail early and clearly when the page's wasm is missing; warn when it is older than the Rust
// or WGSL sources it is built from (a stale web/pkg makes failures very confusing).
const WASM = path.join(REPO, 'web/pkg/bitlora_web_bg.wasm');
if (!existsSync(WASM)) {
  throw new Error(`${path.relative(REPO, WASM)} is missing: run tools/build-web.sh first`);
}
{
  const newest = (dir) => {
    let t = 0;
    if (!existsSync(dir)) return t;
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      t = Math.max(t, e.isDirectory() ? newest(p) : statSync(p).mtimeMs);
    }
    return t;
  };
  const sources = ['crates/core/src', 'crates/gpu/src', 'crates/web/src', 'shaders']
    .map((d) => newest(path.join(REPO, d)));
  if (Math.max(...sources) > statSync(WASM).mtimeMs) {
    console.log('warning: web/pkg is older than crates/*/src or shaders/; run tools/build-web.sh');
  }
}

/** Chromium flags from TOOLCHAIN.md. WebGPU (SwiftShader) only with --enable-unsafe-webgpu. */
const BASE_FLAGS = [
  '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic',
];

/**
 * Launches headless Chromium. Playwright gives every launch a fresh temporary --user-data-dir.
 * `webgpu: false` leaves out --enable-unsafe-webgpu: headless Chromium on Linux then grants no
 * adapter, which is the real fallback path the CPU test exercises.
 */
export async function launchBrowser({ webgpu }) {
  const args = webgpu ? ['--enable-unsafe-webgpu', ...BASE_FLAGS] : [...BASE_FLAGS];
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args });
}

/**
 * Starts `bitlora serve --port 0` from the repo root and resolves to { url, stop() } once it
 * prints `bitlora: serving <root> at http://127.0.0.1:PORT/`.
 */
export function startServer() {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, ['serve', '--port', '0'], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const timer = setTimeout(() => fail(new Error('bitlora serve printed no URL within 10 s')), 10_000);
    const fail = (e) => {
      clearTimeout(timer);
      child.kill();
      reject(new Error(`${e.message}\nstdout: ${out}\nstderr: ${err}`));
    };
    child.on('error', (e) => fail(new Error(`cannot start ${BIN}: ${e.message} (build it: cargo build --release -p bitlora, or set BITLORA_BIN)`)));
    child.on('exit', (code) => fail(new Error(`bitlora serve exited with ${code}`)));
    child.stderr.on('data', (d) => { err += d; });
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/^bitlora: serving (.+) at (http:\/\/127\.0\.0\.1:\d+\/)\n/);
      if (!m) return;
      clearTimeout(timer);
      child.removeAllListeners('exit');
      resolve({
        url: m[2],
        stop: () => new Promise((done) => {
          if (child.exitCode !== null) return done();
          child.once('exit', () => done());
          child.kill();
        }),
      });
    });
  });
}

/** The native CPU reference: `bitlora logits --model DIR --tokens ...` -> rows of V floats. */
export function nativeLogits(tokens = DEFAULT_TOKENS, model = TINY_MODEL) {
  const out = execFileSync(BIN, ['logits', '--model', model, '--tokens', tokens.join(',')], {
    cwd: REPO, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024,
  });
  const parsed = JSON.parse(out);
  assert.deepEqual(parsed.tokens, tokens);
  return parsed.logits;
}

/**
 * Opens the page and waits until it has finished (data-state done or error). Collects console
 * messages, page errors and every request URL so tests can assert on them and print them when
 * something fails.
 */
export async function openPage(browser, url, { viewport = { width: 1280, height: 800 } } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const log = [];
  const requests = [];
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  page.on('request', (r) => requests.push(r.url()));
  page.on('worker', (w) => {
    w.on('console', (m) => log.push(`[worker console.${m.type()}] ${m.text()}`));
  });
  await page.goto(url);
  await waitSettled(page, log);
  return { context, page, log, requests };
}

/** Waits until the page leaves starting/loading/running. */
export async function waitSettled(page, log = [], timeout = 120_000) {
  try {
    await page.waitForFunction(
      () => ['done', 'error'].includes(document.body.dataset.state), null, { timeout });
  } catch (e) {
    throw new Error(`page did not settle: ${e.message}\n${log.join('\n')}`);
  }
}

export async function pageResult(page) {
  return page.evaluate(() => window.__bitlora);
}

/** Fails unless every logit is within tol; prints the max differences either way (CONVENTIONS 9). */
export function assertLogitsClose(actual, expected, tol, label) {
  assert.equal(actual.length, expected.length, `${label}: ${actual.length} rows, native has ${expected.length}`);
  let maxAbs = 0, maxRel = 0, worst = [0, 0], bad = 0;
  const examples = [];
  for (let t = 0; t < expected.length; t++) {
    assert.equal(actual[t].length, expected[t].length, `${label}: row ${t} has ${actual[t].length} logits, native ${expected[t].length}`);
    for (let v = 0; v < expected[t].length; v++) {
      const a = actual[t][v], e = expected[t][v];
      const abs = Math.abs(a - e);
      const rel = abs / Math.max(Math.abs(e), 1e-30);
      if (!(abs <= tol.atol + tol.rtol * Math.abs(e))) {
        bad++;
        if (examples.length < 5) examples.push(`[${t},${v}] page ${a} native ${e} (abs ${abs.toExponential(2)})`);
      }
      if (abs > maxAbs || Number.isNaN(abs)) { maxAbs = abs; worst = [t, v]; }
      maxRel = Math.max(maxRel, rel);
    }
  }
  const summary = `${label}: max |diff| ${maxAbs.toExponential(3)} at [${worst}], max rel ${maxRel.toExponential(3)}, tolerance ${tol.name} (atol ${tol.atol}, rtol ${tol.rtol})`;
  console.log(summary);
  assert.equal(bad, 0, `${summary}: ${bad} logits out of tolerance, e.g.\n  ${examples.join('\n  ')}`);
}

export function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** Screenshots at the desktop and phone sizes, named <name>-<w>x<h>.png in artifacts/. */
export async function screenshots(browser, url, name, prepare) {
  mkdirSync(ARTIFACTS, { recursive: true });
  for (const viewport of [{ width: 1280, height: 800 }, { width: 390, height: 844 }]) {
    const { context, page } = await openPage(browser, url, { viewport });
    if (prepare) await prepare(page);
    // The page must not scroll sideways at phone width.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `${name} at ${viewport.width}px overflows horizontally by ${overflow}px`);
    const file = path.join(ARTIFACTS, `${name}-${viewport.width}x${viewport.height}.png`);
    await page.screenshot({ path: file, fullPage: true });
    await context.close();
  }
}
