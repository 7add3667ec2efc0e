// The npm package (packages/bitlora): `tools/build-package.sh --pack` makes the tarball, which is
// installed (`npm install --offline <tarball>`) into a fresh copy of the example app
// (packages/bitlora/example), served by a plain static server with the app's `_headers`
// (tools/serve-static.mjs), and used in headless Chromium (CPU fallback) as plain ES modules:
// - the tarball holds package.json (version = Cargo.toml's, exports, types), README.md and dist/
//   (the API, its types, the worker and its modules, the wasm, the default model), nothing else;
// - Node resolves `bitlora` through the package's exports to dist/bitlora.js, and tsc type-checks
//   the app against the package's types as a bundler resolves them;
// - the app loads the package's model (with a chat template of its own), fine-tunes it on chat
//   examples with its Fine-tune button (loss finite, every step reported), and its chat form
//   streams a reply through chat.completions.create with the adapter;
// - chat.completions.create: the non-streamed reply equals the streamed one and equals
//   generate({ text, chat: true }) (the chat template as generate applies it), with usage from
//   its token counts; the adapter changes the reply; OpenAI's response and chunk shapes
//   (role chunk, content chunks, finish chunk, usage chunk); a `stop` string cuts the reply
//   before it, also when it is split over tokens; abort() ends a stream without a finish chunk;
//   bad arguments are refused naming the field; the package's bundled model ({ bundled }),
//   which has no chat template, is refused saying so;
// - the two code blocks of the package's README run as written in the app's page;
// - no request leaves the origin.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { REPO, launchBrowser } from './helpers.mjs';
import { serveStatic } from '../../tools/serve-static.mjs';

const PKG = path.join(REPO, 'packages/bitlora');
const TSC = path.join(REPO, 'tests/browser/node_modules/.bin/tsc');
let tmp, tarball, app;

before(() => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'bitlora-npm-'));
  const out = execFileSync(path.join(REPO, 'tools/build-package.sh'), ['--pack', path.join(tmp, 'pack')], { cwd: REPO, encoding: 'utf8' });
  tarball = out.trim().split('\n').at(-1);
  app = path.join(tmp, 'app');
  cpSync(path.join(PKG, 'example'), app, { recursive: true, filter: (src) => !src.includes('node_modules') });
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', '--ignore-scripts', tarball], { cwd: app, stdio: 'pipe' });
});
after(() => { if (tmp) rmSync(tmp, { recursive: true, force: true }); });

test('the tarball: package.json (exports, types, version), README and dist/ only', () => {
  const files = execFileSync('tar', ['tzf', tarball], { encoding: 'utf8' }).trim().split('\n').map((f) => f.replace(/^package\//, '')).sort();
  const expected = ['README.md', 'package.json', 'dist/bitlora.js', 'dist/bitlora.d.ts', 'dist/protocol.d.ts', 'dist/worker.js',
    'dist/store.js', 'dist/hub.js', 'dist/training.js', 'dist/training-store.js', 'dist/sha256.js',
    'dist/pkg/bitlora_web.js', 'dist/pkg/bitlora_web_bg.wasm', 'dist/pkg/bitlora_web.d.ts', 'dist/pkg/models.json',
    'dist/models/default/config.json', 'dist/models/default/model.safetensors', 'dist/models/default/tokenizer.json',
    'dist/models/default/tokenizer_config.json', 'dist/pkg-threads/bitlora_web.js', 'dist/pkg-threads/bitlora_web_bg.wasm',
    'dist/pkg-threads/snippets/bitlora-web-HASH/src/threads.js'].sort();
  // The threaded build's pool-worker script sits in a folder named with wasm-bindgen's hash.
  assert.deepEqual(files.map((f) => f.replace(/bitlora-web-[0-9a-f]+\//, 'bitlora-web-HASH/')), expected);
  const pkg = JSON.parse(readFileSync(path.join(app, 'node_modules/bitlora/package.json'), 'utf8'));
  const cargo = readFileSync(path.join(REPO, 'Cargo.toml'), 'utf8').match(/^version = "(.+)"/m)[1];
  assert.equal(pkg.version, cargo, 'the package version is the workspace version');
  assert.equal(pkg.types, './dist/bitlora.d.ts');
  assert.deepEqual(pkg.exports['.'], { types: './dist/bitlora.d.ts', default: './dist/bitlora.js' });
  // The installed copy is the tarball's (not a link to the repository).
  const installed = readFileSync(path.join(app, 'node_modules/bitlora/dist/bitlora.js'), 'utf8');
  assert.equal(installed, readFileSync(path.join(REPO, 'web/bitlora.js'), 'utf8'));
  const appPkg = JSON.parse(readFileSync(path.join(app, 'package.json'), 'utf8'));
  assert.match(appPkg.dependencies.bitlora, /^file:.*bitlora-.*\.tgz$/, 'npm install recorded the tarball');
  console.log(`tarball ${path.basename(tarball)}: ${(readFileSync(tarball).length / 2 ** 20).toFixed(1)} MiB, ${files.length} files`);
});

test('exports and types resolve as Node and a bundler (tsc, moduleResolution Bundler) see them', () => {
  const resolved = execFileSync(process.execPath, ['--input-type=module', '-e', "console.log(import.meta.resolve('bitlora'))"], { cwd: app, encoding: 'utf8' }).trim();
  assert.equal(resolved, `file://${path.join(app, 'node_modules/bitlora/dist/bitlora.js')}`);
  // tsc checks app.js (// @ts-check) against dist/bitlora.d.ts, found through exports' "types".
  execFileSync(TSC, ['--noEmit', '-p', app], { cwd: app, encoding: 'utf8' });
  const traced = execFileSync(TSC, ['--noEmit', '-p', app, '--traceResolution'], { cwd: app, encoding: 'utf8' });
  assert.match(traced, /Module name 'bitlora' was successfully resolved to '[^']*node_modules\/bitlora\/dist\/bitlora\.d\.ts'/);
  // A misuse of the API is a type error (the types are really applied).
  writeFileSync(path.join(app, 'bad.js'), "// @ts-check\nimport { Bitlora } from 'bitlora';\n" +
    "const bl = await Bitlora.create();\nconst r = await bl.chat.completions.create({ messages: [{ role: 'user', content: 'x' }] });\n" +
    '/** @type {number} */ const n = r.choices[0].message.content;\n');
  writeFileSync(path.join(app, 'tsconfig.bad.json'), JSON.stringify({ extends: './tsconfig.json', files: ['bad.js'] }));
  let err = '';
  try { execFileSync(TSC, ['--noEmit', '-p', path.join(app, 'tsconfig.bad.json')], { cwd: app, encoding: 'utf8' }); } catch (e) { err = e.stdout; }
  assert.match(err, /bad\.js.*Type 'string' is not assignable to type 'number'/);
});

/** Fails naming `what` (with the page's log) after `ms`: page.evaluate has no timeout. */
function within(ms, what, promise, log) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms / 1000} s\n${log.slice(-40).join('\n')}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function waitState(page, states, log, timeout = 180_000) {
  try {
    await page.waitForFunction((s) => s.includes(document.body.dataset.state), states, { timeout });
  } catch (e) {
    throw new Error(`the app did not reach ${states.join('/')}: ${e.message}\n${log.slice(-40).join('\n')}`);
  }
  const state = await page.evaluate(() => document.body.dataset.state);
  assert.ok(states.includes(state) && state !== 'error', `${state}: ${await page.textContent('#status')}\n${log.slice(-40).join('\n')}`);
}

test('the app, from the packed package: fine-tune, then chat.completions.create (CPU fallback)', async () => {
  // The app's CSP allows its inline import map by hash: check the hash is that of index.html's map.
  const html = readFileSync(path.join(app, 'index.html'), 'utf8');
  const map = html.match(/<script type="importmap">([\s\S]*?)<\/script>/)[1];
  const hash = `'sha256-${createHash('sha256').update(map).digest('base64')}'`;
  assert.ok(readFileSync(path.join(app, '_headers'), 'utf8').includes(hash), `example/_headers must allow the import map: ${hash}`);

  const server = await serveStatic(app);
  const origin = new URL(server.url).origin;
  const browser = await launchBrowser({ webgpu: false });
  const context = await browser.newContext();
  const requests = [];
  const log = [];
  context.on('request', (r) => requests.push(r.url()));
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => log.push(`[worker console.${m.type()}] ${m.text()}`)));
  try {
    await page.goto(server.url);
    await waitState(page, ['ready', 'error'], log);
    const model = await page.evaluate(() => ({ ...window.example.bl.model, backend: window.example.bl.backend.kind, threads: window.example.bl.backend.threads }));
    assert.equal(model.chatTemplate, true, 'the app gave the model a chat template');
    assert.equal(model.backend, 'cpu');
    // The app's _headers make it cross-origin isolated, so the worker runs the threaded build.
    assert.ok(model.threads > 1, `the app's CPU backend runs on ${model.threads} thread(s)`);
    assert.ok(server.log.some((r) => r.path === '/node_modules/bitlora/dist/pkg-threads/bitlora_web_bg.wasm' && r.status === 200), 'the wasm came from the package');
    assert.ok(server.log.some((r) => r.path === '/node_modules/bitlora/dist/worker.js' && r.status === 200), 'the worker came from the package');

    // Fine-tune with the app's button: 6 steps of the 6 chat examples.
    await page.fill('#steps', '6');
    await page.click('#train');
    await waitState(page, ['trained', 'error'], log);
    const progress = (await page.textContent('#progress')).trim().split('\n');
    assert.equal(progress.length, 6, progress.join('\n'));
    progress.forEach((line, i) => assert.match(line, new RegExp(`^step ${i + 1}/6 loss \\d+\\.\\d{3}`), line));
    console.log(`trained: ${progress[0]} ... ${progress.at(-1)}`);

    // The chat form streams a reply through the adapter.
    await page.fill('#message', 'Define CAT.');
    await page.click('#send');
    await waitState(page, ['answered', 'error'], log);
    const shown = await page.$$eval('#conversation li', (els) => els.map((e) => ({ cls: e.className, text: e.textContent, finish: e.dataset.finish })));
    assert.equal(shown.length, 2);
    assert.deepEqual(shown[0], { cls: 'user', text: 'Define CAT.', finish: undefined });
    assert.equal(shown[1].cls, 'assistant');
    assert.ok(['stop', 'length'].includes(shown[1].finish), shown[1].finish);

    const r = await within(120_000, 'chat.completions', page.evaluate(async () => {
      const bl = window.example.bl;
      const messages = [{ role: 'user', content: 'Define CAT.' }];
      const full = await bl.chat.completions.create({ messages, max_tokens: 40, adapter: 'chat-example' });
      const chunks = [];
      for await (const c of await bl.chat.completions.create({ messages, max_tokens: 40, adapter: 'chat-example', stream: true, stream_options: { include_usage: true } })) chunks.push(c);
      const viaGenerate = await bl.generate({ text: 'Define CAT.', chat: true }, { maxTokens: 40, adapter: 'chat-example' }).result;
      const base = await bl.chat.completions.create({ messages, max_tokens: 40 });
      const sampled = await bl.chat.completions.create({ messages, max_tokens: 20, temperature: 0.8, top_p: 0.9, seed: 5 });
      const sampledAgain = await bl.chat.completions.create({ messages, max_tokens: 20, temperature: 0.8, top_p: 0.9, seed: 5 });
      const short = await bl.chat.completions.create({ messages, max_tokens: 3, adapter: 'chat-example' });
      // A conversation: every turn goes through the template ("developer" is "system" there).
      const turns = [{ role: 'developer', content: 'Be brief.' }, { role: 'user', content: 'Define DOG.' },
        { role: 'assistant', content: 'A pet.' }, { role: 'user', content: 'Define CAT.' }];
      const conv = await bl.chat.completions.create({ messages: turns, max_tokens: 20, adapter: 'chat-example' });
      const convGenerate = await bl.generate({ messages: turns.map((t) => ({ ...t, role: t.role === 'developer' ? 'system' : t.role })) },
        { maxTokens: 20, adapter: 'chat-example' }).result;
      return { full, chunks, viaGenerate, base, sampled, sampledAgain, short, conv, convGenerate };
    }), log);
    const { full, chunks, viaGenerate, base, sampled, sampledAgain, short, conv, convGenerate } = r;
    assert.equal(convGenerate.promptText,
      '<|endoftext|>### system:\nBe brief.\n### user:\nDefine DOG.\n### assistant:\nA pet.\n<|endoftext|>### user:\nDefine CAT.\n### assistant:\n',
      'the conversation\'s turns rendered by the template');
    assert.equal(conv.choices[0].message.content, convGenerate.text);
    assert.equal(conv.usage.prompt_tokens, convGenerate.promptTokens.length);
    console.log(`adapter: ${JSON.stringify(full.choices[0].message.content)} (${full.choices[0].finish_reason}); base: ${JSON.stringify(base.choices[0].message.content)}`);
    // The OpenAI shape.
    assert.match(full.id, /^chatcmpl-[0-9a-f]{24}$/);
    assert.equal(full.object, 'chat.completion');
    assert.ok(Number.isInteger(full.created) && Math.abs(full.created - Date.now() / 1000) < 600);
    assert.equal(full.choices.length, 1);
    assert.equal(full.choices[0].index, 0);
    assert.equal(full.choices[0].message.role, 'assistant');
    // The chat template as generate({ chat: true }) applies it: same text, same token counts.
    assert.equal(full.choices[0].message.content, viaGenerate.text);
    assert.equal(full.choices[0].message.content, shown[1].text, 'the app showed the same reply');
    assert.deepEqual(full.usage, {
      prompt_tokens: viaGenerate.promptTokens.length, completion_tokens: viaGenerate.tokens.length,
      total_tokens: viaGenerate.promptTokens.length + viaGenerate.tokens.length,
    });
    assert.equal(viaGenerate.promptText, '<|endoftext|>### user:\nDefine CAT.\n### assistant:\n', 'the app\'s template rendered the message');
    assert.equal(full.choices[0].finish_reason, viaGenerate.stoppedBy === 'stop_token' ? 'stop' : 'length');
    assert.notEqual(full.choices[0].message.content, base.choices[0].message.content, 'the adapter changes the reply');
    assert.ok(full.choices[0].message.content.length > 0, 'a non-empty reply');
    // Streaming: a role chunk, content chunks, a finish chunk, the usage chunk.
    for (const c of chunks) {
      assert.equal(c.id, chunks[0].id);
      assert.equal(c.object, 'chat.completion.chunk');
    }
    assert.notEqual(chunks[0].id, full.id);
    assert.deepEqual(chunks[0].choices, [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }]);
    const content = chunks.slice(1, -2);
    assert.ok(content.length >= 2, `${content.length} content chunks`);
    for (const c of content) assert.equal(c.choices[0].finish_reason, null);
    assert.equal(content.map((c) => c.choices[0].delta.content).join(''), full.choices[0].message.content);
    assert.deepEqual(chunks.at(-2).choices, [{ index: 0, delta: {}, finish_reason: full.choices[0].finish_reason }]);
    assert.deepEqual(chunks.at(-1).choices, []);
    assert.deepEqual(chunks.at(-1).usage, full.usage);
    // Sampling options reach the sampler: the same seed gives the same reply.
    assert.equal(sampled.choices[0].message.content, sampledAgain.choices[0].message.content);
    assert.equal(short.choices[0].finish_reason, 'length');
    assert.equal(short.usage.completion_tokens, 3);

    // `stop`: a string from the middle of the reply (spanning tokens) cuts it there.
    const reply = full.choices[0].message.content;
    assert.ok(reply.length >= 8, `the reply is too short to cut: ${JSON.stringify(reply)}`);
    const cut = Math.floor(reply.length / 2);
    const stopString = reply.slice(cut - 2, cut + 2);
    const first = reply.indexOf(stopString);
    const stopped = await page.evaluate(async (stop) => {
      const bl = window.example.bl;
      const messages = [{ role: 'user', content: 'Define CAT.' }];
      const one = await bl.chat.completions.create({ messages, max_tokens: 40, adapter: 'chat-example', stop: [stop, 'never in it'] });
      let streamed = '';
      const s = await bl.chat.completions.create({ messages, max_tokens: 40, adapter: 'chat-example', stop, stream: true });
      let finish = null;
      for await (const c of s) { streamed += c.choices[0]?.delta.content ?? ''; finish = c.choices[0]?.finish_reason ?? finish; }
      return { one, streamed, finish };
    }, stopString);
    assert.equal(stopped.one.choices[0].message.content, reply.slice(0, first), `stop ${JSON.stringify(stopString)}`);
    assert.equal(stopped.one.choices[0].finish_reason, 'stop');
    assert.equal(stopped.streamed, reply.slice(0, first));
    assert.equal(stopped.finish, 'stop');

    // abort(): the stream ends without a finish chunk, and the client keeps working.
    const aborted = await page.evaluate(async () => {
      const bl = window.example.bl;
      const s = await bl.chat.completions.create({ messages: [{ role: 'user', content: 'Define CAT.' }], max_tokens: 40, stream: true, adapter: 'chat-example' });
      const seen = [];
      for await (const c of s) {
        seen.push(c.choices[0]);
        if (c.choices[0]?.delta.content) s.abort();
      }
      const after = await bl.chat.completions.create({ messages: [{ role: 'user', content: 'Define BORE.' }], max_tokens: 4 });
      // Breaking out of the loop ends the generation too.
      for await (const c of await bl.chat.completions.create({ messages: [{ role: 'user', content: 'Define CAT.' }], max_tokens: 40, stream: true })) {
        if (c.choices[0]?.delta.content) break;
      }
      const afterBreak = await bl.chat.completions.create({ messages: [{ role: 'user', content: 'Define BORE.' }], max_tokens: 3 });
      return { seen, after: after.usage.completion_tokens, afterBreak: afterBreak.usage.completion_tokens };
    });
    assert.ok(aborted.seen.every((c) => c.finish_reason === null), JSON.stringify(aborted.seen));
    assert.ok(aborted.seen.length >= 2, 'the role chunk and a content chunk');
    assert.equal(aborted.after, 4);
    assert.equal(aborted.afterBreak, 3, 'a request after breaking out of a stream');

    // Bad arguments: refused, naming the field.
    const bad = await page.evaluate(async () => {
      const bl = window.example.bl;
      const user = [{ role: 'user', content: 'Hi' }];
      const cases = {
        none: undefined,
        noMessages: {},
        emptyMessages: { messages: [] },
        badRole: { messages: [{ role: 'robot', content: 'Hi' }] },
        imagePart: { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] },
        temperature: { messages: user, temperature: 3 },
        topP: { messages: user, top_p: 0 },
        maxTokens: { messages: user, max_tokens: 0 },
        maxTokensBoth: { messages: user, max_tokens: 4, max_completion_tokens: 4 },
        seed: { messages: user, seed: 1.5 },
        stop: { messages: user, stop: ['a', 'b', 'c', 'd', 'e'] },
        n: { messages: user, n: 2 },
        unknown: { messages: user, temprature: 0.5 },
        unsupported: { messages: user, frequency_penalty: 0.5 },
        model: { messages: user, model: 'gpt-4o' },
        streamOptions: { messages: user, stream_options: { include_usage: true } },
        adapter: { messages: user, adapter: 'no such adapter' },
        adapterStreamed: { messages: user, adapter: 'no such adapter', stream: true },
        tooLong: { messages: user, max_tokens: 100000 },
      };
      const out = {};
      for (const [name, req] of Object.entries(cases)) {
        try {
          await bl.chat.completions.create(req);
          out[name] = null;
        } catch (e) {
          out[name] = { message: e.message, field: e.field ?? null };
        }
      }
      // Works again afterwards; and the model's own key passes as `model`.
      const ok = await bl.chat.completions.create({ messages: user, max_tokens: 2, model: bl.model.key });
      out.afterwards = ok.usage.completion_tokens;
      return out;
    });
    const expectBad = {
      none: [null, /takes one object/], noMessages: ['messages', /non-empty list/], emptyMessages: ['messages', /non-empty list/],
      badRole: ['messages[0].role', /"robot"/], imagePart: ['messages[0].content[0]', /text part.*"image_url" part/],
      temperature: ['temperature', /from 0 \(greedy\) to 2, got 3/],
      topP: ['top_p', /above 0 and at most 1, got 0/], maxTokens: ['max_tokens', /at least 1, got 0/],
      maxTokensBoth: ['max_completion_tokens', /give one of them/], seed: ['seed', /whole number.*1\.5/],
      stop: ['stop', /up to 4/], n: ['n', /must be 1/], unknown: ['temprature', /not a request field; the fields are messages, stream/],
      unsupported: ['frequency_penalty', /not supported: use repetition_penalty/], model: ['model', /"gpt-4o".*loaded model is/],
      streamOptions: ['stream_options', /only allowed with stream: true/], adapter: [null, /no adapter named "no such adapter"/],
      adapterStreamed: [null, /no adapter named "no such adapter"/],
      // Checked by the wasm, whose sampling errors name the option in the message (no `field`).
      tooLong: [null, /`max_tokens` is 100000; with the prompt's \d+ tokens that exceeds the model's context/],
    };
    for (const [name, [field, re]] of Object.entries(expectBad)) {
      assert.ok(bad[name], `${name} was accepted`);
      assert.match(bad[name].message, re, `${name}: ${bad[name].message}`);
      if (field) assert.equal(bad[name].field, field, `${name}: ${bad[name].message}`);
    }
    assert.equal(bad.afterwards, 2);
    console.log(`bad arguments refused, e.g. ${bad.badRole.message}`);

    // The package's bundled model ({ bundled: 'default' }) loads from dist/models and, having
    // no chat template, is refused by chat.completions with the way out.
    const bundled = await within(120_000, 'bundled model', page.evaluate(async () => {
      const { Bitlora } = await import('bitlora');
      const bl = await Bitlora.create({ preferGpu: false });
      try {
        const m = await bl.loadModel({ bundled: 'default' });
        let error = null;
        try { await bl.chat.completions.create({ messages: [{ role: 'user', content: 'Hi' }] }); } catch (e) { error = e.message; }
        const text = (await bl.generate('Define CAT.', { maxTokens: 4 }).result).text;
        return { key: m.key, chatTemplate: m.chatTemplate, error, text };
      } finally {
        bl.terminate();
      }
    }), log);
    assert.equal(bundled.key, 'bundled:default');
    assert.equal(bundled.chatTemplate, false);
    assert.match(bundled.error, /has no chat template: load it with a tokenizer_config\.json that has a "chat_template"/);
    assert.ok(bundled.text.length > 0);
    assert.ok(server.log.some((q) => q.path === '/node_modules/bitlora/dist/models/default/model.safetensors' && q.status === 200));

    const foreign = requests.filter((u) => !u.startsWith(origin) && !u.startsWith('data:') && !u.startsWith('blob:'));
    assert.deepEqual(foreign, [], 'requests that left the origin');
  } finally {
    await browser.close();
    await server.stop();
  }
});

test("the package README's code blocks run as written", async () => {
  const readme = readFileSync(path.join(PKG, 'README.md'), 'utf8');
  const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]).filter((b) => b.includes("from 'bitlora'"));
  assert.equal(blocks.length, 2, 'the quick start and the chat completions example');
  blocks.forEach((b, i) => writeFileSync(path.join(app, `readme-${i}.js`), b));
  const server = await serveStatic(app);
  const browser = await launchBrowser({ webgpu: false });
  const context = await browser.newContext();
  const requests = [];
  context.on('request', (r) => requests.push(r.url()));
  const page = await context.newPage();
  const log = [];
  page.on('console', (m) => log.push(m.text()));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  try {
    await page.goto(server.url);
    await waitState(page, ['ready', 'error'], log);
    for (let i = 0; i < blocks.length; i++) {
      const err = await within(180_000, `README block ${i + 1}`, page.evaluate(async (url) => {
        try { await import(url); return null; } catch (e) { return String(e?.stack ?? e); }
      }, `/readme-${i}.js`), log);
      assert.equal(err, null, `README block ${i + 1} failed: ${err}\n${log.join('\n')}`);
    }
    console.log(log.filter((l) => /^(backend|step 8|generated|reply|streamed):?/.test(l)).join('\n'));
    assert.ok(log.some((l) => /^backend: CPU/.test(l)), log.join('\n'));
    assert.equal(log.filter((l) => /^step \d+\/8 loss \d/.test(l)).length, 8, log.join('\n'));
    assert.ok(log.some((l) => /^generated: ./.test(l)), log.join('\n'));
    const reply = log.find((l) => l.startsWith('reply: '));
    const streamed = log.find((l) => l.startsWith('streamed: '));
    assert.match(reply ?? '', /^reply: ".*" (stop|length) \d+$/, log.join('\n'));
    assert.equal(streamed?.slice('streamed: '.length), reply.match(/^reply: (".*") (stop|length)/)[1], 'streamed = non-streamed');
    const origin = new URL(server.url).origin;
    assert.deepEqual(requests.filter((u) => !u.startsWith(origin) && !u.startsWith('data:') && !u.startsWith('blob:')), []);
  } finally {
    await browser.close();
    await server.stop();
  }
});
