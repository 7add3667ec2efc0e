// bitlora's JavaScript API for web developers: fine-tune ternary BitNet b1.58 models with LoRA in
// a browser tab. Types and documentation: web/bitlora.d.ts; a working page: web/examples/train.html.
//
// This module runs on the page's main thread and does no model work itself: `Bitlora.create()`
// starts a module Web Worker (web/worker.js) that owns the wasm module (crates/web), the model,
// the training loop and the IndexedDB stores, and every method here is one message to it. The
// page therefore never blocks, even while a CPU training step runs.

const DEFAULT_WORKER = new URL('./worker.js', import.meta.url);

/** An Error from a worker reply, with the `field` (option) and `line` (JSONL line) it carries. */
function toError(message, { fatal, field, line } = {}) {
  const err = new Error(message);
  if (fatal) err.fatal = true;
  if (field != null) err.field = field;
  if (line != null) err.line = line;
  return err;
}

/** camelCase sampling options -> the worker's snake_case ones; unknown names are errors. */
const SAMPLING = {
  maxTokens: 'max_tokens', temperature: 'temperature', topK: 'top_k', topP: 'top_p',
  repetitionPenalty: 'repetition_penalty', seed: 'seed', stopTokens: 'stop_tokens',
};

export class Bitlora {
  #worker;
  #nextId = 1;
  #pending = new Map();
  #trainers = new Map();
  #broken = null;

  /** Use `Bitlora.create()`. */
  constructor(worker, token) {
    if (token !== Bitlora.#token) throw new TypeError('use Bitlora.create() to make a Bitlora client');
    this.#worker = worker;
    this.backend = null;
    this.model = null;
    worker.onmessage = ({ data }) => this.#onMessage(data);
    worker.onerror = (event) => {
      event.preventDefault?.();
      this.#fail(event.message || 'the bitlora worker failed to start (see the console)');
    };
  }

  static #token = Symbol('Bitlora');

  static async create({ preferGpu = true, workerUrl = DEFAULT_WORKER } = {}) {
    const worker = new Worker(workerUrl, { type: 'module' });
    const bl = new Bitlora(worker, Bitlora.#token);
    try {
      const backend = await bl.request('init', { preferGpu: Boolean(preferGpu) });
      bl.backend = { training: 'cpu', trainingReason: null, wasmMemoryLimit: 2 ** 32, ...backend };
    } catch (err) {
      worker.terminate();
      throw err;
    }
    return bl;
  }

  #onMessage(data) {
    if (data?.type === 'train') {
      this.#trainers.get(data.runId)?._event(data.event, data.data);
      return;
    }
    const p = this.#pending.get(data?.id);
    if (!p) return;
    if (data.type === 'token' || data.type === 'progress') {
      p.onEvent?.(data);
      return;
    }
    this.#pending.delete(data.id);
    if (data.ok) p.resolve(data.result);
    else p.reject(toError(data.error, data));
    if (data.fatal) this.#fail(`the bitlora worker crashed: ${data.error}; create a new Bitlora client`);
  }

  #fail(message) {
    this.#broken = message;
    for (const p of this.#pending.values()) p.reject(new Error(message));
    this.#pending.clear();
    for (const t of this.#trainers.values()) t._event('error', { message, fatal: true });
  }

  request(type, args = {}, onEvent) {
    return this._send(type, args, onEvent).promise;
  }

  /** @internal: a request and its id. */
  _send(type, args, onEvent) {
    if (this.#broken) return { id: null, promise: Promise.reject(new Error(this.#broken)) };
    const id = this.#nextId++;
    const promise = new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, onEvent });
      this.#worker.postMessage({ ...args, id, type });
    });
    return { id, promise };
  }

  /** @internal: a message without a reply (a generation's 'stop'). */
  _post(message) {
    if (!this.#broken) this.#worker.postMessage(message);
  }

  // ---- models ----

  async loadModel(source, { onProgress, persisted = false } = {}) {
    const onEvent = onProgress ? (m) => onProgress(m.event) : undefined;
    let result;
    if (source && typeof source.bundled === 'string') {
      result = await this.request('loadBundled', { model: source.bundled, persisted }, onEvent);
    } else if (source && typeof source.stored === 'string') {
      result = await this.request('loadStored', { modelId: source.stored }, onEvent);
    } else if (source && source.files) {
      result = await this.request('loadFiles', { files: Array.from(source.files) }, onEvent);
      result.source ??= { from: 'files', stored: false, notes: [] };
    } else {
      throw new Error('loadModel: give { bundled: "default" }, { stored: modelId } or { files: [...] }');
    }
    this.model = result;
    return result;
  }

  // ---- data and memory ----

  prepareData(input, options = {}) {
    const { text, fileName } = checkData(input, 'prepareData');
    return this.request('prepareData', { text, fileName, options });
  }

  estimateMemory(config = {}) {
    return this.request('estimateMemory', { config: stripData(config) });
  }

  // ---- training ----

  async createTrainer(options) {
    const { data, ...config } = options ?? {};
    checkData(data, 'createTrainer');
    const info = await this.request('trainCreate', { data: { text: data.text, fileName: data.fileName }, config });
    return this.#trainer(info);
  }

  async resumeTrainer(runId) {
    const run = await this.request('getRun', { runId });
    if (!this.model || this.model.key !== run.model.key) {
      // The run's model, when this browser can load it without the visitor picking files.
      const key = run.model.key;
      if (key.startsWith('bundled:')) await this.loadModel({ bundled: key.slice('bundled:'.length) });
      else if (!key.startsWith('files:')) await this.loadModel({ stored: key });
      else throw new Error(`run "${run.name}" trains ${run.model.name}, which was loaded from picked files: load it again, then resume`);
    }
    const existing = this.#trainers.get(runId);
    if (existing) return existing;
    const info = await this.request('trainResume', { runId });
    return this.#trainer(info);
  }

  #trainer(info) {
    const t = new Trainer(this, info, Trainer.token);
    this.#trainers.set(info.runId, t);
    return t;
  }

  /** @internal: a Trainer disposed or deleted. */
  _forget(runId) {
    this.#trainers.delete(runId);
  }

  listRuns() {
    return this.request('listRuns');
  }

  getRun(runId) {
    return this.request('getRun', { runId });
  }

  async deleteRun(runId) {
    await this.request('deleteRun', { runId });
    this.#trainers.get(runId)?._event('state', { state: 'stopped' });
    this.#trainers.delete(runId);
  }

  // ---- adapters ----

  listAdapters() {
    return this.request('listAdapters');
  }

  exportAdapter(name) {
    return this.request('exportAdapter', { name });
  }

  importAdapter(files, name) {
    return this.request('importAdapter', { files: Array.from(files ?? []), name });
  }

  deleteAdapter(name) {
    return this.request('deleteAdapter', { name });
  }

  deleteTrainingData() {
    return this.request('deleteTrainingData');
  }

  // ---- generation ----

  generate(prompt, options = {}) {
    return new Generation(this, prompt, options);
  }

  terminate() {
    this.#fail('this Bitlora client was terminated');
    this.#worker.terminate();
  }
}

function checkData(data, what) {
  if (!data || typeof data.text !== 'string') {
    throw new Error(`${what}: give the training data as { text: "...", fileName: "train.jsonl" }`);
  }
  return data;
}

function stripData(config) {
  const { data, name, ...rest } = config ?? {};
  return rest;
}

/** A training run; see Trainer in web/bitlora.d.ts. */
class Trainer {
  static token = Symbol('Trainer');
  #bl;
  #listeners = new Map();
  #finished;
  #settle;

  constructor(bl, info, token) {
    if (token !== Trainer.token) throw new TypeError('use Bitlora.createTrainer() or resumeTrainer()');
    this.#bl = bl;
    this.runId = info.runId;
    this.state = info.state;
    this.config = info.config;
    this.data = info.data;
    this.step = info.step;
    this.totalSteps = info.totalSteps;
    this.adapterParams = info.adapterParams;
    this.backend = info.backend;
    this.backendNote = info.backendNote ?? null;
    this.history = info.history ?? [];
    this.initialValLoss = info.initialValLoss ?? null;
    this.#newFinished();
  }

  #newFinished() {
    this.#finished = new Promise((resolve, reject) => { this.#settle = { resolve, reject }; });
    this.#finished.catch(() => {}); // rejections surface through 'error' listeners too
  }

  get finished() {
    return this.#finished;
  }

  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.#listeners.get(type)?.delete(listener);
  }

  #emit(type, event) {
    for (const fn of this.#listeners.get(type) ?? []) {
      try { fn(event); } catch (err) { setTimeout(() => { throw err; }); }
    }
  }

  /** @internal: an event from the worker. */
  _event(type, data) {
    switch (type) {
      case 'progress':
        this.step = data.step;
        this.backend = data.backend;
        this.totalSteps = data.totalSteps;
        this.history.push(data);
        this.#emit('progress', data);
        break;
      case 'checkpoint':
        this.#emit('checkpoint', data);
        break;
      case 'state':
        this.state = data.state;
        this.#emit('state', data);
        break;
      case 'done':
        this.step = data.step;
        this.#emit('done', data);
        this.#settle.resolve(data);
        break;
      case 'error': {
        const err = toError(data.message, data);
        this.state = 'error';
        this.#emit('error', err);
        this.#settle.reject(err);
        break;
      }
    }
  }

  #control(action) {
    return this.#bl.request('trainControl', { runId: this.runId, action });
  }

  async start() {
    if (this.state === 'done' || this.state === 'stopped') this.#newFinished();
    const r = await this.#control('start');
    this.state = r.state;
  }

  async pause() {
    const r = await this.#control('pause');
    this.state = r.state;
    this.step = r.step;
  }

  async resume() {
    const r = await this.#control('resume');
    this.state = r.state;
  }

  async stop() {
    const r = await this.#control('stop');
    this.state = r.state;
    this.step = r.step;
  }

  checkpoint() {
    return this.#control('checkpoint');
  }

  saveAdapter(name) {
    return this.#bl.request('trainSaveAdapter', { runId: this.runId, name });
  }

  async validate() {
    const step = this.step;
    const v = await this.#bl.request('trainValidate', { runId: this.runId });
    if (step === 0 && Number.isFinite(v)) this.initialValLoss = v; // the worker keeps it with the run
    return v;
  }

  async dispose() {
    await this.#bl.request('trainDispose', { runId: this.runId });
    this.#bl._forget(this.runId);
  }
}

/** A generation in progress; see Generation in web/bitlora.d.ts. */
class Generation {
  #queue = [];
  #wake = null;
  #ended = false;
  #stopFlag = null;
  #id = null;
  #bl;

  constructor(bl, prompt, options) {
    this.#bl = bl;
    const { adapter = null, onToken, ...rest } = options ?? {};
    const snake = {};
    let bad = null;
    for (const [k, v] of Object.entries(rest)) {
      if (v === undefined) continue;
      if (!SAMPLING[k]) bad ??= `unknown generation option \`${k}\`; the options are ${[...Object.keys(SAMPLING), 'adapter', 'onToken'].join(', ')}`;
      else snake[SAMPLING[k]] = v;
    }
    if (adapter != null) snake.adapter = adapter;
    const p = typeof prompt === 'string' ? { text: prompt } : prompt;
    // A stop flag the worker reads between tokens: a CPU generation runs synchronously there,
    // so a 'stop' message would arrive only after it ended (needs cross-origin isolation).
    if (globalThis.crossOriginIsolated && typeof SharedArrayBuffer !== 'undefined') {
      this.#stopFlag = new Int32Array(new SharedArrayBuffer(4));
    }
    if (bad) {
      this.result = Promise.reject(new Error(bad));
    } else {
      const { id, promise } = bl._send('generate', { prompt: p, options: snake, stopFlag: this.#stopFlag ?? undefined }, (m) => {
        if (m.type !== 'token') return;
        onToken?.(m.event);
        this.#queue.push(m.event);
        this.#wake?.();
      });
      this.#id = id;
      this.result = promise;
    }
    this.result.then((r) => { if (r) r.adapter ??= adapter; }, () => {}).finally(() => {
      this.#ended = true;
      this.#wake?.();
    });
  }

  stop() {
    if (this.#stopFlag) Atomics.store(this.#stopFlag, 0, 1);
    // WebGPU generation awaits the GPU between tokens, so a message reaches it too.
    if (this.#id != null) this.#bl._post({ type: 'stop', target: this.#id });
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this.#queue.length) {
        yield this.#queue.shift();
        continue;
      }
      if (this.#ended) {
        await this.result; // rethrows a failed generation
        return;
      }
      await new Promise((resolve) => { this.#wake = resolve; });
      this.#wake = null;
    }
  }
}
