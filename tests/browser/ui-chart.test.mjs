// The training panel's loss chart (web/chart.js) on its own: the pure parts (ticks, smoothing,
// the text summary) in Node, the SVG in headless Chromium at desktop and phone widths, served
// with the page's own Content-Security-Policy (a violation is reported and fails the test).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { niceTicks, smooth, describe, fmtLoss } from '../../web/chart.js';
import { startServer, launchBrowser, ARTIFACTS } from './helpers.mjs';

test('chart: nice ticks cover the range on 1/2/2.5/5 multiples', () => {
  assert.deepEqual(niceTicks(0, 100, 5).ticks, [0, 20, 40, 60, 80, 100]);
  const t = niceTicks(2.83, 5.11, 5);
  assert.ok(t.lo <= 2.83 && t.hi >= 5.11, JSON.stringify(t));
  assert.deepEqual(t.ticks, [2.5, 3, 3.5, 4, 4.5, 5, 5.5]);
  // A flat series still gets a non-empty range around it.
  const flat = niceTicks(3, 3, 4);
  assert.ok(flat.lo < 3 && flat.hi > 3 && flat.ticks.length >= 2, JSON.stringify(flat));
  assert.deepEqual(niceTicks(NaN, 1).ticks, []);
});

test('chart: smoothing is a debiased moving average', () => {
  assert.deepEqual(smooth([4, 4, 4]).map((v) => Number(v.toFixed(9))), [4, 4, 4]);
  const s = smooth([5, 1], 0.5);
  assert.equal(s[0], 5);
  assert.ok(Math.abs(s[1] - (0.5 * 5 * 0.5 + 0.5 * 1) / 0.75) < 1e-12);
  assert.deepEqual(smooth([1, 2, 3], 0), [1, 2, 3]);
});

test('chart: the text summary says the step, the trend and the best validation loss', () => {
  assert.match(describe({ train: [], val: [] }), /No losses yet/);
  const text = describe({
    train: [[1, 5.1], [2, 4.6], [3, 4.2], [4, 3.9]],
    val: [[0, 5.12], [2, 4.5], [4, 4.6]],
  }, 10);
  console.log(`summary: ${text}`);
  assert.match(text, /^Step 4 of 10\. Training loss \d\.\d\d \(smoothed\), 5\.10 at step 1, down \d+%\. /);
  assert.match(text, /Validation loss 4\.60 at step 4 \(5\.12 at step 0; best 4\.50 at step 2\)\.$/);
  assert.equal(fmtLoss(3.14159), '3.14');
});

// ---- in the browser --------------------------------------------------------------------------

let server, browser;
before(async () => {
  server = await startServer();
  browser = await launchBrowser({ webgpu: false });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

// The CSP `bitlora serve` sends (crates/cli/src/serve.rs), so the chart is tested under it.
const CSP = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self'; " +
  "style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const HTML = `<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="web/style.css"></head>
<body><main><section id="train"><h2>Training</h2>
<div class="chart-box"><div id="chart"></div></div><p id="chart-summary"></p></section></main></body></html>`;

async function chartPage(width) {
  const context = await browser.newContext({ viewport: { width, height: 700 } });
  const page = await context.newPage();
  const violations = [];
  page.on('console', (m) => { if (/Content.Security.Policy|Refused/i.test(m.text())) violations.push(m.text()); });
  page.on('pageerror', (e) => violations.push(e.message));
  await page.route('**/chart-test.html', (route) => route.fulfill({
    status: 200, contentType: 'text/html', body: HTML, headers: { 'content-security-policy': CSP },
  }));
  await page.goto(new URL('chart-test.html', server.url).href);
  return { context, page, violations };
}

for (const width of [1280, 390]) {
  test(`chart: draws train and validation losses at ${width} px under the page's CSP`, { timeout: 60_000 }, async () => {
    const { context, page, violations } = await chartPage(width);
    try {
      const r = await page.evaluate(async () => {
        const { LossChart } = await import('/web/chart.js');
        const chart = new LossChart(document.getElementById('chart'), { summary: document.getElementById('chart-summary') });
        chart.setTotalSteps(120);
        // A noisy, falling loss over 100 steps and a validation point every 10.
        let seed = 7;
        const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
        for (let s = 1; s <= 100; s++) chart.add('train', s, 3 + 2.2 * Math.exp(-s / 30) + (rnd() - 0.5) * 0.4);
        for (let s = 0; s <= 100; s += 10) chart.add('val', s, 3.3 + 2 * Math.exp(-s / 35));
        // A resumed run that replays step 100 replaces it rather than doubling it.
        chart.add('val', 100, 3.35);
        chart.draw();
        const svg = document.querySelector('#chart svg');
        const d = (cls) => svg.querySelector(`path.${cls}`)?.getAttribute('d') ?? '';
        const box = svg.getBoundingClientRect();
        return {
          train: (d('train').match(/[ML]/g) ?? []).length,
          raw: (d('train-raw').match(/[ML]/g) ?? []).length,
          val: (d('val').match(/[ML]/g) ?? []).length,
          dots: svg.querySelectorAll('circle.val-dot').length,
          ticks: [...svg.querySelectorAll('text.tick')].map((t) => t.textContent),
          label: svg.getAttribute('aria-label'),
          role: svg.getAttribute('role'),
          summary: document.getElementById('chart-summary').textContent,
          width: box.width,
          stroke: getComputedStyle(svg.querySelector('path.train')).stroke,
          overflow: document.documentElement.scrollWidth - window.innerWidth,
          points: chart.points,
        };
      });
      assert.equal(r.train, 100);
      assert.equal(r.raw, 100);
      assert.equal(r.val, 11);
      assert.equal(r.dots, 11);
      assert.equal(r.points.val.at(-1)[1], 3.35);
      assert.equal(r.role, 'img');
      assert.match(r.summary, /^Step 100 of 120\. Training loss .* down \d+%\. Validation loss 3\.35 at step 100/);
      assert.equal(r.label, `Loss chart. ${r.summary}`);
      assert.ok(r.ticks.includes('0') && r.ticks.includes('120'), `x ticks: ${r.ticks}`);
      assert.notEqual(r.stroke, 'none', 'the stylesheet colours the training line');
      assert.ok(r.width <= width && r.width > width * 0.5, `chart width ${r.width} at ${width} px`);
      assert.ok(r.overflow <= 0, `the page overflows by ${r.overflow}px`);
      assert.deepEqual(violations, []);
      console.log(`chart at ${width}px: ${r.width.toFixed(0)} px wide; x ticks ${r.ticks.join(' ')}`);
      mkdirSync(ARTIFACTS, { recursive: true });
      await page.locator('#train').screenshot({ path: path.join(ARTIFACTS, `ui-chart-${width}.png`) });
    } finally {
      await context.close();
    }
  });
}
