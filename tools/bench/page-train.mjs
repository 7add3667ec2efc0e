// The page's own training speed: the example page (web/examples/train.html) trains the default
// model through the JS API in headless Chromium, and this prints the tokens per second of its
// steps. Give it one or more checkouts (each with web/pkg built and a bitlora binary) and it
// measures them interleaved in one run, so "before" and "after" share the machine's state:
//
//   node tools/bench/page-train.mjs [--cpu | --backends webgpu,cpu] [--rounds 2] LABEL=REPO_DIR:BITLORA_BIN ...
//
// e.g. node tools/bench/page-train.mjs before=/work/wt-old:/tmp/old-bitlora after=.:target/debug/bitlora
// Workload: the first 24 lines of data/devil/train.jsonl, context 32, batch 1, LoRA r 8 on all
// seven projections, 6 steps, no validation; the first 2 steps are warm-up. Reported: the
// median over the timed steps of the step's time and of its target tokens per second (the
// tokens the step trained on, as the page counts them), and the bytes a step read back.
// WebGPU is SwiftShader in headless Chromium (--enable-unsafe-webgpu), asked for with
// ?backend=webgpu (by default the page passes a software adapter over for the CPU); --cpu trains
// on the CPU fallback instead; --backends webgpu,cpu measures both, interleaved (the CPU one as
// ?backend=cpu in the same WebGPU-enabled browser: the same wasm the fallback runs).
import { serve } from './serve.mjs';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../..');
const require = createRequire(path.join(REPO, 'tests/browser/package.json'));
const { chromium } = require('playwright-core');

const args = process.argv.slice(2);
const cpu = args.includes('--cpu');
const backends = args.includes('--backends') ? args[args.indexOf('--backends') + 1].split(',') : [cpu ? 'cpu' : 'webgpu'];
const rounds = Number(args[args.indexOf('--rounds') + 1]) || 2;
const targets = args.filter((a) => a.includes('=')).flatMap((a) => {
  const [label, rest] = a.split('=');
  const [dir, bin] = rest.split(':');
  return backends.map((backend) => ({
    label: backends.length > 1 ? `${label}/${backend}` : label, dir: path.resolve(dir), bin: path.resolve(bin), backend,
  }));
});
if (!targets.length) {
  console.error('usage: node tools/bench/page-train.mjs [--cpu] [--rounds N] LABEL=REPO_DIR:BITLORA_BIN ...');
  process.exit(2);
}
const DATA = readFileSync(path.join(REPO, 'data/devil/train.jsonl'), 'utf8').split('\n').slice(0, 24).join('\n');
const CONFIG = { steps: 6, context: 32, rank: 8, alpha: 16, lr: 1e-3, batch: 1, evalEvery: 0, valFraction: 0.1, seed: 3, checkpointEvery: 0 };
const FLAGS = ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'];


const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function measure(t) {
  const server = await serve(t.dir, t.bin);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true,
    args: cpu && backends.length === 1 ? FLAGS : ['--enable-unsafe-webgpu', ...FLAGS],
  });
  try {
    const page = await (await browser.newContext()).newPage();
    await page.goto(`${server.url}web/examples/train.html?backend=${t.backend}`);
    await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 300_000 });
    return await page.evaluate(async ({ DATA, CONFIG }) => {
      const bl = window.bitlora;
      const t = await bl.createTrainer({ ...CONFIG, data: { text: DATA, fileName: 'devil.jsonl' } });
      const steps = [];
      t.on('progress', (p) => steps.push({ ms: p.ms, targets: p.tokens, backend: p.backend, readBytes: p.readBytes }));
      const done = new Promise((resolve, reject) => { t.on('done', resolve); t.on('error', (e) => reject(new Error(e.message))); });
      await t.start();
      await done;
      return { steps, backend: t.backend };
    }, { DATA, CONFIG });
  } finally {
    await browser.close();
    server.stop();
  }
}

const results = new Map(targets.map((t) => [t.label, []]));
for (let r = 0; r < rounds; r++) {
  for (const t of targets) {
    const run = await measure(t);
    const timed = run.steps.slice(2);
    const targetRate = median(timed.map((s) => s.targets / (s.ms / 1000)));
    const ms = median(timed.map((s) => s.ms));
    results.get(t.label).push({ targetRate, ms, backend: run.backend, readBytes: timed[0]?.readBytes });
    console.log(`round ${r + 1} ${t.label} (${run.backend}): median step ${ms.toFixed(0)} ms, ${targetRate.toFixed(1)} target tok/s, read back ${timed[0]?.readBytes ?? '-'} B/step`);
  }
}
for (const [label, rs] of results) {
  console.log(`${label}: median step ${median(rs.map((x) => x.ms)).toFixed(0)} ms, ${median(rs.map((x) => x.targetRate)).toFixed(1)} target tok/s over ${rs.length} runs (${rs[0].backend})`);
}
