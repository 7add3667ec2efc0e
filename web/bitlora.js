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
    this.chat = { completions: new ChatCompletions(this) };
    worker.onmessage = ({ data }) => this.#onMessage(data);
    worker.onerror = (event) => {
      event.preventDefault?.();
      this.#fail(event.message || 'the bitlora worker failed to start (see the console)');
    };
  }

  static #token = Symbol('Bitlora');

  /** @param {api.CreateOptions} [options] */
  static async create({ backend: choice, preferGpu = true, workerUrl = DEFAULT_WORKER, threads, limits = 'adapter' } = {}) {
    choice ??= preferGpu ? 'auto' : 'cpu';
    if (!['auto', 'webgpu', 'cpu'].includes(choice)) {
      throw new TypeError(`Bitlora.create: backend is ${JSON.stringify(choice)}; use "auto", "webgpu" or "cpu"`);
    }
    if (!['adapter', 'phone'].includes(limits)) {
      throw new TypeError(`Bitlora.create: limits is ${JSON.stringify(limits)}; use "adapter" or "phone"`);
    }
    if (threads !== undefined && !(Number.isInteger(threads) && threads >= 1 && threads <= 64)) {
      throw new TypeError(`Bitlora.create: threads is ${JSON.stringify(threads)}; use a whole number from 1 to 64`);
    }
    const worker = new Worker(workerUrl, { type: 'module' });
    const bl = new Bitlora(worker, Bitlora.#token);
    try {
      const backend = await bl.request('init', { backend: choice, threads, limits });
      bl.backend = { training: 'cpu', trainingReason: null, wasmMemoryLimit: 2 ** 32, threadsNote: null, ...backend };
    } catch (err) {
      worker.terminate();
      throw err;
    }
    return bl;
  }

  /** @param {FromWorker} data */
  #onMessage(data) {
    if (data?.type === 'train') {
      // After a lost WebGPU device the session runs on a new one or on the CPU.
      if (data.event === 'recovered') this.backend = { ...this.backend, ...data.data.session };
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

  /**
   * @param {string} name
   * @param {api.ExportAdapterOptions} [options]
   */
  exportAdapter(name, options = {}) {
    return this.request('exportAdapter', { name, ...options });
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
      case 'validation':
        if (e.data.step === 0 && e.data.valLoss != null) this.initialValLoss = e.data.valLoss;
        this.#emit('validation', e.data);
        break;
      case 'checkpoint':
        this.#emit('checkpoint', e.data);
        break;
      case 'recovered': {
        const { session, ...data } = e.data;
        this.step = data.step;
        this.backend = data.backend;
        this.history = this.history.filter((p) => p.step <= data.step);
        this.#emit('recovered', data);
        break;
      }
      case 'state':
        this.state = e.data.state;
        if (e.data.step != null) this.step = e.data.step;
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

// ---- OpenAI-style chat completions (types and docs: ChatCompletionRequest in bitlora.d.ts) ----

/** Request fields and what they map to; `null`/`undefined` values count as absent. */
const CHAT_FIELDS = ['messages', 'stream', 'stream_options', 'model', 'temperature', 'top_p', 'max_tokens',
  'max_completion_tokens', 'seed', 'stop', 'n', 'adapter', 'top_k', 'repetition_penalty'];
/** OpenAI fields bitlora does not offer, and what to do instead. */
const CHAT_UNSUPPORTED = {
  frequency_penalty: 'use repetition_penalty (a multiplicative penalty on tokens already in the text)',
  presence_penalty: 'use repetition_penalty (a multiplicative penalty on tokens already in the text)',
  logit_bias: 'not offered', logprobs: 'not offered (Bitlora.forward gives next-token logits)',
  top_logprobs: 'not offered (Bitlora.forward gives next-token logits)', tools: 'not offered',
  tool_choice: 'not offered', functions: 'not offered', function_call: 'not offered',
  response_format: 'not offered', parallel_tool_calls: 'not offered', audio: 'not offered', modalities: 'not offered',
};

/**
 * A request's error: names the field, as the sampling options' errors do.
 * @param {string} field
 * @param {string} message
 */
function chatError(field, message) {
  return toError(`chat.completions.create: ${field ? `${field} ` : ''}${message}`, { field: field || undefined });
}

/** @param {unknown} v */
function describeValue(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v);
  return typeof v === 'object' ? 'an object' : String(v);
}

/**
 * A number field, checked: absent -> undefined.
 * @param {Record<string, unknown>} req
 * @param {string} field
 * @param {{ integer?: boolean, min?: number, max?: number, above?: number, what: string }} rule
 * @returns {number | undefined}
 */
function chatNumber(req, field, { integer = false, min, max, above, what }) {
  const v = req[field];
  if (v == null) return undefined;
  const ok = typeof v === 'number' && Number.isFinite(v) && (!integer || Number.isSafeInteger(v)) &&
    (min == null || v >= min) && (max == null || v <= max) && (above == null || v > above);
  if (!ok) throw chatError(field, `must be ${what}, got ${describeValue(v)}`);
  return /** @type {number} */ (v);
}

/**
 * The text of a message's content: a string or OpenAI's text parts.
 * @param {unknown} content
 * @param {string} where
 */
function chatText(content, where) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content.map((part, j) => {
      if (part && typeof part === 'object' && part.type === 'text' && typeof part.text === 'string') return part.text;
      const type = part && typeof part === 'object' ? part.type : undefined;
      throw chatError(`${where}.content[${j}]`, `must be a text part ({ type: "text", text: "..." }), got ${type ? `a "${type}" part` : describeValue(part)}: bitlora's models read text only`);
    }).join('');
  }
  throw chatError(`${where}.content`, `must be a string or a list of text parts, got ${describeValue(content)}`);
}

/**
 * Checks a request against the loaded model and turns it into generate()'s prompt and options.
 * @param {Bitlora} bl
 * @param {api.ChatCompletionRequest} request
 */
function planChat(bl, request) {
  if (!request || typeof request !== 'object' || Array.isArray(request)) {
    throw chatError('', `takes one object ({ messages: [{ role: "user", content: "..." }], stream? }), got ${describeValue(request)}`);
  }
  const req = /** @type {Record<string, unknown>} */ (/** @type {unknown} */ (request));
  for (const [k, v] of Object.entries(req)) {
    if (v === undefined || v === null) continue;
    if (Object.hasOwn(CHAT_UNSUPPORTED, k)) throw chatError(k, `is not supported: ${CHAT_UNSUPPORTED[/** @type {keyof typeof CHAT_UNSUPPORTED} */ (k)]}`);
    if (!CHAT_FIELDS.includes(k)) throw chatError(k, `is not a request field; the fields are ${CHAT_FIELDS.join(', ')}`);
  }
  const model = bl.model;
  if (!model) throw chatError('', 'no model is loaded: call loadModel first (e.g. loadModel({ bundled: "default" }))');
  if (req.model != null && ![model.key, model.storeId, model.name].includes(/** @type {string} */ (req.model))) {
    throw chatError('model', `is ${describeValue(req.model)}, but the loaded model is ${JSON.stringify(model.name ?? model.key)} (key ${JSON.stringify(model.key)}); load that model with loadModel first, or leave model out`);
  }
  const messages = req.messages;
  if (!Array.isArray(messages) || messages.length === 0) {
    throw chatError('messages', `must be a non-empty list of { role, content }, got ${describeValue(messages)}`);
  }
  const turns = messages.map((m, i) => {
    if (!m || typeof m !== 'object' || Array.isArray(m)) throw chatError(`messages[${i}]`, `must be { role, content }, got ${describeValue(m)}`);
    if (!['system', 'developer', 'user', 'assistant'].includes(m.role)) {
      throw chatError(`messages[${i}].role`, `must be "system", "developer", "user" or "assistant", got ${describeValue(m.role)}`);
    }
    // OpenAI's "developer" is the newer name of "system"; chat templates know "system".
    const role = /** @type {'system' | 'user' | 'assistant'} */ (m.role === 'developer' ? 'system' : m.role);
    return { role, content: chatText(m.content, `messages[${i}]`) };
  });
  if (!model.tokenizer) throw chatError('', `the loaded model (${model.name ?? model.key}) has no tokenizer.json, so it takes token ids only: use generate({ tokens: [...] })`);
  if (!model.chatTemplate) {
    throw chatError('', `the loaded model (${model.name ?? model.key}) has no chat template: load it with a tokenizer_config.json that has a "chat_template", or from a .gguf with tokenizer.chat_template (loadModel({ files })), or use generate() with a plain text prompt`);
  }
  if (req.stream != null && typeof req.stream !== 'boolean') throw chatError('stream', `must be true or false, got ${describeValue(req.stream)}`);
  const so = req.stream_options;
  if (so != null && (typeof so !== 'object' || Array.isArray(so) || Object.keys(so).some((k) => k !== 'include_usage'))) {
    throw chatError('stream_options', `must be { include_usage: boolean }, got ${describeValue(so)}`);
  }
  if (so != null && !req.stream) throw chatError('stream_options', 'is only allowed with stream: true');
  const includeUsage = Boolean(so && /** @type {{ include_usage?: unknown }} */ (so).include_usage);
  chatNumber(req, 'n', { integer: true, min: 1, max: 1, what: '1 (one choice per request)' });
  if (req.max_tokens != null && req.max_completion_tokens != null) {
    throw chatError('max_completion_tokens', 'and max_tokens are the same setting: give one of them');
  }
  const maxField = req.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens';
  /** @type {api.GenerateOptions} */
  const options = {
    temperature: chatNumber(req, 'temperature', { min: 0, max: 2, what: 'a number from 0 (greedy) to 2' }),
    topP: chatNumber(req, 'top_p', { above: 0, max: 1, what: 'a number above 0 and at most 1' }),
    maxTokens: chatNumber(req, maxField, { integer: true, min: 1, what: 'a whole number of tokens, at least 1' }),
    seed: chatNumber(req, 'seed', { integer: true, min: 0, what: 'a whole number, 0 or more' }),
    topK: chatNumber(req, 'top_k', { integer: true, min: 0, what: 'a whole number, 0 (off) or more' }),
    repetitionPenalty: chatNumber(req, 'repetition_penalty', { above: 0, what: 'a number above 0 (1: off)' }),
  };
  if (req.adapter != null && (typeof req.adapter !== 'string' || req.adapter === '')) {
    throw chatError('adapter', `must be a stored adapter's name (see listAdapters) or null, got ${describeValue(req.adapter)}`);
  }
  options.adapter = /** @type {string | null | undefined} */ (req.adapter) ?? null;
  /** @type {string[]} */
  let stop = [];
  if (req.stop != null) {
    stop = typeof req.stop === 'string' ? [req.stop] : Array.isArray(req.stop) ? req.stop : [];
    if (!(typeof req.stop === 'string' || Array.isArray(req.stop)) || stop.length > 4 || stop.some((x) => typeof x !== 'string' || x === '')) {
      throw chatError('stop', `must be a non-empty string or a list of up to 4 of them, got ${describeValue(req.stop)}`);
    }
  }
  return {
    prompt: { messages: turns }, options, stop, stream: Boolean(req.stream), includeUsage,
    model: model.name ?? model.key,
  };
}

/**
 * Holds back streamed text that may be the start of a stop string, and finds the first one.
 * @param {string[]} stops
 */
function stopMatcher(stops) {
  let held = '';
  return {
    /**
     * @param {string} piece
     * @returns {{ emit: string, hit: boolean }}
     */
    push(piece) {
      const text = held + piece;
      let at = -1;
      for (const s of stops) {
        const i = text.indexOf(s);
        if (i >= 0 && (at < 0 || i < at)) at = i;
      }
      if (at >= 0) {
        held = '';
        return { emit: text.slice(0, at), hit: true };
      }
      // The longest end of `text` that begins some stop string waits for the next piece.
      let keep = 0;
      for (const s of stops) {
        for (let n = Math.min(s.length - 1, text.length); n > keep; n--) {
          if (text.endsWith(s.slice(0, n))) { keep = n; break; }
        }
      }
      held = text.slice(text.length - keep);
      return { emit: text.slice(0, text.length - keep), hit: false };
    },
    flush() {
      const rest = held;
      held = '';
      return rest;
    },
  };
}

/**
 * One chat generation as text pieces, then its finish reason and usage.
 * @param {Bitlora} bl
 * @param {ReturnType<typeof planChat>} plan
 * @param {(generation: Generation) => void} started
 * @returns {AsyncGenerator<string, { finish: api.ChatFinishReason | null, usage: api.ChatCompletionUsage }>}
 */
async function* chatPieces(bl, plan, started) {
  const generation = /** @type {Generation} */ (bl.generate(plan.prompt, plan.options));
  started(generation);
  const match = stopMatcher(plan.stop);
  let hit = false;
  let done = false;
  try {
    for await (const event of generation) {
      const r = match.push(event.text ?? '');
      if (r.emit) yield r.emit;
      if (r.hit) {
        hit = true;
        generation.stop();
        break;
      }
    }
    if (!hit) {
      const rest = match.flush();
      if (rest) yield rest;
    }
    const result = await generation.result;
    done = true;
    /** @type {api.ChatFinishReason | null} */
    const finish = hit || result.stoppedBy === 'stop_token' ? 'stop' : result.stoppedBy === 'max_tokens' ? 'length' : null;
    const usage = {
      prompt_tokens: result.promptTokens.length,
      completion_tokens: result.tokens.length,
      total_tokens: result.promptTokens.length + result.tokens.length,
    };
    return { finish, usage };
  } finally {
    // The consumer left early (break, abort, an error): end the generation after its token.
    if (!done) generation.stop();
  }
}

/** `Bitlora.chat.completions`: see ChatCompletions in bitlora.d.ts. */
class ChatCompletions {
  /** @type {Bitlora} */
  #bl;

  /** @param {Bitlora} bl */
  constructor(bl) {
    this.#bl = bl;
  }

  /**
   * @param {api.ChatCompletionRequest} request
   * @returns {Promise<any>} a ChatCompletion, or a ChatCompletionStream with `stream: true` (the overloads in bitlora.d.ts)
   */
  async create(request) {
    const plan = planChat(this.#bl, request);
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    const id = `chatcmpl-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
    const created = Math.floor(Date.now() / 1000);
    const head = { id, created, model: plan.model };
    if (!plan.stream) {
      const pieces = chatPieces(this.#bl, plan, () => {});
      let content = '';
      let step;
      while (!(step = await pieces.next()).done) content += step.value;
      const { finish, usage } = step.value;
      /** @type {api.ChatCompletion} */
      const completion = {
        ...head, object: 'chat.completion',
        choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: finish ?? 'stop' }],
        usage,
      };
      return completion;
    }
    /** @type {Generation | null} */
    let generation = null;
    let aborted = false;
    const bl = this.#bl;
    // The generation starts at once, not on the first next(); create() resolves with its first
    // piece of text (after the prefill), so what the worker refuses (an unknown adapter, a
    // prompt plus max_tokens past the context) rejects create() as bad arguments do.
    const pieces = chatPieces(bl, plan, (g) => { generation = g; });
    const first = await pieces.next();
    /** @type {api.ChatCompletionStream} */
    const stream = {
      abort() {
        aborted = true;
        /** @type {Generation | null} */ (generation)?.stop();
      },
      async *[Symbol.asyncIterator]() {
        /** @param {api.ChatCompletionChunk['choices']} choices */
        const chunk = (choices) => (/** @type {api.ChatCompletionChunk} */ ({ ...head, object: 'chat.completion.chunk', choices }));
        let ended = false;
        try {
          yield chunk([{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }]);
          let step = first;
          while (!step.done) {
            yield chunk([{ index: 0, delta: { content: step.value }, finish_reason: null }]);
            step = await pieces.next();
          }
          ended = true;
          const { finish, usage } = step.value;
          if (aborted || finish == null) return;
          yield chunk([{ index: 0, delta: {}, finish_reason: finish }]);
          if (plan.includeUsage) yield { ...chunk([]), usage };
        } finally {
          // Left early (break, return, an error in the loop's body): end the generation.
          if (!ended) {
            /** @type {Generation | null} */ (generation)?.stop();
            pieces.return(/** @type {any} */ (undefined)).catch(() => {});
          }
        }
      },
    };
    return stream;
  }
}

// The static side of the class, which `@implements` does not check: Bitlora.create as
// bitlora.d.ts declares it.
/** @satisfies {Pick<typeof api.Bitlora, 'create'>} */ (Bitlora);
