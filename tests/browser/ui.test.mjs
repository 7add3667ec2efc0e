// The page's fine-tuning panels end to end, on WebGPU (SwiftShader) and on the CPU fallback:
// the visitor's path through index.html with the default model and the Devil's Dictionary demo
// data (data/devil/train.jsonl, picked as a file):
//   1. the data panel detects JSONL prompt/completion, counts tokens and sequences, and a line
//      that is not JSON is reported with its line number;
//   2. a tiny fine-tune (12 steps) with pause and resume in the middle: the validation loss goes
//      down, the chart draws a point per step, the text summary says so;
//   3. save the adapter; the chat (step 4) answers a message with both, side by side, each
//      answer streamed token by token into its bubble of the conversation;
//   4. export the adapter: both PEFT files download and parse (adapter_config.json,
//      safetensors header with lora_A / lora_B tensors inside the file); importing them back
//      lists the adapter; deleting it (two clicks) removes just that one, from IndexedDB too;
//   5. a run checkpointed mid-way survives a reload: the page offers to resume it and it
//      continues from the checkpoint's step to the end;
//   6. "Delete all my data" also deletes the training runs and adapters;
//   7. screenshots at 1280 and 390 px (no horizontal scrolling), kept in artifacts/.
// Steps are kept tiny (2 cores): context 64, batch 2, a dozen steps.

import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { startServer, launchBrowser, openPage, waitSettled, unfold, REPO, ARTIFACTS } from './helpers.mjs';

const DATA = readFileSync(path.join(REPO, 'data/devil/train.jsonl'));
const EXAMPLES = DATA.toString('utf8').split('\n').filter((l) => l.trim()).length;

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

/** Fills the training settings (opening the panel's Settings). */
async function settings(page, values) {
  await page.evaluate(() => { document.getElementById('train-settings').open = true; });
  for (const [id, v] of Object.entries(values)) await page.fill(`#${id}`, String(v));
}

/** Waits for <body data-{key}> to be one of `values`; a timeout prints the page's log. */
async function waitData(page, key, values, log, timeout = 240_000) {
  try {
    await page.waitForFunction(([k, vs]) => vs.includes(document.body.dataset[k]), [key, values], { timeout });
  } catch (e) {
    const info = await page.evaluate(() => ({
      train: window.__bitlora.training, stats: document.getElementById('train-stats').textContent,
      errors: [...document.querySelectorAll('.error:not([hidden])')].map((e) => e.textContent.trim()),
    })).catch(() => null);
    throw new Error(`data-${key} never became ${values.join('|')}: ${e.message}\n${JSON.stringify(info)?.slice(0, 2000)}\n${log.slice(-30).join('\n')}`);
  }
}

const training = (page) => page.evaluate(() => window.__bitlora.training);

/** Parses a safetensors file: { header, dataBytes }, checking every tensor lies inside the data. */
function parseSafetensors(buf) {
  assert.ok(buf.length >= 8, 'safetensors: shorter than its 8-byte header length');
  const n = Number(buf.readBigUInt64LE(0));
  assert.ok(n > 0 && 8 + n <= buf.length, `safetensors: header length ${n} does not fit the ${buf.length}-byte file`);
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const dataBytes = buf.length - 8 - n;
  const bytesPer = { F32: 4, F16: 2, BF16: 2 };
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [b, e] = t.data_offsets;
    assert.ok(0 <= b && b <= e && e <= dataBytes, `${name}: offsets ${b}..${e} outside the ${dataBytes} data bytes`);
    assert.equal(e - b, t.shape.reduce((x, y) => x * y, 1) * bytesPer[t.dtype], `${name}: ${t.dtype} ${t.shape} needs another size`);
  }
  return { header, dataBytes };
}

// Per backend: SwiftShader emulates the GPU on the CPU, about 4 s a training step and 3 s a
// validation sequence here, so its run is shorter (fewer steps, fewer validation sequences).
const PLAN = {
  cpu: { steps: 12, context: 64, batch: 2, evalEvery: 4, ckpt: 4, lr: 0.005, valPercent: 2, pauseAfter: 2 },
  webgpu: { steps: 4, context: 32, batch: 1, evalEvery: 4, ckpt: 2, lr: 0.01, valPercent: 0.3, pauseAfter: 1 },
};

for (const backend of ['webgpu', 'cpu']) {
  const plan = PLAN[backend];
  describe(`ui on ${backend === 'webgpu' ? 'WebGPU (SwiftShader)' : 'the CPU fallback'}`, () => {
    let browser, context, page, log;
    const exported = {};

    before(async () => {
      browser = await launchBrowser({ webgpu: backend === 'webgpu' });
      ({ context, page, log } = await openPage(browser, server.url));
      const r = await page.evaluate(() => ({ state: window.__bitlora.state, backend: window.__bitlora.backend, error: window.__bitlora.error }));
      assert.equal(r.state, 'done', `${r.error}\n${log.join('\n')}`);
      assert.equal(r.backend, backend, 'the page runs on the backend this browser offers');
      console.log(`ui ${backend}: ${await page.textContent('#backend-label')}; training on ${await page.evaluate(() => window.__bitlora.training.memory?.backend)}`);
    });
    after(async () => {
      await context?.close();
      await browser?.close();
    });

    test('data: a line that is not JSON is named; the demo data is detected and counted', { timeout: 120_000 }, async () => {
      await page.fill('#data-text', '{"prompt": "Define A.", "completion": " B."}\n{"prompt": "Define C.", completion: " D."}\n');
      await waitData(page, 'data', ['error'], log, 30_000);
      const err = await page.textContent('#data-error-text');
      console.log(`data error: ${err}`);
      assert.match(err, /pasted text: line 2: not JSON/);
      assert.equal(await page.isVisible('#data-error-show'), true, '"Show the line" is offered');
      await page.click('#data-error-show');
      const sel = await page.evaluate(() => {
        const a = document.getElementById('data-text');
        return a.value.slice(a.selectionStart, a.selectionEnd);
      });
      assert.match(sel, /^\{"prompt": "Define C\."/, 'the bad line is selected');
      assert.equal(await page.isDisabled('#train-start'), true, 'no training without valid data');

      await unfold(page, 'data-options');
      await page.fill('#data-val', String(plan.valPercent));
      await page.setInputFiles('#data-file', { name: 'train.jsonl', mimeType: 'application/json', buffer: DATA });
      await waitData(page, 'data', ['ok'], log, 60_000);
      const summary = await page.textContent('#data-summary');
      const d = await page.evaluate(() => window.__bitlora.data.summary);
      console.log(`data: ${summary}`);
      assert.equal(d.format, 'jsonl-prompt-completion');
      assert.equal(d.examples, EXAMPLES);
      assert.ok(d.tokens > 10_000 && d.targetTokens < d.tokens, JSON.stringify(d));
      assert.ok(d.trainSequences > 0 && d.valSequences > 0, JSON.stringify(d));
      assert.match(summary, new RegExp(`^JSONL with prompt and completion · ${EXAMPLES} examples · [\\d,]+ tokens \\([\\d,]+ to learn from\\)`));
      assert.equal(await page.isHidden('#data-error'), true);
    });

    test('train: a tiny fine-tune with pause and resume; the validation loss goes down and the chart draws it', { timeout: 600_000 }, async () => {
      const n = plan.steps;
      await settings(page, {
        'train-rank': 4, 'train-alpha': 8, 'train-lr': plan.lr, 'train-length': n, 'train-context': plan.context,
        'train-batch': plan.batch, 'train-eval': plan.evalEvery, 'train-ckpt': plan.ckpt,
      });
      assert.equal(await page.isChecked('#train-form input[name="preset"][value="custom"]'), true, 'changed settings select "Custom"');
      await page.waitForFunction(() => /fits\.$/.test(document.getElementById('mem-estimate').textContent), null, { timeout: 30_000 });
      const mem = await page.textContent('#mem-estimate');
      console.log(`memory: ${mem}`);
      assert.match(mem, /^Memory: about [\d.]+ [KMG]iB \(model .*\); .*: fits\.$/);
      await page.waitForFunction(() => !document.getElementById('train-start').disabled, null, { timeout: 30_000 });
      const t0 = Date.now();
      await page.click('#train-start');
      await page.waitForFunction((k) => window.__bitlora.training.step >= k, plan.pauseAfter, { timeout: 240_000 });
      await page.click('#train-pause');
      await waitData(page, 'train', ['paused'], log);
      let t = await training(page);
      const pausedAt = t.step;
      assert.ok(pausedAt >= plan.pauseAfter && pausedAt < n, `paused at step ${pausedAt}`);
      assert.equal(t.checkpointStep, pausedAt, 'pausing stores a checkpoint');
      assert.match(await page.textContent('#train-stats'), new RegExp(`^Paused at step ${pausedAt} of ${n} · checkpoint at step ${pausedAt}`));
      assert.equal(await page.isEnabled('#train-resume'), true);
      assert.equal(await page.isDisabled('#train-pause'), true);
      await page.waitForTimeout(1500);
      assert.equal((await training(page)).step, pausedAt, 'no step runs while paused');
      await page.click('#train-resume');
      await waitData(page, 'train', ['done', 'error', 'stopped'], log);
      t = await training(page);
      const secs = (Date.now() - t0) / 1000;
      assert.equal(t.state, 'done', t.error);
      assert.equal(t.step, n);
      // A point per step, each step once (pause/resume did not skip or repeat one).
      assert.deepEqual(t.points.train.map((p) => p[0]), Array.from({ length: n }, (_, i) => i + 1));
      const val = t.points.val;
      console.log(`${backend}: ${n} steps in ${secs.toFixed(1)} s (paused at ${pausedAt}); train ${t.points.train.map((p) => p[1].toFixed(2)).join(' ')}; ` +
        `validation ${val.map(([s, v]) => `${s}:${v.toFixed(3)}`).join(' ')}`);
      // Validation before training (step 0: the base model), then every evalEvery steps.
      assert.deepEqual(val.map((p) => p[0]), Array.from({ length: n / plan.evalEvery + 1 }, (_, i) => i * plan.evalEvery));
      assert.ok(val.at(-1)[1] < val[0][1], `validation loss did not go down: ${JSON.stringify(val)}`);
      // The chart: one path vertex per training step, a dot per validation, and its summary.
      const chart = await page.evaluate(() => ({
        train: (document.querySelector('#loss-chart path.train')?.getAttribute('d').match(/[ML]/g) ?? []).length,
        dots: document.querySelectorAll('#loss-chart circle.val-dot').length,
        summary: document.getElementById('chart-summary').textContent,
        label: document.querySelector('#loss-chart svg').getAttribute('aria-label'),
      }));
      assert.equal(chart.train, n);
      assert.equal(chart.dots, val.length);
      assert.match(chart.summary, new RegExp(`^Step ${n} of ${n}\\. Training loss [\\d.]+ \\(smoothed\\).* ` +
        `Validation loss [\\d.]+ at step ${n} \\([\\d.]+ at step 0`));
      assert.equal(chart.label, `Loss chart. ${chart.summary}`);
      assert.match(await page.textContent('#train-stats'), new RegExp(`^Done: ${n} steps of ${n} in .* validation loss [\\d.]+`));
      assert.equal(await page.evaluate(() => document.getElementById('train-progress').value), n);
    });

    test('adapters and chat: save, then both answers of a turn stream tokens', { timeout: 300_000 }, async () => {
      await page.fill('#adapter-name', 'devil');
      await page.click('#adapter-save');
      await page.waitForFunction(() => window.__bitlora.adapters.list.some((a) => a.name === 'devil'), null, { timeout: 30_000 });
      assert.match(await page.textContent('#adapter-list li[data-name="devil"] .meta'), new RegExp(`^rank 4, alpha 8 on q, v · .* trained ${plan.steps} steps`));
      assert.equal(await page.inputValue('#compare-adapter'), 'devil');

      // A prompt the base model continues (it ends "Define ..." prompts at once).
      await page.fill('#compare-prompt', 'The state of the Union');
      await page.click('#compare-settings > summary');
      await page.fill('#compare-max', '12');
      assert.equal(await page.isChecked('#compare-form input[name="compare-mode"][value="both"]'), true, 'a saved adapter: side by side');
      // Every text change of each answer while generating, as the visitor sees it (the turn's
      // bubbles are made when the message is sent, so the whole log is watched).
      await page.evaluate(() => {
        window.__cols = { base: [], adapted: [] };
        new MutationObserver(() => {
          if (document.body.dataset.compare !== 'generating') return;
          for (const col of ['base', 'adapted']) {
            const el = [...document.querySelectorAll(`#chat-log .turn.assistant [data-column="${col}"] .text`)].at(-1);
            if (el) window.__cols[col].push(el.textContent);
          }
        }).observe(document.getElementById('chat-log'), { childList: true, characterData: true, subtree: true });
      });
      await page.click('#compare-btn');
      await waitData(page, 'compare', ['done', 'error'], log, 240_000);
      const c = await page.evaluate(() => ({ compare: window.__bitlora.compare, cols: window.__cols }));
      assert.equal(c.compare.state, 'done', c.compare.error);
      assert.equal(c.compare.turns, 1);
      for (const col of ['base', 'adapted']) {
        const updates = [...new Set(c.cols[col].filter(Boolean))];
        const r = c.compare[col];
        assert.ok(r.tokens.length >= 2, `${col}: ${r.tokens.length} tokens: too few to see a stream`);
        assert.equal(r.result.adapter, col === 'base' ? null : 'devil');
        assert.ok(updates.length >= 2, `${col}: ${updates.length} DOM updates for ${r.tokens.length} tokens: not streamed`);
        for (let i = 1; i < updates.length; i++) assert.ok(updates[i].startsWith(updates[i - 1]), `${col}: update ${i} does not extend the text`);
        console.log(`${backend} ${col}: ${r.tokens.length} tokens in ${updates.length} updates: ${JSON.stringify(r.text)}`);
      }
      // One turn: the visitor's message, then the two answers side by side.
      assert.equal(await page.locator('#chat-log .turn.user').count(), 1);
      assert.equal(await page.textContent('#chat-log .turn.user'), 'The state of the Union');
      assert.equal(await page.locator('#chat-log .turn.assistant [data-column]').count(), 2);
      assert.match(await page.textContent('#chat-log .turn.assistant [data-column="adapted"] .stats'), /^\d+ tokens? in .*(reached max tokens|the model ended it)$/);
    });

    test('adapters: export downloads PEFT files that parse; importing them back lists the adapter', { timeout: 120_000 }, async () => {
      const downloads = [];
      const got = new Promise((resolve) => {
        page.on('download', async (d) => {
          downloads.push({ name: d.suggestedFilename(), file: await d.path() });
          if (downloads.length === 2) resolve();
        });
      });
      await page.click('#adapter-list li[data-name="devil"] .adapter-export');
      await Promise.race([got, page.waitForTimeout(30_000)]);
      assert.deepEqual(downloads.map((d) => d.name).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
      const byName = Object.fromEntries(downloads.map((d) => [d.name, readFileSync(d.file)]));
      const config = JSON.parse(byName['adapter_config.json'].toString('utf8'));
      assert.equal(config.peft_type, 'LORA');
      assert.equal(config.r, 4);
      assert.equal(config.lora_alpha, 8);
      assert.deepEqual([...config.target_modules].sort(), ['q_proj', 'v_proj']);
      const { header, dataBytes } = parseSafetensors(byName['adapter_model.safetensors']);
      const names = Object.keys(header).filter((k) => k !== '__metadata__');
      assert.ok(names.length > 0 && names.every((n) => /^base_model\.model\.model\.layers\.\d+\.self_attn\.[qv]_proj\.lora_[AB]\.weight$/.test(n)), names.join(', '));
      assert.equal(names.filter((n) => n.endsWith('lora_A.weight')).length, names.length / 2);
      for (const n of names.filter((x) => x.includes('lora_A'))) assert.equal(header[n].shape[0], 4, `${n}: rank rows`);
      console.log(`${backend} export: adapter_config.json r=${config.r} alpha=${config.lora_alpha} ${config.target_modules}; ` +
        `adapter_model.safetensors ${names.length} tensors, ${dataBytes} data bytes`);
      exported.files = byName;
      assert.match(await page.textContent('#adapter-downloads'), /adapter_config\.json \([\d.]+ [KM]?i?B\).*adapter_model\.safetensors/);

      await page.setInputFiles('#adapter-import', Object.entries(byName).map(([name, buffer]) => ({
        name, buffer, mimeType: name.endsWith('.json') ? 'application/json' : 'application/octet-stream',
      })));
      await page.waitForFunction(() => window.__bitlora.adapters.list.some((a) => a.source === 'imported'), null, { timeout: 30_000 })
        .catch(async (e) => { throw new Error(`${e.message}: ${await page.textContent('#adapter-error')}`); });
      const imported = await page.evaluate(() => window.__bitlora.adapters.list.find((a) => a.source === 'imported'));
      assert.equal(imported.r, 4);
      assert.match(await page.textContent('#adapter-status'), /^Imported “imported” \(rank 4 on q, v\)/);

      // Deleting one adapter asks once in place (a second click), removes just that one from the
      // list and from IndexedDB, and leaves the other.
      const del = page.locator('#adapter-list li[data-name="imported"] .adapter-delete');
      await del.click();
      assert.match(await del.textContent(), /sure\? Click again/);
      assert.ok((await page.evaluate(() => window.__bitlora.adapters.list)).some((a) => a.name === 'imported'), 'one click deleted the adapter');
      await del.click();
      await page.waitForFunction(() => !window.__bitlora.adapters.list.some((a) => a.name === 'imported'), null, { timeout: 30_000 });
      assert.match(await page.textContent('#adapter-status'), /^Deleted “imported”\./);
      assert.deepEqual(await page.evaluate(() => window.__bitlora.adapters.list.map((a) => a.name)), ['devil']);
      assert.equal(await page.locator('#adapter-list li[data-name="imported"]').count(), 0);
      const stored = await page.evaluate(() => new Promise((resolve, reject) => {
        const req = indexedDB.open('bitlora-training');
        req.onerror = () => reject(req.error);
        req.onsuccess = () => {
          const keys = req.result.transaction('adapters').objectStore('adapters').getAllKeys();
          keys.onsuccess = () => { req.result.close(); resolve(keys.result); };
          keys.onerror = () => reject(keys.error);
        };
      }));
      assert.deepEqual(stored, ['devil']);
    });

    test('screenshots at 1280 and 390 px', { timeout: 60_000 }, async () => {
      mkdirSync(ARTIFACTS, { recursive: true });
      for (const viewport of [{ width: 1280, height: 800 }, { width: 390, height: 844 }]) {
        await page.setViewportSize(viewport);
        await page.waitForTimeout(300); // the chart redraws at the new width
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        assert.ok(overflow <= 0, `${viewport.width}px: the page scrolls sideways by ${overflow}px`);
        const chartWidth = await page.evaluate(() => document.querySelector('#loss-chart svg').getBoundingClientRect().width);
        assert.ok(chartWidth <= viewport.width - 20, `chart ${chartWidth}px wide at ${viewport.width}px`);
        await page.screenshot({ path: path.join(ARTIFACTS, `ui-${backend}-${viewport.width}x${viewport.height}.png`), fullPage: true });
        for (const [id, name] of [['dataset', 'data'], ['train', 'train'], ['compare', 'chat'], ['adapters', 'adapters']]) {
          await page.locator(`#${id}`).screenshot({ path: path.join(ARTIFACTS, `ui-${backend}-${name}-${viewport.width}.png`) });
        }
      }
      await page.setViewportSize({ width: 1280, height: 800 });
    });

    test('resume after a reload: a run checkpointed mid-way continues from its checkpoint', { timeout: 600_000 }, async () => {
      const n = plan.steps === 4 ? 4 : 8;
      await settings(page, { 'train-length': n, 'train-ckpt': 2, 'train-eval': 0 });
      const previous = (await training(page)).runId;
      await page.click('#train-start');
      await page.waitForFunction((prev) => {
        const t = window.__bitlora.training;
        return t.runId && t.runId !== prev && t.checkpointStep >= 2 && t.step >= 3;
      }, previous, { timeout: 240_000 });
      const before = await training(page);
      const runId = before.runId;
      // The tab "closes" mid-run: a reload. The run's last checkpoint is kept in IndexedDB.
      await page.reload();
      await waitSettled(page, log);
      await page.waitForFunction(() => document.body.dataset.resumable === 'yes', null, { timeout: 30_000 })
        .catch(async (e) => { throw new Error(`no resume offer: ${e.message}\n${JSON.stringify(await training(page))}`); });
      const offer = await training(page);
      const from = offer.offered.step;
      assert.equal(offer.offered.id, runId);
      // Never earlier than the checkpoint read before the reload; on a fast CPU a later one may
      // have been stored before the tab went (it was still mid-way: below n).
      assert.ok(from >= before.checkpointStep && from >= 2 && from < n, `checkpoint step ${from} (the run was at ${before.step}, checkpoint ${before.checkpointStep}, of ${n})`);
      // The offer is on the first screen, without scrolling (issue 13: it sat ~2,200 px down).
      await page.evaluate(() => window.scrollTo(0, 0));
      const box = await page.locator('#resume-offer').boundingBox();
      assert.ok(box && box.y + box.height <= 800, `the resume offer ends at ${box?.y + box?.height} px, below the first screen (800 px)`);
      const text = await page.textContent('#resume-text');
      console.log(`${backend} offer: ${text}`);
      assert.match(text, new RegExp(`^A training run was (interrupted|paused).*Its checkpoint is at step ${from} of ${n}`));
      await page.click('#resume-run');
      await waitData(page, 'train', ['done', 'error', 'stopped'], log);
      const t = await training(page);
      assert.equal(t.state, 'done', t.error);
      assert.equal(t.runId, runId);
      assert.equal(t.resumedFrom, from);
      // The Done line counts what ran in this tab since the resume, and says so.
      assert.match(await page.textContent('#train-stats'), new RegExp(`^Done: ${n} steps of ${n} \\(resumed at step ${from}: ${n - from} steps? in `));
      assert.equal(t.step, n);
      // The chart holds the stored history up to the checkpoint, then the resumed steps.
      assert.deepEqual(t.points.train.map((p) => p[0]), Array.from({ length: n }, (_, i) => i + 1));
      assert.equal(await page.isHidden('#resume-offer'), true);
      // The form shows the resumed run's settings.
      assert.equal(await page.inputValue('#train-length'), String(n));
      assert.equal(await page.inputValue('#train-rank'), '4');
    });

    test('"Delete all my data" also deletes training runs and adapters', { timeout: 120_000 }, async () => {
      const adapters = (await page.evaluate(() => window.__bitlora.adapters.list)).length;
      assert.ok(adapters >= 1);
      // The "Your data" panel says what the training store holds.
      await page.waitForFunction((n) => new RegExp(`: \\d+ runs? and ${n} adapters?, `).test(document.getElementById('training-status').textContent), adapters, { timeout: 10_000 });
      page.once('dialog', (d) => d.accept());
      await page.click('#delete-all');
      await page.waitForFunction(() => /^(Deleted|Could not)/.test(document.getElementById('data-status').textContent), null, { timeout: 30_000 });
      const status = await page.textContent('#data-status');
      console.log(`${backend} delete: ${status}`);
      assert.match(status, new RegExp(`^Deleted: \\d+ models? \\([\\d.]+ [KMG]iB\\), \\d+ training runs? and ${adapters} adapters?\\.`));
      await page.waitForFunction(() => window.__bitlora.adapters.list.length === 0, null, { timeout: 10_000 });
      assert.equal(await page.locator('#adapter-list li').count(), 0);
      assert.equal(await page.inputValue('#compare-adapter'), '');
      // After a reload nothing is offered or listed: the training store is empty.
      await page.reload();
      await waitSettled(page, log);
      await page.waitForFunction(() => window.__bitlora.training.storedRuns === 0, null, { timeout: 30_000 });
      assert.equal(await page.isHidden('#resume-offer'), true);
      assert.deepEqual(await page.evaluate(() => window.__bitlora.adapters.list), []);
      await page.waitForFunction(() => /^No training runs or adapters are kept/.test(document.getElementById('training-status').textContent), null, { timeout: 10_000 });
      const crashes = log.filter((l) => /panicked|RuntimeError|unreachable|pageerror|worker restarted/i.test(l));
      assert.deepEqual(crashes, []);
    });
  });
}
