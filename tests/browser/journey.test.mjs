// The page as a visitor meets it (issue 13, acceptance 1): the four steps walked with visible
// controls only (found by role, label or text, as a person or a screen reader finds them; no
// page.evaluate to act), on WebGPU (SwiftShader) and on the CPU fallback, at 1280 and 390 px.
// At each point it checks what the visitor sees:
//   - no horizontal scrolling (document.scrollingElement.scrollWidth <= innerWidth);
//   - every visible control has an accessible name (Chromium's accessibility tree, over CDP);
//   - every visible control is a tap target of at least 44 px (checkboxes and radios through
//     their label);
//   - the header names the next step, and each step's heading says its state;
//   - the chat is a conversation: each message and each answer is its own labelled group in a
//     role=log, answers stream token by token, side by side or the adapter alone;
//   - nothing is requested from another origin.
// Step 2 is done with the keyboard only (Tab to "Try the demo data", Enter), checking that the
// focused control shows a visible outline. Runs are tiny (2 cores): a handful of steps of short
// sequences, a few tokens of chat. Screenshots of the finished page go to artifacts/
// (journey-<backend>-<width>.png; README's come from the CPU ones).

import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { startServer, launchBrowser, gpuUrl, ARTIFACTS } from './helpers.mjs';

// SwiftShader trains at ~4 tokens/s here, the CPU fallback at ~200: the WebGPU run is shorter.
const PLAN = {
  cpu: { steps: 8, context: 32, batch: 2, evalEvery: 4, valShare: 2, chatTokens: 10 },
  webgpu: { steps: 2, context: 16, batch: 1, evalEvery: 0, valShare: 0, chatTokens: 6 },
};
const WIDTHS = [1280, 390];

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.stop(); });

/** Roles of the controls a visitor can operate, as Chromium's accessibility tree names them. */
const CONTROL_ROLES = new Set(['button', 'textbox', 'spinbutton', 'combobox', 'checkbox', 'radio', 'DisclosureTriangle', 'searchbox', 'slider', 'link', 'ListBox']);

/** Every check that holds at any point of the journey. `where` names the point in messages. */
async function checkPage(page, cdp, where) {
  // No sideways scrolling.
  const sizes = await page.evaluate(() => ({ scroll: document.scrollingElement.scrollWidth, inner: window.innerWidth }));
  assert.ok(sizes.scroll <= sizes.inner, `${where}: the page scrolls sideways (${sizes.scroll} > ${sizes.inner} px)`);

  // Every control in the accessibility tree (visible ones only: hidden and folded ones are not
  // in it, or are marked ignored) has a name.
  const { nodes } = await cdp.send('Accessibility.getFullAXTree');
  const unnamed = [];
  let controls = 0;
  for (const n of nodes) {
    if (n.ignored || !CONTROL_ROLES.has(n.role?.value)) continue;
    const hidden = n.properties?.some((p) => p.name === 'hidden' && p.value?.value === true);
    if (hidden) continue;
    controls++;
    if (!String(n.name?.value ?? '').trim()) unnamed.push(`${n.role.value} (backend node ${n.backendDOMNodeId})`);
  }
  assert.ok(controls > 5, `${where}: only ${controls} controls in the accessibility tree`);
  if (unnamed.length) {
    const described = [];
    for (const u of unnamed) {
      const id = Number(u.match(/node (\d+)/)[1]);
      const { node } = await cdp.send('DOM.describeNode', { backendNodeId: id }).catch(() => ({ node: null }));
      described.push(`${u}: <${node?.localName} ${(node?.attributes ?? []).join(' ')}>`);
    }
    assert.fail(`${where}: controls without an accessible name:\n  ${described.join('\n  ')}`);
  }

  // Tap targets: 44 px tall at least (the label for checkboxes and radios).
  const small = await page.evaluate(() => {
    const out = [];
    const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden'; };
    for (const el of document.querySelectorAll('button, input, select, textarea, summary, [role="button"]')) {
      if (!visible(el)) continue;
      const target = (el.type === 'checkbox' || el.type === 'radio') ? el.closest('label') ?? el : el;
      const h = target.getBoundingClientRect().height;
      if (h < 43.5) out.push(`${el.tagName.toLowerCase()}#${el.id || ''}[${el.type || ''}] "${(el.textContent || el.getAttribute('aria-label') || '').trim().slice(0, 30)}": ${h.toFixed(1)} px`);
    }
    return out;
  });
  assert.deepEqual(small, [], `${where}: tap targets under 44 px`);
}

/** The header's "Next: ..." line. */
const nextStep = (page) => page.getByRole('status').filter({ hasText: /^(Next:|Loading|Fine-tuning|Reading)/ }).first();

/** A step's state line (its section is a region named after its heading). */
const stepState = (page, name) => page.getByRole('region', { name }).locator('.step-state');

async function waitText(locator, re, where, timeout = 60_000) {
  const deadline = Date.now() + timeout;
  let last = '';
  while (Date.now() < deadline) {
    last = (await locator.textContent().catch(() => '')) ?? '';
    if (re.test(last)) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.fail(`${where}: waited ${timeout / 1000} s for ${re}, last saw ${JSON.stringify(last)}`);
}

// JOURNEY_BACKENDS=cpu (or webgpu) runs one backend only, e.g. while working on the page.
const BACKENDS = (process.env.JOURNEY_BACKENDS ?? 'cpu,webgpu').split(',');

for (const backend of BACKENDS) {
  const plan = PLAN[backend];
  describe(`journey on ${backend === 'webgpu' ? 'WebGPU (SwiftShader)' : 'the CPU fallback'}`, () => {
    let browser;
    before(async () => { browser = await launchBrowser({ webgpu: backend === 'webgpu' }); });
    after(async () => { await browser?.close(); });

    for (const width of WIDTHS) {
      test(`a visitor walks the four steps at ${width} px`, { timeout: 600_000 }, async () => {
        const context = await browser.newContext({ viewport: { width, height: 844 }, acceptDownloads: true });
        const page = await context.newPage();
        const cdp = await context.newCDPSession(page);
        const log = [];
        const requests = [];
        page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
        page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
        page.on('request', (r) => requests.push(r.url()));
        const where = (point) => `${backend} ${width}px, ${point}`;
        try {
          await page.goto(gpuUrl(browser, server.url));

          // The first screen: what the page is, then step 1 ready and step 2 named as next.
          await page.getByRole('heading', { level: 1, name: 'bitlora' }).waitFor();
          assert.match(await page.locator('header').textContent(), /Nothing you give the page leaves it/);
          await waitText(stepState(page, /Model/), /^Done: .* is ready/, where('model'), 120_000);
          assert.match(await page.getByRole('region', { name: /Model/ }).textContent(), /bitlora-default-12m/);
          assert.match(await page.locator('header').textContent(), backend === 'webgpu' ? /Runs on WebGPU/ : /Runs on CPU \(SIMD128, \d+ threads?\)/);
          await waitText(nextStep(page), /^Next: add your data \(step 2\)/, where('start'));
          assert.match(await stepState(page, /Your data/).textContent(), /^Needs you:/);
          assert.match(await stepState(page, /Fine-tune/).textContent(), /^Waiting:/);
          // The developer details are folded away.
          assert.equal(await page.getByText('Next-token prediction').isVisible(), false);
          assert.equal(await page.getByText('Max storage binding').isVisible(), false);
          await checkPage(page, cdp, where('first screen'));

          // Step 2 with the keyboard: Tab to "Try the demo data", Enter. The focus is visible.
          await page.locator('body').focus();
          let focused = null;
          for (let i = 0; i < 40; i++) {
            await page.keyboard.press('Tab');
            focused = await page.evaluate(() => {
              const el = document.activeElement;
              const s = getComputedStyle(el);
              return { text: el.textContent.trim(), outline: `${s.outlineStyle} ${s.outlineWidth}` };
            });
            if (focused.text === 'Try the demo data') break;
          }
          assert.equal(focused.text, 'Try the demo data', where('Tab never reached "Try the demo data"'));
          assert.match(focused.outline, /^solid [3-9]/, where(`the focused button shows no outline (${focused.outline})`));
          await page.keyboard.press('Enter');
          await waitText(stepState(page, /Your data/), /^Done: 893 examples, [\d,]+ tokens/, where('demo data'));
          await waitText(nextStep(page), /^Next: fine-tune \(step 3\)/, where('data added'));
          assert.match(await stepState(page, /Fine-tune/).textContent(), /^Needs you: press Start fine-tuning/);
          await checkPage(page, cdp, where('data added'));

          // Step 3: the settings are folded; a tiny run (the Quick try preset takes minutes).
          const train = page.getByRole('region', { name: /Fine-tune/ });
          assert.equal(await train.getByLabel('Rank').isVisible(), false, 'the settings start folded');
          await train.getByText('Settings', { exact: true }).click();
          await page.getByRole('region', { name: /Your data/ }).getByText('Data options').click();
          await page.getByLabel('Validation share (%)').fill(String(plan.valShare));
          await train.getByLabel('Training length', { exact: true }).fill(String(plan.steps));
          await train.getByLabel('Context (tokens)').fill(String(plan.context));
          await train.getByLabel('Batch (sequences a step)').fill(String(plan.batch));
          await train.getByLabel('Validate every (steps)').fill(String(plan.evalEvery));
          await train.getByLabel('Checkpoint every (steps)').fill('0');
          assert.equal(await train.getByRole('radio', { name: /Custom/ }).isChecked(), true);
          await checkPage(page, cdp, where('settings open'));
          // The data is counted again for the new context; wait for it, so the page no longer
          // moves under the pointer when Start is clicked.
          await waitText(page.getByRole('region', { name: /Your data/ }).getByRole('status').first(), new RegExp(`up to ${plan.context} tokens each`), where('data recounted'));
          await waitText(stepState(page, /Your data/), /^Done:/, where('data recounted'));
          const start = train.getByRole('button', { name: 'Start fine-tuning' });
          await waitEnabled(start, where('Start'));
          await start.click();
          // Running: the step's heading shows the step and the time left; Pause is offered.
          await waitText(stepState(page, /Fine-tune/), /^In progress: (starting…|step \d+ of \d+)/, where('training starts'));
          assert.match(await nextStep(page).textContent(), /^Fine-tuning \(step 3\)/);
          await train.getByRole('button', { name: 'Pause' }).waitFor({ state: 'visible' });
          await waitText(stepState(page, /Fine-tune/), new RegExp(`^Needs you: trained: save the adapter below`), where('training'), 480_000);
          await waitText(nextStep(page), /^Next: save the adapter/, where('trained'));
          assert.match(await train.getByRole('progressbar', { name: 'Training progress' }).getAttribute('value'), new RegExp(`^${plan.steps}$`));
          await checkPage(page, cdp, where('trained'));

          await train.getByLabel('Save the adapter as').fill('journey');
          await train.getByRole('button', { name: 'Save the trained adapter' }).click();
          await waitText(stepState(page, /Fine-tune/), /^Done: trained \d+ steps and saved/, where('saved'));
          await waitText(nextStep(page), /^Next: chat with the result \(step 4\)/, where('saved'));

          // Step 4: a conversation. The message box holds a prompt from the data.
          const chat = page.getByRole('region', { name: /Chat with the result/ });
          const conversation = chat.getByRole('log', { name: 'Conversation' });
          const message = chat.getByLabel('Message', { exact: true });
          assert.match(await message.inputValue(), /^Define ZOOLOGY\. The$/);
          assert.equal(await chat.getByRole('radio', { name: 'Both, side by side' }).isChecked(), true);
          await chat.getByText('Chat settings').click();
          await chat.getByLabel('Max tokens', { exact: true }).fill(String(plan.chatTokens));
          assert.equal(await chat.getByLabel('Adapter', { exact: true }).inputValue(), 'journey');
          // Watch the answers' text as it arrives (a check, not an action).
          await page.evaluate(() => {
            window.__answers = [];
            new MutationObserver(() => {
              const texts = [...document.querySelectorAll('#chat-log .turn.assistant .text')].map((t) => t.textContent);
              window.__answers.push(texts.join('\u0000'));
            }).observe(document.getElementById('chat-log'), { childList: true, characterData: true, subtree: true });
          });
          await chat.getByRole('button', { name: 'Send' }).click();
          await waitText(stepState(page, /Chat with the result/), /^Done:/, where('first answer'), 300_000);
          assert.equal(await conversation.getByRole('group', { name: 'You' }).count(), 1);
          assert.equal(await conversation.getByRole('group', { name: 'You' }).textContent(), 'Define ZOOLOGY. The');
          const answers = conversation.getByRole('group', { name: 'Answers' });
          assert.equal(await answers.count(), 1);
          const base = answers.getByRole('group', { name: 'Base model' });
          const adapted = answers.getByRole('group', { name: 'With the adapter “journey”' });
          const baseText = await base.locator('.text').textContent();
          const adaptedText = await adapted.locator('.text').textContent();
          console.log(`${where('chat')}: base ${JSON.stringify(baseText)}; adapter ${JSON.stringify(adaptedText)}`);
          for (const [name, bubble] of [['base', base], ['adapter', adapted]]) {
            assert.match(await bubble.locator('.stats').textContent(), /^\d+ tokens? in .*(reached max tokens|the model ended it)$/, `${name} stats`);
          }
          // Streamed: the answers' text grew in several steps, each extending the last.
          const seen = [...new Set(await page.evaluate(() => window.__answers))];
          assert.ok(seen.length >= 3, `${where('chat')}: ${seen.length} distinct states of the answers: not streamed`);
          // The same prompt answered by the base model and the adapter: the adapter changes it.
          assert.ok(baseText.length > 0 && adaptedText.length > 0, 'both answered');
          await waitText(nextStep(page), /^Next: export the adapter/, where('chatted'));
          await checkPage(page, cdp, where('first answer'));

          // A second turn, the adapter alone: a new "You" group and a one-answer group.
          await chat.getByRole('radio', { name: 'The adapter' }).check();
          await message.fill('Define CAT. A');
          await message.press('Enter');
          await page.waitForFunction(() => document.querySelectorAll('#chat-log .turn.user').length === 2);
          await waitText(stepState(page, /Chat with the result/), /^Done:/, where('second answer'), 300_000);
          assert.equal(await conversation.getByRole('group', { name: 'You' }).count(), 2);
          assert.equal(await conversation.getByRole('group', { name: 'You' }).nth(1).textContent(), 'Define CAT. A');
          const second = conversation.getByRole('group', { name: 'Answer', exact: true });
          assert.equal(await second.count(), 1);
          assert.equal(await second.getByRole('group').count(), 1);
          assert.equal(await second.getByRole('group', { name: 'With the adapter “journey”' }).count(), 1);

          // Export: both PEFT files download.
          const files = [];
          const got = new Promise((resolve) => {
            page.on('download', (d) => { files.push(d.suggestedFilename()); if (files.length === 2) resolve(); });
          });
          await chat.getByRole('button', { name: 'Export PEFT files' }).click();
          await Promise.race([got, page.waitForTimeout(30_000)]);
          assert.deepEqual(files.sort(), ['adapter_config.json', 'adapter_model.safetensors']);
          await checkPage(page, cdp, where('exported'));

          // The developer section opens from its summary and holds the backend's details.
          await page.getByText('Developer', { exact: true }).click();
          await page.getByRole('heading', { name: 'Next-token prediction' }).waitFor({ state: 'visible' });
          assert.match(await page.locator('#backend-details').textContent(), backend === 'webgpu' ? /Max storage binding/ : /Why not WebGPU/);
          await checkPage(page, cdp, where('developer open'));
          await page.getByText('Developer', { exact: true }).click();

          mkdirSync(ARTIFACTS, { recursive: true });
          await page.screenshot({ path: path.join(ARTIFACTS, `journey-${backend}-${width}.png`), fullPage: true });

          // Nothing left the origin.
          const origin = new URL(server.url).origin;
          const foreign = requests.filter((u) => !u.startsWith(origin) && !u.startsWith('data:') && !u.startsWith(`blob:${origin}`));
          assert.deepEqual(foreign, [], 'requests to other origins');
          const crashes = log.filter((l) => /panicked|RuntimeError|unreachable|pageerror/i.test(l));
          assert.deepEqual(crashes, []);
          console.log(`${where('done')}: ${requests.length} requests, all to ${origin}`);
        } catch (err) {
          mkdirSync(ARTIFACTS, { recursive: true });
          await page.screenshot({ path: path.join(ARTIFACTS, `journey-${backend}-${width}-failed.png`), fullPage: true }).catch(() => {});
          const errors = await page.locator('.error:visible').allTextContents().catch(() => []);
          err.message += `\nerrors shown: ${JSON.stringify(errors)}\n${log.slice(-30).join('\n')}`;
          throw err;
        } finally {
          await context.close();
        }
      });
    }
  });
}

async function waitEnabled(locator, where, timeout = 60_000) {
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    if (await locator.isEnabled()) return;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.fail(`${where}: still disabled after ${timeout / 1000} s (title: ${await locator.getAttribute('title')})`);
}
