// The page's module Web Worker: owns the wasm module and the model, does every heavy step
// (fetching the bundled model, reading picked files, the forward pass), so the page never blocks.
//
// Protocol (main.js <-> worker), one reply per request, matched by id:
//   -> { id, type: 'init', preferGpu }            <- backend  { kind, label, adapter, fallbackReason }
//   -> { id, type: 'loadBundled' }                <- model    { config, files, bytes, vocabSize, ... }
//   -> { id, type: 'loadFiles', files: File[] }   <- model
//   -> { id, type: 'forward', tokens: number[] }  <- { backend, tokens, rows, vocab, logits: Float32Array, top, ms }
//   -> { id, type: 'generate', prompt, options, stopFlag? }
//        <- { id, type: 'token', event: { index, token, text?, ms, at } }  once per token, as it is made
//        <- result { backend, promptTokens, promptText, tokens, text, stoppedBy, prefillMs, decodeMs, ms, tokensPerSecond }
//      prompt: { text, chat } or { tokens: number[] }; options: { max_tokens, temperature, top_k,
//      top_p, repetition_penalty, seed } (crates/web/src/generate.rs). `at` is the worker's
//      clock as epoch milliseconds (performance.timeOrigin + now), comparable with the page's.
//   -> { type: 'stop', target: id }               no reply; generation `id` ends after its current token
//   reply: { id, ok: true, result } or { id, ok: false, error: string, fatal?: true }
//
// Stopping: a CPU generation runs synchronously in this worker, so a 'stop' message would only
// be read after it had finished. The page therefore also passes `stopFlag`, an Int32Array on a
// SharedArrayBuffer (available because the page is cross-origin isolated), which the token
// callback reads with Atomics.load between tokens. 'stop' messages cover WebGPU generation
// (which awaits the GPU between tokens, so messages get through) and pages without isolation.
// `fatal` means the wasm instance trapped (a panic): its memory can no longer be trusted, so the
// page starts a fresh worker instead of sending more work here.

import init, { Session } from './pkg/bitlora_web.js';

const BUNDLED = {
  config: 'models/tiny/config.json',
  weights: ['models/tiny/model.safetensors'],
};

// Largest total size of picked files (see loadFiles).
const MAX_PICKED_BYTES = 1 * 2 ** 30;

let session = null;
let poisoned = null;

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
    self.postMessage({ id, ok: false, error, fatal });
  }
}

async function dispatch(type, args) {
  switch (type) {
    case 'init': {
      await init();
      session = await Session.create(Boolean(args.preferGpu));
      const backend = session.backend();
      if (backend.kind === 'webgpu') await nameAdapter(backend);
      return backend;
    }
    case 'loadBundled': {
      const [configBytes, ...weights] = await Promise.all(
        [BUNDLED.config, ...BUNDLED.weights].map(fetchBytes));
      return needSession().load(BUNDLED.config, configBytes, BUNDLED.weights, weights);
    }
    case 'loadFiles':
      return loadFiles(args.files);
    case 'forward':
      return needSession().forward(Uint32Array.from(args.tokens));
    case 'generate':
      return generate(args);
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

// Fetches a file next to this worker; HTTP errors name the file, like core's errors do.
async function fetchBytes(path) {
  const url = new URL(path, import.meta.url);
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new Error(`${path}: cannot fetch: ${describe(err)}`);
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${response.statusText}`);
  return new Uint8Array(await response.arrayBuffer());
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
  // wasm32 memory ends at 4 GiB, and loading holds the raw files plus the unpacked f32 weights
  // (bf16 doubles in size). Refuse early with a clear message rather than trap mid-load.
  const total = list.reduce((n, f) => n + f.size, 0);
  if (total > MAX_PICKED_BYTES) {
    throw new Error(
      `the picked files total ${(total / 2 ** 30).toFixed(2)} GiB; this page can load models up to ` +
      `${MAX_PICKED_BYTES / 2 ** 30} GiB for now (streaming larger ones from disk is planned)`);
  }
  const read = async (f) => (f ? new Uint8Array(await f.arrayBuffer()) : undefined);
  const configBytes = await read(config);
  const weightBytes = await Promise.all(weights.map(read));
  return needSession().load(config.name, configBytes, weights.map((f) => f.name), weightBytes,
    tokenizer?.name, await read(tokenizer), tokenizerConfig?.name, await read(tokenizerConfig));
}

function describe(err) {
  if (err instanceof Error) return err.message || String(err);
  return String(err);
}
