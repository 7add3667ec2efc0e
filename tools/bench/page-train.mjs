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
//
// Threads (issue 16): --threads 1,auto measures the CPU fallback once per entry (implies --cpu):
// `1` is the single-thread wasm (web/pkg, ?threads=1), `auto` the threaded one with the page's
// default pool (one per core, at most 8), a number that many threads. --native adds, in the same
// run and rounds, the native CLI on this machine: `bitlora train --backend cpu` on the same
// workload (default model, data, config; per-step rates from its train_log.jsonl, same warm-up
// and median) and `bitlora bench train --shape 125m --backend cpu --gen-len 8` (the issue's
// native figure; a 125M-parameter random model the page cannot load).
//
//   node tools/bench/page-train.mjs --threads 1,auto --native [--context 128] page=.:target/debug/bitlora
import { serve } from './serve.mjs';
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../..');
const require = createRequire(path.join(REPO, 'tests/browser/package.json'));
const { chromium } = require('playwright-core');

const args = process.argv.slice(2);
const threadList = args.includes('--threads') ? args[args.indexOf('--threads') + 1].split(',') : [null];
const native = args.includes('--native');
const cpu = args.includes('--cpu') || threadList[0] !== null;
const backends = args.includes('--backends') ? args[args.indexOf('--backends') + 1].split(',') : [cpu ? 'cpu' : 'webgpu'];
const rounds = Number(args[args.indexOf('--rounds') + 1]) || 2;
const targets = args.filter((a) => a.includes('=')).flatMap((a) => {
  const [label, rest] = a.split('=');
  const [dir, bin] = rest.split(':');
  return backends.flatMap((backend) => threadList.map((threads) => ({
    label: [label, backends.length > 1 ? backend : null, threads ? `threads=${threads}` : null].filter(Boolean).join('/'),
    dir: path.resolve(dir), bin: path.resolve(bin), backend, threads,
  })));
});
if (!targets.length) {
  console.error('usage: node tools/bench/page-train.mjs [--cpu] [--rounds N] LABEL=REPO_DIR:BITLORA_BIN ...');
  process.exit(2);
}
const DATA = readFileSync(path.join(REPO, 'data/devil/train.jsonl'), 'utf8').split('\n').slice(0, 24).join('\n');
// --context N: the sequence length (default 32; the page's CPU preset uses 64-128).
const context = args.includes('--context') ? Number(args[args.indexOf('--context') + 1]) : 32;
// --steps N: steps per run (default 6; the first 2 are warm-up). CHROMIUM_FLAGS (space-separated)
// adds browser flags, e.g. CHROMIUM_FLAGS='--js-flags=--prof' for a V8 profile of the worker.
const steps = args.includes('--steps') ? Number(args[args.indexOf('--steps') + 1]) : 6;
const CONFIG = { steps, context, rank: 8, alpha: 16, lr: 1e-3, batch: 1, evalEvery: 0, valFraction: 0.1, seed: 3, checkpointEvery: 0 };
const FLAGS = ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'];


const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function measure(t) {
  const server = await serve(t.dir, t.bin);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true,
    args: [...(cpu && backends.length === 1 ? FLAGS : ['--enable-unsafe-webgpu', ...FLAGS]),
      ...(process.env.CHROMIUM_FLAGS ?? '').split(' ').filter(Boolean)],
  });
  try {
    const page = await (await browser.newContext()).newPage();
    const threads = t.threads && t.threads !== 'auto' ? `&threads=${t.threads}` : '';
    await page.goto(`${server.url}web/examples/train.html?backend=${t.backend}${threads}`);
    await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 300_000 });
    const state = await page.evaluate(() => document.body.dataset.state);
    if (state !== 'ready') throw new Error(`${t.label}: the example page failed: ${await page.textContent('#status')}`);
    return await page.evaluate(async ({ DATA, CONFIG }) => {
      const bl = window.bitlora;
      const label = bl.backend.label;
      const t = await bl.createTrainer({ ...CONFIG, data: { text: DATA, fileName: 'devil.jsonl' } });
      const steps = [];
      t.on('progress', (p) => steps.push({ ms: p.ms, targets: p.tokens, backend: p.backend, readBytes: p.readBytes }));
      const done = new Promise((resolve, reject) => { t.on('done', resolve); t.on('error', (e) => reject(new Error(e.message))); });
      await t.start();
      await done;
      return { steps, backend: `${t.backend}, ${label}` };
    }, { DATA, CONFIG });
  } finally {
    await browser.close();
    server.stop();
  }
}

/**
 * `bitlora train --backend cpu` on the page's workload: its steps' target tokens and times, from
 * train_log.jsonl's cumulative tokens_per_s (a step's end is its cumulative tokens / that rate).
 */
function measureNative(t) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'bitlora-page-train-'));
  try {
    writeFileSync(path.join(dir, 'devil.jsonl'), DATA);
    const c = CONFIG;
    const run = spawnSync(t.bin, ['train', '--model', path.join(t.dir, 'web/models/default'), '--data', path.join(dir, 'devil.jsonl'),
      '--out', path.join(dir, 'out'), '--backend', 'cpu', '--steps', String(c.steps), '--context', String(c.context),
      '--rank', String(c.rank), '--alpha', String(c.alpha), '--lr', String(c.lr), '--batch', String(c.batch),
      '--eval-every', String(c.evalEvery), '--val-fraction', String(c.valFraction), '--seed', String(c.seed),
      '--checkpoint-every', String(c.checkpointEvery)], { cwd: t.dir, encoding: 'utf8' });
    if (run.status !== 0) throw new Error(`bitlora train failed:\n${run.stderr}`);
    const lines = readFileSync(path.join(dir, 'out', 'train_log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    let tokens = 0, end = 0;
    const steps = lines.map((l) => {
      tokens += l.tokens;
      const at = tokens / l.tokens_per_s;
      const step = { ms: (at - end) * 1000, targets: l.tokens, backend: 'cpu', readBytes: 0 };
      end = at;
      return step;
    });
    return { steps, backend: 'native CLI, bitlora train --backend cpu' };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * `bitlora bench train --shape 125m --backend cpu --gen-len 8`: its JSON report (8 timed steps
 * of ~3 s on 2 cores; the default, 128, takes 7 minutes).
 */
function benchNative125m(t) {
  const run = spawnSync(t.bin, ['bench', 'train', '--shape', '125m', '--backend', 'cpu', '--gen-len', '8'], { cwd: t.dir, encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`bitlora bench train failed:\n${run.stderr}`);
  return `${run.stdout.trim()}`;
}

if (native) {
  const first = targets[0];
  targets.push({ ...first, label: 'native CLI (default model)', threads: null, native: true });
}
const results = new Map(targets.map((t) => [t.label, []]));
const bench125m = [];
for (let r = 0; r < rounds; r++) {
  if (native) {
    const out = benchNative125m(targets[0]);
    bench125m.push(out);
    console.log(`round ${r + 1} native bitlora bench train --shape 125m --backend cpu: ${out}`);
  }
  for (const t of targets) {
    const run = t.native ? measureNative(t) : await measure(t);
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
