// @ts-check
// The model panel: models stored in this browser (load, resume, delete), downloads from a
// Hugging Face-style hub (progress, ETA, pause, cancel, resume) and local files (picker and
// drag-and-drop), kept so they survive a reload. Main-thread UI only: the work happens in
// web/worker.js through web/hub.js and web/store.js.
//
// Mounted by web/main.js: `mountModelsPanel(page)` builds the DOM inside #model and #load and
// returns { refresh, sync }. `page` gives it main.js's pieces: withClient(fn) (calls fn with the
// Bitlora client of web/bitlora.js; a worker crash restarts it), showModel(model, origin), showError(msg), clearError(), setState(s), run(),
// showLoadProgress(event), askPersist(), publish(), state (window.__bitlora), params (URL).
//
// For tests and embedders: window.__bitlora.models = { list: summary[], usage, quota,
// download: { state, modelId, repo, progress, error, notes, result } } and
// <body data-download="idle|downloading|paused|cancelled|done|error" data-import="idle|importing|done|error">.
// URL parameters: ?hub=URL presets the hub (default https://huggingface.co), ?repo=owner/name the repo.
//
// Deleting asks in place (the button turns into "Delete? Yes / No"), no dialogs; errors show in
// the panel (role=alert), never in alert().

import { DEFAULT_HUB, hubModelId, parseHub, parseRepo } from './hub.js';
import { fmtSize } from './store.js';
import { $ } from './ui/dom.js';

const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k in e && !k.startsWith('aria')) e[k] = v;
    else e.setAttribute(k, v);
  }
  e.append(...children.filter((c) => c != null && c !== false));
  return e;
};

const fmtSeconds = (s) => (s < 1 ? 'under a second' : s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`
  : s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`);
const SOURCE = { bundled: 'bundled with this page', hub: 'Hugging Face', local: 'your files' };

/**
 * @param {{ withClient: <T>(fn: (client: import('./bitlora.js').Bitlora) => Promise<T>) => Promise<T>,
 *   state: import('./ui/panels.js').PageState, params: URLSearchParams,
 *   showModel: (model: import('./bitlora.js').ModelInfo, origin: string) => void, showError: (message: string) => void,
 *   clearError: () => void, setState: (s: string) => void, run: () => Promise<void>, askPersist: () => Promise<void>,
 *   publish: () => void, showLoadProgress: (p: import('./bitlora.js').LoadProgress) => void }} page
 */
export function mountModelsPanel(page) {
  const { withClient, state, params } = page;
  const fakeFree = params.get('free') ? Number(params.get('free')) : undefined;

  // Styles of this panel (a stylesheet from this origin: the CSP allows no inline styles).
  if (!document.querySelector('link[href$="models-panel.css"]')) {
    document.head.append(el('link', { rel: 'stylesheet', href: new URL('./models-panel.css', import.meta.url).href }));
  }

  // ---- DOM ------------------------------------------------------------------------------------
  const advanced = el('details', { id: 'hub-advanced' },
    el('summary', {}, 'Advanced'),
    el('label', { htmlFor: 'hub-url' }, 'Hub URL'),
    el('input', { id: 'hub-url', type: 'url', value: params.get('hub') ?? DEFAULT_HUB, autocomplete: 'off', spellcheck: false, inputMode: 'url' }),
    el('p', { className: 'hint' }, 'A Hugging Face-compatible hub (a mirror, or your own server). The page\'s Content-Security-Policy must allow it: `bitlora serve --hub URL`.'),
    el('label', { htmlFor: 'hub-revision' }, 'Revision (branch, tag or commit)'),
    el('input', { id: 'hub-revision', value: params.get('revision') ?? 'main', autocomplete: 'off', spellcheck: false }),
    el('label', { htmlFor: 'hub-token' }, 'Access token (gated or private models)'),
    el('input', { id: 'hub-token', type: 'password', autocomplete: 'off', spellcheck: false, placeholder: 'hf_…' }),
    el('p', { className: 'hint' }, 'Sent only to the hub above, with this download; never stored.'));
  const form = el('form', { id: 'hub-form', noValidate: true },
    el('label', { htmlFor: 'hub-repo' }, 'Hugging Face repo'),
    el('div', { className: 'row' },
      el('input', { id: 'hub-repo', value: params.get('repo') ?? '', placeholder: 'owner/name, e.g. microsoft/bitnet-b1.58-2B-4T', autocomplete: 'off', spellcheck: false, 'aria-describedby': 'hub-hint' }),
      el('button', { id: 'hub-download', type: 'submit' }, 'Download')),
    el('p', { id: 'hub-hint', className: 'hint' }, 'Fetches config.json, the tokenizer and the .safetensors weights into this browser\'s storage, resumably, checking each file\'s SHA-256; then loads it.'),
    advanced);
  const meter = el('div', { id: 'hub-meter', hidden: true },
    el('progress', { id: 'hub-progress', max: 1, value: 0, 'aria-label': 'Download progress' }),
    el('p', { id: 'hub-stats', 'aria-live': 'polite' }),
    el('div', { className: 'row' },
      el('button', { id: 'hub-pause', type: 'button' }, 'Pause'),
      el('button', { id: 'hub-cancel', type: 'button', className: 'danger' }, 'Cancel')));
  const error = el('div', { id: 'hub-error', className: 'error', role: 'alert', hidden: true },
    el('strong', {}, 'Problem: '), el('span', { id: 'hub-error-text' }));
  const note = el('p', { id: 'hub-note', className: 'note', role: 'status', hidden: true });
  const list = el('ul', { id: 'models-list', className: 'cards', 'aria-label': 'Models stored in this browser' });
  const panel = el('div', { id: 'models-panel' },
    el('h3', {}, 'Stored in this browser'),
    el('p', { id: 'models-summary', className: 'hint', role: 'status' }, 'Checking this browser\'s storage…'),
    list,
    el('h3', {}, 'Download from Hugging Face'),
    form, meter, error, note);
  // Inside step 1's folded "Use another model" (index.html), before the files picker.
  $('load').before(panel);

  const drop = el('div', { id: 'drop-zone', tabIndex: 0, role: 'button', 'aria-describedby': 'drop-hint' },
    el('strong', {}, 'Drop model files here'),
    el('span', { id: 'drop-hint' }, ' config.json, *.safetensors, tokenizer.json, tokenizer_config.json (or their folder), or one .gguf file, or click to pick them.'));
  const importError = el('div', { id: 'import-error', className: 'error', role: 'alert', hidden: true });
  $('files', HTMLInputElement).closest('.row')?.after(drop, importError);

  // ---- state ----------------------------------------------------------------------------------
  /** @type {import('./ui/panels.js').ModelsState} */
  const models = { list: [], usage: null, quota: null, download: { state: 'idle' } };
  state.models = models;
  document.body.dataset.download = 'idle';
  document.body.dataset.import = 'idle';
  let busy = true;
  let armed = null; // the model id whose Delete asks "sure?"

  const setDownload = (patch) => {
    Object.assign(models.download, patch);
    document.body.dataset.download = models.download.state;
    $('hub-download', HTMLButtonElement).disabled = models.download.state === 'downloading';
    meter.hidden = models.download.state !== 'downloading';
    render(); // Resume buttons are off while a download runs
    page.publish();
  };
  const showHubError = (msg) => {
    $('hub-error-text').textContent = msg;
    error.hidden = !msg;
  };
  const showNote = (text) => {
    note.textContent = text;
    note.hidden = !text;
  };

  // ---- the list -------------------------------------------------------------------------------
  async function refresh() {
    let info;
    try {
      info = await withClient((c) => c.listModels());
    } catch (err) {
      $('models-summary').textContent = `Could not read this browser's storage: ${err.message}`;
      return;
    }
    Object.assign(models, { list: info.models, usage: info.usage, quota: info.quota, downloading: info.downloading, available: info.available });
    render();
    page.publish();
  }

  function render() {
    const inUse = state.model?.storeId ?? null;
    const stored = models.list.reduce((n, m) => n + m.storedBytes, 0);
    if (models.available === false) {
      $('models-summary').textContent = 'This browser\'s storage cannot be used here: models are not kept between visits.';
    } else {
      const room = models.quota != null ? ` The browser allows this page ${fmtSize(Math.max(0, models.quota - (models.usage ?? 0)))} more.` : '';
      $('models-summary').textContent = models.list.length
        ? `${models.list.length} model${models.list.length === 1 ? '' : 's'}, ${fmtSize(stored)}.${room}`
        : `None yet.${room}`;
    }
    const rows = [...models.list].sort((a, b) => String(b.updatedAt).localeCompare(String(a.updatedAt)));
    list.replaceChildren(...rows.map((m) => row(m, m.id === inUse)));
  }

  function row(m, inUse) {
    const running = (models.downloading ?? []).includes(m.id); // as the worker last said
    const where = m.source === 'hub' && m.origin
      ? `${SOURCE.hub}${m.origin.hub === DEFAULT_HUB ? '' : ` (${m.origin.hub})`}${m.origin.revision === 'main' ? '' : ` @ ${m.origin.revision}`}`
      : SOURCE[m.source] ?? m.source;
    const when = m.storedAt ? new Date(m.storedAt).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' }) : '';
    const status = m.complete
      ? `${fmtSize(m.bytes)} · stored ${when}`
      : `partial: ${fmtSize(m.storedBytes)} of ${fmtSize(m.bytes)} (${Math.floor((100 * m.storedBytes) / Math.max(m.bytes, 1))}%)${running ? ' · downloading' : ''}` +
        (m.source === 'local' ? ' · an interrupted import: delete it and pick the files again' : '');
    const btn = (action, text, props = {}) => el('button', { type: 'button', dataset: { action, model: m.id }, ...props }, text);
    const actions = [];
    if (m.complete) actions.push(btn('load', inUse ? 'Load again' : 'Load', { disabled: busy }));
    else if (m.source === 'hub' && !running) actions.push(btn('resume', 'Resume', { disabled: models.download.state === 'downloading' }));
    else if (running) actions.push(btn('pause', 'Pause'));
    if (armed === m.id) {
      actions.push(el('span', { className: 'confirm' }, `Delete ${m.complete ? '' : 'what is stored of '}${m.name}?`),
        btn('confirm-delete', 'Yes, delete', { className: 'danger' }), btn('keep', 'No'));
    } else {
      actions.push(btn('delete', 'Delete', { className: 'danger' }));
    }
    return el('li', { dataset: { modelId: m.id, complete: String(m.complete) } },
      el('div', { className: 'name' }, m.name, inUse ? el('span', { className: 'badge' }, 'in use') : null,
        m.complete ? null : el('span', { className: 'badge partial' }, 'partial')),
      el('div', { className: 'meta' }, `${where} · ${status}`),
      m.complete ? null : el('progress', { max: Math.max(m.bytes, 1), value: m.storedBytes, 'aria-label': `${m.name}: stored so far` }),
      el('div', { className: 'row' }, ...actions));
  }

  list.addEventListener('click', (event) => {
    const b = event.target.closest('button[data-action]');
    if (!b) return;
    const m = models.list.find((x) => x.id === b.dataset.model);
    if (!m) return;
    ({
      load: () => loadStored(m),
      // Resume is offered for hub models only, which have an origin.
      resume: () => download(/** @type {NonNullable<typeof m.origin>} */ (m.origin)),
      pause: () => stop(m.id, false),
      delete: () => { armed = m.id; render(); list.querySelector('button[data-action="confirm-delete"]')?.focus(); },
      keep: () => { armed = null; render(); },
      'confirm-delete': () => remove(m),
    })[b.dataset.action]?.();
  });

  async function remove(m) {
    armed = null;
    try {
      if (models.download.modelId === m.id && models.download.state === 'downloading') await stop(m.id, true);
      await withClient((c) => c.deleteStoredModel(m.id));
      showNote(`Deleted ${m.name} from this browser (${fmtSize(m.storedBytes)}).` +
        (state.model?.storeId === m.id ? ' It stays loaded in this tab until you load another model or close it.' : ''));
    } catch (err) {
      showHubError(`Could not delete ${m.name}: ${err.message}`);
    }
    await refresh();
  }

  // ---- loading ----------------------------------------------------------------------------------
  async function loadStored(m) {
    page.clearError();
    page.setState('loading');
    state.loadProgress = [];
    $('model-name').textContent = `Loading ${m.name}…`;
    try {
      const model = await withClient((c) => c.loadModel({ stored: m.id }, { onProgress: page.showLoadProgress }));
      page.showModel(model, m.source === 'hub' ? `${m.name} (Hugging Face)` : m.name);
    } catch (err) {
      page.showError(`Could not load ${m.name}: ${err.message}`);
      await refresh();
      return false;
    } finally {
      $('load-meter').hidden = true;
    }
    render();
    await page.run();
    return true;
  }

  // ---- downloads ------------------------------------------------------------------------------
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    let hub, repo;
    try {
      hub = parseHub($('hub-url', HTMLInputElement).value);
      repo = parseRepo($('hub-repo', HTMLInputElement).value, hub);
    } catch (err) {
      showHubError(err.message);
      setDownload({ state: 'error', error: err.message });
      (/hub URL/.test(err.message) ? (advanced.open = true, $('hub-url', HTMLInputElement)) : $('hub-repo', HTMLInputElement)).focus();
      return;
    }
    download({ hub, repo, revision: $('hub-revision', HTMLInputElement).value.trim() || 'main' });
  });

  async function download({ hub, repo, revision }) {
    if (models.download.state === 'downloading') return;
    showHubError('');
    showNote('');
    await page.askPersist();
    setDownload({ state: 'downloading', modelId: hubModelId(hub, repo, revision), repo, progress: null, error: null, notes: [], result: null, loaded: false });
    $('hub-progress', HTMLProgressElement).removeAttribute('value');
    $('hub-stats').textContent = `Asking ${hub} for the files of ${repo}…`;
    let r;
    try {
      r = await withClient((c) => c.downloadModel({
        hub, repo, revision, token: $('hub-token', HTMLInputElement).value.trim() || undefined,
        persisted: Boolean(state.persisted), fakeFree,
      }, { onProgress: showProgress }));
    } catch (err) {
      setDownload({ state: 'error', error: err.message });
      showHubError(err.message);
      await refresh();
      return;
    }
    Object.assign(models.download, { modelId: r.modelId, result: r, notes: r.notes });
    await refresh();
    const m = r.model;
    if (r.status === 'paused') {
      showNote(m ? `Paused: ${fmtSize(m.storedBytes)} of ${fmtSize(m.bytes)} of ${repo} stored. Resume continues from there, also after a reload.`
        : `Stopped before anything of ${repo} was stored.`);
    } else if (r.status === 'cancelled') {
      showNote(`Cancelled: nothing of ${repo} is kept.`);
    } else {
      const m = r.model; // complete: the stored model
      showNote([r.already ? `${repo} is already stored in this browser.` : `Downloaded ${repo} (${fmtSize(m.bytes)}): every file's size and SHA-256 checked, stored in this browser.`,
        ...r.notes.filter((n) => !/already stored/.test(n))].join(' '));
      // Load it now unless the page is busy (a generation, a training run): then the list's Load.
      models.download.loaded = !busy && await loadStored(m);
    }
    // 'done' once the model is also loaded (when it was), so a waiting test or embedder sees both.
    setDownload({ state: r.status === 'complete' ? 'done' : r.status });
  }

  function showProgress(ev) {
    const d = models.download;
    d.modelId = ev.modelId;
    d.progress = ev;
    const bar = $('hub-progress', HTMLProgressElement);
    const line = [];
    if (ev.phase === 'list') line.push(`Listing the files of ${d.repo}…`);
    else if (ev.phase === 'check') line.push('Checking that config.json is a BitNet model…');
    else if (ev.phase === 'verify') line.push('Verified; finishing…');
    else {
      bar.max = Math.max(ev.total, 1);
      bar.value = ev.done;
      line.push(`${ev.file}`, `${fmtSize(ev.done)} / ${fmtSize(ev.total)}`);
      if (ev.bytesPerSec) line.push(`${fmtSize(ev.bytesPerSec)}/s`);
      if (ev.etaSeconds != null && ev.done < ev.total) line.push(`ETA ${fmtSeconds(ev.etaSeconds)}`);
    }
    $('hub-stats').textContent = line.join(' · ');
    d.line = $('hub-stats').textContent;
    // The list's row for this model: once, when the download starts writing.
    if (ev.phase === 'download' && !models.list.some((m) => m.id === ev.modelId)) refresh();
    else {
      const li = list.querySelector(`li[data-model-id="${CSS.escape(ev.modelId)}"] progress`);
      if (li && ev.total) { li.max = ev.total; li.value = ev.done; }
    }
  }

  async function stop(modelId, discard) {
    const id = modelId ?? models.download.modelId;
    if (!id) return;
    try {
      await withClient((c) => c.stopDownload(id, { discard: Boolean(discard) }));
    } catch (err) {
      showHubError(`Could not ${discard ? 'cancel' : 'pause'}: ${err.message}`);
    }
  }
  $('hub-pause', HTMLButtonElement).addEventListener('click', () => stop(null, false));
  $('hub-cancel', HTMLButtonElement).addEventListener('click', () => stop(null, true));

  // ---- local files: the picker and drag-and-drop ------------------------------------------------
  async function importFiles(files) {
    if (!files.length) return;
    page.clearError();
    importError.hidden = true;
    document.body.dataset.import = 'importing';
    page.setState('loading');
    state.loadProgress = [];
    await page.askPersist();
    try {
      const model = await withClient((c) => c.loadModel({ files },
        { keep: true, persisted: Boolean(state.persisted), fakeFree, onProgress: page.showLoadProgress }));
      page.showModel(model, 'Your model');
      document.body.dataset.import = 'done';
    } catch (err) {
      // The previous model is still loaded in the worker, so the page keeps working.
      page.showError(`Could not load your model: ${err.message}`);
      document.body.dataset.import = 'error';
      return;
    } finally {
      $('files', HTMLInputElement).value = '';
      $('load-meter').hidden = true;
      refresh();
    }
    await page.run();
  }

  $('files', HTMLInputElement).addEventListener('change', () => importFiles(Array.from($('files', HTMLInputElement).files ?? [])));
  drop.addEventListener('click', () => $('files', HTMLInputElement).click());
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      $('files', HTMLInputElement).click();
    }
  });
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      e.dataTransfer.dropEffect = 'copy';
      drop.classList.add('over');
    });
  }
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', async (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (busy) {
      importError.textContent = 'The page is busy (loading, generating or training); drop the files again when it is done.';
      importError.hidden = false;
      return;
    }
    try {
      importFiles(await droppedFiles(e.dataTransfer));
    } catch (err) {
      importError.textContent = `Could not read the dropped files: ${err.message}`;
      importError.hidden = false;
    }
  });

  return {
    refresh,
    /** main.js's syncControls: whether the worker is busy with a model (loads wait then). */
    sync({ busy: b }) {
      const changed = busy !== b;
      busy = b;
      $('files', HTMLInputElement).disabled = b;
      drop.setAttribute('aria-disabled', String(b));
      if (changed) render();
    },
  };
}

/** Files of a drop, with folders walked (a dropped model folder works like its files). */
async function droppedFiles(dt) {
  const entries = Array.from(dt.items ?? []).map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return Array.from(dt.files ?? []);
  const out = [];
  const walk = async (entry, depth) => {
    if (entry.isFile) {
      out.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
    } else if (entry.isDirectory && depth < 2) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const e of batch) await walk(e, depth + 1);
      }
    }
  };
  for (const e of entries) await walk(e, 0);
  return out;
}
