// @ts-check
// The chat panel: one prompt, the base model and the adapted model side by side, streamed token
// by token (two columns on a wide screen, stacked on a phone). Both run with the same settings
// and seed, the base first, then the adapter: the worker runs one generation at a time, so the
// second would only wait anyway, and the first column's answer is readable meanwhile.
//
// Published for tests: <body data-compare="idle|generating|done|error"> and
// window.__bitlora.compare = { state, prompt, adapter, base: { text, tokens, result },
// adapted: { ... }, error }.

import { $, showError, clearError, message, readNumber, started, control } from './dom.js';
import { fmtSeconds, fmtRate, plural } from './format.js';

const WHY = { max_tokens: 'reached max tokens', stop_token: 'the model ended it', stop: 'stopped' };

/**
 * `app`: { client(), model(), state, publish(), bus }. Returns { refreshAdapters(list), select(name) }.
 * @param {import('./panels.js').App} app
 */
export function mountComparePanel(app) {
  /**
   * window.__bitlora.compare (see the header).
   * @typedef {{ text: string, tokens: number[], result: import('../bitlora.js').GenerateResult | null, firstAt: number | null, lastAt: number | null }} Column
   * @type {{ state: string, prompt?: string, adapter?: string, options?: ReturnType<typeof readOptions>, error?: string | null,
   *   base?: Column | null, adapted?: Column | null }}
   */
  const c = { state: 'idle' };
  app.state.compare = c;
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
    $('compare-btn', HTMLButtonElement).disabled = !ready || !text || generating || !adapters.length;
    $('compare-stop', HTMLButtonElement).disabled = !generating;
    $('compare-chat', HTMLInputElement).disabled = !model?.chatTemplate || generating;
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

  /**
   * @param {'base' | 'adapted'} column
   * @param {import('../bitlora.js').Prompt} prompt
   * @param {ReturnType<typeof readOptions>} options
   * @param {string | null} adapter
   */
  async function run(column, prompt, options, adapter) {
    const out = $(`compare-${column}`);
    const stats = $(`compare-${column}-stats`);
    /** @type {Column} */
    const col = { text: '', tokens: [], result: null, firstAt: null, lastAt: null };
    c[column] = col;
    out.replaceChildren();
    out.setAttribute('aria-busy', 'true');
    stats.textContent = 'reading the prompt…';
    if (stopped) {
      stats.textContent = 'not run (stopped)';
      out.setAttribute('aria-busy', 'false');
      return;
    }
    const g = started(app.client()).generate(prompt, {
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
        $('compare-progress', HTMLProgressElement).value = (column === 'adapted' ? options.maxTokens : 0) + n;
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
    clearError('compare-error', $('compare-form', HTMLFormElement));
    const text = $('compare-prompt', HTMLTextAreaElement).value;
    let options;
    try {
      if (!text.trim()) throw Object.assign(new Error('Prompt: type something to ask both models'), { inputId: 'compare-prompt' });
      options = readOptions();
    } catch (err) {
      showError('compare-error', err.message, err.inputId);
      return;
    }
    const adapter = $('compare-adapter', HTMLSelectElement).value;
    if (!adapter) {
      showError('compare-error', 'Pick an adapter (save or import one in the Adapters panel first)', 'compare-adapter');
      return;
    }
    const prompt = { text, chat: $('compare-chat', HTMLInputElement).checked };
    Object.assign(c, { prompt: text, adapter, options, error: null, base: null, adapted: null });
    stopped = false;
    $('compare-adapted-h').textContent = `With the adapter “${adapter}”`;
    $('compare-progress', HTMLProgressElement).max = options.maxTokens * 2;
    $('compare-progress', HTMLProgressElement).value = 0;
    $('compare-meter').hidden = false;
    setState('generating');
    try {
      await run('base', prompt, options, null);
      await run('adapted', prompt, options, adapter);
      $('compare-progress', HTMLProgressElement).value = $('compare-progress', HTMLProgressElement).max;
      setState('done');
    } catch (err) {
      c.error = message(err);
      showError('compare-error', `Generation failed: ${c.error}`);
      setState('error');
    }
  }

  $('compare-form', HTMLFormElement).addEventListener('submit', (event) => {
    event.preventDefault();
    compare();
  });
  $('compare-form', HTMLFormElement).addEventListener('input', (event) => control(event).removeAttribute?.('aria-invalid'));
  $('compare-stop', HTMLButtonElement).addEventListener('click', () => {
    stopped = true;
    running?.stop();
    $('compare-stop', HTMLButtonElement).disabled = true;
  });
  app.bus.addEventListener('model', () => {
    $('compare-chat', HTMLInputElement).checked = Boolean(app.model()?.chatTemplate) && $('compare-chat', HTMLInputElement).checked;
    sync();
  });
  // A suggested prompt: the last example of the visitor's data (most likely not trained on
  // when it falls in the validation share), when the box still holds the default.
  app.bus.addEventListener('data', () => {
    const suggestion = app.data.suggestPrompt?.();
    if (suggestion && ($('compare-prompt', HTMLTextAreaElement).value === $('compare-prompt', HTMLTextAreaElement).defaultValue || $('compare-prompt', HTMLTextAreaElement).dataset.suggested === 'yes')) {
      $('compare-prompt', HTMLTextAreaElement).value = suggestion;
      $('compare-prompt', HTMLTextAreaElement).dataset.suggested = 'yes';
    }
  });
  $('compare-prompt', HTMLTextAreaElement).addEventListener('input', () => { delete $('compare-prompt', HTMLTextAreaElement).dataset.suggested; });

  setState('idle');
  return {
    /**
     * The adapter store changed: list its adapters, keeping the selection (or picking `prefer`).
     * @param {import('../bitlora.js').AdapterInfo[]} list
     * @param {string | null} [prefer]
     */
    refreshAdapters(list, prefer = null) {
      adapters = list;
      const sel = $('compare-adapter', HTMLSelectElement);
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
    /** @param {string} name */
    select(name) {
      $('compare-adapter', HTMLSelectElement).value = name;
      $('compare').scrollIntoView({ behavior: 'smooth', block: 'start' });
      $('compare-prompt', HTMLTextAreaElement).focus({ preventScroll: true });
    },
  };
}
