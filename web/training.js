// @ts-check
// Training and adapters inside the worker (web/worker.js dispatches to these): the training loop
// around the wasm WebTrainer, checkpoints and runs in the training store, adapters for
// generation. The page's side is web/bitlora.js; the messages are typed in web/protocol.d.ts.
//
// The loop. On the CPU a training step runs synchronously in this worker, so the loop does one
// unit of work at a time (one sequence's forward + backward, or one validation sequence) and
// then yields to the event loop (a MessageChannel round trip, which is not clamped like nested
// timers), so 'trainControl' messages (pause, stop) and queued requests (generate, list) are
// handled between two units. Pause, checkpoints and adapter saves happen at safe points, where
// the training state is whole: between two steps, or between the validation sequences of a
// finished step (a pause does not wait for a long validation; it goes on after resume). Stop
// does not wait for one either: the step's report goes out without its validation loss.
// A run that starts at step 0 with validation first measures the base model's validation loss
// (initialValLoss), in the same loop, a sequence at a time, so it too can be paused or stopped.
// Validation is bounded (maxValSequences), reported as 'validation' events, and its time is
// counted in the ETA (the remaining passes at the measured time per sequence) but not in the
// training rate.
//
// Events go to the page as { type: 'train', runId, event, data } messages:
//   progress  ProgressEvent (web/bitlora.d.ts)      checkpoint  { step, bytes, error? }
//   validation ValidationEvent
//   state     { state }                              done        DoneEvent
//   error     { message }
// No network request is made here: the data, the model and the checkpoints are all local.

import * as tstore from './training-store.js';

/**
 * @import { RequestArgs, RequestResult, RunInfo, TrainEvent } from './protocol.js'
 * @import { TrainConfig } from './bitlora.js'
 * @import { Session } from './pkg/bitlora_web.js'
 */

/**
 * One model pass at a time. A WebGPU training unit and a WebGPU generation both hold the
 * model's GPU buffers while they await the GPU, and either may start while the other waits
 * (the loop yields; queued requests run meanwhile), so both go through this lock. On the CPU
 * every pass is synchronous and the lock costs nothing.
 */
/** @type {Promise<unknown>} */
let lock = Promise.resolve();
/**
 * @template T
 * @param {() => T | PromiseLike<T>} fn
 * @returns {Promise<T>}
 */
export function withModel(fn) {
  const p = lock.then(fn);
  lock = p.catch(() => {});
  return p;
}

/** Runs live in this worker, by id: { id, wt, record, state, ... }. */
const runs = new Map();
/**
 * @typedef {{ session(): Session, model(): { key: string, name: string } | null, describe(err: unknown): string,
 *   poison?(message: string): void, replaceGpu(): Promise<import('./protocol.js').InitResult> }} Context
 */
/** @type {Context} */
let ctxFns;

/**
 * `fns`: { session(): Session, model(): { key, name } | null, describe(err): string,
 * poison(message): void (a wasm trap: the worker takes no more work), replaceGpu(): a new
 * WebGPU device (or the CPU) for the session after its device was lost, resolving to its backend }.
 * @param {Context} fns
 */
export function setup(fns) {
  ctxFns = fns;
}

const now = () => performance.timeOrigin + performance.now();
/**
 * @template {TrainEvent['event']} E
 * @param {string} runId
 * @param {E} event
 * @param {Extract<TrainEvent, { event: E }>['data']} data
 */
const post = (runId, event, data) => self.postMessage({ type: 'train', runId, event, data });
const session = () => ctxFns.session();
const describe = (err) => ctxFns.describe(err);

/** @returns {Promise<void>} */
function yieldToEvents() {
  return new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => { ch.port1.close(); resolve(); };
    ch.port2.postMessage(0);
  });
}

function newRunId() {
  const r = crypto.getRandomValues(new Uint32Array(2));
  return `run-${Date.now().toString(36)}-${r[0].toString(36)}${r[1].toString(36)}`;
}

/**
 * The options the wasm parses (TrainConfig without the page-side name and data).
 * @param {TrainConfig & { data?: unknown }} [config]
 */
function wasmConfig(config) {
  const { name, data, checkpointEvery, ...rest } = config ?? {};
  return rest;
}

/** @param {string} what */
function currentModel(what) {
  const m = ctxFns.model();
  if (!m) throw new Error(`cannot ${what}: no model loaded yet; load a model first`);
  return m;
}

// ---- data and memory --------------------------------------------------------------------

/**
 * @param {RequestArgs<'prepareData'>} args
 * @returns {RequestResult<'prepareData'>}
 */
export function prepareData({ text, fileName, options }) {
  currentModel('prepare data');
  const bytes = encodeText(text);
  return session().prepareData(fileName || 'training data', bytes, options ?? {});
}

/** @param {unknown} text */
function encodeText(text) {
  if (typeof text !== 'string') throw new Error('training data must be text (a string)');
  return new TextEncoder().encode(text);
}

/**
 * @param {RequestArgs<'estimateMemory'>} args
 * @returns {Promise<RequestResult<'estimateMemory'>>}
 */
export function estimateMemory({ config }) {
  currentModel('estimate memory');
  return withModel(() => session().estimateMemory(wasmConfig(config)));
}

// ---- runs -----------------------------------------------------------------------------------

/**
 * @param {Run} run
 * @returns {RunInfo}
 */
function publicInfo(run) {
  const info = run.wt.info();
  return {
    runId: run.id, state: run.state, config: { ...info.config, checkpointEvery: run.checkpointEvery, name: run.record.name },
    data: info.data, step: info.step, totalSteps: info.totalSteps, adapterParams: info.adapterParams,
    backend: info.backend, backendNote: info.backendNote ?? null, history: run.history,
    initialValLoss: run.record.initialValLoss ?? null,
  };
}

/** 'trainCreate': a new run, stored at once (data + a step-0 checkpoint) so a reload can resume it. */
/**
 * @param {RequestArgs<'trainCreate'>} args
 * @returns {Promise<RunInfo>}
 */
export async function create({ data, config = {} }) {
  const model = currentModel('train');
  if (!data || typeof data.text !== 'string') throw new Error('createTrainer: give data: { text, fileName }');
  const fileName = data.fileName || 'training data';
  const bytes = encodeText(data.text);
  const wt = session().createTrainer(fileName, bytes, wasmConfig(config));
  const info = wt.info();
  const id = newRunId();
  const t = Date.now();
  const record = {
    id, name: config.name || `${fileName} · ${new Date(t).toLocaleString()}`, createdAt: t, updatedAt: t,
    model: { key: model.key, name: model.name ?? model.key }, state: 'ready', step: 0,
    totalSteps: info.totalSteps, checkpointStep: 0, loss: null, valLoss: null,
    config: { ...config, data: undefined }, resolved: info.config,
    data: { fileName, format: info.data.format, bytes: bytes.length }, history: [], bytes: 0,
  };
  // The checkpoint's safetensors bytes (the wasm binding types the Promise's value as any).
  const ckpt = /** @type {Uint8Array} */ (await wt.checkpoint());
  record.bytes = bytes.length + ckpt.length;
  try {
    await tstore.createRun(record, bytes, { step: 0, bytes: ckpt });
  } catch (err) {
    wt.free();
    throw new Error(`cannot store the training run: ${describe(err)}`);
  }
  const run = addRun(id, wt, record, config.checkpointEvery);
  return publicInfo(run);
}

/**
 * A run open in this worker: its wasm trainer, its stored record, and the loop's state.
 * @typedef {{ id: string, wt: import('./pkg/bitlora_web.js').WebTrainer, record: any,
 *   state: import('./bitlora.js').TrainerState, history: import('./bitlora.js').ProgressEvent[],
 *   checkpointEvery: number, step: number, totalSteps: number,
 *   pauseWaiters: { resolve: () => void, reject: (err: Error) => void }[],
 *   boundaryOps: { fn: () => any, resolve: (value: any) => void, reject: (err: unknown) => void }[],
 *   looping: boolean, want: 'pause' | 'stop' | null, lastCheckpoint: number,
 *   loss: number | null, valLoss: number | null, seconds?: number,
 *   baseline: boolean, timing: Timing, gpuEpoch: number }} Run
 */

/**
 * @param {string} id
 * @param {import('./pkg/bitlora_web.js').WebTrainer} wt
 * @param {any} record the training store's run record (training-store.js)
 * @param {number} [checkpointEvery]
 * @returns {Run}
 */
function addRun(id, wt, record, checkpointEvery) {
  /** @type {Run} */
  const run = {
    id, wt, record, state: record.state === 'done' ? 'done' : (record.state === 'ready' ? 'ready' : 'paused'),
    history: record.history ?? [], checkpointEvery: checkpointEvery ?? 50, step: wt.step, totalSteps: wt.totalSteps,
    pauseWaiters: [], boundaryOps: [], looping: false, want: null, lastCheckpoint: record.checkpointStep ?? 0,
    loss: record.loss, valLoss: record.valLoss,
    // The base model's validation loss is measured first, unless known (or nothing to validate).
    baseline: wt.step === 0 && record.initialValLoss == null && validating(wt.info()),
    timing: { trainSeconds: 0, trainSteps: 0, tokens: 0, valSeconds: 0, valSequences: 0 },
    gpuEpoch,
  };
  runs.set(id, run);
  return run;
}

/** 'trainResume': continues a stored run from its checkpoint, on the loaded model. */
/**
 * @param {RequestArgs<'trainResume'>} args
 * @returns {Promise<RunInfo>}
 */
export async function resume({ runId }) {
  const live = runs.get(runId);
  if (live) return publicInfo(live);
  const model = currentModel('resume training');
  const record = await tstore.getRun(runId);
  if (!record) throw new Error(`no training run ${runId} in this browser (deleted?)`);
  if (record.model.key !== model.key) {
    throw new Error(`run "${record.name}" trains ${record.model.name}, but ${model.name ?? model.key} is loaded; load ${record.model.name} first`);
  }
  const { data, checkpoint } = await tstore.loadRunState(runId);
  if (!data || !checkpoint) throw new Error(`run "${record.name}" has no stored ${data ? 'checkpoint' : 'data'}; it cannot be resumed`);
  const wt = session().resumeTrainer(record.data.fileName, data, wasmConfig(record.config), checkpoint.bytes);
  // Steps after the checkpoint were lost with the tab: their history goes too.
  record.history = (record.history ?? []).filter((p) => p.step <= checkpoint.step);
  record.step = wt.step;
  record.checkpointStep = checkpoint.step;
  const run = addRun(runId, wt, record, record.config.checkpointEvery);
  if (wt.done()) run.state = 'done';
  return publicInfo(run);
}

/** @param {string} runId */
function needRun(runId) {
  const run = runs.get(runId);
  if (!run) throw new Error(`training run ${runId} is not open in this worker (resume it first)`);
  return run;
}

/**
 * @param {Run} run
 * @param {import('./bitlora.js').TrainerState} state
 */
function setState(run, state) {
  run.state = state;
  // The step the run stands at: a pause during a step's validation stores the step's
  // checkpoint before that step's progress event (which waits for the validation loss).
  post(run.id, 'state', { state, step: run.wt.step });
}

/**
 * Stores the run's record and, when the step moved on, its checkpoint.
 * @param {Run} run
 * @param {import('./bitlora.js').TrainerState} [state]
 * @param {boolean} [force]
 * @returns {Promise<import('./bitlora.js').CheckpointEvent | null>}
 */
async function persist(run, state = run.state, force = false) {
  const wt = run.wt;
  const r = run.record;
  Object.assign(r, {
    state, step: wt.step, updatedAt: Date.now(), history: run.history, loss: run.loss ?? null, valLoss: run.valLoss ?? null,
  });
  let checkpoint = null;
  // The record as stored: it names the new checkpoint only in the write that stores it, so a
  // write that fails (storage full) leaves the run pointing at the checkpoint that is there.
  let stored = r;
  if (force || wt.step !== run.lastCheckpoint || r.checkpointStep == null) {
    // On WebGPU the adapter and Adam's moments are read back for it (the only time they are;
    // the read uses the run's own buffers, not the model slot, so it needs no withModel).
    const bytes = /** @type {Uint8Array} */ (await wt.checkpoint());
    checkpoint = { step: wt.step, bytes };
    stored = { ...r, checkpointStep: wt.step, bytes: r.data.bytes + bytes.length };
  }
  try {
    await tstore.saveRun(stored, checkpoint);
    if (!checkpoint) return null;
    Object.assign(r, { checkpointStep: stored.checkpointStep, bytes: stored.bytes });
    run.lastCheckpoint = checkpoint.step;
    const event = { step: checkpoint.step, bytes: checkpoint.bytes.length };
    post(run.id, 'checkpoint', event);
    return event;
  } catch (err) {
    // Training goes on; the page hears that this checkpoint is not stored.
    if (!checkpoint) throw err;
    const event = { step: checkpoint.step, bytes: 0, error: describe(err) };
    post(run.id, 'checkpoint', event);
    return event;
  }
}

/**
 * 'trainControl' (handled beside the queue): { runId, action: 'start'|'resume'|'pause'|'stop'|
 * 'checkpoint' }. start/resume resolve once the loop runs; pause/stop once it has stopped
 * between two steps with a checkpoint stored; checkpoint once one is stored.
 */
/**
 * @param {RequestArgs<'trainControl'>} args
 * @returns {Promise<RequestResult<'trainControl'>>}
 */
export async function control({ runId, action }) {
  const run = needRun(runId);
  switch (action) {
    case 'start':
    case 'resume': {
      if (run.state === 'running') return { state: run.state, step: run.step };
      if (run.state === 'done') throw new Error('the run is complete: all its steps have run');
      if (run.state === 'error') throw new Error('the run stopped on an error; resume it from its checkpoint (resumeTrainer) to try again');
      const other = [...runs.values()].find((r) => r !== run && (r.state === 'running' || r.looping));
      if (other) throw new Error(`another run ("${other.record.name}") is training; pause or stop it first`);
      if (run.looping) {
        // Paused meanwhile but the loop has not noticed yet: cancel the request.
        run.want = null;
        return { state: run.state, step: run.step };
      }
      run.want = null;
      setState(run, 'running');
      run.record.state = 'running';
      // Stored at once, so that a tab closed before the first checkpoint lists the run as
      // interrupted, not as never started (only the record: losing it loses just that).
      tstore.saveRun({ ...run.record, history: run.history }).catch(() => {});
      run.looping = true;
      loop(run);
      return { state: 'running', step: run.step };
    }
    case 'pause':
    case 'stop': {
      if (action === 'pause' && run.state !== 'running') return { state: run.state, step: run.step };
      if (action === 'stop' && !run.looping) {
        if (run.state === 'stopped' || run.state === 'done') return { state: run.state, step: run.step };
        await persist(run, 'stopped');
        setState(run, 'stopped');
        post(run.id, 'done', doneEvent(run, 'stopped'));
        return { state: 'stopped', step: run.step };
      }
      run.want = action;
      await /** @type {Promise<void>} */ (new Promise((resolve, reject) => run.pauseWaiters.push({ resolve, reject })));
      return { state: run.state, step: run.step };
    }
    case 'checkpoint':
      return atBoundary(run, () => persist(run, run.state, true));
    default:
      throw new Error(`trainControl: unknown action ${JSON.stringify(action)}`);
  }
}

/** Runs `fn` between two steps: now if the loop is not running, else at its next step boundary. */
/**
 * @template T
 * @param {Run} run
 * @param {() => T | PromiseLike<T>} fn
 * @returns {Promise<T>}
 */
function atBoundary(run, fn) {
  if (!run.looping) return withModel(fn);
  return new Promise((resolve, reject) => run.boundaryOps.push({ fn, resolve, reject }));
}

/**
 * @param {Run} run
 * @param {'done' | 'stopped'} reason
 * @returns {import('./bitlora.js').DoneEvent}
 */
function doneEvent(run, reason) {
  return {
    reason, step: run.step, totalSteps: run.totalSteps, loss: run.loss ?? null, valLoss: run.valLoss ?? null,
    seconds: run.seconds ?? 0,
  };
}

/**
 * What the loop has measured since start() / resume(): training time (for the rate and the time
 * per step) apart from validation time (the time per validation sequence).
 * @typedef {{ trainSeconds: number, trainSteps: number, tokens: number, valSeconds: number, valSequences: number }} Timing
 */

/**
 * Whether a run validates at all (a pass after steps, and the base model's loss first).
 * @param {{ config: { evalEvery: number }, data: { valSequences: number } }} info
 */
function validating(info) {
  return info.config.evalEvery > 0 && info.data.valSequences > 0;
}

/**
 * Seconds left: the remaining steps at the measured time per step, plus the validation
 * sequences still due (the rest of the running pass, one pass per validating step to come) at
 * the measured time per sequence. Before any validation has run, a validation sequence is taken
 * as a third of a training sequence (a forward pass without the backward). 0 while no step has
 * been timed.
 * @param {Run} run
 * @param {{ done: number, total: number } | null} current the running validation pass
 */
function eta(run, current) {
  const t = run.timing;
  const info = run.wt.info();
  const perStep = t.trainSteps > 0 ? t.trainSeconds / t.trainSteps : 0;
  const perVal = t.valSequences > 0 ? t.valSeconds / t.valSequences : perStep / Math.max(info.config.batch, 1) / 3;
  let valLeft = current ? current.total - current.done : 0;
  if (run.baseline && !current) valLeft += info.data.valSequences;
  if (validating(info)) {
    const every = info.config.evalEvery;
    const total = run.totalSteps;
    // The trainer's count: a step whose validation runs now is already counted (its pass is `current`).
    const after = run.wt.step;
    // Steps in (after, total] that validate: multiples of evalEvery, and the last step.
    const passes = Math.floor(total / every) - Math.floor(after / every) + (total % every !== 0 && after < total ? 1 : 0);
    valLeft += passes * info.data.valSequences;
  }
  if (perStep === 0 && t.valSequences === 0) return 0;
  return (run.totalSteps - run.wt.step) * perStep + valLeft * perVal;
}

/** @param {Run} run */
async function loop(run) {
  const wt = run.wt;
  const startedAt = performance.now();
  run.timing = { trainSeconds: 0, trainSteps: 0, tokens: 0, valSeconds: 0, valSequences: 0 };
  const timing = run.timing;
  let stepStart = performance.now();
  let stepTrainSeconds = 0;
  /** @param {Error} [err] */
  const settle = (err) => {
    for (const w of run.pauseWaiters.splice(0)) (err ? w.reject(err) : w.resolve());
  };
  /** @param {any} report the wasm trainer's report of a finished step */
  const progress = (report) => {
    const t = performance.now();
    timing.tokens += report.tokens;
    timing.trainSteps += 1;
    timing.trainSeconds += stepTrainSeconds;
    stepTrainSeconds = 0;
    run.loss = report.loss;
    run.step = report.step;
    if (report.valLoss != null) run.valLoss = report.valLoss;
    const event = {
      ...report, valLoss: report.valLoss ?? undefined, skipped: report.skipped ?? undefined,
      tokensPerSec: timing.trainSeconds > 0 ? timing.tokens / timing.trainSeconds : 0,
      eta: eta(run, null), ms: t - stepStart, at: now(),
    };
    stepStart = t;
    run.history.push(event);
    post(run.id, 'progress', event);
  };
  /** @param {number} step @param {{ done: number, total: number, valLoss?: number | null }} p */
  const validationEvent = (step, p) => {
    const finished = p.done === p.total;
    post(run.id, 'validation', {
      step, done: p.done, total: p.total, valLoss: finished && p.valLoss != null ? p.valLoss : undefined,
      eta: eta(run, finished ? null : p), at: now(),
    });
  };
  try {
    for (;;) {
      // Safe points: between steps, and between validation sequences (a pause there does not
      // wait for a long validation; it goes on after resume()).
      if (wt.atSafePoint()) {
        for (const op of run.boundaryOps.splice(0)) {
          try { op.resolve(await withModel(op.fn)); } catch (err) { op.reject(err); }
        }
        if (wt.done()) {
          run.seconds = (run.seconds ?? 0) + (performance.now() - startedAt) / 1000;
          await persist(run, 'done');
          run.looping = false;
          setState(run, 'done');
          post(run.id, 'done', doneEvent(run, 'done'));
          settle();
          return;
        }
        if (run.want) {
          const action = run.want;
          run.want = null;
          if (action === 'stop') {
            // A running validation is dropped: the step is applied, its report goes out without
            // the validation loss, and the run stops now instead of after the pass.
            run.baseline = false;
            const report = wt.skipValidation();
            if (report) progress(report);
          }
          run.seconds = (run.seconds ?? 0) + (performance.now() - startedAt) / 1000;
          const state = action === 'pause' ? 'paused' : 'stopped';
          await persist(run, state);
          run.looping = false;
          setState(run, state);
          if (state === 'stopped') post(run.id, 'done', doneEvent(run, 'stopped'));
          settle();
          return;
        }
      }
      const t0 = performance.now();
      if (run.baseline) {
        // The base model's validation loss, a sequence at a time (step 0).
        const p = await withModel(() => wt.validateNext());
        timing.valSeconds += (performance.now() - t0) / 1000;
        timing.valSequences += p.done > 0 ? 1 : 0;
        if (p.done === p.total) {
          run.baseline = false;
          if (p.valLoss != null) {
            run.record.initialValLoss = p.valLoss;
            // Only the record (no checkpoint): losing this write loses just the chart's first point.
            await tstore.saveRun({ ...run.record, history: run.history }).catch(() => {});
          }
        }
        validationEvent(0, p);
        stepStart = performance.now();
      } else {
        const validation = wt.validationProgress();
        const report = await withModel(() => wt.advance());
        const seconds = (performance.now() - t0) / 1000;
        if (validation) {
          timing.valSeconds += seconds;
          timing.valSequences += 1;
          const p = { done: validation.done + 1, total: validation.total, valLoss: report?.valLoss };
          validationEvent(wt.step, p);
        } else {
          stepTrainSeconds += seconds;
        }
        if (report) {
          progress(report);
          if (run.checkpointEvery > 0 && report.step % run.checkpointEvery === 0 && report.step < report.totalSteps) {
            await persist(run, 'running');
          }
        }
      }
      await yieldToEvents();
    }
  } catch (err) {
    run.looping = false;
    if (await recoverRun(run)) return;
    const message = describe(err);
    run.state = 'error';
    run.record.state = 'error';
    run.record.error = message;
    tstore.saveRun({ ...run.record, updatedAt: Date.now(), history: run.history }).catch(() => {});
    post(run.id, 'state', { state: 'error' });
    const fatal = err instanceof WebAssembly.RuntimeError;
    // A trap (a Rust panic): the wasm memory can no longer be trusted, nothing else runs here.
    if (fatal) ctxFns.poison?.(`the wasm module crashed during training: ${message}`);
    post(run.id, 'error', { message, fatal });
    settle(new Error(message));
    for (const op of run.boundaryOps.splice(0)) op.reject(new Error(message));
  }
}

// ---- a lost WebGPU device ------------------------------------------------------------------
//
// A device can be lost at any moment (a driver reset, the GPU process crashing): every pass on
// it fails from then on. The failed pass lands in the loop's catch, which asks the session
// whether the device is lost (its device-lost callback, gpu_slot.rs). If so the session gets a
// new device, or the CPU when the browser grants none (`replaceGpu`), and each WebGPU run open
// here is reopened from its last stored checkpoint on it; the training run carries on from
// there, and the page hears why ('recovered'). The steps after that checkpoint run again.

/** How long a failed WebGPU pass waits for the device's loss to be reported (see recoverRun). */
const LOST_GRACE_MS = 2000;

// Counts device replacements: a WebGPU run made before the last one holds a dead device.
let gpuEpoch = 0;
/** @type {Promise<import('./protocol.js').InitResult> | null} */
let replacing = null;

/**
 * After a lost device: a new one for the session (once, however many callers notice the
 * loss) and every WebGPU run that is not training reopened on it. Resolves to the session's
 * backend now.
 */
export function replaceGpu() {
  replacing ??= withModel(async () => {
    const backend = await ctxFns.replaceGpu();
    gpuEpoch += 1;
    for (const run of runs.values()) if (!run.looping && onGpu(run)) await reopen(run);
    return backend;
  }).finally(() => { replacing = null; });
  return replacing;
}

/** @param {Run} run */
const onGpu = (run) => run.gpuEpoch !== gpuEpoch || run.wt.info().backend === 'webgpu';

/**
 * Reopens `run` from its stored checkpoint on the session's device as it is now (its trainer
 * held the lost one). The loop's state goes back to that checkpoint's step.
 * @param {Run} run
 */
async function reopen(run) {
  const { data, checkpoint } = await tstore.loadRunState(run.id);
  if (!data || !checkpoint) throw new Error(`run "${run.record.name}" has no stored ${data ? 'checkpoint' : 'data'} to continue from`);
  const wt = session().resumeTrainer(run.record.data.fileName, data, wasmConfig(run.record.config), checkpoint.bytes);
  run.wt.free();
  run.wt = wt;
  run.gpuEpoch = gpuEpoch;
  run.step = wt.step;
  run.lastCheckpoint = checkpoint.step;
  run.history = run.history.filter((p) => p.step <= checkpoint.step);
  Object.assign(run.record, { checkpointStep: checkpoint.step, step: wt.step, history: run.history });
  run.baseline = false;
}

/**
 * The loop's catch: when the run's pass failed because the WebGPU device was lost (or was
 * replaced meanwhile), continues the run from its last checkpoint on the new device or the CPU,
 * tells the page, and answers true; false for any other error.
 * @param {Run} run
 */
async function recoverRun(run) {
  if (!onGpu(run)) return false;
  const s = session();
  // The browser resolves the device's `lost` promise a moment after it is lost, and the pass
  // may fail first: on a loaded machine by tens of milliseconds or more (a failed readback's
  // map error came first in CI). So a failure on WebGPU waits up to LOST_GRACE_MS for the
  // loss to be reported before it counts as an ordinary error.
  let lost = s.gpuLost();
  const deadline = performance.now() + LOST_GRACE_MS;
  while (!lost && run.gpuEpoch === gpuEpoch && performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
    lost = s.gpuLost();
  }
  if (!lost && run.gpuEpoch === gpuEpoch) return false;
  let backend;
  try {
    // Replaced already (a generation noticed first): only this run is reopened.
    backend = lost ? await replaceGpu() : session().backend();
    await withModel(() => reopen(run));
  } catch (err) {
    console.error(`bitlora: could not recover run ${run.id} after the device loss: ${describe(err)}`);
    return false;
  }
  const kind = run.wt.info().backend;
  const reason = lost ?? 'the WebGPU device was lost';
  post(run.id, 'recovered', {
    step: run.step, backend: kind, reason, session: backend,
    message: `${reason[0].toUpperCase()}${reason.slice(1)}. Training continues from the checkpoint at step ${run.step} ` +
      `${kind === 'webgpu' ? 'on a new WebGPU device' : 'on the CPU'}; the steps after it run again.`,
  });
  run.looping = true;
  setState(run, 'running');
  loop(run);
  return true;
}

/**
 * 'trainValidate': the validation loss of the adapter as it is now. Before the first step that is
 * the base model's (LoRA's B starts at zero): it is kept with the run as `initialValLoss`, so a
 * run resumed after a reload still shows where it started from.
 */
/**
 * @param {RequestArgs<'trainValidate'>} args
 * @returns {Promise<RequestResult<'trainValidate'>>}
 */
export async function validate({ runId }) {
  const run = needRun(runId);
  const v = await atBoundary(run, () => run.wt.validate() ?? null);
  if (run.wt.step === 0 && Number.isFinite(v) && run.record.initialValLoss !== v) {
    run.record.initialValLoss = v;
    run.baseline = false; // the loop need not measure it again
    // Only the record (no checkpoint): losing this write loses just the chart's first point.
    await tstore.saveRun({ ...run.record, history: run.history }).catch(() => {});
  }
  return v;
}

/** 'trainDispose': frees the run's wasm memory (its stored record and checkpoint stay). */
/** @param {RequestArgs<'trainDispose'>} args */
export async function dispose({ runId }) {
  const run = runs.get(runId);
  if (!run) return;
  if (run.looping) await control({ runId, action: 'pause' });
  runs.delete(runId);
  run.wt.free();
}

/** Runs in the store; a 'running' run that is not running in this worker was interrupted. */
/** @returns {Promise<RequestResult<'listRuns'>>} */
export async function listRuns() {
  return (await tstore.listRuns()).map(summary);
}

/**
 * @param {any} r a run record of the training store (training-store.js)
 * @returns {import('./bitlora.js').RunSummary}
 */
function summary(r) {
  const live = runs.get(r.id);
  let state = live ? live.state : r.state;
  if (state === 'running' && !live?.looping) state = 'interrupted';
  if (state === 'ready' && !live) state = 'paused';
  const { history, resolved, ...rest } = r;
  return { ...rest, state, config: { ...r.config } };
}

/**
 * @param {RequestArgs<'getRun'>} args
 * @returns {Promise<RequestResult<'getRun'>>}
 */
export async function getRun({ runId }) {
  const r = await tstore.getRun(runId);
  if (!r) throw new Error(`no training run ${runId} in this browser`);
  const live = runs.get(runId);
  return { ...summary(r), history: live ? live.history : (r.history ?? []) };
}

/** @param {RequestArgs<'deleteRun'>} args */
export async function deleteRun({ runId }) {
  if (runs.has(runId)) {
    const run = runs.get(runId);
    if (run.looping) await control({ runId, action: 'stop' });
    runs.delete(runId);
    run.wt.free();
  }
  await tstore.deleteRun(runId);
}

// ---- adapters -------------------------------------------------------------------------------

/** @param {string} configText adapter_config.json */
function adapterInfoFromConfig(configText) {
  const c = JSON.parse(configText);
  return {
    r: c.r, alpha: c.lora_alpha, dropout: c.lora_dropout ?? 0, rslora: Boolean(c.use_rslora),
    targets: Array.isArray(c.target_modules) ? c.target_modules : [c.target_modules],
  };
}

/** @param {unknown} name */
function checkName(name) {
  if (typeof name !== 'string' || !name.trim()) throw new Error('an adapter needs a name (a non-empty string)');
  if (name.length > 200) throw new Error('adapter names are at most 200 characters');
  return name.trim();
}

/**
 * An adapter as the training store keeps it: its description and its PEFT files.
 * @typedef {import('./bitlora.js').AdapterInfo & { config: string, weights: Uint8Array }} StoredAdapter
 */

/** 'trainSaveAdapter': the run's adapter as it is now, stored under `name` (replacing one). */
/**
 * @param {RequestArgs<'trainSaveAdapter'>} args
 * @returns {Promise<RequestResult<'trainSaveAdapter'>>}
 */
export async function saveAdapter({ runId, name }) {
  const run = needRun(runId);
  name = checkName(name);
  const entry = await atBoundary(run, /** @returns {Promise<StoredAdapter>} */ async () => {
    const files = await run.wt.adapterFiles(run.record.model.name ?? '');
    const info = run.wt.info();
    return {
      name, source: 'trained', createdAt: Date.now(), model: run.record.model,
      ...adapterInfoFromConfig(files.config), params: info.adapterParams,
      bytes: files.weights.length + files.config.length, runId: run.id, step: run.wt.step,
      config: files.config, weights: files.weights,
    };
  });
  await tstore.putAdapter(entry);
  session().removeAdapter(name); // a cached older version
  const { config, weights, ...info } = entry;
  return info;
}

/** @returns {Promise<RequestResult<'listAdapters'>>} */
export function listAdapters() {
  return tstore.listAdapters();
}

/** @param {string} name */
async function needAdapter(name) {
  const a = await tstore.getAdapter(name);
  if (!a) throw new Error(`no adapter named "${name}" in this browser`);
  return a;
}

/**
 * 'exportAdapter': files [{ name, bytes }] for download: PEFT (adapter_config.json +
 * adapter_model.safetensors), or with `format: 'gguf'` one GGUF LoRA adapter for llama.cpp
 * (`target: 'llama'`) or QVAC Fabric's BitNet graph ('qvac'), written by core's
 * gguf::write_adapter as `bitlora export --format gguf --target ...` writes it. GGUF needs the
 * adapter's base model loaded (its shapes; for 'qvac' its weight scales).
 * @param {RequestArgs<'exportAdapter'>} args
 * @returns {Promise<RequestResult<'exportAdapter'>>}
 */
export async function exportAdapter({ name, format = 'peft', target = 'llama', arch }) {
  const a = await needAdapter(name);
  if (format === 'gguf') {
    const model = currentModel('export an adapter as GGUF');
    // QVAC's B is folded with the base model's weight scales: they must be that model's.
    if (target === 'qvac' && a.model?.key && a.model.key !== model.key) {
      throw new Error(`adapter "${name}" was made for ${a.model.name}, but ${model.name ?? model.key} is loaded: load ${a.model.name} to export it for QVAC (its B is scaled by the base model's weight scales)`);
    }
    const bytes = session().adapterGguf(new TextEncoder().encode(a.config), a.weights, target, arch);
    const stem = String(name).replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^-+|-+$/g, '') || 'adapter';
    return [{ name: `${stem}-${target}.gguf`, bytes }];
  }
  if (format !== 'peft') throw new Error(`format is ${JSON.stringify(format)}; an adapter exports as "peft" or "gguf"`);
  return [
    { name: 'adapter_config.json', bytes: new TextEncoder().encode(a.config) },
    { name: 'adapter_model.safetensors', bytes: a.weights },
  ];
}

/**
 * 'importAdapter': PEFT files (File objects or { name, bytes }), validated against the loaded
 * model, stored under `name`. An existing name is refused (delete it first).
 */
/**
 * @param {RequestArgs<'importAdapter'>} args
 * @returns {Promise<RequestResult<'importAdapter'>>}
 */
export async function importAdapter({ files, name }) {
  const model = currentModel('import an adapter');
  const list = Array.from(files ?? []);
  const read = async (/** @type {File | import('./bitlora.js').PeftFile} */ f) =>
    ('bytes' in f && f.bytes instanceof Uint8Array ? f.bytes : new Uint8Array(await /** @type {File} */ (f).arrayBuffer()));
  const cfg = list.find((f) => f.name === 'adapter_config.json') ?? list.find((f) => f.name.endsWith('.json'));
  const st = list.find((f) => f.name === 'adapter_model.safetensors') ?? list.find((f) => f.name.endsWith('.safetensors'));
  if (!cfg || !st) {
    const got = list.map((f) => f.name).join(', ') || 'nothing';
    throw new Error(`a PEFT adapter is two files, adapter_config.json and adapter_model.safetensors; got ${got}`);
  }
  if (list.some((f) => f.name.endsWith('.bin'))) {
    throw new Error('adapter_model.bin (PyTorch pickle) is not supported: save the adapter with safetensors (PEFT does by default)');
  }
  const [cfgBytes, stBytes] = await Promise.all([read(cfg), read(st)]);
  const info = session().checkAdapter(cfg.name, cfgBytes, st.name, stBytes);
  name = checkName(name ?? 'imported adapter');
  if (await tstore.getAdapter(name)) throw new Error(`an adapter named "${name}" already exists; delete it or import under another name`);
  const { baseModel, ...fields } = info;
  /** @type {StoredAdapter} */
  const entry = {
    name, source: 'imported', createdAt: Date.now(), model: { key: model.key, name: model.name ?? model.key },
    ...fields, bytes: cfgBytes.length + stBytes.length, config: new TextDecoder().decode(cfgBytes), weights: stBytes,
  };
  await tstore.putAdapter(entry);
  session().removeAdapter(name);
  const { config, weights, ...out } = entry;
  return out;
}

/** @param {RequestArgs<'deleteAdapter'>} args */
export async function deleteAdapter({ name }) {
  await tstore.deleteAdapter(name);
  session().removeAdapter(name);
}

/** Makes the stored adapter `name` available to generation (validated against the loaded model). */
/** @param {string | null} name */
export async function useAdapter(name) {
  if (name == null) return;
  if (session().hasAdapter(name)) return;
  const a = await needAdapter(name);
  try {
    session().addAdapter(name, new TextEncoder().encode(a.config), a.weights);
  } catch (err) {
    throw new Error(`adapter "${name}" does not fit the loaded model: ${describe(err)}`);
  }
}

/** 'deleteTrainingData': every run (stopped first) and adapter. */
export async function deleteAll() {
  for (const [id, run] of runs) {
    if (run.looping) await control({ runId: id, action: 'stop' }).catch(() => {});
    run.wt.free();
  }
  runs.clear();
  await tstore.deleteAll();
}

