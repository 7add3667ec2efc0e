// @ts-check
// The fine-tuning panel: presets and settings, a live memory estimate checked against the
// device before start, start / pause / resume / stop, a progress bar with ETA, the live loss
// chart, checkpoints to IndexedDB every N steps, and after a reload an offer to resume the
// stored run. The training itself runs in the worker (web/bitlora.js's Trainer); this module
// only shows it.
//
// Published for tests: <body data-train="idle|starting|running|paused|stopped|done|error"> and
// window.__bitlora.training = { state, runId, step, totalSteps, loss, valLoss, checkpointStep,
// resumedFrom, points: { train: [[step, loss]...], val }, progressEvents, done, error, memory,
// config, backend }.

import { $, $$, control, showError, clearError, debounce, message, readNumber, inputError, started } from './dom.js';
import { fmtBytes, fmtSeconds, fmtInt, fmtLoss, fmtRate, fmtDate, fmtLr, plural } from './format.js';
import { PRESETS, ALL_TARGETS, matchPreset } from './presets.js';
import { LossChart, smooth } from '../chart.js';

// Training speed assumed before any run was measured: target tokens a second (the default model
// on a laptop CPU; see presets.js). Only used for the presets' time estimate.
const ASSUMED_RATE = { cpu: 150, webgpu: 150 };
// Data below this many target tokens, or a run of more than this many passes over it, gets a
// warning at the data (step 2): it would be memorised, not learnt from.
const MIN_TOKENS = 200;
const MAX_EPOCHS = 10;
const TARGET_LABELS = { q_proj: 'q', k_proj: 'k', v_proj: 'v', o_proj: 'o', gate_proj: 'gate', up_proj: 'up', down_proj: 'down' };

/** @typedef {'rank' | 'alpha' | 'lr' | 'length' | 'context' | 'batch' | 'evalEvery' | 'checkpointEvery'} NumberField */
/** @type {[id: string, key: NumberField, label: string, options: { integer?: boolean, min?: number, max?: number }][]} */
const FIELDS = [
  // [input id, config key, label, readNumber options]
  ['train-rank', 'rank', 'Rank', { integer: true, min: 1, max: 256 }],
  ['train-alpha', 'alpha', 'Alpha', { min: 0 }],
  ['train-lr', 'lr', 'Learning rate', { min: 0, max: 1 }],
  ['train-length', 'length', 'Length', { min: 0 }],
  ['train-context', 'context', 'Context', { integer: true, min: 2 }],
  ['train-batch', 'batch', 'Batch', { integer: true, min: 1, max: 4096 }],
  ['train-eval', 'evalEvery', 'Validate every', { integer: true, min: 0 }],
  ['train-ckpt', 'checkpointEvery', 'Checkpoint every', { integer: true, min: 0 }],
];

/**
 * `app`: { client(), model(), state, publish(), bus, data (the data panel), lastRate }.
 * Returns { trainer(), readConfig(), options(), offerResume(), beforeDeleteAll() }.
 * @param {import('./panels.js').App} app
 */
export function mountTrainPanel(app) {
  const chart = new LossChart($('loss-chart'), { summary: $('chart-summary') });
  /**
   * window.__bitlora.training (see the header).
   * @type {{ state: string, points: typeof chart.points, progressEvents: number, runId?: string | null, step?: number,
   *   totalSteps?: number, loss?: number | null, valLoss?: number | null, checkpointStep?: number | null,
   *   checkpointBytes?: number, resumedFrom?: number | null, done?: import('../bitlora.js').DoneEvent | null,
   *   error?: string | null, memory?: import('../bitlora.js').MemoryEstimate | null,
   *   config?: import('../bitlora.js').Trainer['config'], backend?: string, adapterParams?: number, stepMs?: number,
   *   tokensPerSec?: number, eta?: number, dataWarning?: string | null, storedRuns?: number, offered?: { id: string, step: number | null, totalSteps: number } | null }}
   */
  const t = { state: 'idle', points: chart.points, progressEvents: 0 };
  app.state.training = t;
  let trainer = null;
  let unsubscribe = [];
  let memory = null; // the last MemoryEstimate, for the config it was made for
  let memoryKey = '';
  let measuredRate = null; // target tokens/s of this tab's last run
  let busy = false; // a button's request in flight
  let offered = null; // the RunSummary offered for resuming

  const setState = (s) => {
    t.state = s;
    document.body.dataset.train = s;
    sync();
    app.publish();
  };

  // ---- the form -------------------------------------------------------------------------

  /** @returns {Record<NumberField, number> & { unit: string, targets: string[] }} */
  function values() {
    // Every NumberField is set by the loop, unit and targets after it.
    const v = /** @type {Record<NumberField, number> & { unit: string, targets: string[] }} */ ({});
    for (const [id, key] of FIELDS) v[key] = $(id, HTMLInputElement).value.trim() === '' ? NaN : Number($(id, HTMLInputElement).value);
    v.unit = $('train-unit', HTMLSelectElement).value;
    v.targets = $$('#train-form input[name="target"]:checked', HTMLInputElement).map((i) => i.value);
    return v;
  }

  /** @param {string} name */
  function applyPreset(name) {
    const p = PRESETS[/** @type {keyof typeof PRESETS} */ (name)];
    if (!p) return;
    for (const [id, key] of FIELDS) $(id, HTMLInputElement).value = String(p[key]);
    $('train-unit', HTMLSelectElement).value = p.unit;
    for (const box of $$('#train-form input[name="target"]', HTMLInputElement)) box.checked = p.targets.includes(box.value);
    describePreset();
    changed();
  }

  /**
   * The form as a TrainConfig (without the data); throws an inputError naming the field.
   * @returns {import('../bitlora.js').TrainConfig}
   */
  function readConfig() {
    // Every NumberField is set by the loop (readNumber throws rather than leave one out).
    const c = /** @type {Record<NumberField, number>} */ ({});
    for (const [id, key, label, opts] of FIELDS) c[key] = readNumber(id, label, opts);
    const unit = $('train-unit', HTMLSelectElement).value;
    if (unit === 'steps' && !Number.isInteger(c.length)) throw inputError('train-length', `Length: a whole number of steps (got ${c.length})`);
    if (c.length <= 0) throw inputError('train-length', `Length: at least 1 ${unit === 'steps' ? 'step' : 'epoch'}`);
    const targets = $$('#train-form input[name="target"]:checked', HTMLInputElement).map((i) => i.value);
    if (!targets.length) throw inputError('train-target-q', 'Layers: tick at least one layer to put an adapter on');
    const model = app.model();
    if (model && c.context > model.maxPositions) {
      throw inputError('train-context', `Context: at most ${model.maxPositions} tokens, this model's context (got ${c.context})`);
    }
    const { length, ...rest } = c;
    const steps = unit === 'steps' ? length : undefined;
    // Warm up over the first 5% of steps (at most 20), then cosine decay, as most LoRA recipes do.
    const warmup = steps ? Math.min(20, Math.floor(steps * 0.05)) : 10;
    // The checkboxes' values are the projection names (index.html), LoraTargets all.
    const loraTargets = /** @type {import('../bitlora.js').LoraTarget[]} */ (targets);
    return { ...rest, ...(unit === 'steps' ? { steps: length } : { epochs: length }), targets: loraTargets, schedule: 'cosine', warmup };
  }

  /** Context and batch for the data panel's counts (the form's values, or the defaults). */
  function options() {
    const ctx = Number($('train-context', HTMLInputElement).value);
    const batch = Number($('train-batch', HTMLInputElement).value);
    return {
      // A context the model cannot take is the training form's error (at the Context field); the
      // data is counted with the default meanwhile, so the data panel shows no second error.
      context: Number.isInteger(ctx) && ctx >= 2 && ctx <= (app.model()?.maxPositions ?? Infinity) ? ctx : 64,
      batch: Number.isInteger(batch) && batch >= 1 ? batch : 1,
    };
  }

  function describePreset() {
    const v = values();
    const name = matchPreset(v);
    const radio = $$(`#train-form input[name="preset"][value="${name}"]`, HTMLInputElement)[0];
    if (radio) radio.checked = true;
    const summary = app.data.summary();
    const steps = v.unit === 'steps' ? v.length : summary ? Math.ceil(v.length * summary.stepsPerEpoch) : null;
    const perSeq = summary && summary.trainSequences ? summary.trainTargetTokens / summary.trainSequences : v.context;
    const tokens = steps ? steps * v.batch * perSeq : null;
    const backend = app.client()?.backend?.training ?? 'cpu';
    const rate = measuredRate ?? ASSUMED_RATE[backend];
    const parts = [];
    parts.push(`Rank ${v.rank} on ${v.targets.map((x) => TARGET_LABELS[x] ?? x).join(', ') || 'no layers'}`);
    parts.push(steps ? `${plural(steps, 'step')} of ${v.batch} × ${v.context} tokens` : `${v.length} epochs of ${v.batch} × ${v.context} tokens`);
    parts.push(`learning rate ${fmtLr(v.lr)}`);
    if (tokens) {
      parts.push(`about ${fmtSeconds(tokens / rate)}` +
        (measuredRate ? ` at this tab's measured ${fmtRate(measuredRate)}` : ` at a typical ${fmtRate(rate)}`));
    }
    $('preset-hint').textContent = parts.join(' · ') + '.';
    warnSmallData(summary, steps);
  }

  /**
   * Data too small for the settings: the run would go over it many times and learn it by heart
   * (3 tokens trained for 60 steps reach loss 0.004 and say nothing). Said in step 2, at the data.
   * @param {import('../bitlora.js').DataSummary | null} summary
   * @param {number | null} steps
   */
  function warnSmallData(summary, steps) {
    const el = $('data-warning');
    const epochs = summary && steps && summary.stepsPerEpoch > 0 ? steps / summary.stepsPerEpoch : null;
    let text = '';
    if (summary && summary.targetTokens < MIN_TOKENS) {
      text = `Only ${plural(summary.targetTokens, 'token')} to learn from: too little to teach the model anything; ` +
        `it would repeat this text by heart. Add more (a few thousand tokens at least).`;
    } else if (epochs != null && epochs > MAX_EPOCHS) {
      text = `Your data is small for these settings: ${plural(steps ?? 0, 'step')} go over it ${Math.round(epochs)} times, ` +
        `so the model learns it by heart rather than its style. Add more data, or make the run shorter in step 3's Settings ` +
        `(about ${plural(Math.max(1, Math.round(summary?.stepsPerEpoch ?? 1) * 3), 'step')} is plenty for this much).`;
    }
    el.textContent = text;
    el.hidden = !text;
    t.dataWarning = text || null;
  }

  const estimate = debounce(async () => {
    const client = app.client();
    if (!client || !app.model()) return;
    let config;
    try {
      config = readConfig();
    } catch (err) {
      showMemory(null, err.message);
      return;
    }
    const key = JSON.stringify(config) + (app.model()?.key ?? '');
    try {
      const est = await client.estimateMemory(config);
      if (JSON.stringify(readConfigSafe()) + (app.model()?.key ?? '') !== key) return; // changed meanwhile
      memory = est;
      memoryKey = key;
      showMemory(est);
    } catch (err) {
      memory = null;
      showMemory(null, `Memory estimate: ${message(err)}`);
    }
    sync();
  }, 250);

  const readConfigSafe = () => { try { return readConfig(); } catch { return null; } };

  /**
   * @param {import('../bitlora.js').MemoryEstimate | null} est
   * @param {string | null} [problem]
   */
  function showMemory(est, problem = null) {
    const el = $('mem-estimate');
    t.memory = est;
    if (!est) {
      el.className = 'summary bad';
      el.textContent = problem;
      return;
    }
    let where;
    if (est.backend === 'webgpu') {
      const parts = [];
      if (Number.isFinite(est.limit)) parts.push(`this GPU allows about ${fmtBytes(est.limit)}`);
      if (est.maxBinding) parts.push(`a GPU buffer may hold ${fmtBytes(est.maxBinding)}, this run's largest holds ${fmtBytes(est.largestBuffer)}`);
      where = parts.join('; ') || 'the GPU did not say its limits';
    } else {
      where = `the CPU backend can use about ${fmtBytes(est.limit)} (WebAssembly memory)`;
    }
    const head = `Memory: about ${fmtBytes(est.total)} (model ${fmtBytes(est.weights)}, adapter and optimizer ${fmtBytes(est.adapter)} for ` +
      `${fmtInt(est.adapterParams)} parameters, activations ${fmtBytes(est.activations)}); ${where}`;
    el.className = `summary ${est.fits ? 'ok' : 'bad'}`;
    el.textContent = est.fits ? `${head}: fits.` : `${head}: does not fit. ${est.message ?? 'Lower the context, the batch or the rank.'}`;
  }

  function changed() {
    describePreset();
    estimate();
    app.bus.dispatchEvent(new Event('train-options'));
    clearError('train-error', $('train-form', HTMLFormElement));
  }

  $('train-form', HTMLFormElement).addEventListener('input', (event) => {
    if (control(event).name === 'preset') return;
    control(event).removeAttribute?.('aria-invalid');
    changed();
  });
  $('train-form', HTMLFormElement).addEventListener('change', (event) => {
    if (control(event).name !== 'preset') return;
    if (control(event).value === 'custom') $('train-settings', HTMLDetailsElement).open = true;
    else applyPreset(control(event).value);
  });
  $('train-form', HTMLFormElement).addEventListener('submit', (event) => {
    event.preventDefault();
    start();
  });
  $('train-pause', HTMLButtonElement).addEventListener('click', () => act('pause'));
  $('train-resume', HTMLButtonElement).addEventListener('click', () => act('resume'));
  $('train-stop', HTMLButtonElement).addEventListener('click', () => act('stop'));
  $('resume-run', HTMLButtonElement).addEventListener('click', () => resumeStored());
  $('resume-discard', HTMLButtonElement).addEventListener('click', () => discardStored());
  app.bus.addEventListener('data', () => { describePreset(); sync(); });
  app.bus.addEventListener('model', () => { estimate.now(); offerResume(); sync(); });
  // The first target checkbox gets an id so an error about the targets can point at it.
  $$('#train-form input[name="target"]', HTMLInputElement)[0].id = 'train-target-q';

  // ---- controls ---------------------------------------------------------------------------

  function sync() {
    const s = trainer?.state;
    const active = s === 'running' || s === 'paused' || t.state === 'starting';
    const ready = Boolean(app.client() && app.model());
    const dataOk = app.state.data?.state === 'ok';
    const fits = memory ? memory.fits : true;
    $('train-start', HTMLButtonElement).disabled = busy || active || !ready || !dataOk || !fits;
    const dataState = app.state.data?.state;
    $('train-start', HTMLButtonElement).title = !ready ? 'Waiting for the model' : !fits ? 'Does not fit in memory: see the estimate in Settings'
      : dataState === 'checking' ? 'Checking the training data…' : dataState === 'error' ? 'Fix the problem with your data first (step 2)'
        : !dataOk ? 'Add your data first (step 2)' : '';
    // Pause, Resume and Stop only while there is a run to act on.
    $('train-controls').hidden = !(s === 'running' || s === 'paused');
    // The loss chart once there is a run to draw.
    $('chart-wrap').hidden = !trainer;
    // A configuration that does not fit opens the settings, where the estimate says why.
    if (!fits && !active) $('train-settings', HTMLDetailsElement).open = true;
    $('train-pause', HTMLButtonElement).disabled = busy || s !== 'running';
    $('train-resume', HTMLButtonElement).disabled = busy || s !== 'paused';
    $('train-stop', HTMLButtonElement).disabled = busy || !(s === 'running' || s === 'paused');
    for (const el of $$('input, select', HTMLElement, $('train-form', HTMLFormElement))) {
      /** @type {HTMLInputElement | HTMLSelectElement} */ (el).disabled = active;
    }
    $('resume-run', HTMLButtonElement).disabled = busy || active || !ready;
    $('resume-discard', HTMLButtonElement).disabled = busy || active;
    app.bus.dispatchEvent(new Event('trainer'));
  }

  async function act(what) {
    if (!trainer) return;
    busy = true;
    sync();
    if (what === 'pause') $('train-stats').textContent += ' · pausing after this step…';
    if (what === 'stop') $('train-stats').textContent += ' · stopping after this step…';
    try {
      await trainer[what]();
    } catch (err) {
      fail(`Could not ${what}: ${message(err)}`);
    } finally {
      busy = false;
      if (trainer) setState(trainer.state);
    }
  }

  function fail(msg, inputId = null) {
    t.error = msg;
    showError('train-error', msg, inputId);
  }

  // ---- a run ------------------------------------------------------------------------------

  async function start() {
    clearError('train-error', $('train-form', HTMLFormElement));
    const client = app.client();
    if (!client) return;
    let config;
    try {
      config = readConfig();
    } catch (err) {
      fail(err.message, err.inputId);
      return;
    }
    busy = true;
    // Until the new run exists, nothing of the previous one is reported as current.
    Object.assign(t, { runId: null, step: 0, checkpointStep: null, resumedFrom: null, done: null, error: null });
    setState('starting');
    try {
      const data = await app.data.check();
      if (!data) throw new Error('Training data: add some text or a file above (and fix what it says there) first');
      // The estimate is checked again for exactly this config, so nothing that does not fit starts.
      const est = await client.estimateMemory(config);
      memory = est;
      showMemory(est);
      if (!est.fits) throw new Error(`Not enough memory for these settings: ${est.message ?? `needs ${fmtBytes(est.total)}, about ${fmtBytes(est.limit)} available`}`);
      const tr = await client.createTrainer({ ...data.options, ...config, data: data.input });
      attach(tr, { resumed: false });
      // The run first measures the base model's validation loss ('validation' events, step 0).
      await tr.start();
      busy = false;
      setState(tr.state);
    } catch (err) {
      busy = false;
      fail(message(err));
      setState('error');
    }
  }

  /** Shows `tr`: its history on the chart, its events as they come. */
  function attach(tr, { resumed }) {
    for (const off of unsubscribe) off();
    if (trainer && trainer !== tr) trainer.dispose().catch(() => {});
    trainer = tr;
    app.trainer = tr;
    Object.assign(t, {
      runId: tr.runId, step: tr.step, totalSteps: tr.totalSteps, loss: null, valLoss: null,
      checkpointStep: resumed ? tr.step : null, resumedFrom: resumed ? tr.step : null, done: null, error: null,
      config: tr.config, backend: tr.backend, progressEvents: 0, adapterParams: tr.adapterParams,
    });
    chart.clear();
    chart.setTotalSteps(tr.totalSteps);
    if (Number.isFinite(tr.initialValLoss)) plot({ step: 0, valLoss: tr.initialValLoss });
    for (const p of tr.history ?? []) plot(p);
    t.points = chart.points;
    $('train-meter').hidden = false;
    $('train-progress', HTMLProgressElement).max = Math.max(tr.totalSteps, 1);
    $('train-progress', HTMLProgressElement).value = tr.step;
    const startedAt = performance.now();
    $('train-stats').textContent = resumed
      ? `Resumed from the checkpoint at step ${tr.step} of ${tr.totalSteps}…`
      : `Starting: ${plural(tr.totalSteps, 'step')} on ${tr.backend === 'webgpu' ? 'WebGPU' : 'the CPU'}…`;
    unsubscribe = [
      tr.on('progress', (p) => {
        t.progressEvents++;
        plot(p);
        Object.assign(t, { step: p.step, totalSteps: p.totalSteps, loss: p.loss, stepMs: p.ms, tokensPerSec: p.tokensPerSec, eta: p.eta });
        if (p.valLoss != null) t.valLoss = p.valLoss;
        if (p.tokensPerSec > 0) measuredRate = p.tokensPerSec;
        $('train-progress', HTMLProgressElement).max = Math.max(p.totalSteps, 1);
        $('train-progress', HTMLProgressElement).value = p.step;
        const parts = [`Step ${fmtInt(p.step)} / ${fmtInt(p.totalSteps)}`, `loss ${fmtLoss(p.loss)}`];
        if (t.valLoss != null) parts.push(`validation ${fmtLoss(t.valLoss)}`);
        if (p.tokensPerSec > 0) parts.push(fmtRate(p.tokensPerSec));
        parts.push(p.step >= p.totalSteps ? 'finishing…' : `ETA ${fmtSeconds(p.eta)}`);
        if (t.checkpointStep != null) parts.push(`checkpoint at step ${t.checkpointStep}`);
        if (p.skipped) parts.push(`step skipped: ${p.skipped}`);
        $('train-stats').textContent = parts.join(' · ');
        app.bus.dispatchEvent(new Event('progress'));
        app.publish();
      }),
      tr.on('validation', (v) => {
        const finished = v.done === v.total;
        if (finished && v.step === 0 && v.valLoss != null && Number.isFinite(v.valLoss)) {
          chart.add('val', 0, v.valLoss);
          t.points = chart.points;
          t.valLoss = v.valLoss;
        }
        const what = v.step === 0 ? 'Measuring the validation loss before training' : `Validating after step ${fmtInt(v.step)} of ${fmtInt(tr.totalSteps)}`;
        const parts = [finished ? `${what}: done` : `${what}: ${fmtInt(v.done)} / ${plural(v.total, 'sequence')}`];
        if (finished && v.valLoss != null) parts.push(`validation ${fmtLoss(v.valLoss)}`);
        if (v.eta > 0) parts.push(`ETA ${fmtSeconds(v.eta)}`);
        $('train-stats').textContent = parts.join(' · ');
        app.publish();
      }),
      tr.on('checkpoint', (c) => {
        if (c.error) {
          // Not stored (e.g. browser storage full): training goes on, the last stored one stays.
          showError('train-error', `The checkpoint of step ${fmtInt(c.step)} was not stored: ${c.error}. Training goes on` +
            (t.checkpointStep != null ? `; the last stored checkpoint is at step ${fmtInt(t.checkpointStep)}.` : '.'));
          return;
        }
        t.checkpointStep = c.step;
        t.checkpointBytes = c.bytes;
        app.publish();
      }),
      tr.on('recovered', (e) => {
        t.checkpointStep = e.step;
        showError('train-error', e.message);
        app.publish();
      }),
      tr.on('state', ({ state }) => {
        if (state === 'paused') {
          t.step = tr.step;
          $('train-progress', HTMLProgressElement).value = tr.step;
          $('train-stats').textContent = `Paused at step ${fmtInt(tr.step)} of ${fmtInt(tr.totalSteps)}` +
            (t.checkpointStep != null ? ` · checkpoint at step ${t.checkpointStep} (kept if you close the tab)` : '') + ' · Resume continues from here.';
        }
        setState(state);
      }),
    ];
    tr.finished.then((d) => {
      if (trainer !== tr) return;
      t.done = d;
      const secs = (performance.now() - startedAt) / 1000;
      $('train-progress', HTMLProgressElement).value = d.step;
      // The same figures as the chart's summary: the smoothed training loss (the last step's alone
      // jumps around), and for a resumed run how many steps ran in this tab and for how long.
      const train = chart.points.train.map((p) => p[1]);
      const smoothed = train.length ? smooth(train).at(-1) : d.loss;
      const here = resumed && t.resumedFrom != null ? ` (resumed at step ${fmtInt(t.resumedFrom)}: ${plural(d.step - t.resumedFrom, 'step')} in ${fmtSeconds(d.seconds ?? secs)})` : ` in ${fmtSeconds(d.seconds ?? secs)}`;
      $('train-stats').textContent = `${d.reason === 'done' ? 'Done' : 'Stopped'}: ${plural(d.step, 'step')} of ${fmtInt(d.totalSteps)}${here}` +
        (smoothed != null ? ` · training loss ${fmtLoss(smoothed)}${train.length > 1 ? ' (smoothed)' : ''}` : '') + (d.valLoss != null ? ` · validation loss ${fmtLoss(d.valLoss)}` : '') +
        (d.step > 0 ? ' · Next: save the adapter below, then chat with it in step 4.' : ' · No step ran, so there is no adapter to save.');
      setState(d.reason === 'done' ? 'done' : 'stopped');
      describePreset(); // the time estimate now uses this run's measured speed
      app.bus.dispatchEvent(new Event('trained'));
    }, (err) => {
      if (trainer !== tr) return;
      fail(`Training failed: ${message(err)}`);
      setState('error');
    });
    hideOffer();
    describePreset();
    setState(tr.state);
  }

  function plot(p) {
    if (Number.isFinite(p.loss) && !p.skipped) chart.add('train', p.step, p.loss);
    if (p.valLoss != null && Number.isFinite(p.valLoss)) chart.add('val', p.step, p.valLoss);
    t.points = chart.points;
  }

  /** Fills the form from a run's config (a resumed run shows what it trains with). */
  function showConfig(c) {
    const set = (/** @type {string} */ id, /** @type {unknown} */ v) => { if (v != null) $(id, HTMLInputElement).value = String(v); };
    set('train-rank', c.rank);
    set('train-alpha', c.alpha);
    set('train-lr', c.lr);
    set('train-context', c.context);
    set('train-batch', c.batch);
    set('train-eval', c.evalEvery);
    set('train-ckpt', c.checkpointEvery);
    if (c.epochs) {
      $('train-unit', HTMLSelectElement).value = 'epochs';
      set('train-length', c.epochs);
    } else {
      $('train-unit', HTMLSelectElement).value = 'steps';
      set('train-length', c.steps);
    }
    const targets = c.targets?.includes('all-linear') ? ALL_TARGETS : c.targets ?? [];
    for (const box of $$('#train-form input[name="target"]', HTMLInputElement)) box.checked = targets.includes(box.value);
    describePreset();
  }

  // ---- resuming a stored run after a reload ---------------------------------------------

  async function offerResume() {
    const client = app.client();
    if (!client || trainer) return;
    let runs;
    try {
      runs = await client.listRuns();
    } catch (err) {
      console.warn(`bitlora: cannot list stored training runs: ${message(err)}`);
      return;
    }
    const resumable = runs
      .filter((r) => ['paused', 'interrupted', 'running'].includes(r.state) && r.checkpointStep != null && r.checkpointStep < r.totalSteps)
      .sort((a, b) => b.updatedAt - a.updatedAt);
    t.storedRuns = runs.length;
    offered = resumable[0] ?? null;
    t.offered = offered ? { id: offered.id, step: offered.checkpointStep, totalSteps: offered.totalSteps } : null;
    if (!offered || trainer) return hideOffer();
    const r = offered;
    const how = r.state === 'paused' ? 'was paused' : 'was interrupted (the tab closed or reloaded)';
    const losses = [r.loss != null ? `training loss ${fmtLoss(r.loss)}` : null, r.valLoss != null ? `validation loss ${fmtLoss(r.valLoss)}` : null].filter(Boolean);
    const data = r.data?.fileName && !String(r.name).includes(r.data.fileName) ? ` on ${r.data.fileName}` : '';
    $('resume-text').textContent =
      `A training run ${how}: “${r.name}”${data}, ${r.model?.name ?? r.model?.key}, started ${fmtDate(r.createdAt)}. ` +
      `Its checkpoint is at step ${fmtInt(r.checkpointStep)} of ${fmtInt(r.totalSteps)}${losses.length ? ` (${losses.join(', ')})` : ''}. ` +
      'Resume it from there?' + (runs.length > 1 ? ` (${plural(runs.length, 'run')} stored in this browser.)` : '');
    $('resume-offer').hidden = false;
    document.body.dataset.resumable = 'yes';
    app.publish();
  }

  function hideOffer() {
    $('resume-offer').hidden = true;
    document.body.dataset.resumable = 'no';
  }

  async function resumeStored() {
    if (!offered) return;
    const client = app.client();
    busy = true;
    clearError('train-error');
    setState('starting');
    $('resume-text').textContent = `Loading the run's checkpoint (step ${offered.checkpointStep})…`;
    try {
      const tr = await started(client).resumeTrainer(offered.id);
      showConfig(tr.config);
      attach(tr, { resumed: true });
      await tr.start();
      busy = false;
      setState(tr.state);
    } catch (err) {
      busy = false;
      fail(`Could not resume the stored run: ${message(err)}`);
      $('resume-text').textContent = 'The stored run could not be resumed (see the problem below); discard it or try again.';
      setState('error');
    }
  }

  async function discardStored() {
    if (!offered) return;
    busy = true;
    sync();
    try {
      await started(app.client()).deleteRun(offered.id);
      hideOffer();
      offered = null;
      await offerResume();
    } catch (err) {
      fail(`Could not discard the stored run: ${message(err)}`);
    } finally {
      busy = false;
      sync();
    }
  }

  describePreset();
  setState('idle');
  hideOffer();

  return {
    trainer: () => trainer,
    readConfig,
    options,
    offerResume,
    refresh: () => { describePreset(); estimate.now(); },
    /** Before "Delete all my data": ends a run in progress and forgets it. */
    async beforeDeleteAll() {
      const tr = trainer;
      if (tr && (tr.state === 'running' || tr.state === 'paused')) await tr.stop().catch(() => {});
      await tr?.finished.catch(() => {});
      for (const off of unsubscribe) off();
      unsubscribe = [];
      if (tr) await tr.dispose().catch(() => {});
      trainer = null;
      app.trainer = null;
      Object.assign(t, { runId: null, step: 0, checkpointStep: null, done: null, error: null, offered: null });
      chart.clear();
      t.points = chart.points;
      $('train-meter').hidden = true;
      hideOffer();
      offered = null;
      setState('idle');
    },
  };
}
