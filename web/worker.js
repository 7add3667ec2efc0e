// @ts-check
// The page's module Web Worker: owns the wasm module and the model, does every heavy step
// (fetching the bundled model, reading picked files, the forward pass), so the page never blocks.
//
// The messages (web/bitlora.js <-> worker) are typed in web/protocol.d.ts, one entry per request
// type: its arguments, its reply and the events it sends meanwhile. HANDLERS below answers each
// one and `tsc` checks it against that table. What the requests do:
//   init              instantiates the wasm (crates/web) and picks the backend; the CPU backend's
//                     threads: web/pkg-threads (rayon on a pool of Web Workers over shared
//                     memory) where the page is cross-origin isolated, else web/pkg (one thread);
//                     see loadWasm
//   loadBundled       a model of web/models/: from the IndexedDB store when a complete, verified
//                     copy is there, else fetched from the page's server and stored (when it fits);
//                     `persisted` is what the page's navigator.storage.persist() gave (workers
//                     cannot ask); `fakeFree` (tests) pretends only that many bytes are free
//   loadFiles         picked files (File objects, read here, never uploaded)
//   importFiles       loadFiles, then the files are kept in the store so they survive a reload
//   loadStored        a model of the store, by id: 'bundled:default', 'hub:<hub>/<owner/name>@<rev>',
//                     'local:...'; its files stream from the store into wasm one file at a time,
//                     one 4 MiB chunk at a time, each file's sha256 checked at its end (progress
//                     'read'), then 'build' while the model is finished (tokenizer, GPU upload)
//   listModels, downloadHub, cancelDownload, deleteModel, deleteAll: the model store (web/store.js,
//                     web/hub.js). A download is resumable: the same request again continues it;
//                     it does not load the model (send loadStored)
//   forward, generate the model; generate streams { type: 'token' } events. `at` in events is the
//                     worker's clock as epoch milliseconds (performance.timeOrigin + now),
//                     comparable with the page's
//   prepareData, estimateMemory, train*, *Run*, *Adapter*, deleteTrainingData: web/training.js;
//                     a run's events come as { type: 'train', runId, event, data }
//   { type: 'stop', target: id }: no reply; generation `id` ends after its current token
//   Tests only: wasmMemory (wasm memory and its marks during the last load); threadsUsed (how
//                     many threads ran one parallel loop's blocks); loadStored's
//                     wholeFiles (the older Session.load path) and measureHeldBytes
//                     (store.heldBytes: needs Chromium's --js-flags=--expose-gc), whose peak
//                     heldBytes answers
// Loads answer with the model's summary, keyed by its store id (ModelInfo.key). listModels,
// downloadHub, cancelDownload and deleteModel (hub.OUTSIDE_QUEUE) and trainControl run beside the
// queue below (a download does not hold up generation, and Pause must reach a running download
// or training loop).
//
// Stopping: a CPU generation runs synchronously in this worker, so a 'stop' message would only
// be read after it had finished. The page therefore also passes `stopFlag`, an Int32Array on a
// SharedArrayBuffer (available because the page is cross-origin isolated), which the token
// callback reads with Atomics.load between tokens. 'stop' messages cover WebGPU generation
// (which awaits the GPU between tokens, so messages get through) and pages without isolation.
// `fatal` means the wasm instance trapped (a panic): its memory can no longer be trusted, so the
// page starts a fresh worker instead of sending more work here.

import * as store from './store.js';
import * as hub from './hub.js';
import * as training from './training.js';

/**
 * @import { FromWorker, Handlers, Request, RequestArgs, RequestType, ToWorker } from './protocol.js'
 * @import { LoadProgress, ModelInfo } from './bitlora.js'
 */

/**
 * Posts a message to the page; every message this worker sends goes through here.
 * @param {FromWorker} message
 * @param {Transferable[]} [transfer]
 */
const send = (message, transfer = []) => self.postMessage(message, transfer);

/** @typedef {{ vendor: string, architecture: string, device: string, description: string, isFallbackAdapter?: boolean }} GPUAdapterInfoLike */

// The models that ship with the page (web/models/), by the page's ?model= name.
const BUNDLED = {
  default: {
    name: 'bitlora-default-12m', dir: 'models/default',
    description: 'ternary BitNet pretrained by bitlora on public-domain English (MODEL_CARD.md)',
    files: ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'],
  },
  tiny: {
    name: 'tiny random test model', dir: 'models/tiny',
    description: 'random weights, no tokenizer: for parity tests',
    files: ['config.json', 'model.safetensors'],
  },
};

// Largest total size of picked files (see loadFiles).
const MAX_PICKED_BYTES = 1 * 2 ** 30;

/** What the worker uses of either build once it is instantiated (their glue differs beyond it). */
/** @typedef {{ Session: typeof import('./pkg/bitlora_web.js').Session }} Wasm */
/** @typedef {import('./pkg/bitlora_web.js').Session} Session */

/** The wasm module `init` instantiated: web/pkg-threads or web/pkg (see loadWasm). */
/** @type {Wasm | null} */
let wasm = null;
/** Why the CPU backend runs on one thread (loadWasm), null when it has its pool. */
/** @type {string | null} */
let threadsNote = null;
/** @type {Session | null} */
let session = null;
/** The WebGPU device limits `init` asked for (a device replaced after a loss gets the same). */
/** @type {import('./bitlora.js').DeviceLimitsChoice} */
let deviceLimits = 'adapter';
// The loaded model's { key, name } (ModelInfo.key: the store id), which runs and adapters record.
/** @type {{ key: string, name: string } | null} */
let currentModel = null;
/** @type {string | null} */
let poisoned = null;
// What the last 'loadStored' with measureHeldBytes measured (store.heldBytes; tests only).
/** @type {import('./protocol.js').HeldBytesPeak | null} */
let lastHeldBytes = null;

// Generations asked to stop (by request id), see 'stop' above.
/** @type {Set<number>} */
const stopRequested = new Set();

// Requests run one after another, in arrival order: a forward pass never sees half a load.
// 'stop' is the exception: it must reach a generation that is running now.
/** @type {Promise<void>} */
let queue = Promise.resolve();
/** @param {MessageEvent<ToWorker>} event */
self.onmessage = (event) => {
  if (event.data?.type === 'stop') {
    stopRequested.add(event.data.target);
    return;
  }
  // Pause/stop must reach a training loop that is running now (it yields between sequences).
  if (event.data?.type === 'trainControl') {
    handle(event.data);
    return;
  }
  if (hub.OUTSIDE_QUEUE.has(event.data?.type)) {
    handle(event.data);
    return;
  }
  const request = event.data;
  queue = queue.then(() => handle(request));
};

/** @param {Request} request */
async function handle({ id, type, ...args }) {
  try {
    if (poisoned) throw Object.assign(new Error(poisoned), { fatal: true });
    const result = await dispatch(type, { ...args, id });
    const transfer = result && typeof result === 'object' && 'logits' in result && result.logits instanceof Float32Array
      ? [result.logits.buffer] : [];
    send({ id, ok: true, result }, transfer);
  } catch (err) {
    // A WebAssembly.RuntimeError is a trap (e.g. a Rust panic, logged above it by
    // console_error_panic_hook). Ordinary errors from bitlora are JsErrors: plain Errors.
    const fatal = Boolean(/** @type {{ fatal?: boolean } | null} */ (err)?.fatal) || err instanceof WebAssembly.RuntimeError;
    let error = describe(err);
    // A pass on a lost WebGPU device: the session gets a new one (or the CPU) for what comes
    // next, and the message says so (a training run recovers by itself: training.js).
    const lost = !fatal && session?.gpuLost();
    if (lost) {
      const backend = await training.replaceGpu().catch(() => null);
      if (backend) error += ` (${lost}; the page now runs on ${backend.label}: try again)`;
    }
    if (fatal && !poisoned) poisoned = `the wasm module crashed earlier: ${error}`;
    // bitlora's errors are objects: `field` (the option at fault) and `line` (the JSONL line)
    // travel with the message, so the page never picks them out of the text.
    const { field, line } = /** @type {{ field?: string, line?: number } | null} */ (err) ?? {};
    send({ id, ok: false, error, fatal, field, line });
  }
}

/**
 * @param {string} type
 * @param {{ id: number }} args
 */
async function dispatch(type, args) {
  if (!Object.hasOwn(HANDLERS, type)) throw new Error(`worker: unknown request type ${JSON.stringify(type)}`);
  // HANDLERS answers each type with the arguments protocol.d.ts gives it, and tsc checks every
  // entry; a lookup by a runtime string cannot tie `args` to that type, hence this one cast.
  const handler = /** @type {(args: { id: number }) => unknown} */ (HANDLERS[/** @type {RequestType} */ (type)]);
  const result = await handler(args);
  // Any request that loads a model answers with its summary, keyed by its store id.
  if (LOADS.has(type) && result) {
    const model = /** @type {ModelInfo} */ (result);
    const a = /** @type {RequestArgs<'loadBundled'>} */ (args);
    model.key ??= type === 'loadBundled' ? `bundled:${a.model ?? 'default'}`
      : `files:${model.config}:${model.bytes}:${(model.files ?? []).join(',')}`;
    currentModel = { key: model.key, name: model.name ?? model.files?.[0] ?? model.key };
  }
  return result;
}

/** @type {Set<string>} */
const LOADS = new Set(['loadBundled', 'loadFiles', 'loadStored', 'importFiles']);

/** What the worker does for each request (web/protocol.d.ts's Requests). */
/** @type {Handlers} */
const HANDLERS = {
  async init(args) {
    ({ wasm, threadsNote } = await loadWasm(args.threads));
    const { Session } = wasm;
    const choice = args.backend ?? 'auto';
    const software = choice === 'auto' ? await softwareAdapter() : null;
    const cpuReason = software
      ? `the browser's WebGPU adapter is a software renderer (${software}), which trains about 50x slower than ` +
        'the CPU path on the same machine (BENCHMARKS.md: ~4 vs ~200 tokens/s), so the CPU runs it; ' +
        '?backend=webgpu (or Bitlora.create({ backend: "webgpu" })) uses the adapter anyway'
      : undefined;
    deviceLimits = args.limits ?? 'adapter';
    const s = (session = await Session.create(choice !== 'cpu', cpuReason, deviceLimits));
    const backend = s.backend();
    if (backend.kind === 'webgpu') await nameAdapter(backend);
    return { ...backend, threadsNote };
  },
  loadBundled: (args) => loadBundled(args),
  async deleteAll() {
    await hub.stopAll();
    return store.deleteAll();
  },
  listModels: () => listModels(),
  downloadHub: (args) => hub.downloadHub(args, (event) => send({ id: args.id, type: 'progress', event })),
  cancelDownload: (args) => hub.stopDownload(args.modelId, args.discard ? 'cancel' : 'pause'),
  deleteModel: (args) => deleteStored(args.modelId),
  loadStored: (args) => loadStored(args),
  importFiles: (args) => importFiles(args),
  // Bytes of wasm linear memory (it only grows), and its marks during the last load
  // ({ before, weights, after }): tests compare what loads take.
  wasmMemory: () => ({ bytes: needWasm().Session.wasmMemoryBytes(), load: session?.loadMemory() ?? null }),
  // How many threads ran one parallel loop's blocks (the pool really runs: threads.test.mjs).
  threadsUsed: (args) => needWasm().Session.cpuThreadsUsed(args.blocks ?? 64),
  // The JS heap's peak of model bytes during the last loadStored with measureHeldBytes (tests).
  heldBytes: () => lastHeldBytes,
  loadFiles: (args) => loadFiles(args.files),
  forward: (args) => training.withModel(() => needSession().forward(Uint32Array.from(args.tokens))),
  async generate(args) {
    await training.useAdapter(args.options?.adapter ?? null);
    return training.withModel(() => generate(args));
  },
  prepareData: (args) => training.prepareData(args),
  estimateMemory: (args) => training.estimateMemory(args),
  trainCreate: (args) => training.create(args),
  trainResume: (args) => training.resume(args),
  trainControl: (args) => training.control(args),
  trainValidate: (args) => training.validate(args),
  trainDispose: (args) => training.dispose(args),
  trainSaveAdapter: (args) => training.saveAdapter(args),
  listRuns: () => training.listRuns(),
  getRun: (args) => training.getRun(args),
  deleteRun: (args) => training.deleteRun(args),
  listAdapters: () => training.listAdapters(),
  exportAdapter: (args) => training.exportAdapter(args),
  importAdapter: (args) => training.importAdapter(args),
  deleteAdapter: (args) => training.deleteAdapter(args),
  deleteTrainingData: () => training.deleteAll(),
  // Test hook (tests/browser/faults.test.mjs): loses the WebGPU device as a driver reset would.
  debugLoseGpu: () => needSession().debugLoseGpu(),
};

// A software WebGPU adapter (SwiftShader, llvmpipe/lavapipe, WARP) runs shaders on the CPU, one
// thread of SIMD lanes per workgroup: measured on one machine it trained at 2.7-5.2 tokens/s
// where this worker's CPU path did 183-249 (issue 13). Chromium flags it as the fallback adapter
// (GPUAdapterInfo.isFallbackAdapter); the names catch browsers that do not. Returns how the
// adapter names itself when it is one, else null (no adapter: Session.create says so itself).
async function softwareAdapter() {
  const gpu = /** @type {{ gpu?: { requestAdapter(): Promise<{ info?: GPUAdapterInfoLike, isFallbackAdapter?: boolean } | null> } }} */ (navigator).gpu;
  try {
    const adapter = await gpu?.requestAdapter();
    if (!adapter) return null;
    const info = adapter.info;
    return isSoftware(info, adapter.isFallbackAdapter) ? (adapterName(info) || 'fallback adapter') : null;
  } catch {
    return null;
  }
}

/** @param {GPUAdapterInfoLike | undefined} info */
const adapterName = (info) => [info?.vendor, info?.architecture, info?.device, info?.description].filter(Boolean).join(' ');

/**
 * @param {GPUAdapterInfoLike | undefined} info
 * @param {boolean} [flagged] the older GPUAdapter.isFallbackAdapter
 */
const isSoftware = (info, flagged) => Boolean(info?.isFallbackAdapter || flagged) ||
  /swiftshader|llvmpipe|lavapipe|softpipe|\bwarp\b|microsoft basic render/i.test(adapterName(info));

// wgpu's web backend names the adapter after GPUAdapterInfo.description, which Chromium leaves
// empty (SwiftShader reports only vendor "google", architecture "swiftshader"). Ask the browser
// for the same default adapter's info so the page can say which device it is.
/** @param {import('./protocol.js').InitResult} backend */
async function nameAdapter(backend) {
  // TypeScript's libraries have no WebGPU types (the npm package @webgpu/types has them); this
  // is the one WebGPU call the worker makes itself.
  const gpu = /** @type {{ gpu?: { requestAdapter(): Promise<{ info?: GPUAdapterInfoLike } | null> } }} */ (navigator).gpu;
  /** @type {GPUAdapterInfoLike | null} */
  let info = null;
  try {
    info = (await gpu?.requestAdapter())?.info ?? null;
  } catch {
    // Naming is cosmetic; the adapter wgpu got is what runs.
  }
  const adapter = backend.adapter; // kind "webgpu" always has one
  if (!info || !adapter) return;
  backend.browserAdapterInfo = {
    vendor: info.vendor, architecture: info.architecture, device: info.device,
    description: info.description, isFallbackAdapter: Boolean(info.isFallbackAdapter),
  };
  if (!adapter.name) {
    const name = [info.vendor, info.architecture, info.device].filter(Boolean).join(' ');
    if (name) adapter.name = name;
  }
  backend.label = `WebGPU: ${adapter.name}${isSoftware(info) ? ' (software fallback adapter)' : ''}`;
}

// Streams each token to the page as soon as the model has made it. Returning false from the
// callback is how bitlora's generate is told to stop.
/** @param {RequestArgs<'generate'> & { id: number }} args */
async function generate({ id, prompt, options, stopFlag }) {
  const stopped = () => stopRequested.has(id) || (stopFlag instanceof Int32Array && Atomics.load(stopFlag, 0) !== 0);
  try {
    return await needSession().generate(prompt, options, (/** @type {import('./bitlora.js').TokenEvent} */ event) => {
      event.at = performance.timeOrigin + performance.now();
      send({ id, type: 'token', event });
      return !stopped();
    });
  } finally {
    stopRequested.delete(id);
  }
}

function needWasm() {
  if (!wasm) throw new Error('worker: not initialised (send "init" first)');
  return wasm;
}

// The threaded build's pool: one Web Worker per core the browser reports, at most this many by
// default (each holds a thread's stack and a copy of the module's JS; the kernels' blocks are
// sized to the pool, and on more than 8 cores their speed is bounded by memory bandwidth);
// `threads` asks for another number (Bitlora.create's option, the page's ?threads=).
const DEFAULT_MAX_THREADS = 8;
/** The most `threads` may ask for. */
const MAX_THREADS = 64;
// How long the pool's workers may take to start before the worker gives up on threads.
const POOL_START_MS = 30_000;

/**
 * Instantiates crates/web. Threads need SharedArrayBuffer, i.e. a cross-origin isolated page
 * (COOP/COEP headers: `bitlora serve` sends them), and the threaded build (web/pkg-threads,
 * tools/build-web.sh: nightly, -Z build-std, +atomics): its `initThreadPool(n, glue)` starts n
 * Web Workers (crates/web/src/threads.js) that import the glue, instantiate the module on its
 * shared memory and become rayon's pool; this worker waits
 * (Atomics.wait) while they run a kernel's blocks. Elsewhere, for `threads: 1`, or when the
 * threaded build fails to start (missing, a browser without wasm threads, workers that do not
 * start), it is web/pkg, on this worker's thread alone, and `threadsNote` says why. Both builds
 * give the same results bit for bit (crates/core/src/par.rs).
 * @param {number | undefined} threads
 * @returns {Promise<{ wasm: Wasm, threadsNote: string | null }>}
 */
async function loadWasm(threads) {
  const n = threads ?? Math.min(navigator.hardwareConcurrency || 1, DEFAULT_MAX_THREADS);
  let why = null;
  if (!Number.isInteger(n) || n < 1 || n > MAX_THREADS) {
    throw new TypeError(`threads is ${JSON.stringify(threads)}; use a whole number from 1 to ${MAX_THREADS}`);
  } else if (n === 1) {
    why = threads === 1 ? 'one thread was asked for (threads: 1)' : 'the browser reports one core';
  } else if (!self.crossOriginIsolated) {
    why = 'the page is not cross-origin isolated (its server sends no COOP/COEP headers), so threads cannot share memory';
  } else {
    try {
      const glue = new URL('./pkg-threads/bitlora_web.js', import.meta.url).href;
      const threaded = await import('./pkg-threads/bitlora_web.js');
      await threaded.default();
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let timer;
      const late = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`its ${n} Web Workers did not start within ${POOL_START_MS / 1000} s`)), POOL_START_MS);
      });
      await Promise.race([threaded.initThreadPool(n, glue), late]).finally(() => clearTimeout(timer));
      return { wasm: threaded, threadsNote: null };
    } catch (err) {
      why = `the threaded build did not start: ${describe(err)}`;
      console.warn(`bitlora: ${why}; the CPU backend runs on one thread`);
    }
  }
  const single = await import('./pkg/bitlora_web.js');
  await single.default();
  return { wasm: single, threadsNote: why };
}

function needSession() {
  if (!session) throw new Error('worker: not initialised (send "init" first)');
  return session;
}

/**
 * Loads a bundled model: from the IndexedDB store when a complete, verified copy is there;
 * otherwise fetched from the page's own server and stored (when it fits) for the next visit.
 * @param {RequestArgs<'loadBundled'> & { id: number }} args
 */
async function loadBundled({ id, model = 'default', fakeFree, persisted = false }) {
  const spec = Object.hasOwn(BUNDLED, model) ? BUNDLED[/** @type {keyof typeof BUNDLED} */ (model)] : null;
  if (!spec) throw new Error(`unknown bundled model ${JSON.stringify(model)} (known: ${Object.keys(BUNDLED).join(', ')})`);
  const storeId = `bundled:${model}`;
  const progress = (phase, done, total, file) =>
    send({ id, type: 'progress', event: { phase, done, total, file, at: performance.timeOrigin + performance.now() } });
  const notes = [];
  let files = null;
  let from = 'network';
  let stored = false;
  let storeOk = true;
  // Sizes and sha256 of the files as this server has them (tools/build-web.sh writes the index).
  const expected = await bundledIndex(model);
  const discarded = (err) => notes.push(`The stored copy of this model was discarded: ${err.problem}. Fetching it again.`);
  const noStore = (err) => {
    storeOk = false;
    notes.push(`The model store (IndexedDB) cannot be used here (${describe(err)}); the model runs from memory and is fetched on every visit.`);
  };
  let opened = null;
  try {
    opened = await store.openModel(storeId, { onProblem: 'discard' });
    if (opened && expected && opened.manifest.files.some((f) => expected.get(f.name)?.sha256 !== f.sha256)) {
      opened = null;
      await store.deleteModel(storeId);
      notes.push('The stored copy of this model is of an older version; it was discarded and the current one fetched.');
    }
  } catch (err) {
    if (err instanceof store.StoreProblem) discarded(err); else noStore(err);
  }
  let loaded = null;
  if (opened) {
    // Streamed from the store into the session file by file, each file's sha256 checked at its end.
    try {
      loaded = await loadIntoSession(opened.files, progress, { phase: 'read' });
      files = opened.files;
      from = 'store';
      stored = true;
    } catch (err) {
      if (err instanceof store.StoreProblem) discarded(err);
      else if (err?.storeError) noStore(err);
      else throw err;
    }
  }
  if (!files) {
    // Room is checked before the download when the index gives the total, else after it.
    const knownTotal = expected ? spec.files.reduce((n, f) => n + (expected.get(f)?.size ?? 0), 0) : null;
    /** @type {Awaited<ReturnType<typeof store.checkRoom>> | null} */
    let room = null;
    const checkRoom = async (/** @type {number} */ bytes) => {
      const r = (room = await store.checkRoom(bytes));
      if (fakeFree != null) Object.assign(r, { free: Number(fakeFree), fits: bytes * 1.05 <= Number(fakeFree) });
      return r;
    };
    if (storeOk && knownTotal != null) await checkRoom(knownTotal);
    const paths = spec.files.map((f) => `${spec.dir}/${f}`);
    // All files are requested at once, with one progress bar over their total.
    let total = knownTotal ?? 0, received = 0;
    const onBytes = (n) => { received += n; progress('fetch', received, Math.max(total, received)); };
    const responses = paths.map((p) => fetch(new URL(p, import.meta.url)).then((r) => {
      if (knownTotal == null) total += Number(r.headers.get('content-length') ?? 0);
      return r;
    }));
    files = await Promise.all(responses.map(async (resp, i) => ({
      name: spec.files[i], bytes: await readBody(paths[i], await resp.catch((err) => {
        throw new Error(`${paths[i]}: cannot fetch: ${describe(err)}`);
      }), onBytes),
    })));
    if (expected) {
      for (const f of files) {
        const want = expected.get(f.name);
        if (!want) continue;
        const sha = await store.sha256Hex(f.bytes);
        if (f.bytes.length !== want.size || sha !== want.sha256) {
          throw new Error(`${spec.dir}/${f.name}: the download is ${f.bytes.length} bytes with sha256 ${sha.slice(0, 12)}…, ` +
            `but the server's index (pkg/models.json) says ${want.size} bytes, ${want.sha256.slice(0, 12)}…; reload to try again`);
        }
      }
    }
    const bytes = files.reduce((n, f) => n + f.bytes.length, 0);
    if (storeOk) {
      room ??= await checkRoom(bytes);
      if (!room.fits) {
        notes.push(`Not stored: this model needs ${fmtBytes(bytes)} but only ${fmtBytes(room.free)} of browser storage is free here. ` +
          'It runs from memory and will be fetched again on the next visit.');
      } else {
        try {
          await store.storeModel({ id: storeId, name: spec.name, source: 'bundled' }, files,
            ({ done, total: t }) => progress('store', done, t));
          stored = true;
          if (!room.persisted && !persisted) notes.push('Stored in this browser (the browser may evict it under storage pressure: it did not grant persistent storage).');
        } catch (err) {
          notes.push(`Not stored (${describe(err)}); the model runs from memory and will be fetched again on the next visit.`);
        }
      }
    }
  }
  const { summary, config } = loaded ?? await loadIntoSession(files, progress);
  return {
    ...summary, key: storeId, storeId, name: spec.name, description: spec.description, params: countParams(config),
    downloadBytes: files.reduce((n, f) => n + fileSize(f), 0),
    source: { from, stored, notes },
  };
}

/**
 * Loads a model folder (config.json, *.safetensors, and tokenizer.json / tokenizer_config.json
 * when present; other files are ignored) into the session; see loadModelFiles.
 */
function loadIntoSession(files, progress, options) {
  const byName = new Map(files.map((f) => [f.name, f]));
  return loadModelFiles({
    config: byName.get('config.json'),
    gguf: files.find(isGguf),
    weights: files.filter((f) => f.name.endsWith('.safetensors')),
    tokenizer: byName.get('tokenizer.json'),
    tokenizerConfig: byName.get('tokenizer_config.json'),
  }, progress, options);
}

/**
 * Loads a model into the session: `config`, `weights` (the safetensors files, in order) and the
 * optional `tokenizer` / `tokenizerConfig`. Each file is { name, bytes } (fetched), a
 * store.StoredFile or a picked File. Resolves to the session's summary and the parsed config.
 *
 * The weights stream in one file at a time, tensor by tensor (Session beginLoad / addFile /
 * addTensor / finishLoad; see streamFile): wasm memory holds the model being built plus a
 * 64 KiB piece of one tensor, never a whole file. A stored file is read from IndexedDB one 4 MiB
 * chunk at a time and hashed as it goes, a picked file one tensor at a time, so the JS heap
 * holds a chunk and the tensor in flight, not the file. Progress is reported as `phase` (the
 * store's 'read': reading and building are one pass; 'build' for fetched or picked files), over
 * the weights' bytes, then 'build' for finishLoad (the tokenizer, the GPU upload).
 * `wholeFiles` (tests only) takes the older path, Session.load, which copies every file whole
 * into wasm memory.
 */
async function loadModelFiles({ config, gguf = null, weights, tokenizer, tokenizerConfig }, progress, { wholeFiles = false, phase = 'build' } = {}) {
  if (gguf) return loadGguf({ gguf, tokenizer, tokenizerConfig }, progress, phase);
  if (!config) throw new Error('config.json is missing from the model\'s files');
  const configBytes = await wholeBytes(config);
  // The tokenizer files are read after the weights, when finishLoad needs them.
  const tokenizerArgs = async () => [tokenizer?.name, tokenizer && await wholeBytes(tokenizer),
    tokenizerConfig?.name, tokenizerConfig && await wholeBytes(tokenizerConfig)];
  const s = needSession();
  let summary;
  if (wholeFiles) {
    progress('build', 0, 1);
    const weightBytes = [];
    for (const f of weights) weightBytes.push(await wholeBytes(f));
    summary = s.load(config.name, configBytes, weights.map((f) => f.name), weightBytes, ...await tokenizerArgs());
    progress('build', 1, 1);
  } else {
    const total = weights.reduce((n, f) => n + fileSize(f), 0);
    let done = 0;
    progress(phase, 0, total);
    s.beginLoad(config.name, configBytes);
    for (const f of weights) {
      await streamFile(s, f, (n) => {
        done += n;
        progress(phase, done, total);
      });
    }
    const args = await tokenizerArgs();
    if (phase !== 'build') progress('build', 0, 1);
    summary = s.finishLoad(...args);
    progress('build', 1, 1);
  }
  return { summary, config: JSON.parse(new TextDecoder().decode(configBytes)) };
}

/**
 * A model from one .gguf file (llama.cpp, QVAC Fabric, bitnet.cpp), streamed as safetensors
 * are: its header (Session.beginGguf, given a growing prefix of the file until the header fits
 * in it), then each tensor the model reads, in file order (addTensor), then finishLoad. The
 * config comes from the file's metadata, the tokenizer from tokenizer.json when given, else
 * from the file's tokenizer.ggml.* keys. Resolves as loadModelFiles does (`config`: the
 * summary's numbers under config.json's names, for countParams).
 */
async function loadGguf({ gguf, tokenizer, tokenizerConfig }, progress, phase) {
  const s = needSession();
  const size = fileSize(gguf);
  let done = 0;
  progress(phase, 0, size);
  try {
    // The header: its first MiB, grown (read on from where it ended: a stored file reads front
    // to back) until it holds the whole header. Tensors that start inside it are cut from it.
    let prefix = await fileRange(gguf, 0, Math.min(size, 2 ** 20));
    let spans;
    while ((spans = s.beginGguf(gguf.name, prefix, size)) == null) {
      if (prefix.length >= size) throw new Error(`${gguf.name}: the GGUF header is longer than the file`);
      const more = await fileRange(gguf, prefix.length, Math.min(size, prefix.length * 2));
      const grown = new Uint8Array(prefix.length + more.length);
      grown.set(prefix);
      grown.set(more, prefix.length);
      prefix = grown;
    }
    for (const t of spans) {
      let bytes = t.end <= prefix.length ? prefix.subarray(t.start, t.end)
        : t.start < prefix.length ? concat(prefix.subarray(t.start), await fileRange(gguf, prefix.length, t.end))
          : await fileRange(gguf, t.start, t.end);
      await store.heldBytes.sample();
      s.addTensor(t.name, bytes);
      bytes = null; // let the tensor go before the next one is read
      done = t.end;
      progress(phase, done, size);
      // Past the header: hold no more of the file than the tensor in flight.
      if (t.end >= prefix.length) prefix = new Uint8Array(0);
    }
    if (gguf instanceof store.StoredFile) {
      // The rest (padding, tensors the model does not read) for the sha256 check.
      if (done < size) await gguf.read(Math.max(done, prefix.length), size);
      await gguf.finish();
    }
  } catch (err) {
    if (gguf instanceof store.StoredFile && !(err instanceof store.StoreProblem)) await gguf.finish();
    throw err;
  }
  if (phase !== 'build') progress('build', 0, 1);
  const summary = s.finishLoad(tokenizer?.name, tokenizer && await wholeBytes(tokenizer),
    tokenizerConfig?.name, tokenizerConfig && await wholeBytes(tokenizerConfig));
  progress('build', 1, 1);
  return { summary, config: summary.ggufConfig };
}

/** `a` then `b` in one array. */
function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

const isGguf = (/** @type {{ name: string }} */ f) => f.name.toLowerCase().endsWith('.gguf');


/**
 * One safetensors file into the session being built: its header (addFile), then each tensor the
 * model reads from it, in file order (addTensor), then, for a stored file, the check of its
 * size and sha256 at its end. `onBytes(n)` after each tensor.
 */
async function streamFile(s, f, onBytes) {
  const size = fileSize(f);
  // Views into a store chunk are not kept in locals across an await: a suspended async
  // function keeps its locals, and with them the whole chunk, alive.
  try {
    const spans = await addHeader(s, f, size);
    for (const t of spans) {
      let bytes = await fileRange(f, t.start, t.end);
      await store.heldBytes.sample();
      s.addTensor(t.name, bytes);
      bytes = null; // let the tensor go before the next one is read
      onBytes(t.end - t.start);
    }
  } catch (err) {
    // A damaged stored file can fail as anything (a header that is not JSON, a tensor of the
    // wrong size): check its sha256 first, so that the error names the real cause.
    if (f instanceof store.StoredFile && !(err instanceof store.StoreProblem)) await f.finish();
    throw err;
  }
  if (f instanceof store.StoredFile) await f.finish();
}

/**
 * Hands the session a safetensors file's header: the 8-byte length and the JSON header after
 * it; at least the first 9 bytes, so that addFile can tell a file that is not safetensors (an
 * absurd length, no '{') apart. Resolves to the tensors to add, in file order.
 */
async function addHeader(s, f, size) {
  let end = Math.min(size, 9);
  if (size >= 8) {
    const head = await fileRange(f, 0, 8);
    const n = new DataView(head.buffer, head.byteOffset, 8).getBigUint64(0, true);
    if (n <= 100_000_000n) end = Math.max(end, Math.min(size, 8 + Number(n)));
  }
  return s.addFile(f.name, await fileRange(f, 0, end), size).sort((a, b) => a.start - b.start);
}

// A file as { name, bytes } (in memory), a store.StoredFile or a File.
// (Not `f.bytes ?? ...`: a File has a bytes() method.)
const inMemory = (f) => f.bytes instanceof Uint8Array;
const fileSize = (f) => (inMemory(f) ? f.bytes.length : f.size);
/** Bytes [start, end) of a file: a view where the bytes are in memory, else a copy of just those. */
async function fileRange(f, start, end) {
  if (inMemory(f)) return f.bytes.subarray(start, end);
  if (f instanceof store.StoredFile) return f.read(start, end);
  return new Uint8Array(await f.slice(start, end).arrayBuffer());
}
/** A whole file (config, tokenizer, or weights for Session.load); a stored one is verified. */
async function wholeBytes(f) {
  const bytes = await fileRange(f, 0, fileSize(f));
  if (f instanceof store.StoredFile) await f.finish();
  return bytes;
}

const progressTo = (id) => (phase, done, total, file) =>
  send({ id, type: 'progress', event: { phase, done, total, file, at: performance.timeOrigin + performance.now() } });

/** Loads a model from the store (any source) into the session; see 'loadStored' above. */
async function loadStored({ id, modelId, wholeFiles = false, measureHeldBytes = false }) {
  const progress = progressTo(id);
  if (hub.isDownloading(modelId)) throw new Error(`${modelId} is still downloading: load it once it is complete`);
  const bundled = String(modelId).startsWith('bundled:');
  if (measureHeldBytes) store.heldBytes.start();
  try {
    const opened = await store.openModel(modelId, { onProblem: bundled ? 'discard' : 'keep-partial' });
    if (!opened) throw new Error(`${modelId} is not in this browser's storage (deleted meanwhile?)`);
    const { summary, config } = await loadIntoSession(opened.files, progress, { wholeFiles, phase: 'read' });
    return {
      ...summary, key: modelId, storeId: modelId, name: opened.manifest.name, params: countParams(config),
      downloadBytes: opened.files.reduce((n, f) => n + f.size, 0),
      source: { from: 'store', stored: true, notes: [] },
    };
  } catch (err) {
    if (err instanceof store.StoreProblem) throw new Error(store.problemMessage(err));
    throw err;
  } finally {
    if (measureHeldBytes) lastHeldBytes = store.heldBytes.stop();
  }
}

/**
 * 'importFiles': loads the picked files (every check of loadFiles), then keeps them in the store.
 * @param {RequestArgs<'importFiles'> & { id: number }} args
 * @returns {Promise<ModelInfo>}
 */
async function importFiles({ id, files, persisted = false, fakeFree }) {
  const list = Array.from(files ?? []);
  const model = await loadFiles(list);
  const kept = await store.keepFiles(list, model, { persisted, fakeFree },
    ({ done, total, file }) => progressTo(id)('store', done, total, file));
  return { ...model, key: kept.storeId ?? undefined, storeId: kept.storeId, name: kept.name,
    params: kept.config ? countParams(kept.config) : undefined, source: { from: 'files', stored: kept.stored, notes: kept.notes } };
}

async function listModels() {
  try {
    const models = (await store.listIfAny()).map(store.summary);
    const est = await navigator.storage?.estimate?.().catch(() => null);
    return { available: true, models, usage: est?.usage ?? null, quota: est?.quota ?? null, downloading: hub.downloading() };
  } catch (err) {
    return { available: false, error: describe(err), models: [], downloading: [] };
  }
}

async function deleteStored(modelId) {
  if (hub.isDownloading(modelId)) await hub.stopDownload(modelId, 'pause');
  const m = await store.getManifest(modelId);
  await store.deleteModel(modelId);
  return { deleted: m ? store.summary(m) : null };
}

// Streams a response's body so progress can be reported (`onBytes(n)` per piece received);
// HTTP errors name the file, like core's errors do.
async function readBody(path, response, onBytes) {
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${response.statusText}`);
  const reader = response.body.getReader();
  const parts = [];
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    n += value.length;
    onBytes(value.length);
  }
  const bytes = new Uint8Array(n);
  let off = 0;
  for (const p of parts) { bytes.set(p, off); off += p.length; }
  return bytes;
}

/** Parameters of a BitNet/LLaMA config: embeddings (tied or not), attention, FFN, norms. */
function countParams(c) {
  const h = c.hidden_size, v = c.vocab_size, i = c.intermediate_size, l = c.num_hidden_layers;
  const hd = c.head_dim ?? h / c.num_attention_heads;
  const q = c.num_attention_heads * hd, kv = (c.num_key_value_heads ?? c.num_attention_heads) * hd;
  const perLayer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    + (c.model_type === 'bitnet' ? q + i : 0);
  return v * h * (c.tie_word_embeddings === false ? 2 : 1) + l * perLayer + h;
}

/** pkg/models.json's entry for `model` as Map(name -> { size, sha256 }), or null without an index. */
async function bundledIndex(model) {
  try {
    const r = await fetch(new URL('pkg/models.json', import.meta.url), { cache: 'no-cache' });
    if (!r.ok) return null;
    const list = (await r.json())[model];
    return Array.isArray(list) ? new Map(list.map((f) => [f.name, f])) : null;
  } catch {
    return null;
  }
}

function fmtBytes(n) {
  if (n == null) return 'an unknown amount';
  if (n < 1024) return `${n} B`;
  return n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`;
}

// JSON files of a Hugging Face model folder that are not its config.json. tokenizer.json and
// tokenizer_config.json are used; the others are not needed and are ignored.
const TOKENIZER = 'tokenizer.json';
const TOKENIZER_CONFIG = 'tokenizer_config.json';
const NOT_CONFIG = new Set([TOKENIZER, TOKENIZER_CONFIG, 'generation_config.json', 'special_tokens_map.json',
  'model.safetensors.index.json', 'added_tokens.json', 'vocab.json', 'preprocessor_config.json']);

// The user's picked files: exactly one config (config.json, or the only other .json picked),
// one or more .safetensors, and optionally tokenizer.json (text prompts) and
// tokenizer_config.json (the chat template). Everything stays in this tab: File objects are read
// here, never uploaded.
async function loadFiles(files) {
  const list = Array.from(files ?? []);
  const isJson = (f) => f.name.toLowerCase().endsWith('.json');
  const jsons = list.filter(isJson);
  const ggufs = list.filter(isGguf);
  if (ggufs.length) return loadGgufFiles(list, ggufs, jsons);
  const weights = list.filter((f) => !isJson(f));
  const candidates = jsons.filter((f) => !NOT_CONFIG.has(f.name) && !f.name.endsWith('.index.json'));
  const config = jsons.find((f) => f.name === 'config.json') ?? (candidates.length === 1 ? candidates[0] : null);
  if (!config) {
    const picked = list.map((f) => f.name).join(', ') || 'nothing';
    throw new Error(
      candidates.length > 1
        ? `several .json files picked (${candidates.map((f) => f.name).join(', ')}) and none is named config.json; pick the model's config.json`
        : `no config.json picked (got: ${picked}); pick the model's config.json together with its .safetensors files`);
  }
  const tokenizer = jsons.find((f) => f.name === TOKENIZER) ?? null;
  const tokenizerConfig = jsons.find((f) => f.name === TOKENIZER_CONFIG) ?? null;
  const others = jsons.filter((f) => f !== config && f !== tokenizer && f !== tokenizerConfig);
  if (others.length) {
    // e.g. model.safetensors.index.json: the shards name their own tensors.
    console.info(`bitlora: ignoring ${others.map((f) => f.name).join(', ')}`);
  }
  // wasm32 memory ends at 4 GiB and the weights are unpacked to f32 there (bf16 doubles in
  // size). Refuse early with a clear message rather than trap mid-load.
  const total = list.reduce((n, f) => n + f.size, 0);
  if (total > MAX_PICKED_BYTES) {
    throw new Error(
      `the picked files total ${(total / 2 ** 30).toFixed(2)} GiB; this page can load models up to ` +
      `${MAX_PICKED_BYTES / 2 ** 30} GiB (their weights are unpacked to 32-bit floats in the tab's 4 GiB of wasm memory)`);
  }
  // Streamed from disk tensor by tensor: neither the JS heap nor wasm memory holds a whole file.
  const { summary } = await loadModelFiles({ config, weights, tokenizer, tokenizerConfig }, () => {});
  return summary;
}

// A picked .gguf model: exactly one .gguf (its config is in its metadata), optionally with
// tokenizer.json (else the file's own tokenizer.ggml.* keys) and tokenizer_config.json.
async function loadGgufFiles(list, ggufs, jsons) {
  if (ggufs.length > 1) {
    throw new Error(`several .gguf files picked (${ggufs.map((f) => f.name).join(', ')}); pick one model's .gguf`);
  }
  const safetensors = list.filter((f) => f.name.endsWith('.safetensors'));
  if (safetensors.length) {
    throw new Error(`a .gguf and .safetensors files picked (${[...ggufs, ...safetensors].map((f) => f.name).join(', ')}); a model is either one .gguf or config.json with its .safetensors`);
  }
  const total = list.reduce((n, f) => n + f.size, 0);
  if (total > MAX_PICKED_BYTES) {
    throw new Error(
      `the picked files total ${(total / 2 ** 30).toFixed(2)} GiB; this page can load models up to ` +
      `${MAX_PICKED_BYTES / 2 ** 30} GiB (their embeddings are unpacked to 32-bit floats in the tab's 4 GiB of wasm memory)`);
  }
  const others = jsons.filter((f) => f.name !== TOKENIZER && f.name !== TOKENIZER_CONFIG);
  if (others.length) console.info(`bitlora: ignoring ${others.map((f) => f.name).join(', ')} (a .gguf holds its config)`);
  const { summary } = await loadGguf({
    gguf: ggufs[0], tokenizer: jsons.find((f) => f.name === TOKENIZER), tokenizerConfig: jsons.find((f) => f.name === TOKENIZER_CONFIG),
  }, () => {}, 'build');
  return summary;
}

training.setup({
  session: () => needSession(), model: () => currentModel, describe: (err) => describe(err),
  poison: (message) => { poisoned ??= message; },
  replaceGpu: () => replaceGpu(),
});

/**
 * A new WebGPU device for the session after its device was lost (the loaded model's weights
 * go onto it), or the CPU when the browser grants none; resolves to the session's backend.
 * Called by training.replaceGpu, which reopens the runs on it.
 * @returns {Promise<import('./protocol.js').InitResult>}
 */
async function replaceGpu() {
  const s = needSession();
  const backend = s.replaceGpu(await needWasm().Session.requestGpu(deviceLimits));
  if (backend.kind === 'webgpu') await nameAdapter(backend);
  console.warn(`bitlora: the WebGPU device was lost; now on ${backend.label}`);
  return backend;
}

function describe(err) {
  if (err instanceof Error) return err.message || String(err);
  return String(err);
}
