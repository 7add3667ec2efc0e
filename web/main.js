// The page's main-thread script: UI only. All model work happens in web/worker.js.
//
// For tests and embedders, the page's progress and last result are published in two places:
//   <body data-state="starting|loading|running|done|error" data-backend="webgpu|cpu">
//   window.__bitlora = { state, backend, adapter, backendInfo, model, tokens, logits (rows), top, ms, error }
// and a summary (without logits) as JSON in <pre id="result-json">.
//
// URL parameters: ?backend=cpu forces the CPU backend; ?tokens=1,2,3 sets the default tokens.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const preferGpu = params.get('backend') !== 'cpu';

const state = (window.__bitlora = {
  state: 'starting', backend: null, adapter: null, backendInfo: null, model: null,
  tokens: null, logits: null, top: null, ms: null, error: null,
});

// ---- worker plumbing: request/reply by id, restart after a crash -------------------------

let worker = null;
let nextId = 1;
const pending = new Map();

function startWorker() {
  worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  worker.onmessage = ({ data }) => {
    const p = pending.get(data.id);
    if (!p) return;
    pending.delete(data.id);
    if (data.ok) p.resolve(data.result);
    else p.reject(Object.assign(new Error(data.error), { fatal: Boolean(data.fatal) }));
    if (data.fatal) restartWorker(data.error);
  };
  // Fires when the worker's module fails to load or throws outside a request.
  worker.onerror = (event) => {
    event.preventDefault();
    const msg = event.message || 'the worker failed to start (see the console)';
    for (const p of pending.values()) p.reject(new Error(msg));
    pending.clear();
    showError(`Worker error: ${msg}`);
  };
}

function call(type, args = {}) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, type, ...args });
  });
}

let restarting = false;
async function restartWorker(reason) {
  if (restarting) return;
  restarting = true;
  worker.terminate();
  for (const p of pending.values()) p.reject(new Error(`worker restarted: ${reason}`));
  pending.clear();
  console.warn(`bitlora: the worker crashed (${reason}); starting a fresh one`);
  startWorker();
  restarting = false;
  // Keep the error that caused the restart on screen; the bundled model comes back quietly.
  await boot({ run: false, keepError: true });
}

// ---- UI -----------------------------------------------------------------------------------

function setState(s) {
  state.state = s;
  document.body.dataset.state = s;
  $('run').disabled = s === 'starting' || s === 'loading' || s === 'running';
  $('files').disabled = s === 'starting' || s === 'loading' || s === 'running';
  $('status').textContent = {
    starting: 'Starting…', loading: 'Loading model…', running: 'Running…', done: 'Done.', error: 'Error.',
  }[s];
}

function showError(message) {
  state.error = message;
  $('error-text').textContent = message;
  $('error').hidden = false;
  setState('error');
  publish();
}

function clearError() {
  state.error = null;
  $('error').hidden = true;
  $('error-text').textContent = '';
}

const MiB = 1024 * 1024;
const fmtBytes = (n) => (n >= MiB ? `${(n / MiB).toFixed(n % MiB ? 1 : 0)} MiB` : `${(n / 1024).toFixed(1)} KiB`);

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
}

function showModel(model, source) {
  state.model = { ...model, source };
  $('model-label').textContent =
    `${source}: ${model.files.join(', ')} (${fmtBytes(model.bytes)}) · vocab ${model.vocabSize}, ` +
    `hidden ${model.hiddenSize}, ${model.numHiddenLayers} layers · runs on ${model.backend === 'webgpu' ? 'WebGPU' : 'the CPU'}`;
  $('model-note').textContent = model.note ?? '';
  $('model-note').hidden = !model.note;
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
function parseTokens(text) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  if (!parts.length) throw new Error('Token ids: enter at least one, e.g. 5,17,42');
  return parts.map((p) => {
    if (!/^\d+$/.test(p) || Number(p) > 0xffffffff) {
      throw new Error(`Token ids: "${p}" is not a whole number between 0 and 4294967295`);
    }
    return Number(p);
  });
}

async function run() {
  let tokens;
  try {
    tokens = parseTokens($('tokens').value);
  } catch (err) {
    showError(err.message);
    return;
  }
  clearError();
  setState('running');
  try {
    showResult(await call('forward', { tokens }));
    setState('done');
    publish();
  } catch (err) {
    showError(`Forward pass failed: ${err.message}`);
  }
}

async function loadBundled() {
  setState('loading');
  showModel(await call('loadBundled'), 'Bundled tiny model');
}

// Start (or restart) the worker's session and load the bundled model; optionally run.
async function boot({ run: andRun, keepError = false }) {
  if (!keepError) clearError();
  setState('starting');
  try {
    showBackend(await call('init', { preferGpu }));
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

$('run-form').addEventListener('submit', (event) => {
  event.preventDefault();
  run();
});

$('files').addEventListener('change', async () => {
  const files = Array.from($('files').files);
  if (!files.length) return;
  clearError();
  setState('loading');
  try {
    showModel(await call('loadFiles', { files }), 'Your model');
  } catch (err) {
    // The previous model is still loaded in the worker, so the page keeps working.
    showError(`Could not load your model: ${err.message}`);
    $('files').value = '';
    return;
  }
  $('files').value = '';
  await run();
});

$('load-bundled').addEventListener('click', async () => {
  clearError();
  try {
    await loadBundled();
  } catch (err) {
    showError(`Could not load the bundled model: ${err.message}`);
    return;
  }
  await run();
});

if (params.get('tokens')) $('tokens').value = params.get('tokens');
startWorker();
boot({ run: true });
