// Validation in the page's training loop (issue 13 item 6), through the JS API on the CPU fallback
// (the loop is the worker's JavaScript over core's Trainer; the backend does not change it):
// - the held-out share is bounded: maxValSequences caps it and the rest is trained on;
// - the base model's validation loss is measured inside the loop, a sequence at a time, with a
//   'validation' event per sequence, and equals a whole-pass validate() on the same run;
// - a validation pass after a step reports each sequence, and the step's progress event then
//   carries the loss; every event's ETA is a number, counting the passes still due;
// - Stop during a validation pass (the base model's, or a step's) stops after the sequence it
//   is on, without finishing the pass; Pause during one pauses there and Resume finishes it.
// No assertion on wall-clock time: "acts at once" is checked as "stops well before the pass of 64
// sequences ends", counted in sequences (the page's stop() reaches the worker a message round
// trip after the event that asked for it, a sequence or a few later).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { REPO, startServer, launchBrowser } from './helpers.mjs';

// 200 short examples at context 16, half held out: ~100 validation sequences before the cap.
const DATA = readFileSync(path.join(REPO, 'data/devil/train.jsonl'), 'utf8').split('\n').slice(0, 200).join('\n');
const BASE = {
  steps: 4, context: 16, rank: 4, lr: 1e-2, schedule: 'constant', batch: 1, evalEvery: 2,
  valFraction: 0.5, completionOnly: true, seed: 3, checkpointEvery: 0,
};

let server;
let browser;
let page;
const log = [];
before(async () => {
  server = await startServer();
  browser = await launchBrowser({ webgpu: false });
  page = await (await browser.newContext()).newPage();
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  await page.goto(`${server.url}web/examples/train.html`);
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 120_000 });
  assert.equal(await page.evaluate(() => document.body.dataset.state), 'ready', log.join('\n'));
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

/**
 * Runs a trainer with `config` in the page: starts it, and on the validation event that
 * `act.when` picks ({ step, done, total }) calls `act.action` ('stop' or 'pause'; a pause is
 * resumed). Resolves to every event in order and the done event.
 */
function run(config, act = null) {
  return page.evaluate(async ({ DATA, config, act }) => {
    const bl = window.bitlora;
    const tr = await bl.createTrainer({ data: { text: DATA, fileName: 'devil.jsonl' }, ...config });
    const events = [];
    let acted = false;
    tr.on('progress', (p) => events.push({ kind: 'progress', step: p.step, valLoss: p.valLoss ?? null, eta: p.eta, tokensPerSec: p.tokensPerSec }));
    tr.on('validation', (v) => {
      events.push({ kind: 'validation', step: v.step, done: v.done, total: v.total, valLoss: v.valLoss ?? null, eta: v.eta });
      if (act && !acted && v.step === act.step && v.done === act.done) {
        acted = true;
        events.push({ kind: act.action });
        if (act.action === 'stop') tr.stop();
        else tr.pause().then(() => { events.push({ kind: 'paused', state: tr.state }); return tr.resume(); });
      }
    });
    await tr.start();
    const done = await tr.finished;
    const data = tr.data;
    const initialValLoss = tr.initialValLoss;
    await tr.dispose();
    return { events, done, data, initialValLoss };
  }, { DATA, config, act });
}

test('the held-out share is capped by maxValSequences, the rest trained on', { timeout: 120_000 }, async () => {
  const sizes = await page.evaluate(async ({ DATA, BASE }) => {
    const bl = window.bitlora;
    const input = { text: DATA, fileName: 'devil.jsonl' };
    const all = await bl.prepareData(input, { ...BASE, maxValSequences: 0 });
    const capped = await bl.prepareData(input, { ...BASE, maxValSequences: 5 });
    const byDefault = await bl.prepareData(input, BASE);
    return { all, capped, byDefault };
  }, { DATA, BASE });
  const { all, capped, byDefault } = sizes;
  console.log(`held out: ${all.valSequences} uncapped, ${capped.valSequences} with maxValSequences 5, ${byDefault.valSequences} by default (64)`);
  assert.ok(all.valSequences > 5, `${all.valSequences} validation sequences without a cap`);
  assert.equal(capped.valSequences, 5);
  assert.equal(capped.trainSequences, all.trainSequences + all.valSequences - 5);
  assert.equal(byDefault.valSequences, Math.min(all.valSequences, 64));
});

test('validation runs a sequence at a time, before the first step and after steps, with the ETA', { timeout: 300_000 }, async () => {
  const config = { ...BASE, maxValSequences: 6 };
  // The whole-pass validate() of an identical run, for the base model's loss.
  const whole = await page.evaluate(async ({ DATA, config }) => {
    const tr = await window.bitlora.createTrainer({ data: { text: DATA, fileName: 'devil.jsonl' }, ...config });
    const v = await tr.validate();
    await tr.dispose();
    return v;
  }, { DATA, config });
  const r = await run(config);
  const v = r.events.filter((e) => e.kind === 'validation');
  const p = r.events.filter((e) => e.kind === 'progress');
  console.log(`validation events: ${v.map((e) => `${e.step}:${e.done}/${e.total}`).join(' ')}`);
  console.log(`ETAs: ${r.events.map((e) => e.eta?.toFixed(2)).join(' ')}`);
  // Base model: 6 events, 1..6 of 6, the last with the loss, equal to validate()'s exactly.
  const base = v.filter((e) => e.step === 0);
  assert.deepEqual(base.map((e) => e.done), [1, 2, 3, 4, 5, 6]);
  assert.ok(base.every((e) => e.total === 6));
  assert.equal(base.at(-1).valLoss, whole);
  assert.equal(r.initialValLoss, whole);
  // Validation after steps 2 and 4 (evalEvery 2, 4 steps): 6 sequences each, then the step's
  // progress event with the loss; steps 1 and 3 have none.
  for (const step of [2, 4]) {
    assert.deepEqual(v.filter((e) => e.step === step).map((e) => e.done), [1, 2, 3, 4, 5, 6], `step ${step}`);
    const report = p.find((e) => e.step === step);
    assert.ok(Number.isFinite(report.valLoss), `step ${step}'s report has its validation loss`);
    assert.equal(v.filter((e) => e.step === step).at(-1).valLoss, report.valLoss);
  }
  for (const step of [1, 3]) assert.equal(p.find((e) => e.step === step).valLoss, null);
  assert.deepEqual(p.map((e) => e.step), [1, 2, 3, 4]);
  // Every event carries an ETA; from the first step on it is positive until the last step.
  assert.ok(r.events.every((e) => typeof e.eta === 'number' && e.eta >= 0));
  assert.ok(p.slice(0, -1).every((e) => e.eta > 0), p.map((e) => e.eta).join(' '));
  assert.equal(p.at(-1).eta, 0);
  assert.ok(p.every((e) => e.tokensPerSec > 0));
  assert.equal(r.done.reason, 'done');
});

test('Stop during the base model\'s validation stops at once, before any step', { timeout: 120_000 }, async () => {
  const r = await run({ ...BASE, maxValSequences: 64 }, { step: 0, done: 2, action: 'stop' });
  const base = r.events.filter((e) => e.kind === 'validation' && e.step === 0);
  console.log(`stopped after ${base.length} of 64 base-model validation sequences`);
  assert.equal(r.done.reason, 'stopped');
  assert.equal(r.done.step, 0);
  assert.ok(base.length < 32, `${base.length} validation sequences ran after stop() at the 2nd`);
  assert.equal(r.initialValLoss, null);
  assert.equal(r.events.filter((e) => e.kind === 'progress').length, 0);
});

test('Stop during a step\'s validation stops at once; the step counts, without its validation loss', { timeout: 120_000 }, async () => {
  const r = await run({ ...BASE, maxValSequences: 64 }, { step: 2, done: 3, action: 'stop' });
  const pass = r.events.filter((e) => e.kind === 'validation' && e.step === 2);
  console.log(`stopped after ${pass.length} of 64 validation sequences of step 2`);
  assert.equal(r.done.reason, 'stopped');
  assert.equal(r.done.step, 2);
  assert.ok(pass.length < 32, `${pass.length} validation sequences ran after stop() at the 3rd`);
  const p = r.events.filter((e) => e.kind === 'progress');
  assert.deepEqual(p.map((e) => e.step), [1, 2]);
  assert.equal(p.at(-1).valLoss, null);
});

test('Pause during a step\'s validation pauses there; Resume finishes the pass', { timeout: 180_000 }, async () => {
  const r = await run({ ...BASE, maxValSequences: 64 }, { step: 2, done: 3, action: 'pause' });
  const kinds = r.events.map((e) => (e.kind === 'validation' ? `v${e.step}:${e.done}` : e.kind === 'progress' ? `p${e.step}` : e.kind));
  const around = kinds.indexOf('pause');
  console.log(`... ${kinds.slice(Math.max(around - 3, 0), around + 5).join(' ')} ...`);
  const paused = r.events.find((e) => e.kind === 'paused');
  assert.equal(paused?.state, 'paused');
  // Paused well before the pass's end, then the pass went on to its end, every sequence once.
  const at = kinds.indexOf('paused');
  assert.ok(at < kinds.indexOf('v2:32'), kinds.join(' '));
  assert.deepEqual(r.events.filter((e) => e.kind === 'validation' && e.step === 2).map((e) => e.done), Array.from({ length: 64 }, (_, i) => i + 1));
  assert.ok(Number.isFinite(r.events.find((e) => e.kind === 'progress' && e.step === 2).valLoss));
  assert.equal(r.done.reason, 'done');
});
