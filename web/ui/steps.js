// @ts-check
// The page's four steps (index.html: #model, #dataset, #train, #compare): each shows its state
// in its heading (done / running with progress and time left / needs input / waiting for an
// earlier step), and the header says what to do next ("Next: add your data (step 2)…").
//
// Nothing here decides anything: the state is read from what the panels publish in
// window.__bitlora (the model, data, training, adapters and compare parts), every time one of
// them changes (the panels' bus events, and main.js's setState / load progress).
//
// Published for tests: <section class="step" data-step="done|running|needs|waiting"> and
// <body data-next="model|data|train|save|chat|export">.

import { $ } from './dom.js';
import { fmtInt, fmtSeconds, plural } from './format.js';

/** @typedef {'done' | 'running' | 'needs' | 'waiting'} StepState */

/**
 * @param {import('./panels.js').App} app
 * @returns {() => void} recomputes the steps (cheap; call it on any change)
 */
export function mountSteps(app) {
  /**
   * @param {string} id the step's section
   * @param {StepState} state
   * @param {string} text
   */
  const show = (id, state, text) => {
    const section = $(id);
    section.dataset.step = state;
    const label = { done: 'Done', running: 'In progress', needs: 'Needs you', waiting: 'Waiting' }[state];
    const el = $(`${id}-step`);
    const full = `${label}: ${text}`;
    if (el.textContent !== full) el.textContent = full;
  };

  function update() {
    const s = app.state;
    const model = app.model();
    const data = s.data;
    const t = /** @type {Record<string, any>} */ (s.training ?? {});
    const adapters = s.adapters?.list ?? [];
    const compare = /** @type {Record<string, any>} */ (s.compare ?? {});
    const trainer = app.trainer;

    // 1. Model
    const loading = s.state === 'starting' || s.state === 'loading';
    if (loading) {
      const last = s.loadProgress?.at(-1);
      show('model', 'running', last?.text ?? 'starting…');
    } else if (!model) {
      show('model', 'needs', 'the model did not load: see the problem below');
    } else {
      show('model', 'done', `${model.name ?? model.origin} is ready`);
    }

    // 2. Your data
    if (!data || data.state === 'empty') show('dataset', model ? 'needs' : 'waiting', 'paste text, pick a file or try the demo data');
    else if (data.state === 'checking') show('dataset', 'running', 'reading and counting your data…');
    else if (data.state === 'error') show('dataset', 'needs', 'fix the problem shown below');
    else {
      const d = data.summary;
      show('dataset', 'done', d ? `${plural(d.examples, 'example')}, ${fmtInt(d.tokens)} tokens` : 'checked');
    }

    // 3. Fine-tune
    const saved = trainer ? adapters.some((a) => a.runId === trainer.runId && a.step === trainer.step) : false;
    const trained = t.state === 'done' || t.state === 'stopped';
    if (t.state === 'starting') show('train', 'running', 'starting…');
    else if (t.state === 'running') {
      const left = Number.isFinite(t.eta) && t.step < t.totalSteps ? ` · about ${fmtSeconds(t.eta)} left` : '';
      const pct = t.totalSteps ? ` (${Math.floor((100 * (t.step ?? 0)) / t.totalSteps)}%)` : '';
      show('train', 'running', `step ${fmtInt(t.step ?? 0)} of ${fmtInt(t.totalSteps ?? 0)}${pct}${left}`);
    } else if (t.state === 'paused') show('train', 'needs', `paused at step ${fmtInt(t.step ?? 0)} of ${fmtInt(t.totalSteps ?? 0)}: resume or stop`);
    else if (trained && !saved && (trainer?.step ?? 0) > 0) show('train', 'needs', 'trained: save the adapter below');
    else if (trained && saved) show('train', 'done', `trained ${plural(trainer?.step ?? 0, 'step')} and saved`);
    else if (adapters.length) show('train', 'done', `${plural(adapters.length, 'adapter')} saved in this browser; train again to make another`);
    else if (data?.state !== 'ok') show('train', 'waiting', 'add your data first (step 2)');
    else if (t.state === 'error') show('train', 'needs', 'see the problem below, then start again');
    else show('train', 'needs', 'press Start fine-tuning');

    // 4. Chat and export
    if (compare.state === 'generating') show('compare', 'running', 'the model is answering…');
    else if (!model) show('compare', 'waiting', 'waiting for the model');
    else if (!adapters.length) show('compare', 'waiting', 'fine-tune and save an adapter (step 3) to compare; the base model answers already');
    else if (compare.state === 'done') show('compare', 'done', 'chatted; export the adapter below to keep it');
    else show('compare', 'needs', 'send a message to compare the base model with the adapter');

    // What to do next, in the header.
    /** @type {[string, string]} */
    let next;
    if (loading) next = ['model', 'Loading the model (step 1)…'];
    else if (!model) next = ['model', 'Next: load a model (step 1): see the problem there.'];
    else if (t.state === 'running' || t.state === 'starting') next = ['train', 'Fine-tuning (step 3): you can pause it. Next: chat with the result when it is done.'];
    else if (t.state === 'paused') next = ['train', 'Next: resume or stop the paused fine-tuning (step 3).'];
    else if (trained && !saved && (trainer?.step ?? 0) > 0) next = ['save', 'Next: save the adapter (end of step 3), then chat with it (step 4).'];
    else if (data?.state !== 'ok' && !adapters.length) {
      next = ['data', data?.state === 'checking' ? 'Reading your data (step 2)…'
        : data?.state === 'error' ? 'Next: fix your data (step 2): see the problem there.'
          : 'Next: add your data (step 2): paste text, pick a file or try the demo data.'];
    } else if (!adapters.length) next = ['train', 'Next: fine-tune (step 3): press Start fine-tuning.'];
    else if (compare.state !== 'done') next = ['chat', 'Next: chat with the result (step 4): send a message.'];
    else next = ['export', 'Next: export the adapter (step 4), or train again with more data or steps.'];
    document.body.dataset.next = next[0];
    if ($('next-step').textContent !== next[1]) $('next-step').textContent = next[1];
  }

  for (const e of ['model', 'data', 'trainer', 'progress', 'trained', 'adapters', 'compare']) app.bus.addEventListener(e, update);
  update();
  return update;
}
