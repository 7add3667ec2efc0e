// @ts-check
// The training-data panel: paste or pick text / JSONL; bitlora detects the format, tokenizes
// it with the loaded model's tokenizer (in the worker) and says what it became: examples,
// tokens, training and validation sequences. Errors name the line ("notes.jsonl: line 7: not
// JSON: ...") and "Show the line" selects it in the text box.
//
// Published for tests: <body data-data="empty|checking|ok|error"> and window.__bitlora.data =
// { state, fileName, summary (DataSummary), error }.

import { $, showError, clearError, debounce, message, readNumber } from './dom.js';
import { fmtBytes, fmtInt, plural } from './format.js';

export const FORMAT_LABELS = {
  text: 'Plain text',
  'jsonl-text': 'JSONL with "text"',
  'jsonl-prompt-completion': 'JSONL with prompt and completion',
  'jsonl-chat': 'JSONL chat (messages)',
};

// Files up to this size are shown (and editable) in the text box; larger ones are used whole but
// only their start is shown, since a text box with megabytes in it makes typing sluggish.
const EDITABLE_BYTES = 1 << 20;
const PREVIEW_CHARS = 100_000;

/**
 * `app`: { client(), model(), state, publish(), bus, trainOptions() -> { context, batch } }.
 * Returns { current(), check(), clear() }.
 * @param {import('./panels.js').App} app
 */
export function mountDataPanel(app) {
  const area = $('data-text', HTMLTextAreaElement);
  let text = '';
  let fileName = 'pasted text';
  let preview = false; // the box shows only the start of a large file
  let seq = 0;
  /** @type {import('./panels.js').DataState} */
  const data = { state: 'empty', fileName, summary: null, error: null };
  app.state.data = data;
  /** @type {{ input: import('../bitlora.js').DataInput, options: import('../bitlora.js').DataOptions & { batch: number }, summary: import('../bitlora.js').DataSummary } | null} */
  let lastGood = null;
  /** @type {Promise<unknown> | null} */
  let pending = null;

  const setState = (/** @type {import('./panels.js').DataState['state']} */ s) => {
    data.state = s;
    document.body.dataset.data = s;
  };
  setState('empty');

  const options = () => {
    const { context, batch } = app.trainOptions();
    const val = readNumber('data-val', 'Validation share (%)', { min: 0, max: 50 });
    return { context, batch, completionOnly: $('data-completion-only', HTMLInputElement).checked, valFraction: val / 100 };
  };

  async function check() {
    const my = ++seq;
    clearError('data-error', $('dataset'));
    $('data-error-show', HTMLButtonElement).hidden = true;
    data.fileName = fileName;
    if (!text.trim()) {
      lastGood = null;
      Object.assign(data, { summary: null, error: null });
      setState('empty');
      $('data-summary').textContent = 'No data yet: paste some text or pick a file.';
      app.bus.dispatchEvent(new Event('data'));
      app.publish();
      return null;
    }
    const client = app.client();
    if (!client || !app.model()) {
      $('data-summary').textContent = 'Waiting for the model (its tokenizer counts the tokens)…';
      return null;
    }
    let opts;
    try {
      opts = options();
    } catch (err) {
      return fail(err.message, err.inputId);
    }
    const input = { text, fileName };
    setState('checking');
    $('data-summary').textContent = `Reading ${fileName} (${fmtBytes(new TextEncoder().encode(text.slice(0, 4_000_000)).length)})…`;
    const job = client.prepareData(input, opts);
    pending = job;
    let summary;
    try {
      summary = await job;
    } catch (err) {
      if (my !== seq) return null;
      return fail(message(err), null, err?.line);
    } finally {
      if (pending === job) pending = null;
    }
    if (my !== seq) return null;
    lastGood = { input, options: opts, summary };
    Object.assign(data, { summary, error: null });
    setState('ok');
    $('data-summary').textContent = describe(summary);
    $('data-completion-only', HTMLInputElement).disabled = summary.format === 'text' || summary.format === 'jsonl-text';
    app.bus.dispatchEvent(new Event('data'));
    app.publish();
    return lastGood;

    /** `line`: the data's JSONL line at fault (the error's `line`), which "show" selects. */
    function fail(msg, inputId, line) {
      lastGood = null;
      Object.assign(data, { summary: null, error: msg });
      setState('error');
      $('data-summary').textContent = '';
      showError('data-error', msg, inputId);
      $('data-error-show', HTMLButtonElement).hidden = !(line && !preview);
      $('data-error-show', HTMLButtonElement).dataset.line = line == null ? '' : String(line);
      app.bus.dispatchEvent(new Event('data'));
      app.publish();
      return null;
    }
  }

  const debounced = debounce(check, 350);
  // The data is stale from the first keystroke: "checking" at once, so nothing uses old counts.
  const schedule = Object.assign(() => {
    if (text.trim() && data.state !== 'checking') setState('checking');
    debounced();
  }, { now: debounced.now });

  area.addEventListener('input', () => {
    if (preview) return;
    text = area.value;
    if (!text) fileName = 'pasted text';
    schedule();
  });

  $('data-file', HTMLInputElement).addEventListener('change', async () => {
    const file = $('data-file', HTMLInputElement).files?.[0];
    if (!file) return;
    setState('checking');
    $('data-summary').textContent = `Reading ${file.name}…`;
    try {
      text = await file.text();
    } catch (err) {
      showError('data-error', `${file.name}: cannot read the file: ${message(err)}`);
      setState('error');
      return;
    }
    fileName = file.name;
    preview = file.size > EDITABLE_BYTES;
    area.readOnly = preview;
    area.value = preview
      ? `${text.slice(0, PREVIEW_CHARS)}\n…\n(${file.name}, ${fmtBytes(file.size)}: only the start is shown here; all of it is used. "Clear" to type instead.)`
      : text;
    $('data-file', HTMLInputElement).value = '';
    schedule.now();
  });

  // The demo set (tools/build-web.sh copies data/devil/train.jsonl beside the wasm): 893
  // Devil's Dictionary definitions as prompt/completion pairs, fetched from this page's own
  // server, once, when asked.
  $('data-demo', HTMLButtonElement).addEventListener('click', async () => {
    const name = 'devil.jsonl';
    setState('checking');
    $('data-summary').textContent = `Fetching the demo data (${name})…`;
    try {
      const res = await fetch(new URL('../pkg/demo/devil.jsonl', import.meta.url));
      if (!res.ok) throw new Error(`the server answered ${res.status} ${res.statusText}`);
      text = await res.text();
    } catch (err) {
      showError('data-error', `${name}: cannot fetch the demo data: ${message(err)}`);
      setState('error');
      return;
    }
    fileName = name;
    preview = false;
    area.readOnly = false;
    area.value = text;
    schedule.now();
  });

  $('data-clear', HTMLButtonElement).addEventListener('click', () => {
    text = '';
    fileName = 'pasted text';
    preview = false;
    area.readOnly = false;
    area.value = '';
    $('data-file', HTMLInputElement).value = '';
    schedule.now();
  });

  $('data-val', HTMLInputElement).addEventListener('input', schedule);
  $('data-completion-only', HTMLInputElement).addEventListener('change', () => schedule.now());
  $('data-error-show', HTMLButtonElement).addEventListener('click', () => selectLine(area, Number($('data-error-show', HTMLButtonElement).dataset.line)));
  // The context and batch are the training panel's; the counts depend on them.
  app.bus.addEventListener('train-options', schedule);
  app.bus.addEventListener('model', () => schedule.now());

  return {
    /** The last successfully checked data (waits for a check in flight); null if none. */
    async current() {
      if (pending) await pending.catch(() => {});
      return data.state === 'ok' ? lastGood : null;
    },
    check: () => schedule.now(),
    /** Sets the data as if typed (tests, and the resumed run's file name). */
    set(value, name = 'pasted text') {
      text = value;
      fileName = name;
      preview = false;
      area.readOnly = false;
      area.value = value;
      return schedule.now();
    },
    get fileName() { return fileName; },
    /** A prompt from the data for the chat: the last example's prompt (and its answer's first word) or user turn. */
    suggestPrompt() {
      if (data.state !== 'ok' || !/^jsonl-(prompt|chat)/.test(data.summary?.format ?? '')) return null;
      const last = text.trimEnd().split('\n').at(-1) ?? '';
      try {
        const obj = JSON.parse(last);
        // The prompt and the first word of its answer (see compare-panel.js for why).
        if (typeof obj.prompt === 'string') return obj.prompt + (typeof obj.completion === 'string' ? /^\s*\S+/.exec(obj.completion)?.[0] ?? '' : '');
        const user = Array.isArray(obj.messages) ? obj.messages.filter((m) => m?.role === 'user').at(-1) : null;
        return typeof user?.content === 'string' ? user.content : null;
      } catch {
        return null;
      }
    },
    /** The last DataSummary (null without valid data). */
    summary: () => (data.state === 'ok' ? data.summary : null),
  };
}

/** "JSONL with prompt and completion · 893 examples · 61,579 tokens (48,210 to learn from) · ..." */
export function describe(s) {
  const parts = [
    FORMAT_LABELS[s.format] ?? s.format,
    plural(s.examples, 'example'),
    `${fmtInt(s.tokens)} tokens` + (s.targetTokens !== s.tokens ? ` (${fmtInt(s.targetTokens)} to learn from)` : ''),
    `${plural(s.trainSequences, 'training sequence')} and ${fmtInt(s.valSequences)} for validation, up to ${s.context} tokens each`,
    `${plural(s.stepsPerEpoch, 'step')} an epoch`,
  ];
  if (s.truncated) parts.push(`${plural(s.truncated, 'example')} longer than the context, cut from the start`);
  return parts.join(' · ');
}

/** Selects line `n` (1-based) of a text box and scrolls it into view. */
function selectLine(area, n) {
  if (!(n >= 1)) return;
  const lines = area.value.split('\n');
  if (n > lines.length) return;
  const start = lines.slice(0, n - 1).reduce((k, l) => k + l.length + 1, 0);
  area.focus();
  area.setSelectionRange(start, start + lines[n - 1].length);
  const lineHeight = parseFloat(getComputedStyle(area).lineHeight) || 18;
  area.scrollTop = Math.max(0, (n - 3) * lineHeight);
}
