// The messages between the page (web/bitlora.js, the only sender) and its module Web Worker
// (web/worker.js, which hands training work to web/training.js and store work to web/store.js and
// web/hub.js). Types only: nothing imports this at run time. Both sides are checked against it by
// `tsc` (web/tsconfig.json, web/tsconfig.worker.json; tools/test.sh runs them), so a field
// renamed on one side and not the other fails the test suite.
//
//   page -> worker   { id, type, ...args }        one of Requests (below), or StopMessage
//   worker -> page   { id, type: 'progress' | 'token', event }   0..n events of request `id`
//                    { id, ok: true, result } | { id, ok: false, error, fatal }   its one reply
//                    { type: 'train', runId, event, data }        a training run's events (no id)
//
// Requests run one after another in the worker, in arrival order, except 'trainControl' and
// the model store's 'listModels', 'downloadHub', 'cancelDownload' and 'deleteModel', which run
// beside the queue (a pause must reach a running loop; a download must not hold up generation).
// `fatal` in a reply means the wasm instance trapped: the worker takes no more work.

import type {
  AdapterInfo, BackendInfo, CheckpointEvent, RecoveredEvent, DataInput, DataOptions, DataSummary, DoneEvent,
  DownloadOptions, DownloadProgress, DownloadResult, ForwardResult, GenerateResult, LoadProgress,
  ExportAdapterOptions, MemoryEstimate, ModelInfo, ModelStoreList, PeftFile, ProgressEvent, RunSummary, StoredModel,
  TokenEvent, TrainConfig, TrainerState, ValidationEvent,
} from './bitlora.js';

/** The worker's own progress messages of a request, by the request's type. */
export interface LoadProgressMessage { type: 'progress'; event: LoadProgress }
export interface DownloadProgressMessage { type: 'progress'; event: DownloadProgress }
export interface TokenMessage { type: 'token'; event: TokenEvent }

/** What `init` answers: the wasm Session's backend, with the adapter named after the browser's. */
export type InitResult = Omit<BackendInfo, 'training' | 'trainingReason' | 'wasmMemoryLimit'> &
  Partial<Pick<BackendInfo, 'training' | 'trainingReason' | 'wasmMemoryLimit'>> & {
  /** GPUAdapterInfo of the browser's default adapter (wgpu leaves the description empty). */
  browserAdapterInfo?: {
    vendor: string; architecture: string; device: string; description: string; isFallbackAdapter: boolean;
  };
};

/** Generation options as crates/web/src/generate.rs reads them (bitlora.js maps the camelCase ones). */
export interface WireGenerateOptions {
  max_tokens?: number;
  temperature?: number;
  top_k?: number;
  top_p?: number;
  repetition_penalty?: number;
  seed?: number;
  stop_tokens?: number[];
  /** A stored adapter's name; null or absent: the base model. */
  adapter?: string | null;
}

/** A run as the worker describes it when it is created or resumed (bitlora.js makes a Trainer of it). */
export interface RunInfo {
  runId: string;
  state: TrainerState;
  config: TrainConfig & { checkpointEvery: number; name: string };
  data: DataSummary;
  step: number;
  totalSteps: number;
  adapterParams: number;
  backend: ProgressEvent['backend'];
  backendNote: string | null;
  history: ProgressEvent[];
  initialValLoss: number | null;
}

/**
 * The most model bytes the worker's JS heap held at once during a measured load (web/store.js
 * heldBytes: store chunks and the copies of tensors that cross chunks, alive after a full GC).
 */
export interface HeldBytesPeak {
  /** Bytes of every watched buffer alive at the largest sample. */
  bytes: number;
  /** The most bytes of store chunks alive at one sample, and the most chunks. */
  chunkBytes: number;
  chunks: number;
  /** Samples taken (one per chunk fetched and per tensor handed to wasm). */
  samples: number;
  /** What was alive at the largest sample: "<file>/<chunk> (<n> bytes)" or "<file>[a..b) (<n> bytes)". */
  held: string[];
}

export type TrainAction = 'start' | 'resume' | 'pause' | 'stop' | 'checkpoint';
/** 'trainControl's reply: the run's state, or for 'checkpoint' the checkpoint stored. */
export type TrainControlResult = { state: TrainerState; step: number } | CheckpointEvent | null;

/** Every request: its arguments, its reply's result, and the messages it sends meanwhile. */
export interface Requests {
  /** Instantiates the wasm and picks the backend. */
  init: { args: { backend: import('./bitlora.js').BackendChoice; threads?: number; limits?: import('./bitlora.js').DeviceLimitsChoice }; result: InitResult; event: never };
  /** A model of web/models/ (`model`: 'default' | 'tiny'), from the store or fetched and stored. */
  loadBundled: { args: { model?: string; persisted?: boolean; fakeFree?: number }; result: ModelInfo; event: LoadProgressMessage };
  /** Picked files, loaded (not stored). */
  loadFiles: { args: { files: File[] }; result: ModelInfo; event: never };
  /** Picked files, loaded, then kept in the store (source.stored says whether they fitted). */
  importFiles: { args: { files: File[]; persisted?: boolean; fakeFree?: number }; result: ModelInfo; event: LoadProgressMessage };
  /**
   * A model of the store, streamed into wasm one file, one 4 MiB chunk at a time (progress
   * 'read', then 'build'). Tests only: `wholeFiles` copies each file whole into wasm
   * (Session.load); `measureHeldBytes` measures the JS heap's peak of model bytes during the
   * load (store.heldBytes; needs Chromium's --js-flags=--expose-gc), which `heldBytes` answers.
   */
  loadStored: { args: { modelId: string; wholeFiles?: boolean; measureHeldBytes?: boolean }; result: ModelInfo; event: LoadProgressMessage };
  listModels: { args: {}; result: ModelStoreList; event: never };
  downloadHub: { args: DownloadOptions; result: DownloadResult; event: DownloadProgressMessage };
  /** Pauses (keeps the stored chunks) or, with discard, cancels and deletes a download. */
  cancelDownload: { args: { modelId: string; discard?: boolean }; result: { running: boolean }; event: never };
  deleteModel: { args: { modelId: string }; result: { deleted: StoredModel | null }; event: never };
  /** Deletes the model store (IndexedDB `bitlora`). */
  deleteAll: { args: {}; result: { models: number; bytes: number }; event: never };
  /** Tests: the peak measured by the last loadStored with measureHeldBytes (null: none yet). */
  heldBytes: { args: {}; result: HeldBytesPeak | null; event: never };
  /** Tests: how many threads ran the blocks of one parallel loop in wasm (Session.cpuThreadsUsed). */
  threadsUsed: { args: { blocks?: number }; result: number; event: never };
  /** Tests: wasm memory now, and its marks during the last load. */
  wasmMemory: { args: {}; result: { bytes: number; load: { before: number; weights: number; after: number } | null }; event: never };
  forward: { args: { tokens: number[] }; result: ForwardResult; event: never };
  /**
   * `stopFlag`: an Int32Array on a SharedArrayBuffer that the page sets to stop a CPU generation
   * (which runs synchronously here, so a 'stop' message would be read only after it ended).
   */
  generate: {
    args: { prompt: { text: string; chat?: boolean } | { tokens: number[] } | { messages: import('./bitlora').ChatTurn[] }; options: WireGenerateOptions; stopFlag?: Int32Array };
    result: Omit<GenerateResult, 'adapter'> & { adapter?: string | null };
    event: TokenMessage;
  };
  prepareData: { args: { text: string; fileName?: string; options?: DataOptions & { batch?: number } }; result: DataSummary; event: never };
  estimateMemory: { args: { config: TrainConfig }; result: MemoryEstimate; event: never };
  trainCreate: { args: { data: DataInput; config: TrainConfig }; result: RunInfo; event: never };
  trainResume: { args: { runId: string }; result: RunInfo; event: never };
  /** start/resume reply once the loop runs; pause/stop once it stopped between steps (checkpoint stored). */
  trainControl: { args: { runId: string; action: TrainAction }; result: TrainControlResult; event: never };
  trainValidate: { args: { runId: string }; result: number | null; event: never };
  trainDispose: { args: { runId: string }; result: void; event: never };
  trainSaveAdapter: { args: { runId: string; name: string }; result: AdapterInfo; event: never };
  listRuns: { args: {}; result: RunSummary[]; event: never };
  getRun: { args: { runId: string }; result: RunSummary & { history: ProgressEvent[] }; event: never };
  deleteRun: { args: { runId: string }; result: void; event: never };
  listAdapters: { args: {}; result: AdapterInfo[]; event: never };
  exportAdapter: { args: { name: string } & ExportAdapterOptions; result: PeftFile[]; event: never };
  importAdapter: { args: { files: Array<File | PeftFile>; name?: string }; result: AdapterInfo; event: never };
  deleteAdapter: { args: { name: string }; result: void; event: never };
  /** Deletes the training store (runs, checkpoints, adapters). */
  deleteTrainingData: { args: {}; result: void; event: never };
  /** Test hook: destroys the session's WebGPU device (as a driver reset would); errors on the CPU. */
  debugLoseGpu: { args: {}; result: void; event: never };
}

export type RequestType = keyof Requests;
export type RequestArgs<K extends RequestType> = Requests[K]['args'];
export type RequestResult<K extends RequestType> = Requests[K]['result'];
export type RequestEvent<K extends RequestType> = Requests[K]['event'];

/** A request as posted: a discriminated union on `type`. */
export type Request = { [K in RequestType]: { id: number; type: K } & RequestArgs<K> }[RequestType];
/** Ends generation `target` after its current token; no reply. */
export interface StopMessage { type: 'stop'; target: number }
export type ToWorker = Request | StopMessage;

/** How the worker answers each request type (checked in worker.js's handler table). */
export type Handlers = {
  [K in RequestType]: (args: RequestArgs<K> & { id: number }) => RequestResult<K> | Promise<RequestResult<K>>;
};

export type Reply =
  | { id: number; type?: undefined; ok: true; result: unknown }
  | {
      id: number;
      type?: undefined;
      ok: false;
      error: string;
      fatal: boolean;
      /** The training option at fault (a TrainConfig name), when one is. */
      field?: string;
      /** The training data's JSONL line at fault (1-based), when one is. */
      line?: number;
    };

/** A training run's event; bitlora.js hands it to that run's Trainer. */
export type TrainEvent =
  | { event: 'progress'; data: ProgressEvent }
  | { event: 'validation'; data: ValidationEvent }
  | { event: 'checkpoint'; data: CheckpointEvent }
  | { event: 'state'; data: { state: TrainerState; step?: number } }
  | { event: 'done'; data: DoneEvent }
  | { event: 'recovered'; data: RecoveredEvent & { session: InitResult } }
  | { event: 'error'; data: { message: string; fatal?: boolean; field?: string; line?: number } };
export type TrainMessage = { type: 'train'; runId: string } & TrainEvent;

export type RequestEventMessage = { id: number } & (LoadProgressMessage | DownloadProgressMessage | TokenMessage);
export type FromWorker = Reply | RequestEventMessage | TrainMessage;
