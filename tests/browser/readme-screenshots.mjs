// README's screenshots of the page (docs/img/page-1280.png, page-390.png): the four steps walked
// with the defaults a visitor gets (the demo data, the Quick try preset: 60 steps, about 1.5 min
// on the CPU fallback), then two chat turns side by side. Not a test (tests/browser/journey.test.mjs
// checks the same path with tiny runs); run it after a change to the page's look:
//   cd tests/browser && node readme-screenshots.mjs && cp artifacts/readme-page-*.png ../../docs/img/
// (renaming readme-page-W.png to page-W.png). Also writes readme-page-390-dark.png (first screen).
import path from 'node:path';
import { mkdirSync } from 'node:fs';
import { startServer, launchBrowser, ARTIFACTS } from './helpers.mjs';
mkdirSync(ARTIFACTS, { recursive: true });
const out = (name) => path.join(ARTIFACTS, `readme-${name}.png`);
const server = await startServer();
const browser = await launchBrowser({ webgpu: false });
const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, colorScheme: 'light' });
const page = await context.newPage();
try {
  await page.goto(server.url);
  await page.waitForFunction(() => document.body.dataset.state === 'done', null, { timeout: 120000 });
  await page.getByRole('button', { name: 'Try the demo data' }).click();
  await page.waitForFunction(() => document.body.dataset.data === 'ok', null, { timeout: 60000 });
  const start = page.getByRole('button', { name: 'Start fine-tuning' });
  await page.waitForFunction(() => !document.getElementById('train-start').disabled, null, { timeout: 60000 });
  const t0 = Date.now();
  await start.click();
  await page.waitForFunction(() => ['done', 'stopped', 'error'].includes(document.body.dataset.train), null, { timeout: 600000 });
  console.log('trained in', (Date.now() - t0) / 1000, 's:', await page.textContent('#train-stats'));
  await page.getByRole('button', { name: 'Save the trained adapter' }).click();
  await page.waitForFunction(() => window.__bitlora.adapters.list.length === 1, null, { timeout: 30000 });
  await page.getByRole('button', { name: 'Send' }).click();
  await page.waitForFunction(() => document.body.dataset.compare === 'done', null, { timeout: 120000 });
  await page.locator('#compare-prompt').fill('Define LOVE. A');
  await page.getByRole('button', { name: 'Send' }).click();
  await page.waitForFunction(() => document.body.dataset.compare === 'done' && window.__bitlora.compare.turns === 2, null, { timeout: 120000 });
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: out('page-1280'), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(500);
  await page.screenshot({ path: out('page-390'), fullPage: true });
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.screenshot({ path: out('page-390-dark'), fullPage: false });
} finally {
  await context.close(); await browser.close(); await server.stop();
}
