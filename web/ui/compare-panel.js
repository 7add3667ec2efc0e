// @ts-check
// Step 4, the chat: a conversation view. Each message the visitor sends becomes a turn (a "You"
// bubble), answered, streamed token by token, by the adapter, by the base model, or by both side
// by side (two bubbles in one turn, stacked on a phone). Both run with the same settings and
// seed, the base first, then the adapter: the worker runs one generation at a time, so the second
// would only wait anyway, and the first answer is readable meanwhile.
//
// Memory: with the model's chat template on, each answerer sees the conversation so far, its own
// earlier answers included (the base model's history and the adapter's differ after the first
// turn), sent as `{ messages }`; "New conversation" forgets it. Without a template (the default
// model has none) each message is answered on its own, and the view says so.
//
// Published for tests: <body data-compare="idle|generating|done|error">, the log
// (#chat-log, role=log: .turn.user and .turn.assistant groups, each answer a [data-column] bubble
// named "Base model" or "With the adapter …") and window.__bitlora.compare = { state, prompt,
// adapter, mode, turns, base: { text, tokens, result }, adapted: { ... }, error } for the last turn.

import { $, $$, showError, clearError, message, readNumber, started, control } from './dom.js';
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
   * @type {{ state: string, prompt?: string, adapter?: string | null, mode?: string, turns: number, options?: ReturnType<typeof readOptions>,
   *   error?: string | null, base?: Column | null, adapted?: Column | null }}
   */
  const c = { state: 'idle', turns: 0 };
  app.state.compare = c;
  let running = null; // the Generation in progress
  let stopped = false;
  let adapters = [];
  /** The conversation so far as each answerer saw it (chat template on only). */
  /** @type {Record<'base' | 'adapted', import('../bitlora.js').ChatTurn[]>} */
  let history = { base: [], adapted: [] };

  const setState = (s) => {
    c.state = s;
    document.body.dataset.compare = s;
    sync();
    app.bus.dispatchEvent(new Event('compare'));
    app.publish();
  };

  /** 'both' | 'adapted' | 'base', as picked (the adapter modes need an adapter). */
  const mode = () => $$('#compare-form input[name="compare-mode"]:checked', HTMLInputElement)[0]?.value ?? 'both';

  function sync() {
    const model = app.model();
    const ready = Boolean(app.client() && model);
    const text = Boolean(model?.tokenizer);
    const generating = c.state === 'generating';
    const needsAdapter = mode() !== 'base';
    $('compare-btn', HTMLButtonElement).disabled = !ready || !text || generating || (needsAdapter && !adapters.length);
    $('compare-stop', HTMLButtonElement).disabled = !generating;
    $('compare-chat', HTMLInputElement).disabled = !model?.chatTemplate || generating;
    for (const radio of $$('#compare-form input[name="compare-mode"]', HTMLInputElement)) {
      radio.disabled = generating || (radio.value !== 'base' && !adapters.length);
    }
    const remembers = Boolean(model?.chatTemplate) && $('compare-chat', HTMLInputElement).checked;
    $('chat-empty').textContent = remembers
      ? 'Your messages and the model\'s answers appear here. The model sees the earlier turns of this conversation; "New conversation" starts afresh.'
      : 'Your messages and the model\'s answers appear here. Each message is answered on its own: ' +
        (model?.chatTemplate ? 'with the chat template off, ' : 'this model has no chat template, so ') + 'the model does not see earlier turns.';
    $('chat-clear', HTMLButtonElement).disabled = generating || c.turns === 0;
    $('compare-hint').textContent = !ready ? 'Waiting for the model…'
      : !text ? 'This model has no tokenizer: chatting needs one (pick its tokenizer.json with the model).'
        : !adapters.length ? 'No adapter yet: fine-tune and save one (step 3) to compare it with the base model. Meanwhile the base model can answer.'
          : mode() === 'both' ? 'Both answers get the same message, settings and seed; the second runs through the adapter.'
            : mode() === 'adapted' ? 'The adapter answers.' : 'The base model answers, without the adapter.';
  }

  function readOptions() {
    return {
      maxTokens: readNumber('compare-max', 'Max tokens', { integer: true, min: 1, max: app.model()?.maxPositions ?? Infinity }),
      temperature: readNumber('compare-temp', 'Temperature', { min: 0 }),
      seed: readNumber('compare-seed', 'Seed', { integer: true, min: 0 }),
      topP: 0.9,
    };
  }

  /** A new turn in the log: the visitor's message, then an answer group with one bubble a column. */
  function addTurn(text, columns, adapter) {
    $('chat-empty').hidden = true;
    const log = $('chat-log');
    const you = document.createElement('div');
    you.className = 'turn user';
    you.setAttribute('role', 'group');
    you.setAttribute('aria-label', 'You');
    const bubble = document.createElement('p');
    bubble.className = 'bubble';
    bubble.textContent = text;
    you.append(bubble);
    const answer = document.createElement('div');
    answer.className = `turn assistant${columns.length > 1 ? ' side' : ''}`;
    answer.setAttribute('role', 'group');
    answer.setAttribute('aria-label', columns.length > 1 ? 'Answers' : 'Answer');
    /** @type {Record<string, { out: HTMLElement, stats: HTMLElement }>} */
    const els = {};
    for (const column of columns) {
      const name = column === 'base' ? 'Base model' : `With the adapter “${adapter}”`;
      const b = document.createElement('div');
      b.className = `bubble ${column}`;
      b.dataset.column = column;
      b.setAttribute('role', 'group');
      b.setAttribute('aria-label', name);
      const who = document.createElement('p');
      who.className = 'who';
      who.textContent = name;
      const out = document.createElement('div');
      out.className = 'text';
      out.setAttribute('aria-busy', 'false');
      const stats = document.createElement('p');
      stats.className = 'stats';
      b.append(who, out, stats);
      answer.append(b);
      els[column] = { out, stats };
    }
    log.append(you, answer);
    c.turns += 1;
    answer.scrollIntoView({ block: 'nearest' });
    return els;
  }

  /**
   * @param {'base' | 'adapted'} column
   * @param {{ out: HTMLElement, stats: HTMLElement }} el
   * @param {import('../bitlora.js').Prompt} prompt
   * @param {ReturnType<typeof readOptions>} options
   * @param {string | null} adapter
   * @param {number} offset tokens of the earlier answers of this turn (for the progress bar)
   */
  async function run(column, el, prompt, options, adapter, offset) {
    const { out, stats } = el;
    /** @type {Column} */
    const col = { text: '', tokens: [], result: null, firstAt: null, lastAt: null };
    c[column] = col;
    out.setAttribute('aria-busy', 'true');
    stats.textContent = 'reading the message…';
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
        stats.textContent = `${n} / ${options.maxTokens} tokens` + (rate ? ` · ${fmtRate(rate)} · about ${fmtSeconds((options.maxTokens - n) / rate)} left` : '');
        $('compare-progress', HTMLProgressElement).value = offset + n;
      },
    });
    running = g;
    try {
      const r = await g.result;
      col.result = r;
      if (!r.tokens.length || !col.text) {
        out.textContent = col.text || '(no answer: right after this message the model predicts the end of the text. ' +
          'Try starting the answer yourself, e.g. add its first word.)';
        out.classList.add('empty');
      }
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
      if (!text.trim()) throw Object.assign(new Error('Message: type something to ask the model'), { inputId: 'compare-prompt' });
      options = readOptions();
    } catch (err) {
      if (err.inputId && err.inputId !== 'compare-prompt') $('compare-settings', HTMLDetailsElement).open = true;
      showError('compare-error', err.message, err.inputId);
      return;
    }
    const m = mode();
    const adapter = m === 'base' ? null : $('compare-adapter', HTMLSelectElement).value;
    if (m !== 'base' && !adapter) {
      $('compare-settings', HTMLDetailsElement).open = true;
      showError('compare-error', 'Pick an adapter (fine-tune and save one in step 3, or import one below)', 'compare-adapter');
      return;
    }
    /** @type {('base' | 'adapted')[]} */
    const columns = m === 'both' ? ['base', 'adapted'] : m === 'base' ? ['base'] : ['adapted'];
    const chat = $('compare-chat', HTMLInputElement).checked && Boolean(app.model()?.chatTemplate);
    /** The prompt of one answerer: the conversation so far with the chat template, else the message alone. */
    const promptFor = (/** @type {'base' | 'adapted'} */ column) => /** @type {import('../bitlora.js').Prompt} */ (chat
      ? { messages: [...history[column], { role: 'user', content: text }] }
      : { text, chat: false });
    Object.assign(c, { prompt: text, adapter, mode: m, options, error: null, base: null, adapted: null });
    stopped = false;
    const els = addTurn(text, columns, adapter);
    $('compare-progress', HTMLProgressElement).max = options.maxTokens * columns.length;
    $('compare-progress', HTMLProgressElement).value = 0;
    $('compare-meter').hidden = false;
    setState('generating');
    try {
      for (const [i, column] of columns.entries()) {
        await run(column, els[column], promptFor(column), options, column === 'base' ? null : adapter, i * options.maxTokens);
        const answer = c[column];
        if (chat && answer?.result) history[column].push({ role: 'user', content: text }, { role: 'assistant', content: answer.text });
      }
      $('compare-progress', HTMLProgressElement).value = $('compare-progress', HTMLProgressElement).max;
      $('compare-meter').hidden = true;
      setState('done');
    } catch (err) {
      c.error = message(err);
      showError('compare-error', `The answer failed: ${c.error}`);
      setState('error');
    }
  }

  $('compare-form', HTMLFormElement).addEventListener('submit', (event) => {
    event.preventDefault();
    compare();
  });
  $('compare-form', HTMLFormElement).addEventListener('input', (event) => control(event).removeAttribute?.('aria-invalid'));
  $('compare-form', HTMLFormElement).addEventListener('change', (event) => { if (control(event).name === 'compare-mode') sync(); });
  // Enter sends, Shift+Enter starts a new line (as chat boxes do).
  $('compare-prompt', HTMLTextAreaElement).addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!$('compare-btn', HTMLButtonElement).disabled) $('compare-form', HTMLFormElement).requestSubmit();
    }
  });
  $('compare-stop', HTMLButtonElement).addEventListener('click', () => {
    stopped = true;
    running?.stop();
    $('compare-stop', HTMLButtonElement).disabled = true;
  });
  app.bus.addEventListener('model', () => {
    // A model with a chat template chats through it (and remembers the conversation).
    $('compare-chat', HTMLInputElement).checked = Boolean(app.model()?.chatTemplate);
    newConversation();
  });
  $('compare-chat', HTMLInputElement).addEventListener('change', () => newConversation());
  $('chat-clear', HTMLButtonElement).addEventListener('click', () => {
    newConversation();
    $('compare-prompt', HTMLTextAreaElement).focus();
  });

  /** Forgets the conversation: the log empties, the next message starts afresh. */
  function newConversation() {
    history = { base: [], adapted: [] };
    for (const turn of $$('#chat-log .turn', HTMLElement)) turn.remove();
    c.turns = 0;
    $('chat-empty').hidden = false;
    sync();
  }
  // A suggested prompt: the last example of the visitor's data (most likely not trained on
  // when it falls in the validation share) with the first word of its answer, when the box still
  // holds the default: the default model ends a bare "Define ZOOLOGY." at once, with or without a
  // quick adapter, while after "Define ZOOLOGY. The" both answer and the adapter's answer differs.
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
      // The first adapter switches the chat to side by side; without any only the base model answers.
      const radio = (/** @type {string} */ v) => $$(`#compare-form input[name="compare-mode"][value="${v}"]`, HTMLInputElement)[0];
      if (!list.length) radio('base').checked = true;
      else if (!adapters.length || prefer) radio('both').checked = true;
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
