// The public JavaScript API of bitlora: fine-tune ternary BitNet b1.58 models with LoRA in a
// browser tab. Implemented by web/bitlora.js (main thread), which owns a module Web Worker
// (web/worker.js) where the wasm module (crates/web) does all the work.
//
//   import { Bitlora } from './bitlora.js';
//   const bl = await Bitlora.create();                       // WebGPU when granted, else CPU
//   await bl.loadModel({ bundled: 'default' }, { onProgress: (p) => bar(p.done / p.total) });
//   const data = await bl.prepareData({ text, fileName: 'train.jsonl' }, { context: 128 });
//   const t = await bl.createTrainer({ data: { text, fileName: 'train.jsonl' }, rank: 8, steps: 200 });
//   t.on('progress', (p) => chart(p.step, p.loss, p.valLoss));
//   await t.start(); await t.finished;                       // or pause() / resume() / stop()
//   await t.saveAdapter('devil');
//   const g = bl.generate('Define LAWYER.', { adapter: 'devil', maxTokens: 40 });
//   for await (const tok of g) out.textContent += tok.text;
//   const r = await bl.chat.completions.create({ messages: [{ role: 'user', content: 'Hi' }], adapter: 'devil' });
//
// Every method that can fail rejects with an Error whose message says what is wrong and how to
// fix it (e.g. "train.jsonl: line 7: not JSON: ..."); nothing the visitor types crashes the worker.
// Where they apply the Error also carries `field` (the TrainConfig option at fault, e.g.
// "context") and `line` (the data's JSONL line, 1-based): see BitloraError.
// Nothing here makes a network request except loadModel (and only for models not yet stored).

import type { RequestType, RequestArgs, RequestEvent, RequestResult } from './protocol.js';

/** What the API's methods reject with. */
export type BitloraError = Error & {
  /** The option at fault (a TrainConfig name such as "context"), when one is. */
  field?: string;
  /** The JSONL line of the training data at fault (1-based), when one is. */
  line?: number;
  /** The worker crashed; create a new Bitlora client. */
  fatal?: boolean;
};

/** Where the model's forward pass runs. */
export type BackendKind = 'webgpu' | 'cpu';

/** What the worker got from the browser: `Bitlora.backend`. */
export interface BackendInfo {
  kind: BackendKind;
  /** One line for people: "WebGPU: google swiftshader (software fallback adapter)" or "CPU (SIMD128, 2 threads)". */
  label: string;
  /** The WebGPU adapter's name and limits when kind is "webgpu". */
  adapter: GpuAdapterInfo | null;
  /** Why WebGPU is not used when kind is "cpu". */
  fallbackReason: string | null;
  /** Where training steps run: may be "cpu" on a WebGPU session (see `trainingReason`). */
  training: BackendKind;
  /** Why training does not run on WebGPU although the session has it, else null. */
  trainingReason: string | null;
  /** The largest wasm memory the CPU backend can use, in bytes (4 GiB on wasm32). */
  wasmMemoryLimit: number;
  /**
   * Threads the CPU backend runs on: the threaded build's pool of Web Workers (one per core by
   * default, at most 8), or 1 for the single-thread build. The label says it too.
   */
  threads: number;
  /** Why the CPU backend runs on one thread (no cross-origin isolation, `threads: 1`, ...), else null. */
  threadsNote?: string | null;
}

export interface GpuAdapterInfo {
  name: string;
  backend: string;
  device_type: string;
  max_storage_buffer_binding_size: number;
  max_buffer_size: number;
  max_compute_workgroup_size_x: number;
  max_compute_invocations_per_workgroup: number;
  features: string[];
}

/**
 * Which backend `Bitlora.create` picks. "auto" (the default): WebGPU when the browser grants a
 * hardware adapter, else the CPU (wasm SIMD128); a software WebGPU adapter (SwiftShader,
 * llvmpipe, WARP: `isFallbackAdapter`) counts as none, because the CPU path is faster there
 * (BENCHMARKS.md: ~4 vs ~200 training tokens/s on one machine). "webgpu": any adapter the
 * browser grants, software ones too (the CPU only without one). "cpu": the CPU.
 */
export type BackendChoice = 'auto' | 'webgpu' | 'cpu';

/**
 * The WebGPU device's limits. "adapter" (the default): the adapter's own (SwiftShader 1 GiB
 * storage bindings, a desktop GPU 2-4 GiB). "phone": WebGPU's default limits, what a phone's
 * browser grants (Chrome on Android: maxStorageBufferBindingSize 128 MiB, maxBufferSize 256 MiB,
 * 16 KiB of workgroup memory), to try a model against a phone's limits on a desktop: the device
 * enforces them, and tensors larger than a binding (the embedding and the head of a large
 * vocabulary) are split to fit. `backend.adapter` shows the limits the device has.
 */
export type DeviceLimitsChoice = 'adapter' | 'phone';

export interface CreateOptions {
  /** See BackendChoice (default "auto"). */
  backend?: BackendChoice;
  /** Older spelling: false is `backend: "cpu"`, true is `backend: "auto"`. `backend` wins. */
  preferGpu?: boolean;
  /** URL of web/worker.js (default: next to bitlora.js). */
  workerUrl?: string | URL;
  /**
   * Threads for the CPU backend (default: the cores the browser reports, at most 8). More than 1
   * needs a cross-origin isolated page (COOP/COEP headers) and the threaded wasm
   * (web/pkg-threads); without them it runs on one thread and `backend.threadsNote` says why.
   * 1 picks the single-thread build. Results are the same bit for bit whatever the number.
   */
  threads?: number;
  /** See DeviceLimitsChoice (default "adapter"). */
  limits?: DeviceLimitsChoice;
}

// ---- models --------------------------------------------------------------------------------

/**
 * - `{ bundled }`: a model shipped with the page ("default": bitlora-default-12m; "tiny": a
 *   random test model); fetched once, then read from the IndexedDB model store.
 * - `{ stored }`: a model already in the model store, by its id (web/store.js manifests).
 * - `{ files }`: picked files: config.json, *.safetensors, and optionally tokenizer.json and
 *   tokenizer_config.json; or one .gguf (llama.cpp, QVAC Fabric, bitnet.cpp: TQ1_0, TQ2_0 or
 *   I2_S), whose metadata holds the config and, without a tokenizer.json, the tokenizer.
 *   Read in the worker, never uploaded.
 */
export type ModelSource =
  | { bundled: string }
  | { stored: string }
  | { files: File[] | FileList };

export interface LoadOptions {
  onProgress?: (p: LoadProgress) => void;
  /** What the page's `navigator.storage.persist()` gave (workers cannot ask); only changes a note. */
  persisted?: boolean;
  /**
   * `{ files }` only: also keep the files in the model store (config.json, the .safetensors,
   * tokenizer.json, tokenizer_config.json), so they load after a reload as `{ stored: model.storeId }`.
   * When they do not fit, the model runs from memory and `model.source.notes` says why. Default false.
   */
  keep?: boolean;
  /** Tests: act as if only this many bytes of browser storage were free. */
  fakeFree?: number;
}

export interface LoadProgress {
  phase: 'fetch' | 'store' | 'read' | 'build';
  done: number;
  total: number;
  file?: string;
  /** Epoch milliseconds. */
  at: number;
}

export interface ModelInfo {
  /**
   * A stable key for this model: its model-store id ("bundled:default", "hub:...", "local:..."),
   * or "files:..." for picked files that were not stored. Runs and adapters record it.
   */
  key: string;
  storeId?: string;
  name?: string;
  description?: string;
  config: string;
  files: string[];
  bytes: number;
  vocabSize: number;
  hiddenSize: number;
  numHiddenLayers: number;
  /** Where its forward pass runs. */
  backend: BackendKind;
  /** Set when the session has WebGPU but this model could not be put on it. */
  note: string | null;
  tokenizer: string | null;
  tokenizerVocabSize: number | null;
  tokenizerConfig: string | null;
  chatTemplate: boolean;
  eosTokenIds: number[];
  maxPositions: number;
  /** A model loaded from a .gguf: its general.architecture; null for safetensors. */
  ggufArchitecture: string | null;
  /** A model loaded from a .gguf: its config (from the file's metadata) under config.json's names. */
  ggufConfig: Record<string, unknown> | null;
  params?: number;
  downloadBytes?: number;
  source?: { from: 'store' | 'network' | 'files'; stored: boolean; notes: string[] };
}

/** The forward pass over a prompt: `Bitlora.forward`. */
export interface ForwardResult {
  backend: BackendKind;
  tokens: number[];
  /** Rows (one per token) and columns (the vocabulary) of `logits`. */
  rows: number;
  vocab: number;
  /** Row-major (rows, vocab) next-token logits. */
  logits: Float32Array;
  /** The 10 most likely next tokens after the last one, with their probabilities (softmax). */
  top: { token: number; prob: number }[];
  ms: number;
}

// ---- the model store -----------------------------------------------------------------------

/** A model in the model store (IndexedDB `bitlora`), as `listModels` gives it. */
export interface StoredModel {
  /** "bundled:default", "hub:<hub>/<owner/name>@<revision>" or "local:..."; `loadModel({ stored: id })`. */
  id: string;
  name: string;
  source: 'bundled' | 'hub' | 'local';
  /** Where a hub model came from. */
  origin: { hub: string; repo: string; revision: string } | null;
  /** Bytes of all its files, and bytes stored so far (less while partly downloaded). */
  bytes: number;
  storedBytes: number;
  complete: boolean;
  /** ISO 8601 dates. */
  storedAt: string;
  updatedAt: string;
  files: string[];
}

export interface ModelStoreList {
  /** false: IndexedDB cannot be used here (`error` says why); nothing is kept between visits. */
  available: boolean;
  error?: string;
  models: StoredModel[];
  /** The browser's storage estimate for this page, when it gives one. */
  usage?: number | null;
  quota?: number | null;
  /** Ids of the models downloading now. */
  downloading: string[];
}

export interface DownloadOptions {
  /** A Hugging Face-style hub's base URL (default https://huggingface.co); the page's CSP must allow it. */
  hub?: string;
  /** "owner/name". */
  repo: string;
  /** Branch, tag or commit (default "main"). */
  revision?: string;
  /** An access token for gated or private repos: sent to the hub only, never stored. */
  token?: string;
  persisted?: boolean;
  /** Tests: act as if only this many bytes of browser storage were free. */
  fakeFree?: number;
}

export interface DownloadProgress {
  phase: 'list' | 'check' | 'download' | 'verify';
  modelId: string;
  /** 'download': the file being fetched and the model's bytes stored or in flight. */
  file?: string;
  done?: number;
  total?: number;
  fileDone?: number;
  fileTotal?: number;
  bytesPerSec?: number | null;
  etaSeconds?: number | null;
  /** Epoch milliseconds. */
  at: number;
}

/** "paused" / "cancelled": `stopDownload` ended it (a paused one resumes with the same call). */
export type DownloadResult =
  | {
    status: 'complete'; modelId: string; model: StoredModel; notes: string[];
    /** It was complete in the store already; nothing was fetched. */
    already?: boolean;
  }
  /** `model`: what is stored so far (null when nothing is). */
  | { status: 'paused'; modelId: string; model: StoredModel | null; notes: string[] }
  | { status: 'cancelled'; modelId: string; model: null; notes: string[] };

// ---- data ----------------------------------------------------------------------------------

/** The visitor's training data: its text and (for messages) the file's name. */
export interface DataInput {
  text: string;
  /** Named in error messages ("notes.jsonl: line 7: ..."); default "training data". */
  fileName?: string;
}

export interface DataOptions {
  /** Tokens per training sequence (T). Default 128; at most the model's context. */
  context?: number;
  /** Count the loss on completions / assistant turns only (prompt+completion and chat data). Default false. */
  completionOnly?: boolean;
  /** Share of sequences held out for validation. Default 0.1 (0: none). */
  valFraction?: number;
  /**
   * At most this many sequences held out (a seeded random sample; the rest of the share is
   * trained on), so a validation pass stays short on large data. Default 64 (0: no cap).
   */
  maxValSequences?: number;
  /** Seed of the train/validation split. Default 0. */
  seed?: number;
}

/** `prepareData`'s report: what the data became. */
export interface DataSummary {
  fileName: string;
  /** Detected format. */
  format: 'text' | 'jsonl-text' | 'jsonl-prompt-completion' | 'jsonl-chat';
  /** Documents (plain text: 1; JSONL: non-blank lines). */
  examples: number;
  /** Tokens of all sequences (inputs), and those that count toward the loss. */
  tokens: number;
  targetTokens: number;
  trainSequences: number;
  valSequences: number;
  trainTargetTokens: number;
  valTargetTokens: number;
  /** Examples longer than the context that were cut (the answer is kept, the prompt's start dropped). */
  truncated: number;
  context: number;
  /** Optimizer steps in one epoch with `batch` sequences a step (batch from the options, default 1). */
  stepsPerEpoch: number;
  bytes: number;
}

// ---- training ------------------------------------------------------------------------------

export type LoraTarget = 'q_proj' | 'k_proj' | 'v_proj' | 'o_proj' | 'gate_proj' | 'up_proj' | 'down_proj' | 'all-linear';

/** Everything is optional; defaults follow the CLI (`bitlora train`). */
export interface TrainConfig extends DataOptions {
  /** LoRA rank r (default 8). */
  rank?: number;
  /** LoRA alpha (default 16): scale = alpha / r, or alpha / sqrt(r) with rslora. */
  alpha?: number;
  /** Dropout on the adapter's input (default 0). */
  dropout?: number;
  /** Projections that get an adapter (default ["all-linear"]). */
  targets?: LoraTarget[];
  rslora?: boolean;
  /** Peak learning rate (default 2e-4). */
  lr?: number;
  /** After warmup (default "cosine"). */
  schedule?: 'cosine' | 'linear' | 'constant';
  /** Linear warmup steps (default 0). */
  warmup?: number;
  /** AdamW's decoupled weight decay (default 0.01). */
  weightDecay?: number;
  /** Global gradient-norm clipping (default 1; 0 or null: off). */
  maxGradNorm?: number | null;
  /** Optimizer steps; or `epochs` passes over the training sequences (default: 1 epoch). */
  steps?: number;
  epochs?: number;
  /** Sequences per optimizer step (gradient accumulation; default 1). */
  batch?: number;
  /** Validation loss every N steps (default 20; 0: only at the end). */
  evalEvery?: number;
  /** Save a checkpoint to IndexedDB every N steps (default 50; 0: only on pause/stop/done). */
  checkpointEvery?: number;
  /** A name for the run (lists); default: data file name and date. */
  name?: string;
  /**
   * WebGPU runs: recompute each layer's activations in the backward instead of keeping every
   * layer's: less GPU memory (the 1b shape at context 128: ~240 MB less) for about one more
   * forward pass of work a step; the same results bit for bit. Default (null): on where memory
   * is short, i.e. on a device with a phone's limits (`limits: 'phone'`, buffers of at most
   * 256 MiB). `estimateMemory` counts with it. The CPU ignores it.
   */
  recompute?: boolean | null;
}

/** `createTrainer`'s argument: the config plus the data. */
export interface TrainerOptions extends TrainConfig {
  data: DataInput;
}

export interface ProgressEvent {
  step: number;
  totalSteps: number;
  epoch: number;
  /** Mean training loss over the step's sequences. */
  loss: number;
  /** Validation loss, on steps that ran validation. */
  valLoss?: number;
  /** Target tokens per second of training, averaged since start() / resume() (validation time left out). */
  tokensPerSec: number;
  /** Seconds left for the whole run: the remaining steps at the measured step time, plus the validation passes still due at the measured time per validation sequence. */
  eta: number;
  lr: number;
  gradNorm: number;
  /** Target tokens this step trained on. */
  tokens: number;
  /** Why the update was not applied (a non-finite loss or gradient); the adapter is unchanged. */
  skipped?: string;
  /** Milliseconds the step took. */
  ms: number;
  /** Where the step ran. */
  backend: BackendKind;
  /**
   * Bytes the step's training passes read back from the GPU: on WebGPU the per-row losses and
   * the squared gradient norm (the adapter, its gradients and Adam's moments stay on the GPU);
   * 0 on the CPU.
   */
  readBytes: number;
  /**
   * GPU bytes the run holds after the step (the model's weights, the training buffers and the
   * optimizer state): what `estimateMemory` predicts. Absent on the CPU.
   */
  gpuBytes?: number;
  /**
   * Whether the step recomputed activations in the backward (the `recompute` option, by
   * default on where memory is short). Absent on the CPU.
   */
  recompute?: boolean;
  /** Epoch milliseconds when the step ended. */
  at: number;
}

/**
 * A validation pass, one sequence at a time: after the steps that validate (`evalEvery`, and the
 * last), and before the first step (step 0: the base model's loss, kept as `initialValLoss`).
 */
export interface ValidationEvent {
  /** The step whose adapter is measured (0: before training). */
  step: number;
  /** Validation sequences done, of `total` (at most `maxValSequences`). */
  done: number;
  total: number;
  /** The mean loss, on the event that finishes the pass. */
  valLoss?: number;
  /** Seconds left for the whole run, validation included (0 while unknown). */
  eta: number;
  /** Epoch milliseconds. */
  at: number;
}

export interface CheckpointEvent {
  step: number;
  /** Bytes stored (checkpoint file); 0 when it could not be stored. */
  bytes: number;
  /** Why this checkpoint was not stored (e.g. browser storage full); training goes on. */
  error?: string;
}

export interface DoneEvent {
  /** "done": all steps ran; "stopped": stop() was called. */
  reason: 'done' | 'stopped';
  step: number;
  totalSteps: number;
  /** Last validation loss, if any. */
  valLoss: number | null;
  /** Last training loss. */
  loss: number | null;
  seconds: number;
}

export type TrainerState = 'ready' | 'running' | 'paused' | 'stopped' | 'done' | 'error';

/**
 * The WebGPU device was lost mid-run (a driver reset, the GPU process crashing) and the run
 * continues from its last stored checkpoint on a new device, or on the CPU when the browser
 * grants none; the steps after that checkpoint run again.
 */
export interface RecoveredEvent {
  /** The checkpoint's step: the run continues from here. */
  step: number;
  /** Where the run trains now. */
  backend: BackendKind;
  /** The browser's reason, e.g. "the WebGPU device was destroyed: ...". */
  reason: string;
  /** One sentence for the user. */
  message: string;
}

export interface TrainerEvents {
  progress: ProgressEvent;
  validation: ValidationEvent;
  checkpoint: CheckpointEvent;
  /** `step`: the step the run stands at (a pause during a step's validation comes before
   * that step's progress event). */
  state: { state: TrainerState; step?: number };
  done: DoneEvent;
  /** The WebGPU device was lost; the run goes on from its last checkpoint (`step` and `backend` follow). */
  recovered: RecoveredEvent;
  /** The run stopped on an error (`finished` rejects with it); `fatal`: the worker crashed. */
  error: Error & { fatal?: boolean };
}

/** One training run. Created by `Bitlora.createTrainer` or `Bitlora.resumeTrainer`. */
export interface Trainer {
  /** The run's id in the training store (IndexedDB `bitlora-training`). */
  readonly runId: string;
  readonly state: TrainerState;
  /** The config as resolved (defaults filled in, steps computed from epochs). */
  readonly config: Required<Omit<TrainConfig, 'epochs' | 'maxGradNorm'>> & { maxGradNorm: number | null; epochs: number | null };
  readonly data: DataSummary;
  readonly step: number;
  readonly totalSteps: number;
  /** Trainable parameters of the adapter. */
  readonly adapterParams: number;
  /** Every progress event of the run so far (kept with its checkpoints, so a resumed run has its curve). */
  readonly history: ProgressEvent[];
  /** The validation loss before the first step, once `validate()` measured it at step 0 (kept with the run). */
  readonly initialValLoss: number | null;
  /** Where steps run. */
  readonly backend: BackendKind;
  /** Why a WebGPU session trains this run on the CPU (e.g. a buffer over the device's limit), else null. */
  readonly backendNote: string | null;
  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof TrainerEvents>(type: K, listener: (event: TrainerEvents[K]) => void): () => void;
  /** Starts (or, from "paused", continues) the training loop; resolves once it runs. */
  start(): Promise<void>;
  /** Pauses after the current step and stores a checkpoint; resolves when paused. */
  pause(): Promise<void>;
  /** Continues a paused run. */
  resume(): Promise<void>;
  /** Ends the run after the current step (checkpoint stored; the adapter can still be saved). */
  stop(): Promise<void>;
  /** Resolves with the done event (reason "done" or "stopped"); rejects with the run's error. */
  readonly finished: Promise<DoneEvent>;
  /** Stores a checkpoint now (also allowed while running: taken between two steps). */
  checkpoint(): Promise<CheckpointEvent>;
  /** Saves the adapter as it is now to the adapter store under `name` (replacing one of that name). */
  saveAdapter(name: string): Promise<AdapterInfo>;
  /** Validation loss of the adapter as it is now (null without validation data). */
  validate(): Promise<number | null>;
  /** Frees the run's memory in the worker (its stored checkpoint stays). */
  dispose(): Promise<void>;
}

/** A stored run, as `listRuns` gives it. */
export interface RunSummary {
  id: string;
  name: string;
  createdAt: number;
  updatedAt: number;
  /** The model it trains: ModelInfo.key and name. */
  model: { key: string; name: string };
  /** "interrupted": the tab closed while it ran; resumable like "paused". */
  state: 'running' | 'paused' | 'stopped' | 'done' | 'interrupted' | 'error';
  step: number;
  totalSteps: number;
  /** Step of the stored checkpoint (what resumeTrainer continues from), null if none yet. */
  checkpointStep: number | null;
  loss: number | null;
  valLoss: number | null;
  /** The validation loss before the first step (from `validate()` at step 0), if measured. */
  initialValLoss?: number | null;
  config: TrainConfig;
  data: { fileName: string; format: string; bytes: number };
  /** Bytes this run takes in IndexedDB (its data and checkpoint). */
  bytes: number;
  /** The error that stopped it, when state is "error". */
  error?: string;
}

/** Bytes for training `config` on the loaded model, against what the backend can hold. */
export interface MemoryEstimate {
  backend: BackendKind;
  /** The frozen model (as the training backend holds it). */
  weights: number;
  /** Saved activations and temporaries of one sequence's forward + backward (sequences are processed one at a time). */
  activations: number;
  /** LoRA A/B, their gradients and AdamW's two moments (4 x params x 4 bytes). */
  adapter: number;
  total: number;
  adapterParams: number;
  /**
   * Bytes the training backend can still use: on the CPU, wasm32's 4 GiB minus what the page's
   * wasm memory holds apart from the model. null on WebGPU: browsers do not say how much GPU
   * memory there is; only the per-buffer limit (`maxBinding`) is checked there.
   */
  limit: number | null;
  /** The largest single buffer, against the device's maxStorageBufferBindingSize (WebGPU). */
  largestBuffer: number;
  maxBinding: number | null;
  fits: boolean;
  /** Why it does not fit, and what to change, for people; null when it fits. */
  message: string | null;
}

// ---- adapters ------------------------------------------------------------------------------

/** An adapter in the adapter store. */
export interface AdapterInfo {
  name: string;
  source: 'trained' | 'imported';
  createdAt: number;
  /** The model it was trained on or validated against (ModelInfo.key and name). */
  model: { key: string; name: string };
  r: number;
  alpha: number;
  dropout: number;
  rslora: boolean;
  targets: string[];
  params: number;
  bytes: number;
  runId?: string;
  step?: number;
}

/** A file of an adapter: "adapter_config.json" or "adapter_model.safetensors" (PEFT), or "<name>-<target>.gguf". */
/** How `exportAdapter` writes an adapter. */
export interface ExportAdapterOptions {
  /** "peft" (default): adapter_config.json + adapter_model.safetensors; "gguf": one .gguf file. */
  format?: 'peft' | 'gguf';
  /**
   * GGUF only. "llama" (default): llama.cpp's semantics (`llama-cli --lora`, `llama-export-lora`),
   * the same update as PEFT. "qvac": QVAC Fabric's BitNet graph, which applies the weight scale
   * after the LoRA term, so each B is multiplied by its projection's weight scale.
   */
  target?: 'llama' | 'qvac';
  /** GGUF only: the base model's general.architecture; default the loaded .gguf's, else "bitnet". */
  arch?: string;
}

export interface PeftFile {
  name: string;
  bytes: Uint8Array;
}

// ---- generation ----------------------------------------------------------------------------

/** Text (through the model's tokenizer; `chat` wraps it in the chat template), token ids, or a conversation (`messages`, through the chat template). */
export type Prompt = string | { text: string; chat?: boolean } | { tokens: number[] } | { messages: ChatTurn[] };
/** One turn of a conversation prompt (`{ messages }`), rendered by the model's chat template. */
export interface ChatTurn { role: 'system' | 'user' | 'assistant'; content: string }

export interface GenerateOptions {
  /** Default 64. Prompt + maxTokens must fit the model's context. */
  maxTokens?: number;
  /** 0 (default): greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  repetitionPenalty?: number;
  seed?: number;
  stopTokens?: number[];
  /** A stored adapter's name; null/undefined: the base model. */
  adapter?: string | null;
  /** Called with each token as soon as it exists (as well as the async iterator). */
  onToken?: (event: TokenEvent) => void;
}

export interface TokenEvent {
  index: number;
  token: number;
  /** The text this token adds (text prompts only). */
  text?: string;
  ms: number;
  at: number;
}

export interface GenerateResult {
  backend: BackendKind;
  adapter: string | null;
  promptTokens: number[];
  promptText: string | null;
  tokens: number[];
  text: string | null;
  stoppedBy: 'max_tokens' | 'stop_token' | 'stop';
  prefillMs: number;
  decodeMs: number;
  ms: number;
  tokensPerSecond: number | null;
}

/** A generation in progress: iterate its tokens, await its result, or stop it. */
export interface Generation extends AsyncIterable<TokenEvent> {
  readonly result: Promise<GenerateResult>;
  /** Ends generation after the current token; `result` then resolves with stoppedBy "stop". */
  stop(): void;
}

// ---- OpenAI-style chat ---------------------------------------------------------------------
//
//   const r = await bl.chat.completions.create({ messages: [{ role: 'user', content: 'Hi' }], adapter: 'mine' });
//   r.choices[0].message.content;
//   const s = await bl.chat.completions.create({ messages, stream: true, max_tokens: 40 });
//   for await (const chunk of s) out.textContent += chunk.choices[0]?.delta.content ?? '';
//
// On top of `generate`: the messages go through the loaded model's chat template exactly as
// `generate({ text, chat: true })` puts them (the template's end-of-turn token stops the reply),
// and the OpenAI sampling fields map to GenerateOptions: temperature -> temperature, top_p ->
// topP, max_tokens (or max_completion_tokens) -> maxTokens, seed -> seed; `stop` strings are
// matched in the streamed text (the reply ends before them; they are never emitted). Bad
// arguments reject with a BitloraError whose `field` names the request field at fault.

/** Text, or OpenAI's list of content parts (text parts only). */
export type ChatContent = string | Array<{ type: 'text'; text: string }>;

export interface ChatMessage {
  role: 'system' | 'developer' | 'user' | 'assistant';
  content: ChatContent;
}

export interface ChatCompletionRequest {
  /**
   * The conversation. For now one user message: the chat template renders it as
   * `generate({ text, chat: true })` does (the wasm renders a single user turn); other shapes
   * are refused with a message that says so.
   */
  messages: ChatMessage[];
  /** true: an async iterable of chunks instead of one completion. */
  stream?: boolean;
  /** With `stream`: `include_usage` adds a last chunk with `usage` and no choices. */
  stream_options?: { include_usage?: boolean } | null;
  /** When given, the loaded model's key, store id or name (a check: loading is `loadModel`). */
  model?: string | null;
  /** 0 (default): greedy. At most 2. */
  temperature?: number | null;
  /** In (0, 1]. */
  top_p?: number | null;
  /** Tokens to generate at most (default 64, as generate). Prompt + this must fit the model's context. */
  max_tokens?: number | null;
  /** OpenAI's newer name for max_tokens (give one of them). */
  max_completion_tokens?: number | null;
  /** Seed of the sampler (a non-negative integer). */
  seed?: number | null;
  /** Up to 4 strings that end the reply; not included in it. */
  stop?: string | string[] | null;
  /** Only 1. */
  n?: number | null;
  /** bitlora: a stored adapter's name (see listAdapters); null or absent: the base model. */
  adapter?: string | null;
  /** bitlora: GenerateOptions.topK. */
  top_k?: number | null;
  /** bitlora: GenerateOptions.repetitionPenalty. */
  repetition_penalty?: number | null;
}

/** "stop": an end-of-turn/EOS token or a `stop` string; "length": max_tokens was reached. */
export type ChatFinishReason = 'stop' | 'length';

export interface ChatCompletionUsage {
  /** Tokens of the prompt after the chat template. */
  prompt_tokens: number;
  /** Tokens generated (with the end-of-turn token when one ended the reply). */
  completion_tokens: number;
  total_tokens: number;
}

export interface ChatCompletion {
  /** "chatcmpl-" and 24 random hex digits. */
  id: string;
  object: 'chat.completion';
  /** Unix seconds. */
  created: number;
  /** The loaded model's name (ModelInfo.name, else its key). */
  model: string;
  choices: Array<{
    index: 0;
    message: { role: 'assistant'; content: string };
    finish_reason: ChatFinishReason;
  }>;
  usage: ChatCompletionUsage;
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  /**
   * One choice: the first chunk's delta is `{ role: 'assistant', content: '' }`, then text
   * pieces, and the last one's is `{}` with `finish_reason`. Empty in the usage chunk.
   */
  choices: Array<{
    index: 0;
    delta: { role?: 'assistant'; content?: string };
    finish_reason: ChatFinishReason | null;
  }>;
  /** Only in the extra last chunk that `stream_options.include_usage` asks for. */
  usage?: ChatCompletionUsage;
}

/**
 * A streamed chat completion (iterate it once). `create` resolves with it once the first piece
 * of text exists, so every refused request rejects `create` itself. Breaking out of the
 * `for await` loop, or `abort()`, ends the generation.
 */
export interface ChatCompletionStream extends AsyncIterable<ChatCompletionChunk> {
  /** Ends the generation after its current token; the iteration then ends without a finish chunk. */
  abort(): void;
}

export interface ChatCompletions {
  create(request: ChatCompletionRequest & { stream: true }): Promise<ChatCompletionStream>;
  create(request: ChatCompletionRequest & { stream?: false | null }): Promise<ChatCompletion>;
  create(request: ChatCompletionRequest): Promise<ChatCompletion | ChatCompletionStream>;
}

// ---- the client ----------------------------------------------------------------------------

export declare class Bitlora {
  /** Starts the worker, instantiates the wasm and picks the backend. */
  static create(options?: CreateOptions): Promise<Bitlora>;
  readonly backend: BackendInfo;
  /** The loaded model, or null. */
  readonly model: ModelInfo | null;

  /** Loads a model; the previous one stays loaded if this fails. */
  loadModel(source: ModelSource, options?: LoadOptions): Promise<ModelInfo>;

  /** Next-token logits of the loaded model for `tokens` (token ids), and the top 10 after the last. */
  forward(tokens: number[]): Promise<ForwardResult>;

  /** The models in the model store (complete and partly downloaded). */
  listModels(): Promise<ModelStoreList>;
  /**
   * Downloads a model from a Hugging Face-style hub into the model store (resuming a partial
   * download of the same repo and revision); it does not load it: `loadModel({ stored: r.modelId })`.
   * Rejects with a sentence: repo not found, gated, not a BitNet model, does not fit, storage
   * full, hash mismatch, connection lost; what was stored stays, and the same call resumes it.
   */
  downloadModel(options: DownloadOptions, events?: { onProgress?: (p: DownloadProgress) => void }): Promise<DownloadResult>;
  /** Pauses a running download (keeps what is stored) or, with `discard`, cancels it and deletes the partial model. */
  stopDownload(modelId: string, options?: { discard?: boolean }): Promise<{ running: boolean }>;
  /** Deletes one model from the model store (stopping its download first). */
  deleteStoredModel(modelId: string): Promise<{ deleted: StoredModel | null }>;
  /** Deletes the whole model store (downloads are stopped first) and says what it held. The loaded model stays loaded. */
  deleteModelStore(): Promise<{ models: number; bytes: number }>;

  /** Parses and tokenizes training data with the loaded model's tokenizer and reports what it became. */
  prepareData(input: DataInput, options?: DataOptions & { batch?: number }): Promise<DataSummary>;

  /** Memory needed to train `config` on the loaded model, and whether it fits (check before start). */
  estimateMemory(config?: TrainConfig): Promise<MemoryEstimate>;

  /** A new training run on the loaded model (stored at once, so it survives a reload). Call start(). */
  createTrainer(options: TrainerOptions): Promise<Trainer>;
  /** Continues a stored run from its last checkpoint (loads its model first when it is bundled or stored). Call start(). */
  resumeTrainer(runId: string): Promise<Trainer>;
  listRuns(): Promise<RunSummary[]>;
  /** A run with its loss history. */
  getRun(runId: string): Promise<RunSummary & { history: ProgressEvent[] }>;
  deleteRun(runId: string): Promise<void>;

  listAdapters(): Promise<AdapterInfo[]>;
  /**
   * The adapter as files for download: PEFT (adapter_config.json + adapter_model.safetensors),
   * or with `{ format: 'gguf', target }` one GGUF LoRA adapter (`<name>-<target>.gguf`), the
   * bytes `bitlora export --format gguf` writes. GGUF needs the adapter's base model loaded.
   */
  exportAdapter(name: string, options?: ExportAdapterOptions): Promise<PeftFile[]>;
  /**
   * Imports PEFT files (File objects from a picker, or { name, bytes }), checked against the
   * loaded model, under `name` (default "imported adapter"). An existing name is refused:
   * delete that adapter first. adapter_model.bin (pickle) is not supported.
   */
  importAdapter(files: Array<File | PeftFile> | FileList, name?: string): Promise<AdapterInfo>;
  deleteAdapter(name: string): Promise<void>;

  /** Streams generated tokens; with `options.adapter` through that stored adapter (unmerged, as PEFT). */
  generate(prompt: Prompt, options?: GenerateOptions): Generation;

  /**
   * OpenAI-style chat completions on top of `generate` (see ChatCompletionRequest): the loaded
   * model's chat template, the adapter as an option, streaming or not.
   */
  readonly chat: { readonly completions: ChatCompletions };

  /** Deletes the training store (runs, checkpoints, adapters). The model store is separate. */
  deleteTrainingData(): Promise<void>;

  /**
   * Low level: sends one worker request of web/protocol.d.ts (the methods above cover them all);
   * `onEvent` gets its progress or token messages.
   */
  request<K extends RequestType>(type: K, args: RequestArgs<K>, onEvent?: (message: RequestEvent<K>) => void): Promise<RequestResult<K>>;

  /** Ends the worker; the client is unusable afterwards. */
  terminate(): void;
}
