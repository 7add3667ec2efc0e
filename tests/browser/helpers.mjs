// Shared pieces of the browser tests: start `bitlora serve`, launch Debian's Chromium, open the
// page and wait for its result, compare logits with the native CPU reference.

import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = path.resolve(REPO, process.env.BITLORA_BIN ?? 'target/debug/bitlora');
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
export const TINY_MODEL = path.join(REPO, 'web/models/tiny');
/** The page's default model (bitlora-default-12m, MODEL_CARD.md). Pages for the tiny one: ?model=tiny. */
export const DEFAULT_MODEL = path.join(REPO, 'web/models/default');
/** Files of the bundled models, as the page's worker requests them. */
export const MODEL_FILE_RE = /\/web\/models\//;
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
 * adapter, which is the real fallback path the CPU test exercises. `args`: more flags.
 */
/**
 * With WebGPU: SwiftShader supports Vulkan 1.3, so Dawn zeroes workgroup memory through the
 * driver's zero-initialize extension, which SwiftShader is slow to compile and to run (measured
 * natively: 112 pipelines compile in 28.4 s with it, 4.0 s without; a 3-step train 61.6 s vs
 * 25.1 s). Turning the extension off makes Dawn zero the memory itself in the shader: still
 * zeroed, the same results (texts and losses compared), a first generation 21.9 -> 4.1 s.
 */
const WEBGPU_FLAGS = [
  '--enable-unsafe-webgpu',
  '--disable-dawn-features=use_vulkan_zero_initialize_workgroup_memory_extension',
];

export async function launchBrowser({ webgpu, args = [] }) {
  const flags = webgpu ? [...WEBGPU_FLAGS, ...BASE_FLAGS] : [...BASE_FLAGS];
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: [...flags, ...args] });
  if (webgpu) WEBGPU_BROWSERS.add(browser);
  return browser;
}

// Browsers launched with WebGPU. Their only adapter is SwiftShader, a software one, which the
// page by default passes over for the CPU (it is slower there); tests that launch one are there
// to test the WebGPU path, so their pages are opened with ?backend=webgpu (see gpuUrl).
const WEBGPU_BROWSERS = new WeakSet();

/**
 * `url` with ?backend=webgpu when `browser` was launched with WebGPU and the URL names no
 * backend of its own; otherwise `url` unchanged.
 */
export function gpuUrl(browser, url) {
  if (!WEBGPU_BROWSERS.has(browser) || /[?&]backend=/.test(url)) return url;
  const u = new URL(url);
  u.searchParams.set('backend', 'webgpu');
  return u.href;
}

/**
 * Starts `bitlora serve --port 0` from the repo root and resolves to { url, stop() } once it
 * prints `bitlora: serving <root> at http://127.0.0.1:PORT/`. `args`: more flags, e.g.
 * ['--hub', hubUrl] to let the page download from a test hub (hub-server.mjs).
 */
export function startServer({ args = [] } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, ['serve', '--port', '0', ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const timer = setTimeout(() => fail(new Error('bitlora serve printed no URL within 10 s')), 10_000);
    const fail = (e) => {
      clearTimeout(timer);
      child.kill();
      reject(new Error(`${e.message}\nstdout: ${out}\nstderr: ${err}`));
    };
    child.on('error', (e) => fail(new Error(`cannot start ${BIN}: ${e.message} (build it: cargo build -p bitlora, or set BITLORA_BIN)`)));
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
  await page.goto(gpuUrl(browser, url));
  await waitSettled(page, log);
  return { context, page, log, requests };
}

/**
 * Opens the folded <details id="{id}"> of the page (as a visitor does: a click on its summary)
 * unless it is open: 'developer' (the Generate and Next-token panels, the backend's details) or
 * 'model-more' (step 1's stored models, Hugging Face downloads and model files).
 */
export async function unfold(page, id) {
  if (await page.locator(`#${id}`).evaluate((d) => d.open)) return;
  await page.click(`#${id} > summary`);
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

/** Waits until web/examples/train.html has loaded its model (data-state ready); fails on its error. */
export async function waitExampleReady(page, log) {
  try {
    await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 120_000 });
  } catch (e) {
    throw new Error(`example page did not load: ${e.message}\n${log.join('\n')}`);
  }
  const state = await page.evaluate(() => document.body.dataset.state);
  assert.equal(state, 'ready', `${await page.textContent('#status')}\n${log.join('\n')}`);
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

// ---- generation ------------------------------------------------------------------------------

/** The prompt and length of the generation parity tests (ISSUE 3, item 6). */
export const GEN_PROMPT = [1, 5, 17];
export const GEN_TOKENS = 24;

/**
 * The native reference: `bitlora generate --model DIR --tokens ... --max-tokens N [args]`, which
 * prints the generated ids separated by spaces on stdout (greedy unless args say otherwise).
 */
export function nativeGenerate(tokens, maxTokens, { model = TINY_MODEL, args = [] } = {}) {
  const out = execFileSync(BIN, ['generate', '--model', model, '--tokens', tokens.join(','),
    '--max-tokens', String(maxTokens), ...args], { cwd: REPO, encoding: 'utf8' });
  return out.trim().split(/\s+/).filter(Boolean).map(Number);
}

/** `bitlora generate --model DIR --prompt TEXT ...`: the generated text as the CLI streams it. */
export function nativeGenerateText(model, prompt, maxTokens, args = []) {
  const out = execFileSync(BIN, ['generate', '--model', model, '--prompt', prompt,
    '--max-tokens', String(maxTokens), ...args], { cwd: REPO, encoding: 'utf8' });
  return out.replace(/\n$/, '');
}

/**
 * Fills the Generate panel (prompt text or ids as typed, options by input id), records every
 * DOM update of the output with a timestamp, clicks Generate and waits for the end.
 *
 * `onStart(page)` runs right after the click (e.g. to click Stop). Returns
 * { gen: window.__bitlora.generation, updates: [{ t, gen, text }], stats, error, longTasks }, where
 * `t` is epoch milliseconds (performance.timeOrigin + now), comparable with the worker's
 * event.at, longTasks the durations (ms) of main-thread tasks over 50 ms meanwhile, and
 * mainThreadWasm the .wasm files the page's own thread fetched (none: the model is in the worker).
 */
export async function generateOnPage(page, { prompt, chat, options = {}, log = [], onStart, stopAfter } = {}) {
  await unfold(page, 'developer');
  if (prompt !== undefined) await page.fill('#prompt', prompt);
  if (chat !== undefined) await page.setChecked('#chat', chat);
  for (const [id, value] of Object.entries(options)) await page.fill(`#${id}`, String(value));
  await page.evaluate((stopAfter) => {
    const text = document.getElementById('gen-text');
    const updates = (window.__genUpdates = []);
    const record = () => {
      const t = performance.timeOrigin + performance.now();
      const last = updates.at(-1);
      const now = { t, gen: document.body.dataset.gen, text: text.textContent };
      if (!last || last.text !== now.text || last.gen !== now.gen) updates.push(now);
      // Stop from inside the page as soon as `stopAfter` tokens show: a real click on the
      // button, without the test's round trip (a CPU generation of the tiny model is fast).
      if (stopAfter && window.__bitlora.generation.tokens?.length >= stopAfter && !window.__stopClickedAt) {
        window.__stopClickedAt = t;
        window.__tokensAtStop = window.__bitlora.generation.tokens.length;
        document.getElementById('stop').click();
      }
    };
    window.__genObserver?.disconnect();
    window.__stopClickedAt = null;
    // Main-thread tasks over 50 ms while generating: the UI would stutter.
    window.__longTasks = [];
    window.__longTaskObserver?.disconnect();
    window.__longTaskObserver = new PerformanceObserver((list) => {
      for (const e of list.getEntries()) window.__longTasks.push(Math.round(e.duration));
    });
    window.__longTaskObserver.observe({ type: 'longtask' });
    window.__genObserver = new MutationObserver(record);
    window.__genObserver.observe(text, { childList: true, characterData: true, subtree: true });
    window.__genObserver.observe(document.body, { attributes: true, attributeFilter: ['data-gen'] });
  }, stopAfter ?? 0);
  await page.click('#generate-btn');
  if (onStart) await onStart(page);
  try {
    await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.gen), null, { timeout: 120_000 });
  } catch (e) {
    throw new Error(`generation did not finish: ${e.message}\n${log.join('\n')}`);
  }
  return page.evaluate(() => ({
    gen: window.__bitlora.generation,
    updates: window.__genUpdates,
    stats: document.getElementById('gen-stats').textContent,
    error: document.getElementById('gen-error').hidden ? null : document.getElementById('gen-error').textContent.trim(),
    stopClickedAt: window.__stopClickedAt,
    tokensAtStop: window.__tokensAtStop,
    longTasks: window.__longTasks,
    // The wasm this document itself fetched (the worker's fetches are in its own timeline).
    mainThreadWasm: performance.getEntriesByType('resource').map((e) => e.name).filter((n) => /\.wasm($|\?)/.test(n)),
  }));
}

/**
 * Checks the recorded DOM updates of one generation: a real stream, not one final paint.
 * With `overlap`, also that the page showed the first token before the worker had made the last
 * (tokens are posted as they are made, not collected and sent at the end). That needs a
 * generation slower than a message's trip to the page: true on WebGPU (tens of ms a token on
 * SwiftShader), not guaranteed for 24 tokens of the tiny model on the CPU (about 1 ms a token),
 * where the Stop test shows the same thing (Stop at 3 tokens shown ends generation early).
 */
export function assertStreamed(run, label, { overlap = true } = {}) {
  const { gen, updates } = run;
  const n = gen.tokens.length;
  const during = updates.filter((u) => u.gen === 'generating' && u.text !== '');
  const doneAt = updates.find((u) => u.gen === 'done')?.t;
  assert.ok(doneAt, `${label}: no 'done' state recorded`);
  // One DOM update per token, each while generating, each extending the previous text.
  assert.equal(during.length, n, `${label}: ${during.length} intermediate states for ${n} tokens`);
  for (let i = 1; i < during.length; i++) {
    assert.ok(during[i].text.startsWith(during[i - 1].text) && during[i].text.length > during[i - 1].text.length,
      `${label}: update ${i} does not extend the previous text`);
    assert.ok(during[i].t >= during[i - 1].t);
  }
  assert.equal(during.at(-1).text, gen.text);
  assert.ok(during.at(-1).t <= doneAt);
  const lastMadeAt = gen.lastAt;
  const firstShownAt = during[0].t;
  console.log(`${label}: ${during.length} DOM updates over ${(during.at(-1).t - during[0].t).toFixed(1)} ms; ` +
    `first token shown ${(lastMadeAt - firstShownAt).toFixed(1)} ms before the worker made the last one; ` +
    `first at +${(during[0].t - updates[0].t).toFixed(1)} ms, done at +${(doneAt - updates[0].t).toFixed(1)} ms`);
  if (overlap) assert.ok(firstShownAt < lastMadeAt,
    `${label}: the first token appeared ${(firstShownAt - lastMadeAt).toFixed(1)} ms after the last was made: not streamed`);
}

/**
 * Asserts that page and native greedy tokens are equal. On a difference it says at which step
 * and by what margin: the native logits at that step (one `bitlora logits` pass over prompt +
 * the common prefix) give the native top-1 and top-2 and the logit of the page's choice. A
 * near-tie that flips (margin ~1e-5 and below, within TOLERANCE.WEBGPU) is reported as such;
 * it still fails, since exact equality is expected on this model.
 */
export function assertSameTokens(page, native, prompt, label) {
  const seq = [...prompt, ...native];
  const logits = nativeLogits(seq);
  // Row prompt.length - 1 + k predicts generated token k.
  const margins = native.map((tok, k) => {
    const row = logits[prompt.length - 1 + k];
    const sorted = [...row].sort((a, b) => b - a);
    return { k, margin: sorted[0] - sorted[1] };
  });
  const min = margins.reduce((a, b) => (b.margin < a.margin ? b : a));
  console.log(`${label}: ${native.length} native greedy tokens; smallest top-1/top-2 logit margin ` +
    `${min.margin.toExponential(3)} at step ${min.k}`);
  const k = native.findIndex((t, i) => page[i] !== t);
  if (k === -1 && page.length === native.length) return;
  if (k === -1) assert.fail(`${label}: page made ${page.length} tokens, native ${native.length}`);
  const row = logits[prompt.length - 1 + k];
  const order = [...row.keys()].sort((a, b) => row[b] - row[a]);
  assert.fail(`${label}: first difference at step ${k}: page chose ${page[k]} (native logit ` +
    `${row[page[k]]}), native chose ${native[k]} (logit ${row[native[k]]}); native top-2 ${order[0]}, ` +
    `${order[1]} with margin ${(row[order[0]] - row[order[1]]).toExponential(3)}` +
    (Math.abs(row[native[k]] - row[page[k]]) < 1e-3 ? ' (a near-tie flipped)' : ' (not a near-tie: a real mismatch)') +
    `\n  page:   ${page.join(' ')}\n  native: ${native.join(' ')}`);
}

/**
 * A hand-written tokenizers JSON for the tiny model (vocab 509): WordLevel, whitespace
 * pre-tokenizer, BOS added by a TemplateProcessing post-processor, as LLaMA's tokenizer does.
 * Ids 0-2 are <unk>, <s>, </s> (config.json's bos 1 / eos 2), 3-505 made-up words (word(i)),
 * 506-508 chat markers. No decoder: tokenizers then joins tokens with single spaces.
 */
export const CHAT = { user: '<|user|>', assistant: '<|assistant|>', end: '<|im_end|>' };
const SYL_C = 'bdfgklmnprstvz', SYL_V = 'aeiou';
const syllable = (i) => SYL_C[i % 14] + SYL_V[Math.floor(i / 14) % 5];
export const word = (i) => syllable(i % 70) + syllable(Math.floor(i / 70));
export function tinyTokenizer() {
  const specials = ['<unk>', '<s>', '</s>'];
  const markers = [CHAT.user, CHAT.assistant, CHAT.end];
  const vocab = {};
  specials.forEach((t, i) => { vocab[t] = i; });
  for (let i = 3; i < 506; i++) vocab[word(i)] = i;
  markers.forEach((t, i) => { vocab[t] = 506 + i; });
  assert.equal(Object.keys(vocab).length, 509, 'words must be distinct');
  const added = (content, id) => ({
    id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
  });
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [...specials.map((t, i) => added(t, i)), ...markers.map((t, i) => added(t, 506 + i))],
    normalizer: null,
    pre_tokenizer: { type: 'Whitespace' },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } },
        { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: null,
    model: { type: 'WordLevel', vocab, unk_token: '<unk>' },
  };
}

/** tokenizer_config.json with a chat template in the shape of LLaMA-3's / ChatML's. */
export function tinyTokenizerConfig() {
  return {
    bos_token: '<s>',
    eos_token: '</s>',
    chat_template:
      `{% for m in messages %}${CHAT.user} {{ m['content'] }} ${CHAT.end} {% endfor %}` +
      `{% if add_generation_prompt %}${CHAT.assistant}{% endif %}`,
  };
}
