// The page's own decoding speed (issue 14 item 4): the example page (web/examples/train.html)
// loads a model through the JS API in headless Chromium and generates greedily; this prints the
// decode tokens per second the page sees (tokens after the first, over the time from the first
// token's event to the last's, as the worker stamps them), for each model and backend,
// interleaved in one run so they share the machine's state:
//
//   node tools/bench/page-decode.mjs [--rounds 2] [--tokens 32] [--models default,125m] [--backends webgpu,cpu]
//
// Models: "default" (the bundled 12.6 M model), "125m" (the decode-125m shape with random
// weights, written once by `bitlora random-model --shape 125m` into target/bench-models/ and
// picked as files, as a visitor's own model would be). Prompt: 16 tokens (ids 1..16).
// WebGPU is SwiftShader in headless Chromium (--enable-unsafe-webgpu), asked for with
// ?backend=webgpu (the page passes a software adapter over by default); "cpu" is ?backend=cpu
// in the same browser: the wasm (SIMD128) path.
import { execFileSync } from 'node:child_process';
import { serve } from './serve.mjs';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../..');
const require = createRequire(path.join(REPO, 'tests/browser/package.json'));
const { chromium } = require('playwright-core');

const args = process.argv.slice(2);
const opt = (name, def) => (args.includes(name) ? args[args.indexOf(name) + 1] : def);
const rounds = Number(opt('--rounds', 2));
const tokens = Number(opt('--tokens', 32));
const models = opt('--models', 'default,125m').split(',');
const backends = opt('--backends', 'webgpu,cpu').split(',');
const BIN = process.env.BITLORA_BIN ?? path.join(REPO, 'target/debug/bitlora');
const FLAGS = ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic', '--enable-unsafe-webgpu'];

/** The model's files on disk ("default" loads the bundled model instead: null). */
function modelFiles(model) {
  if (model === 'default') return null;
  const dir = path.join(REPO, 'target/bench-models', model);
  if (!existsSync(path.join(dir, 'model.safetensors'))) {
    mkdirSync(dir, { recursive: true });
    console.log(`writing a random ${model} model to ${path.relative(REPO, dir)} ...`);
    execFileSync(BIN, ['random-model', '--shape', model, '--seed', '42', '--out', dir], { stdio: 'inherit' });
  }
  return ['config.json', 'model.safetensors'].map((f) => path.join(dir, f));
}


async function measure(server, browser, model, backend) {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    await page.goto(`${server.url}web/examples/train.html?backend=${backend}`);
    await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 300_000 });
    const files = modelFiles(model);
    if (files) {
      // A visitor's own files: a file input set from disk, handed to loadModel({ files }).
      await page.evaluate(() => {
        const input = document.createElement('input');
        input.type = 'file';
        input.multiple = true;
        input.id = 'bench-files';
        document.body.append(input);
      });
      await page.setInputFiles('#bench-files', files);
      await page.evaluate(async () => {
        const input = /** @type {HTMLInputElement} */ (document.getElementById('bench-files'));
        await window.bitlora.loadModel({ files: input.files });
      });
    }
    return await page.evaluate(async ({ tokens }) => {
      const bl = window.bitlora;
      const prompt = { tokens: Array.from({ length: 16 }, (_, i) => i + 1) };
      await bl.generate(prompt, { maxTokens: 4 }).result; // warm-up: pipelines, first uploads
      const at = [];
      const g = bl.generate(prompt, { maxTokens: tokens, onToken: (t) => at.push(t.at) });
      const r = await g.result;
      const span = (at.at(-1) - at[0]) / 1000;
      return { backend: r.backend, n: at.length, rate: span > 0 ? (at.length - 1) / span : 0, first: r.ms };
    }, { tokens });
  } finally {
    await context.close();
  }
}

const server = await serve(REPO, BIN);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true, args: FLAGS });
const results = new Map();
try {
  for (let r = 0; r < rounds; r++) {
    for (const model of models) {
      for (const backend of backends) {
        const m = await measure(server, browser, model, backend);
        const key = `${model} ${backend}`;
        if (!results.has(key)) results.set(key, []);
        results.get(key).push(m.rate);
        console.log(`round ${r + 1} ${model} on ${backend} (ran on ${m.backend}): ${m.n} tokens, decode ${m.rate.toFixed(1)} tok/s`);
      }
    }
  }
} finally {
  await browser.close();
  server.stop();
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
for (const [key, rates] of results) console.log(`${key}: decode ${median(rates).toFixed(1)} tok/s (median of ${rates.length})`);
