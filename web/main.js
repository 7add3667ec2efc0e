// @ts-check
// The page's main-thread script: UI only. All model work happens in web/worker.js, reached
// through the public JS API (web/bitlora.js, one client and one worker for the whole page).
// The fine-tuning panels (training data, fine-tune, chat comparison, adapters) live in web/ui/.
//
// For tests and embedders, the page's progress and last result are published in two places:
//   <body data-state="starting|loading|running|done|error" data-backend="webgpu|cpu"
//         data-gen="idle|generating|done|error" data-data="empty|checking|ok|error"
//         data-train="idle|starting|running|paused|stopped|done|error" data-resumable="yes|no"
//         data-compare="idle|generating|done|error">
//   window.__bitlora = { state, backend, adapter, backendInfo, model, tokens, logits (rows), top, ms, error,
//                        generation: { state, prompt, options, maxTokens, tokens, text, events, result, error },
//                        data, training, compare, adapters (web/ui/*.js say what each holds) }
// and a summary (without logits) as JSON in <pre id="result-json">. data-state is the model and
// the next-token panel; data-gen the Generate panel.
//
// URL parameters: ?backend=cpu forces the CPU backend, ?backend=webgpu any WebGPU adapter (a software
// one too; by default a software adapter loses to the CPU); ?tokens=1,2,3 sets the default tokens;
// ?model=tiny loads the tiny random test model instead of the default one (parity tests);
// ?free=BYTES (tests) makes the store act as if only that much browser storage were free;
// ?threads=N sets the CPU backend's threads (1: the single-thread wasm; default one per core);
// ?limits=phone asks for a WebGPU device with a phone's limits (bitlora.d.ts DeviceLimitsChoice).
//
// The bundled model is kept in IndexedDB after the first visit (web/store.js); window.__bitlora
// .model.source says where it came from: { from: 'store'|'network', stored, notes }.

import { mountModelsPanel } from './models-panel.js';
import { Bitlora } from './bitlora.js';
import { mountPanels } from './ui/panels.js';
import { $, control } from './ui/dom.js';

/** @import { PageState, GenState } from './ui/panels.js' */

const params = new URLSearchParams(location.search);
// auto (default): WebGPU on a hardware adapter, else the CPU; webgpu: any adapter, software too.
const backendChoice = /** @type {import('./bitlora.js').BackendChoice} */ (
  ['auto', 'webgpu', 'cpu'].includes(params.get('backend') ?? '') ? params.get('backend') : 'auto');
const bundledModel = params.get('model') ?? 'default';
// ?threads=N: the CPU backend's threads (1: the single-thread build); by default one per core.
const threads = params.get('threads') ? Number(params.get('threads')) : undefined;
// ?limits=phone: a WebGPU device with a phone's limits (128 MiB bindings, 256 MiB buffers).
const limits = /** @type {import('./bitlora.js').DeviceLimitsChoice} */ (
  params.get('limits') === 'phone' ? 'phone' : 'adapter');
// ?free=BYTES (tests): the store acts as if only that much browser storage were free.
const fakeFree = params.get('free') ? Number(params.get('free')) : undefined;

/** @type {PageState} */
const state = {
  state: 'starting', backend: null, adapter: null, backendInfo: null, model: null,
  tokens: null, logits: null, top: null, ms: null, error: null,
  generation: { state: 'idle' },
  loadProgress: [],
};
/** @type {Window & { __bitlora?: PageState }} */ (window).__bitlora = state;
let modelsPanel = null; // web/models-panel.js, mounted below
let panels = null; // the fine-tuning panels (web/ui/panels.js), mounted below

// ---- the bitlora client (web/bitlora.js): one worker for the whole page ----------------------

// The client is started on first use; a crash of the wasm module (a `fatal` reply) ends it and
// the page starts a fresh one (below, restartWorker).
let client = null;
let clientReady = null;

function startClient() {
  clientReady ??= Bitlora.create({ backend: backendChoice, threads, limits }).then((c) => (client = c), (err) => {
    clientReady = null;
    throw err;
  });
  return clientReady;
}

/**
 * Calls the client's public API (web/bitlora.js) once it runs: `withClient((c) => c.forward(ids))`.
 * A crash of the wasm module (an error with `fatal`) restarts the worker.
 * @template T
 * @param {(client: Bitlora) => Promise<T>} fn
 * @returns {Promise<T>}
 */
async function withClient(fn) {
  const c = await startClient();
  try {
    return await fn(c);
  } catch (err) {
    if (err.fatal) restartWorker(err.message);
    throw err;
  }
}

let restarting = false;
async function restartWorker(reason) {
  if (restarting) return;
  restarting = true;
  const old = client;
  client = null;
  clientReady = null;
  old?.terminate();
  console.warn(`bitlora: the worker crashed (${reason}); starting a fresh one`);
  restarting = false;
  // Keep the error that caused the restart on screen; the bundled model comes back quietly.
  await boot({ run: false, keepError: true });
}

// ---- UI -----------------------------------------------------------------------------------

function setState(s) {
  state.state = s;
  document.body.dataset.state = s;
  syncControls();
  $('status').textContent = {
    starting: 'Starting…', loading: 'Loading model…', running: 'Running…', done: 'Done.', error: 'Error.',
  }[s];
  panels?.steps();
}

// One place decides which controls work: nothing that needs the worker while it is starting,
// loading or running a forward pass; during a generation only Stop (requests would queue
// behind it, and a new model must not arrive mid-generation).
function syncControls() {
  const busy = ['starting', 'loading', 'running'].includes(state.state);
  const generating = state.generation.state === 'generating';
  $('run', HTMLButtonElement).disabled = busy || generating;
  $('files', HTMLInputElement).disabled = busy || generating;
  modelsPanel?.sync({ busy: busy || generating });
  $('load-bundled', HTMLButtonElement).disabled = busy || generating;
  $('delete-all', HTMLButtonElement).disabled = busy || generating;
  $('generate-btn', HTMLButtonElement).disabled = busy || generating || !state.model;
  $('stop', HTMLButtonElement).disabled = !generating;
}

/**
 * An error of the model (loading one, starting) shows in step 1, at the model picker; one of the
 * developer section's next-token run (`box` 'run-error') shows there.
 * @param {string} message
 * @param {'error' | 'run-error'} [box]
 */
function showError(message, box = 'error') {
  clearError();
  state.error = message;
  $(`${box}-text`).textContent = message;
  $(box).hidden = false;
  setState('error');
  publish();
}

function clearError() {
  state.error = null;
  for (const box of ['error', 'run-error']) {
    $(box).hidden = true;
    $(`${box}-text`).textContent = '';
  }
}

const MiB = 1024 * 1024;
const fmtBytes = (n) => (n >= 1024 * MiB ? `${(n / 1024 / MiB).toFixed(1)} GiB` : n >= MiB ? `${(n / MiB).toFixed(n % MiB ? 1 : 0)} MiB` : `${(n / 1024).toFixed(1)} KiB`);

function showBackend(info) {
  state.backendInfo = info;
  state.backend = info.kind;
  state.adapter = info.adapter ? info.adapter.name : null;
  document.body.dataset.backend = info.kind;
  $('backend-label').textContent = info.label;
  const details = $('backend-details');
  details.replaceChildren();
  const row = (k, v) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    if (v instanceof Node) dd.append(v);
    else dd.textContent = v;
    details.append(dt, dd);
  };
  if (info.adapter) {
    const a = info.adapter;
    row('Adapter', a.name || '(unnamed)');
    row('Backend', a.backend);
    row('Device type', a.device_type);
    row('Max storage binding', fmtBytes(a.max_storage_buffer_binding_size));
    row('Max buffer', fmtBytes(a.max_buffer_size));
    row('Max workgroup size x', String(a.max_compute_workgroup_size_x));
    row('Max invocations / workgroup', String(a.max_compute_invocations_per_workgroup));
    // The features that matter for our kernels first; the full list folded away (it is long
    // and mostly about textures).
    const has = (f) => (a.features.includes(f) ? 'yes' : 'no');
    row('shader-f16', has('SHADER_F16'));
    row('Timestamp queries', has('TIMESTAMP_QUERY'));
    const all = document.createElement('details');
    const summary = document.createElement('summary');
    summary.textContent = `${a.features.length} features`;
    const list = document.createElement('p');
    list.textContent = a.features.join(', ') || 'none';
    all.append(summary, list);
    row('All features', all);
  } else {
    row('Why not WebGPU', info.fallbackReason ?? 'unknown');
  }
  // Where the CPU backend runs (training falls back to it even on a WebGPU session).
  row('CPU threads', info.threads > 1
    ? `${info.threads} (Web Workers sharing the wasm memory)`
    : `1 (single-thread build${info.threadsNote ? `: ${info.threadsNote}` : ''})`);
}

const fmtParams = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(1)} B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} M` : `${(n / 1e3).toFixed(0)} k`);

function showModel(model, origin) {
  state.model = { ...model, origin };
  const where = model.source
    ? (model.source.from === 'store' ? ' · loaded from this browser\'s storage'
      : model.source.from === 'files' ? (model.source.stored ? ' · your files, kept in this browser' : ' · your files, running from memory')
      : model.source.stored ? ' · fetched from this page\'s server and stored in this browser'
        : ' · fetched from this page\'s server, running from memory')
    : '';
  $('model-name').textContent = model.name ? `${model.name}` : origin;
  $('model-size').textContent = model.params
    ? `${fmtParams(model.params)} parameters · ${fmtBytes(model.downloadBytes ?? model.bytes)}${where}`
    : `${fmtBytes(model.bytes)}`;
  $('model-label').textContent =
    `${origin}: ${model.files.join(', ')} (${fmtBytes(model.bytes)}) · vocab ${model.vocabSize}, ` +
    `hidden ${model.hiddenSize}, ${model.numHiddenLayers} layers · runs on ${model.backend === 'webgpu' ? 'WebGPU' : 'the CPU'}`;
  const notes = [...(model.source?.notes ?? []), ...(model.note ? [model.note] : [])];
  $('model-note').textContent = notes.join(' ');
  $('model-note').hidden = notes.length === 0;
  if (model.tokenizer) {
    $('model-label').textContent += ` · tokenizer ${model.tokenizer} (${model.tokenizerVocabSize} tokens)` +
      (model.chatTemplate ? ', chat template' : '');
  }
  setPromptMode(model);
  panels?.modelLoaded();
}

// ---- Generate panel -------------------------------------------------------------------------

const PROMPT_DEFAULTS = { ids: '1,5,17', text: 'The state of the Union' };
let promptMode = 'ids';

/** Text prompts when the model came with a tokenizer.json, else token ids. */
function setPromptMode(model) {
  const mode = model.tokenizer ? 'text' : 'ids';
  if (mode !== promptMode) {
    $('prompt', HTMLTextAreaElement).value = PROMPT_DEFAULTS[mode];
    promptMode = mode;
  }
  $('prompt-label').textContent = mode === 'text' ? 'Prompt' : 'Prompt (token ids)';
  $('prompt', HTMLTextAreaElement).inputMode = mode === 'text' ? 'text' : 'numeric';
  $('prompt-hint').textContent = mode === 'text'
    ? `Text, encoded with ${model.tokenizer}; the output streams as text.`
    : 'This model has no tokenizer (pick its tokenizer.json to use text): give comma-separated token ids; the output is ids too.';
  $('chat', HTMLInputElement).disabled = !model.chatTemplate;
  $('chat', HTMLInputElement).checked = Boolean(model.chatTemplate);
  $('max-tokens', HTMLInputElement).max = String(model.maxPositions);
  syncControls();
}

const OPTION_INPUTS = {
  max_tokens: ['max-tokens', 'Max tokens'],
  temperature: ['temperature', 'Temperature'],
  top_k: ['top-k', 'Top-k'],
  top_p: ['top-p', 'Top-p'],
  repetition_penalty: ['repetition-penalty', 'Repetition penalty'],
  seed: ['seed', 'Seed'],
};

/** A labelled error that points at the input it is about. */
const inputError = (inputId, message) => Object.assign(new Error(message), { inputId });

/**
 * The form's options as numbers. Only emptiness is checked here: the ranges are checked once,
 * by bitlora itself (core's SamplingOptions::validate), whose errors name the option.
 */
function readOptions() {
  /** @type {Record<string, number>} */
  const options = {};
  for (const [name, [id, label]] of Object.entries(OPTION_INPUTS)) {
    const raw = $(id, HTMLInputElement).value.trim();
    if (raw === '') throw inputError(id, `${label}: enter a number`);
    options[name] = Number(raw);
  }
  return options;
}

function readPrompt() {
  const text = $('prompt', HTMLTextAreaElement).value;
  if (promptMode === 'text') {
    if (!text.trim()) throw inputError('prompt', 'Prompt: type some text to continue');
    return { text, chat: $('chat', HTMLInputElement).checked };
  }
  try {
    return { tokens: parseTokens(text, 'Prompt') };
  } catch (err) {
    throw inputError('prompt', err.message);
  }
}

function showGenError(message, inputId = null) {
  const g = state.generation;
  g.error = message;
  g.state = 'error';
  document.body.dataset.gen = 'error';
  $('gen-error-text').textContent = message;
  $('gen-error').hidden = false;
  if (inputId) {
    $(inputId).setAttribute('aria-invalid', 'true');
    $(inputId).focus();
  }
  syncControls();
  publish();
}

function clearGenError() {
  $('gen-error').hidden = true;
  $('gen-error-text').textContent = '';
  for (const el of document.querySelectorAll('#gen-form [aria-invalid]')) el.removeAttribute('aria-invalid');
}

const fmtSeconds = (s) => (s < 1 ? `${(s * 1000).toFixed(0)} ms` : s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${s.toFixed(s < 10 ? 1 : 0)} s`);
const fmtRate = (r) => `${r >= 100 ? r.toFixed(0) : r.toFixed(1)} tokens/s`;

/** Decode speed from the worker's timestamps: tokens after the first per second. */
function liveRate(g) {
  const n = g.tokens.length;
  if (n < 2) return null;
  const s = (g.lastAt - g.firstAt) / 1000;
  return s > 0 ? (n - 1) / s : null;
}

function showProgress(g) {
  const n = g.tokens.length;
  $('gen-progress', HTMLProgressElement).value = n;
  const parts = [`${n} / ${g.maxTokens} tokens`];
  const rate = liveRate(g);
  if (rate) {
    parts.push(fmtRate(rate));
    parts.push(`ETA ${fmtSeconds((g.maxTokens - n) / rate)}`);
  } else if (n === 0) {
    parts.push('reading the prompt…');
  }
  $('gen-stats').textContent = parts.join(' · ');
}

/**
 * @param {GenState} g
 * @param {import('./bitlora.js').TokenEvent} event
 */
function onToken(g, event) {
  if (g.tokens.length === 0) g.firstAt = event.at;
  g.lastAt = event.at;
  g.tokens.push(event.token);
  g.events += 1;
  // Text prompts stream text pieces (a piece can be empty while a character's bytes are
  // incomplete); id prompts stream ids.
  const piece = typeof event.text === 'string' ? event.text : `${g.tokens.length > 1 ? ' ' : ''}${event.token}`;
  g.text += piece;
  if (piece) $('gen-text').append(piece);
  showProgress(g);
}

let generation = null; // the Generate panel's generation in progress (web/bitlora.js)

async function generate() {
  clearGenError();
  let prompt, options;
  try {
    prompt = readPrompt();
    options = readOptions();
  } catch (err) {
    showGenError(err.message, err.inputId);
    return;
  }
  /** @type {GenState} */
  const g = {
    state: 'generating', prompt, options, maxTokens: options.max_tokens,
    tokens: [], text: '', events: 0, firstAt: null, lastAt: null, result: null, error: null,
  };
  state.generation = g;
  document.body.dataset.gen = 'generating';
  $('gen-prompt').textContent = prompt.tokens ? prompt.tokens.join(' ') + ' → ' : '';
  $('gen-text').textContent = '';
  $('gen-output').hidden = false;
  $('gen-output').setAttribute('aria-busy', 'true');
  $('gen-progress', HTMLProgressElement).max = Number.isFinite(options.max_tokens) && options.max_tokens > 0 ? options.max_tokens : 1;
  $('gen-meter').hidden = false;
  showProgress(g);
  syncControls();
  try {
    generation = (await startClient()).generate(prompt, {
      maxTokens: options.max_tokens, temperature: options.temperature, topK: options.top_k, topP: options.top_p,
      repetitionPenalty: options.repetition_penalty, seed: options.seed, onToken: (event) => onToken(g, event),
    });
    const r = await generation.result;
    g.result = r;
    g.state = 'done';
    g.stoppedBy = r.stoppedBy;
    if (!prompt.tokens) $('gen-prompt').textContent = '';
    const why = { max_tokens: 'reached max tokens', stop_token: 'the model ended it (stop token)', stop: 'stopped' }[r.stoppedBy];
    const rate = r.tokensPerSecond ? ` · ${fmtRate(r.tokensPerSecond)}` : '';
    $('gen-stats').textContent =
      `${r.tokens.length} token${r.tokens.length === 1 ? '' : 's'} in ${fmtSeconds(r.ms / 1000)} on ` +
      `${r.backend === 'webgpu' ? 'WebGPU' : 'the CPU'}${rate} · prompt ${r.promptTokens.length} tokens, ` +
      `first token after ${fmtSeconds(r.prefillMs / 1000)} · ${why}`;
    $('gen-progress', HTMLProgressElement).value = r.stoppedBy === 'max_tokens' ? $('gen-progress', HTMLProgressElement).max : r.tokens.length;
    document.body.dataset.gen = 'done';
  } catch (err) {
    if (err.fatal) restartWorker(err.message);
    const option = /sampling option `(\w+)`/.exec(err.message)?.[1];
    showGenError(`Generation failed: ${err.message}`,
      OPTION_INPUTS[option]?.[0] ?? (/^prompt|token id/i.test(err.message) ? 'prompt' : null));
    $('gen-meter').hidden = g.tokens.length === 0;
    $('gen-output').hidden = g.tokens.length === 0;
  } finally {
    generation = null;
    $('gen-output').setAttribute('aria-busy', 'false');
    syncControls();
    publish();
  }
}

function stopGeneration() {
  generation?.stop();
  $('stop', HTMLButtonElement).disabled = true;
}

function showResult(r) {
  const rows = [];
  for (let t = 0; t < r.rows; t++) rows.push(Array.from(r.logits.subarray(t * r.vocab, (t + 1) * r.vocab)));
  Object.assign(state, { tokens: r.tokens, logits: rows, top: r.top, ms: r.ms, ranOn: r.backend });
  $('timing').textContent =
    `${r.tokens.length} token${r.tokens.length === 1 ? '' : 's'} in ${r.ms.toFixed(1)} ms on ` +
    `${r.backend === 'webgpu' ? 'WebGPU' : 'the CPU'}`;
  const list = $('top');
  list.replaceChildren();
  for (const { token, prob } of r.top) {
    const li = document.createElement('li');
    const id = document.createElement('span');
    id.className = 'token';
    id.textContent = `token ${token}`;
    const meter = document.createElement('meter');
    meter.min = 0;
    meter.max = 1;
    meter.value = prob;
    const pct = document.createElement('span');
    pct.className = 'prob';
    pct.textContent = `${(prob * 100).toFixed(2)}%`;
    li.append(id, meter, pct);
    list.append(li);
  }
  $('result').hidden = false;
}

function publish() {
  const { logits, ...summary } = state;
  $('result-json').textContent = JSON.stringify(summary, null, 2);
}

/** "5, 17 42" -> [5, 17, 42]; throws an Error that says which entry is wrong. */
function parseTokens(text, label = 'Token ids') {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  if (!parts.length) throw new Error(`${label}: enter at least one token id, e.g. 5,17,42`);
  return parts.map((p) => {
    if (!/^\d+$/.test(p) || Number(p) > 0xffffffff) {
      throw new Error(`${label}: "${p}" is not a whole number between 0 and 4294967295`);
    }
    return Number(p);
  });
}

async function run() {
  let tokens;
  try {
    tokens = parseTokens($('tokens', HTMLInputElement).value);
  } catch (err) {
    showError(err.message, 'run-error');
    return;
  }
  clearError();
  setState('running');
  try {
    showResult(await withClient((c) => c.forward(tokens)));
    setState('done');
    publish();
  } catch (err) {
    showError(`Forward pass failed: ${err.message}`, 'run-error');
  }
}

// ---- loading progress and the model store ------------------------------------------------

const PHASES = {
  read: 'Loading from this browser\'s storage',
  fetch: 'Fetching from this page\'s server',
  store: 'Storing in this browser (IndexedDB)',
  build: 'Preparing the model',
};
let phaseStart = null;

/** @param {import('./bitlora.js').LoadProgress} ev */
function showLoadProgress(ev) {
  if (!phaseStart || phaseStart.phase !== ev.phase) {
    phaseStart = { phase: ev.phase, at: ev.at };
    state.loadProgress.push({ phase: ev.phase, at: ev.at });
  }
  const start = phaseStart;
  const last = state.loadProgress[state.loadProgress.length - 1]; // the entry pushed above, or earlier for this phase
  Object.assign(last, { done: ev.done, total: ev.total, end: ev.at });
  $('load-meter').hidden = false;
  const bar = $('load-progress', HTMLProgressElement);
  bar.max = Math.max(ev.total, 1);
  bar.value = ev.done;
  const parts = [PHASES[ev.phase] ?? ev.phase];
  if (ev.phase !== 'build') {
    parts.push(`${fmtBytes(ev.done)} / ${fmtBytes(ev.total)}`);
    const s = (ev.at - start.at) / 1000;
    if (s > 0.05 && ev.done > 0) {
      const rate = ev.done / s;
      parts.push(`${fmtBytes(rate)}/s`, ev.done >= ev.total
        ? `done in ${fmtSeconds(s)}` : `ETA ${fmtSeconds((ev.total - ev.done) / rate)}`);
    }
  } else {
    parts.push(ev.done >= ev.total ? 'done' : 'unpacking the ternary weights…');
  }
  $('load-stats').textContent = parts.join(' · ');
  last.text = $('load-stats').textContent;
  panels?.steps();
}

async function loadBundled() {
  setState('loading');
  state.loadProgress = [];
  phaseStart = null;
  $('model-name').textContent = bundledModel === 'default' ? 'Loading the built-in model…' : `Loading the bundled ${bundledModel} model…`;
  await askPersist();
  try {
    showModel(await withClient((c) => c.loadModel({ bundled: bundledModel },
      { persisted: Boolean(state.persisted), fakeFree, onProgress: showLoadProgress })),
    bundledModel === 'default' ? 'Bundled default model' : `Bundled ${bundledModel} model`);
  } finally {
    $('load-meter').hidden = true;
  }
  await showStore();
}

// persist() is only exposed to pages (not workers): ask once, before the first store.
let persistAsked = null;
function askPersist() {
  persistAsked ??= (async () => {
    try {
      state.persisted = Boolean(await navigator.storage?.persist?.());
    } catch {
      state.persisted = false;
    }
  })();
  return persistAsked;
}

async function showStore() {
  modelsPanel?.refresh();
  const info = await withClient((c) => c.listModels());
  state.store = info;
  if (!info.available) {
    $('data-status').textContent = `This browser's storage cannot be used here (${info.error}): nothing is kept between visits.`;
    return;
  }
  const stored = info.models.filter((m) => m.complete);
  const bytes = stored.reduce((n, m) => n + m.bytes, 0);
  $('data-status').textContent = stored.length
    ? `Kept in this browser (IndexedDB): ${stored.map((m) => m.name).join(', ')}, ${fmtBytes(bytes)}` +
      (info.quota ? ` (the browser allows this site ${fmtBytes(info.quota)}` + (state.persisted ? ', persistent)' : ')') : '') + '.'
    : 'Nothing is kept in this browser.';
  publish();
}

async function deleteAll() {
  if (!window.confirm('Delete everything this page keeps in this browser: stored models, training runs and adapters?')) return;
  $('delete-all', HTMLButtonElement).disabled = true;
  try {
    // A run in progress is stopped first, so it does not write a checkpoint after the deletion.
    await panels?.beforeDeleteAll();
    const r = await withClient((c) => c.deleteModelStore());
    const training = (await panels?.deleteTrainingData()) || '';
    state.store = { available: true, models: [] };
    modelsPanel.refresh();
    $('data-status').textContent =
      `Deleted: ${r.models} model${r.models === 1 ? '' : 's'} (${fmtBytes(r.bytes)})${training ? `, ${training}` : ''}. Nothing is kept in this browser now; ` +
      'the model in use stays in memory until you close the tab.';
    publish();
  } catch (err) {
    $('data-status').textContent = `Could not delete: ${err.message}`;
  } finally {
    syncControls();
  }
}

// Start (or restart) the worker's session and load the bundled model; optionally run.
async function boot({ run: andRun, keepError = false }) {
  if (!keepError) clearError();
  setState('starting');
  try {
    showBackend((await startClient()).backend);
    await loadBundled();
  } catch (err) {
    showError(`Could not start: ${err.message}`);
    return;
  }
  if (andRun) await run();
  else {
    setState(state.error ? 'error' : 'done');
    publish();
  }
}

$('run-form', HTMLFormElement).addEventListener('submit', (event) => {
  event.preventDefault();
  run();
});

$('gen-form', HTMLFormElement).addEventListener('submit', (event) => {
  event.preventDefault();
  generate();
});
$('stop', HTMLButtonElement).addEventListener('click', stopGeneration);
$('gen-form', HTMLFormElement).addEventListener('input', (event) => control(event).removeAttribute?.('aria-invalid'));

// The model panel (web/models-panel.js): stored models, Hugging Face downloads, and the files
// picker (#files) + drop zone, whose files are loaded and kept in the store ('importFiles').
modelsPanel = mountModelsPanel({
  withClient, state, params, showModel, showError, clearError, setState, run, askPersist, publish, showLoadProgress,
});

// The fine-tuning panels (web/ui/): training data, fine-tune, base-vs-adapter chat, adapters.
panels = mountPanels({ client: () => client, model: () => state.model, state, publish });

$('delete-all', HTMLButtonElement).addEventListener('click', deleteAll);

$('load-bundled', HTMLButtonElement).addEventListener('click', async () => {
  clearError();
  try {
    await loadBundled();
  } catch (err) {
    showError(`Could not load the bundled model: ${err.message}`);
    return;
  }
  await run();
});

if (params.get('tokens')) $('tokens', HTMLInputElement).value = String(params.get('tokens'));
document.body.dataset.gen = 'idle';
boot({ run: true });
