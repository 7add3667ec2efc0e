// The chat panel: one prompt, the base model and the adapted model side by side, streamed token
// by token (two columns on a wide screen, stacked on a phone). Both run with the same settings
// and seed, the base first, then the adapter: the worker runs one generation at a time, so the
// second would only wait anyway, and the first column's answer is readable meanwhile.
//
// Published for tests: <body data-compare="idle|generating|done|error"> and
// window.__bitlora.compare = { state, prompt, adapter, base: { text, tokens, result },
// adapted: { ... }, error }.

import { $, showError, clearError, message, readNumber } from './dom.js';
import { fmtSeconds, fmtRate, plural } from './format.js';

const WHY = { max_tokens: 'reached max tokens', stop_token: 'the model ended it', stop: 'stopped' };

/** `app`: { client(), model(), state, publish(), bus }. Returns { refreshAdapters(list), select(name) }. */
export function mountComparePanel(app) {
  const c = (app.state.compare = { state: 'idle' });
  let running = null; // the Generation in progress
  let stopped = false;
  let adapters = [];

  const setState = (s) => {
    c.state = s;
    document.body.dataset.compare = s;
    sync();
    app.publish();
  };

  function sync() {
    const model = app.model();
    const ready = Boolean(app.client() && model);
    const text = Boolean(model?.tokenizer);
    const generating = c.state === 'generating';
    $('compare-btn').disabled = !ready || !text || generating || !adapters.length;
    $('compare-stop').disabled = !generating;
    $('compare-chat').disabled = !model?.chatTemplate || generating;
    $('compare-hint').textContent = !ready ? 'Waiting for the model…'
      : !text ? 'This model has no tokenizer: chatting needs one (pick its tokenizer.json with the model).'
        : !adapters.length ? 'Train an adapter and save it (or import one) in the Adapters panel, then compare it with the base model here.'
          : 'Both columns get the same prompt, settings and seed; the right one runs through the adapter.';
  }

  function readOptions() {
    return {
      maxTokens: readNumber('compare-max', 'Max tokens', { integer: true, min: 1, max: app.model()?.maxPositions ?? Infinity }),
      temperature: readNumber('compare-temp', 'Temperature', { min: 0 }),
      seed: readNumber('compare-seed', 'Seed', { integer: true, min: 0 }),
      topP: 0.9,
    };
  }

  async function run(column, prompt, options, adapter) {
    const out = $(`compare-${column}`);
    const stats = $(`compare-${column}-stats`);
    const col = (c[column] = { text: '', tokens: [], result: null, firstAt: null, lastAt: null });
    out.replaceChildren();
    out.setAttribute('aria-busy', 'true');
    stats.textContent = 'reading the prompt…';
    if (stopped) {
      stats.textContent = 'not run (stopped)';
      out.setAttribute('aria-busy', 'false');
      return;
    }
    const g = app.client().generate(prompt, {
      ...options, adapter,
      onToken: (ev) => {
        col.tokens.push(ev.token);
        col.firstAt ??= ev.at;
        col.lastAt = ev.at;
        if (ev.text) {
          col.text += ev.text;
          out.append(ev.text);
        }
        const n = col.tokens.length;
        const rate = n > 1 && col.lastAt > col.firstAt ? (n - 1) / ((col.lastAt - col.firstAt) / 1000) : null;
        stats.textContent = `${n} / ${options.maxTokens} tokens` + (rate ? ` · ${fmtRate(rate)} · ETA ${fmtSeconds((options.maxTokens - n) / rate)}` : '');
        $('compare-progress').value = (column === 'adapted' ? options.maxTokens : 0) + n;
      },
    });
    running = g;
    try {
      const r = await g.result;
      col.result = r;
      if (!r.tokens.length || !col.text) out.textContent = col.text || '(nothing: the model ended at once)';
      stats.textContent = `${plural(r.tokens.length, 'token')} in ${fmtSeconds(r.ms / 1000)}` +
        (r.tokensPerSecond ? ` · ${fmtRate(r.tokensPerSecond)}` : '') + ` · ${WHY[r.stoppedBy] ?? r.stoppedBy}`;
    } finally {
      running = null;
      out.setAttribute('aria-busy', 'false');
    }
  }

  async function compare() {
    clearError('compare-error', $('compare-form'));
    const text = $('compare-prompt').value;
    let options;
    try {
      if (!text.trim()) throw Object.assign(new Error('Prompt: type something to ask both models'), { inputId: 'compare-prompt' });
      options = readOptions();
    } catch (err) {
      showError('compare-error', err.message, err.inputId);
      return;
    }
    const adapter = $('compare-adapter').value;
    if (!adapter) {
      showError('compare-error', 'Pick an adapter (save or import one in the Adapters panel first)', 'compare-adapter');
      return;
    }
    const prompt = { text, chat: $('compare-chat').checked };
    Object.assign(c, { prompt: text, adapter, options, error: null, base: null, adapted: null });
    stopped = false;
    $('compare-adapted-h').textContent = `With the adapter “${adapter}”`;
    $('compare-progress').max = options.maxTokens * 2;
    $('compare-progress').value = 0;
    $('compare-meter').hidden = false;
    setState('generating');
    try {
      await run('base', prompt, options, null);
      await run('adapted', prompt, options, adapter);
      $('compare-progress').value = $('compare-progress').max;
      setState('done');
    } catch (err) {
      c.error = message(err);
      showError('compare-error', `Generation failed: ${c.error}`);
      setState('error');
    }
  }

  $('compare-form').addEventListener('submit', (event) => {
    event.preventDefault();
    compare();
  });
  $('compare-form').addEventListener('input', (event) => event.target.removeAttribute?.('aria-invalid'));
  $('compare-stop').addEventListener('click', () => {
    stopped = true;
    running?.stop();
    $('compare-stop').disabled = true;
  });
  app.bus.addEventListener('model', () => {
    $('compare-chat').checked = Boolean(app.model()?.chatTemplate) && $('compare-chat').checked;
    sync();
  });
  // A suggested prompt: the last example of the visitor's data (most likely not trained on
  // when it falls in the validation share), when the box still holds the default.
  app.bus.addEventListener('data', () => {
    const suggestion = app.data.suggestPrompt?.();
    if (suggestion && ($('compare-prompt').value === $('compare-prompt').defaultValue || $('compare-prompt').dataset.suggested === 'yes')) {
      $('compare-prompt').value = suggestion;
      $('compare-prompt').dataset.suggested = 'yes';
    }
  });
  $('compare-prompt').addEventListener('input', () => { delete $('compare-prompt').dataset.suggested; });

  setState('idle');
  return {
    /** The adapter store changed: list its adapters, keeping the selection (or picking `prefer`). */
    refreshAdapters(list, prefer = null) {
      adapters = list;
      const sel = $('compare-adapter');
      const keep = prefer ?? sel.value;
      sel.replaceChildren();
      if (!list.length) {
        const o = document.createElement('option');
        o.value = '';
        o.textContent = '(none saved yet)';
        sel.append(o);
      }
      for (const a of [...list].sort((x, y) => y.createdAt - x.createdAt)) {
        const o = document.createElement('option');
        o.value = a.name;
        o.textContent = `${a.name} (rank ${a.r})`;
        sel.append(o);
      }
      if (list.some((a) => a.name === keep)) sel.value = keep;
      sync();
    },
    select(name) {
      $('compare-adapter').value = name;
      $('compare').scrollIntoView({ behavior: 'smooth', block: 'start' });
      $('compare-prompt').focus({ preventScroll: true });
    },
  };
}
