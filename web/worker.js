// The page's module Web Worker: owns the wasm module and the model, does every heavy step
// (fetching the bundled model, reading picked files, the forward pass), so the page never blocks.
//
// Protocol (main.js <-> worker), one reply per request, matched by id:
//   -> { id, type: 'init', preferGpu }            <- backend  { kind, label, adapter, fallbackReason }
//   -> { id, type: 'loadBundled', model, persisted, fakeFree? }  <- model { config, files, bytes, vocabSize, ...,
//        name, params, source: { from: 'store'|'network', stored, notes: string[] } }
//        <- { id, type: 'progress', event: { phase: 'fetch'|'store'|'read'|'build', done, total, at } } meanwhile
//      model: a key of BUNDLED ('default', 'tiny'); persisted: what the page's navigator.storage.persist()
//      gave (persist() is not exposed to workers); fakeFree (tests): pretend this many bytes are free.
//   -> { id, type: 'storeInfo' }                  <- { available, models: manifest[], usage, quota }
//   -> { id, type: 'deleteAll' }                  <- { models, bytes } (the IndexedDB store is deleted)
//   -> { id, type: 'loadFiles', files: File[] }   <- model
//   -> { id, type: 'forward', tokens: number[] }  <- { backend, tokens, rows, vocab, logits: Float32Array, top, ms }
//   -> { id, type: 'generate', prompt, options, stopFlag? }
//        <- { id, type: 'token', event: { index, token, text?, ms, at } }  once per token, as it is made
//        <- result { backend, promptTokens, promptText, tokens, text, stoppedBy, prefillMs, decodeMs, ms, tokensPerSecond }
//      prompt: { text, chat } or { tokens: number[] }; options: { max_tokens, temperature, top_k,
//      top_p, repetition_penalty, seed } (crates/web/src/generate.rs). `at` is the worker's
//      clock as epoch milliseconds (performance.timeOrigin + now), comparable with the page's.
//   -> { type: 'stop', target: id }               no reply; generation `id` ends after its current token
//   The model store (web/store.js, web/hub.js; the page's panel is web/models-panel.js). Models
//   are known by their store id: 'bundled:default', 'hub:<hub>/<owner/name>@<revision>', 'local:...'.
//   -> { id, type: 'listModels' }                 <- { available, models: summary[], usage, quota, downloading: id[] }
//      summary: { id, name, source: 'bundled'|'hub'|'local', origin: { hub, repo, revision }|null,
//                 bytes, storedBytes, complete, storedAt, updatedAt, files: string[] }
//   -> { id, type: 'downloadHub', hub, repo, revision?, token?, persisted?, fakeFree? }
//        <- { id, type: 'progress', event: { phase: 'list'|'check'|'download'|'verify', modelId, file, done,
//             total, fileDone, fileTotal, bytesPerSec, etaSeconds, at } } meanwhile
//        <- { status: 'complete'|'paused'|'cancelled', modelId, model: summary|null, notes: string[], already? }
//      Downloads (or resumes: the same request again) a Hugging Face repo into the store; it does
//      not load it (send 'loadStored'). hub: base URL (default https://huggingface.co); token: an
//      access token for gated/private repos, sent to the hub only, never stored. A failure rejects
//      with a sentence (repo not found, gated, not a BitNet model, does not fit, storage full,
//      hash mismatch, connection lost); what was stored stays and resumes (web/hub.js).
//   -> { id, type: 'cancelDownload', modelId, discard? }  <- { running }  pauses (keeps the stored
//      chunks) or, with discard, cancels and deletes the partial model
//   -> { id, type: 'deleteModel', modelId }       <- { deleted: summary|null } (stops its download first)
//   -> { id, type: 'loadStored', modelId }        <- model (as loadBundled; source.from 'store', key = modelId)
//        <- progress { phase: 'read'|'build' } meanwhile: 'read' while the files stream from the
//        store into wasm (one file at a time, one 4 MiB chunk at a time, each file's sha256
//        checked at its end), 'build' while the model is finished (tokenizer, GPU upload)
//      Tests only: wholeFiles (the older Session.load path), measureHeldBytes (store.heldBytes:
//      needs Chromium's --js-flags=--expose-gc)
//   -> { id, type: 'heldBytes' }  <- the last measured load's peak { bytes, chunkBytes, chunks, samples, held }
//   -> { id, type: 'wasmMemory' } <- { bytes, load: Session.loadMemory() }  (tests)
//   -> { id, type: 'importFiles', files: File[], persisted?, fakeFree? }  <- model, with storeId and
//      source: { from: 'files', stored, notes }: loadFiles, then the files are kept in the store
//      (config.json, *.safetensors, tokenizer.json, tokenizer_config.json) so they survive a reload
//        <- progress { phase: 'store' } meanwhile
//   listModels, downloadHub, cancelDownload and deleteModel run beside the queue below (a
//   download does not hold up generation, and Pause must reach a running download).
//   Training and adapters (web/training.js; the page's API is web/bitlora.js, types in bitlora.d.ts):
//   -> { id, type: 'prepareData', text, fileName, options }   <- DataSummary
//   -> { id, type: 'estimateMemory', config }                 <- MemoryEstimate
//   -> { id, type: 'trainCreate', data: { text, fileName }, config }  <- run info { runId, state,
//        config, data, step, totalSteps, adapterParams, backend, history }; stored at once
//   -> { id, type: 'trainResume', runId }                     <- run info (from its stored checkpoint)
//   -> { id, type: 'trainControl', runId, action }            <- { state, step }; beside the queue;
//        action: 'start'|'resume' (reply once running), 'pause'|'stop' (reply once stopped between
//        two steps, checkpoint stored), 'checkpoint'
//   -> { id, type: 'trainValidate'|'trainDispose', runId }    <- valLoss | undefined
//   -> { id, type: 'trainSaveAdapter', runId, name }          <- AdapterInfo
//   -> { id, type: 'listRuns' | 'getRun' | 'deleteRun', runId? }
//   -> { id, type: 'listAdapters' | 'exportAdapter' | 'importAdapter' | 'deleteAdapter', name?, files? }
//   -> { id, type: 'deleteTrainingData' }
//   <- { type: 'train', runId, event: 'progress'|'checkpoint'|'state'|'done'|'error', data }  (no id)
//   'generate' takes options.adapter: a stored adapter's name (null: the base model).
//   reply: { id, ok: true, result } or { id, ok: false, error: string, fatal?: true,
//            field?: string (the option at fault), line?: number (the data's JSONL line) }
//
// Stopping: a CPU generation runs synchronously in this worker, so a 'stop' message would only
// be read after it had finished. The page therefore also passes `stopFlag`, an Int32Array on a
// SharedArrayBuffer (available because the page is cross-origin isolated), which the token
// callback reads with Atomics.load between tokens. 'stop' messages cover WebGPU generation
// (which awaits the GPU between tokens, so messages get through) and pages without isolation.
// `fatal` means the wasm instance trapped (a panic): its memory can no longer be trusted, so the
// page starts a fresh worker instead of sending more work here.

import init, { Session } from './pkg/bitlora_web.js';
import * as store from './store.js';
import * as hub from './hub.js';
import * as training from './training.js';

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

let session = null;
// The loaded model's { key, name } (ModelInfo.key: the store id), which runs and adapters record.
let currentModel = null;
let poisoned = null;
// What the last 'loadStored' with measureHeldBytes measured (store.heldBytes; tests only).
let lastHeldBytes = null;

// Generations asked to stop (by request id), see 'stop' above.
const stopRequested = new Set();

// Requests run one after another, in arrival order: a forward pass never sees half a load.
// 'stop' is the exception: it must reach a generation that is running now.
let queue = Promise.resolve();
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
  queue = queue.then(() => handle(event.data));
};

async function handle({ id, type, ...args }) {
  try {
    if (poisoned) throw Object.assign(new Error(poisoned), { fatal: true });
    const result = await dispatch(type, { ...args, id });
    const transfer = result && result.logits instanceof Float32Array ? [result.logits.buffer] : [];
    self.postMessage({ id, ok: true, result }, transfer);
  } catch (err) {
    // A WebAssembly.RuntimeError is a trap (e.g. a Rust panic, logged above it by
    // console_error_panic_hook). Ordinary errors from bitlora are JsErrors: plain Errors.
    const fatal = err?.fatal || err instanceof WebAssembly.RuntimeError;
    const error = describe(err);
    if (fatal && !poisoned) poisoned = `the wasm module crashed earlier: ${error}`;
    // bitlora's errors are objects: `field` (the option at fault) and `line` (the JSONL line)
    // travel with the message, so the page never picks them out of the text.
    self.postMessage({ id, ok: false, error, fatal, field: err?.field, line: err?.line });
  }
}

async function dispatch(type, args) {
  const result = await dispatchType(type, args);
  // Any request that loads a model answers with its summary, keyed by its store id.
  if (LOADS.has(type) && result) {
    result.key ??= type === 'loadBundled' ? `bundled:${args.model ?? 'default'}`
      : `files:${result.config}:${result.bytes}:${(result.files ?? []).join(',')}`;
    currentModel = { key: result.key, name: result.name ?? result.files?.[0] ?? result.key };
  }
  return result;
}

const LOADS = new Set(['loadBundled', 'loadFiles', 'loadStored', 'importFiles']);

async function dispatchType(type, args) {
  switch (type) {
    case 'init': {
      await init();
      session = await Session.create(Boolean(args.preferGpu));
      const backend = session.backend();
      if (backend.kind === 'webgpu') await nameAdapter(backend);
      return backend;
    }
    case 'loadBundled':
      return loadBundled(args);
    case 'storeInfo':
      return storeInfo();
    case 'deleteAll':
      await hub.stopAll();
      return store.deleteAll();
    case 'listModels':
      return listModels();
    case 'downloadHub':
      return hub.downloadHub(args, (event) => self.postMessage({ id: args.id, type: 'progress', event }));
    case 'cancelDownload':
      return hub.stopDownload(args.modelId, args.discard ? 'cancel' : 'pause');
    case 'deleteModel':
      return deleteStored(args.modelId);
    case 'loadStored':
      return loadStored(args);
    case 'importFiles':
      return importFiles(args);
    case 'heldBytes':
      return lastHeldBytes;
    case 'wasmMemory':
      // Bytes of wasm linear memory (it only grows), and its marks during the last load
      // ({ before, weights, after }): tests compare what loads take.
      return { bytes: Session.wasmMemoryBytes(), load: session?.loadMemory() ?? null };
    case 'loadFiles':
      return loadFiles(args.files);
    case 'forward':
      return training.withModel(() => needSession().forward(Uint32Array.from(args.tokens)));
    case 'generate':
      await training.useAdapter(args.options?.adapter ?? null);
      return training.withModel(() => generate(args));
    case 'prepareData':
      return training.prepareData(args);
    case 'estimateMemory':
      return training.estimateMemory(args);
    case 'trainCreate':
      return training.create(args);
    case 'trainResume':
      return training.resume(args);
    case 'trainControl':
      return training.control(args);
    case 'trainValidate':
      return training.validate(args);
    case 'trainDispose':
      return training.dispose(args);
    case 'trainSaveAdapter':
      return training.saveAdapter(args);
    case 'listRuns':
      return training.listRuns();
    case 'getRun':
      return training.getRun(args);
    case 'deleteRun':
      return training.deleteRun(args);
    case 'listAdapters':
      return training.listAdapters();
    case 'exportAdapter':
      return training.exportAdapter(args);
    case 'importAdapter':
      return training.importAdapter(args);
    case 'deleteAdapter':
      return training.deleteAdapter(args);
    case 'deleteTrainingData':
      return training.deleteAll();
    default:
      throw new Error(`worker: unknown request type ${JSON.stringify(type)}`);
  }
}

// wgpu's web backend names the adapter after GPUAdapterInfo.description, which Chromium leaves
// empty (SwiftShader reports only vendor "google", architecture "swiftshader"). Ask the browser
// for the same default adapter's info so the page can say which device it is.
async function nameAdapter(backend) {
  let info = null;
  try {
    info = (await navigator.gpu?.requestAdapter())?.info ?? null;
  } catch {
    // Naming is cosmetic; the adapter wgpu got is what runs.
  }
  if (!info) return;
  backend.browserAdapterInfo = {
    vendor: info.vendor, architecture: info.architecture, device: info.device,
    description: info.description, isFallbackAdapter: Boolean(info.isFallbackAdapter),
  };
  if (!backend.adapter.name) {
    const name = [info.vendor, info.architecture, info.device].filter(Boolean).join(' ');
    if (name) backend.adapter.name = name;
  }
  backend.label = `WebGPU: ${backend.adapter.name}${info.isFallbackAdapter ? ' (software fallback adapter)' : ''}`;
}

// Streams each token to the page as soon as the model has made it. Returning false from the
// callback is how bitlora's generate is told to stop.
async function generate({ id, prompt, options, stopFlag }) {
  const stopped = () => stopRequested.has(id) || (stopFlag instanceof Int32Array && Atomics.load(stopFlag, 0) !== 0);
  try {
    return await needSession().generate(prompt, options, (event) => {
      event.at = performance.timeOrigin + performance.now();
      self.postMessage({ id, type: 'token', event });
      return !stopped();
    });
  } finally {
    stopRequested.delete(id);
  }
}

function needSession() {
  if (!session) throw new Error('worker: not initialised (send "init" first)');
  return session;
}

/**
 * Loads a bundled model: from the IndexedDB store when a complete, verified copy is there;
 * otherwise fetched from the page's own server and stored (when it fits) for the next visit.
 */
async function loadBundled({ id, model = 'default', fakeFree, persisted = false }) {
  const spec = BUNDLED[model];
  if (!spec) throw new Error(`unknown bundled model ${JSON.stringify(model)} (known: ${Object.keys(BUNDLED).join(', ')})`);
  const storeId = `bundled:${model}`;
  const progress = (phase, done, total, file) =>
    self.postMessage({ id, type: 'progress', event: { phase, done, total, file, at: performance.timeOrigin + performance.now() } });
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
    let room = null;
    const checkRoom = async (bytes) => {
      room = await store.checkRoom(bytes);
      if (fakeFree != null) Object.assign(room, { free: Number(fakeFree), fits: bytes * 1.05 <= Number(fakeFree) });
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
      if (!room) await checkRoom(bytes);
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
async function loadModelFiles({ config, weights, tokenizer, tokenizerConfig }, progress, { wholeFiles = false, phase = 'build' } = {}) {
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
  self.postMessage({ id, type: 'progress', event: { phase, done, total, file, at: performance.timeOrigin + performance.now() } });

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

/** 'importFiles': loads the picked files (every check of loadFiles), then keeps them in the store. */
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

async function storeInfo() {
  try {
    const models = await store.listManifests();
    const est = await navigator.storage?.estimate?.().catch(() => null);
    return { available: true, models, usage: est?.usage ?? null, quota: est?.quota ?? null };
  } catch (err) {
    return { available: false, error: describe(err), models: [] };
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

training.setup({
  session: () => needSession(), model: () => currentModel, describe: (err) => describe(err),
  poison: (message) => { poisoned ??= message; },
});

function describe(err) {
  if (err instanceof Error) return err.message || String(err);
  return String(err);
}
