// @ts-check
// bitlora's JavaScript API for web developers: fine-tune ternary BitNet b1.58 models with LoRA in
// a browser tab. Types and documentation: web/bitlora.d.ts; a working page: web/examples/train.html.
//
// This module runs on the page's main thread and does no model work itself: `Bitlora.create()`
// starts a module Web Worker (web/worker.js) that owns the wasm module (crates/web), the model,
// the training loop and the IndexedDB stores, and every method here is one message to it. The
// page therefore never blocks, even while a CPU training step runs. The messages are typed in
// web/protocol.d.ts; `tsc` checks this file against it and against bitlora.d.ts.

/**
 * @import * as api from './bitlora.js'
 * @import { FromWorker, RequestType, RequestArgs, RequestResult, RequestEvent, TrainEvent, RunInfo, TrainAction, WireGenerateOptions } from './protocol.js'
 */

const DEFAULT_WORKER = new URL('./worker.js', import.meta.url);

/**
 * An Error with the fields bitlora's errors may carry: `field` (the option at fault), `line`
 * (the JSONL line of the training data), `fatal` (the worker crashed).
 * @typedef {Error & { field?: string, line?: number, fatal?: boolean }} BitloraError
 */

/**
 * An Error from a worker reply, with the `field` and `line` it carries.
 * @param {string} message
 * @param {{ fatal?: boolean, field?: string, line?: number }} [extra]
 * @returns {BitloraError}
 */
function toError(message, { fatal, field, line } = {}) {
  /** @type {BitloraError} */
  const err = new Error(message);
  if (fatal) err.fatal = true;
  if (field != null) err.field = field;
  if (line != null) err.line = line;
  return err;
}

/**
 * camelCase sampling options -> the worker's snake_case ones; unknown names are errors.
 * @type {Record<string, keyof WireGenerateOptions>}
 */
const SAMPLING = {
  maxTokens: 'max_tokens', temperature: 'temperature', topK: 'top_k', topP: 'top_p',
  repetitionPenalty: 'repetition_penalty', seed: 'seed', stopTokens: 'stop_tokens',
};

/**
 * A request waiting for its reply. `resolve` takes the reply's result as the protocol types it for
 * the request's type (see _send); `onEvent` its progress or token messages.
 * @typedef {{ resolve: (result: unknown) => void, reject: (err: Error) => void, onEvent?: (message: any) => void }} Pending
 */

/** @implements {api.Bitlora} */
export class Bitlora {
  /** @type {Worker} */
  #worker;
  #nextId = 1;
  /** @type {Map<number, Pending>} */
  #pending = new Map();
  /** @type {Map<string, Trainer>} */
  #trainers = new Map();
  /** @type {string | null} */
  #broken = null;

  /**
   * Use `Bitlora.create()`.
   * @param {Worker} worker
   * @param {symbol} token
   */
  constructor(worker, token) {
    if (token !== Bitlora.#token) throw new TypeError('use Bitlora.create() to make a Bitlora client');
    this.#worker = worker;
    // Set by create() before the client is handed out, so never null where a caller sees it.
    this.backend = /** @type {api.BackendInfo} */ (/** @type {unknown} */ (null));
    /** @type {api.ModelInfo | null} */
    this.model = null;
    worker.onmessage = ({ data }) => this.#onMessage(data);
    worker.onerror = (event) => {
      event.preventDefault?.();
      this.#fail(event.message || 'the bitlora worker failed to start (see the console)');
    };
  }

  static #token = Symbol('Bitlora');

  /** @param {api.CreateOptions} [options] */
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

  /** @param {FromWorker} data */
  #onMessage(data) {
    if (data?.type === 'train') {
      this.#trainers.get(data.runId)?._event(data);
      return;
    }
    const p = this.#pending.get(data?.id);
    if (!p) return;
    if (data.type === 'token' || data.type === 'progress') {
      p.onEvent?.(data);
      return;
    }
    this.#pending.delete(data.id);
    if (data.ok) {
      p.resolve(data.result);
      return;
    }
    p.reject(toError(data.error, data));
    if (data.fatal) this.#fail(`the bitlora worker crashed: ${data.error}; create a new Bitlora client`);
  }

  /** @param {string} message */
  #fail(message) {
    this.#broken = message;
    for (const p of this.#pending.values()) p.reject(new Error(message));
    this.#pending.clear();
    for (const t of this.#trainers.values()) t._event({ event: 'error', data: { message, fatal: true } });
  }

  /**
   * @template {RequestType} K
   * @param {K} type
   * @param {RequestArgs<K>} args
   * @param {(message: RequestEvent<K>) => void} [onEvent]
   * @returns {Promise<RequestResult<K>>}
   */
  request(type, args = {}, onEvent) {
    return this._send(type, args, onEvent).promise;
  }

  /**
   * @internal: a request and its id.
   * @template {RequestType} K
   * @param {K} type
   * @param {RequestArgs<K>} args
   * @param {(message: RequestEvent<K>) => void} [onEvent]
   * @returns {{ id: number | null, promise: Promise<RequestResult<K>> }}
   */
  _send(type, args, onEvent) {
    if (this.#broken) return { id: null, promise: Promise.reject(new Error(this.#broken)) };
    const id = this.#nextId++;
    /** @type {Promise<RequestResult<K>>} */
    const promise = new Promise((resolve, reject) => {
      // The worker answers request `type` with RequestResult<K> (web/protocol.d.ts; worker.js's
      // handler table is checked against it), which a reply's `result: unknown` cannot say.
      const settle = /** @type {(result: unknown) => void} */ (resolve);
      this.#pending.set(id, { resolve: settle, reject, onEvent });
      this.#worker.postMessage({ ...args, id, type });
    });
    return { id, promise };
  }

  /**
   * @internal: a message without a reply (a generation's 'stop').
   * @param {import('./protocol.js').StopMessage} message
   */
  _post(message) {
    if (!this.#broken) this.#worker.postMessage(message);
  }

  // ---- models ----

  /**
   * @param {api.ModelSource} source
   * @param {api.LoadOptions} [options]
   */
  async loadModel(source, { onProgress, persisted = false, keep = false, fakeFree } = {}) {
    /** @type {((m: import('./protocol.js').LoadProgressMessage) => void) | undefined} */
    const onEvent = onProgress ? (m) => onProgress(m.event) : undefined;
    let result;
    if (source && 'bundled' in source && typeof source.bundled === 'string') {
      result = await this.request('loadBundled', { model: source.bundled, persisted, fakeFree }, onEvent);
    } else if (source && 'stored' in source && typeof source.stored === 'string') {
      result = await this.request('loadStored', { modelId: source.stored }, onEvent);
    } else if (source && 'files' in source && source.files && keep) {
      result = await this.request('importFiles', { files: Array.from(source.files), persisted, fakeFree }, onEvent);
    } else if (source && 'files' in source && source.files) {
      result = await this.request('loadFiles', { files: Array.from(source.files) });
      result.source ??= { from: 'files', stored: false, notes: [] };
    } else {
      throw new Error('loadModel: give { bundled: "default" }, { stored: modelId } or { files: [...] }');
    }
    this.model = result;
    return result;
  }

  /** @param {number[]} tokens */
  forward(tokens) {
    return this.request('forward', { tokens });
  }

  // ---- the model store ----

  listModels() {
    return this.request('listModels', {});
  }

  /**
   * @param {api.DownloadOptions} options
   * @param {{ onProgress?: (p: api.DownloadProgress) => void }} [events]
   */
  downloadModel(options, { onProgress } = {}) {
    return this.request('downloadHub', { ...options }, onProgress ? (m) => onProgress(m.event) : undefined);
  }

  /**
   * @param {string} modelId
   * @param {{ discard?: boolean }} [options]
   */
  stopDownload(modelId, { discard = false } = {}) {
    return this.request('cancelDownload', { modelId, discard: Boolean(discard) });
  }

  /** @param {string} modelId */
  deleteStoredModel(modelId) {
    return this.request('deleteModel', { modelId });
  }

  deleteModelStore() {
    return this.request('deleteAll', {});
  }

  // ---- data and memory ----

  /**
   * @param {api.DataInput} input
   * @param {api.DataOptions & { batch?: number }} [options]
   */
  prepareData(input, options = {}) {
    const { text, fileName } = checkData(input, 'prepareData');
    return this.request('prepareData', { text, fileName, options });
  }

  /** @param {api.TrainConfig} [config] */
  estimateMemory(config = {}) {
    return this.request('estimateMemory', { config: stripData(config) });
  }

  // ---- training ----

  /** @param {api.TrainerOptions} options */
  async createTrainer(options) {
    const { data, ...config } = options ?? {};
    checkData(data, 'createTrainer');
    const info = await this.request('trainCreate', { data: { text: data.text, fileName: data.fileName }, config });
    return this.#trainer(info);
  }

  /** @param {string} runId */
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

  /** @param {RunInfo} info */
  #trainer(info) {
    const t = new Trainer(this, info, Trainer.token);
    this.#trainers.set(info.runId, t);
    return t;
  }

  /**
   * @internal: a Trainer disposed or deleted.
   * @param {string} runId
   */
  _forget(runId) {
    this.#trainers.delete(runId);
  }

  listRuns() {
    return this.request('listRuns', {});
  }

  /** @param {string} runId */
  getRun(runId) {
    return this.request('getRun', { runId });
  }

  /** @param {string} runId */
  async deleteRun(runId) {
    await this.request('deleteRun', { runId });
    this.#trainers.get(runId)?._event({ event: 'state', data: { state: 'stopped' } });
    this.#trainers.delete(runId);
  }

  // ---- adapters ----

  listAdapters() {
    return this.request('listAdapters', {});
  }

  /** @param {string} name */
  exportAdapter(name) {
    return this.request('exportAdapter', { name });
  }

  /**
   * @param {Array<File | api.PeftFile> | FileList} files
   * @param {string} [name]
   */
  importAdapter(files, name) {
    return this.request('importAdapter', { files: Array.from(files ?? []), name });
  }

  /** @param {string} name */
  deleteAdapter(name) {
    return this.request('deleteAdapter', { name });
  }

  deleteTrainingData() {
    return this.request('deleteTrainingData', {});
  }

  // ---- generation ----

  /**
   * @param {api.Prompt} prompt
   * @param {api.GenerateOptions} [options]
   */
  generate(prompt, options = {}) {
    return new Generation(this, prompt, options);
  }

  terminate() {
    this.#fail('this Bitlora client was terminated');
    this.#worker.terminate();
  }
}

/**
 * @param {api.DataInput | undefined} data
 * @param {string} what
 * @returns {api.DataInput}
 */
function checkData(data, what) {
  if (!data || typeof data.text !== 'string') {
    throw new Error(`${what}: give the training data as { text: "...", fileName: "train.jsonl" }`);
  }
  return data;
}

/**
 * @param {api.TrainConfig & { data?: unknown }} config
 * @returns {api.TrainConfig}
 */
function stripData(config) {
  const { data, name, ...rest } = config ?? {};
  return rest;
}

/**
 * A training run; see Trainer in web/bitlora.d.ts.
 * @implements {api.Trainer}
 */
class Trainer {
  static token = Symbol('Trainer');
  /** @type {Bitlora} */
  #bl;
  /** @type {Map<keyof api.TrainerEvents, Set<(event: any) => void>>} */
  #listeners = new Map();
  /** @type {Promise<api.DoneEvent>} */
  #finished;
  /** @type {{ resolve: (done: api.DoneEvent) => void, reject: (err: Error) => void }} */
  #settle;

  /**
   * @param {Bitlora} bl
   * @param {RunInfo} info
   * @param {symbol} token
   */
  constructor(bl, info, token) {
    if (token !== Trainer.token) throw new TypeError('use Bitlora.createTrainer() or resumeTrainer()');
    this.#bl = bl;
    this.runId = info.runId;
    this.state = info.state;
    // The worker resolves the config (crates/web fills in every default), which is what the
    // declared type says; the wire type is the looser TrainConfig the page sent.
    this.config = /** @type {api.Trainer['config']} */ (info.config);
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

  /**
   * @template {keyof api.TrainerEvents} K
   * @param {K} type
   * @param {(event: api.TrainerEvents[K]) => void} listener
   */
  on(type, listener) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => this.#listeners.get(type)?.delete(listener);
  }

  /**
   * @template {keyof api.TrainerEvents} K
   * @param {K} type
   * @param {api.TrainerEvents[K]} event
   */
  #emit(type, event) {
    for (const fn of this.#listeners.get(type) ?? []) {
      try { fn(event); } catch (err) { setTimeout(() => { throw err; }); }
    }
  }

  /**
   * @internal: an event from the worker.
   * @param {TrainEvent} e
   */
  _event(e) {
    switch (e.event) {
      case 'progress': {
        const data = e.data;
        this.step = data.step;
        this.backend = data.backend;
        this.totalSteps = data.totalSteps;
        this.history.push(data);
        this.#emit('progress', data);
        break;
      }
      case 'checkpoint':
        this.#emit('checkpoint', e.data);
        break;
      case 'state':
        this.state = e.data.state;
        this.#emit('state', e.data);
        break;
      case 'done':
        this.step = e.data.step;
        this.#emit('done', e.data);
        this.#settle.resolve(e.data);
        break;
      case 'error': {
        const err = toError(e.data.message, e.data);
        this.state = 'error';
        this.#emit('error', err);
        this.#settle.reject(err);
        break;
      }
    }
  }

  /**
   * @overload
   * @param {'checkpoint'} action
   * @returns {Promise<api.CheckpointEvent>}
   */
  /**
   * @overload
   * @param {Exclude<TrainAction, 'checkpoint'>} action
   * @returns {Promise<{ state: api.TrainerState, step: number }>}
   */
  /**
   * training.js's control() answers 'checkpoint' with the checkpoint stored and the other
   * actions with the run's state; the protocol's one reply type for 'trainControl' is the union.
   * @param {TrainAction} action
   * @returns {Promise<import('./protocol.js').TrainControlResult>}
   */
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

  /** @param {string} name */
  saveAdapter(name) {
    return this.#bl.request('trainSaveAdapter', { runId: this.runId, name });
  }

  async validate() {
    const step = this.step;
    const v = await this.#bl.request('trainValidate', { runId: this.runId });
    if (step === 0 && v !== null && Number.isFinite(v)) this.initialValLoss = v; // the worker keeps it with the run
    return v;
  }

  async dispose() {
    await this.#bl.request('trainDispose', { runId: this.runId });
    this.#bl._forget(this.runId);
  }
}

/**
 * A generation in progress; see Generation in web/bitlora.d.ts.
 * @implements {api.Generation}
 */
class Generation {
  /** @type {api.TokenEvent[]} */
  #queue = [];
  /** @type {(() => void) | null} */
  #wake = null;
  #ended = false;
  /** @type {Int32Array | null} */
  #stopFlag = null;
  /** @type {number | null} */
  #id = null;
  /** @type {Bitlora} */
  #bl;

  /**
   * @param {Bitlora} bl
   * @param {api.Prompt} prompt
   * @param {api.GenerateOptions} options
   */
  constructor(bl, prompt, options) {
    this.#bl = bl;
    const { adapter = null, onToken, ...rest } = options ?? {};
    /** @type {WireGenerateOptions} */
    const snake = {};
    let bad = null;
    for (const [k, v] of Object.entries(rest)) {
      if (v === undefined) continue;
      if (!SAMPLING[k]) bad ??= `unknown generation option \`${k}\`; the options are ${[...Object.keys(SAMPLING), 'adapter', 'onToken'].join(', ')}`;
      else Object.assign(snake, { [SAMPLING[k]]: v }); // the wasm checks each option's value
    }
    if (adapter != null) snake.adapter = adapter;
    const p = typeof prompt === 'string' ? { text: prompt } : prompt;
    // A stop flag the worker reads between tokens: a CPU generation runs synchronously there,
    // so a 'stop' message would arrive only after it ended (needs cross-origin isolation).
    if (globalThis.crossOriginIsolated && typeof SharedArrayBuffer !== 'undefined') {
      this.#stopFlag = new Int32Array(new SharedArrayBuffer(4));
    }
    if (bad) {
      /** @type {Promise<api.GenerateResult>} */
      this.result = Promise.reject(new Error(bad));
    } else {
      const { id, promise } = bl._send('generate', { prompt: p, options: snake, stopFlag: this.#stopFlag ?? undefined }, (m) => {
        if (m.type !== 'token') return;
        onToken?.(m.event);
        this.#queue.push(m.event);
        this.#wake?.();
      });
      this.#id = id;
      // The worker's result has no `adapter`; the first handler below fills it in before any
      // caller's handler runs, so callers see a whole GenerateResult.
      this.result = /** @type {Promise<api.GenerateResult>} */ (promise);
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
      const next = this.#queue.shift();
      if (next) {
        yield next;
        continue;
      }
      if (this.#ended) {
        await this.result; // rethrows a failed generation
        return;
      }
      await new Promise((resolve) => { this.#wake = () => resolve(undefined); });
      this.#wake = null;
    }
  }
}

// The static side of the class, which `@implements` does not check: Bitlora.create as
// bitlora.d.ts declares it.
/** @satisfies {Pick<typeof api.Bitlora, 'create'>} */ (Bitlora);
