// @ts-check
// The adapters panel: save the trained adapter, list the stored ones, export one as PEFT files
// (adapter_config.json + adapter_model.safetensors) or as a GGUF LoRA adapter for llama.cpp or
// QVAC Fabric (downloaded from this tab: nothing is uploaded), import PEFT files, delete one (a second click confirms, no dialog).
//
// Published for tests: window.__bitlora.adapters = { list: AdapterInfo[], exported: { name,
// files: [{ name, size }] }, error }.

import { $, showError, clearError, message, started } from './dom.js';
import { fmtBytes, fmtDate, fmtInt, fmtParams } from './format.js';

const TARGET_LABELS = { q_proj: 'q', k_proj: 'k', v_proj: 'v', o_proj: 'o', gate_proj: 'gate', up_proj: 'up', down_proj: 'down' };
const NAME_RE = /^[\w.\- ]{1,80}$/u;
const CONFIRM_MS = 5000;

/**
 * `app`: { client(), model(), state, publish(), bus, trainer, compare }. Returns { refresh() }.
 * @param {import('./panels.js').App} app
 */
export function mountAdaptersPanel(app) {
  /** @type {NonNullable<import('./panels.js').PageState['adapters']>} */
  const a = { list: [], exported: null, error: null };
  app.state.adapters = a;
  let busy = false;
  const urls = [];

  const status = (text) => { $('adapter-status').textContent = text; };

  function sync() {
    const tr = app.trainer;
    // Nothing to save before the first step has run (the adapter's B is still zero).
    const canSave = Boolean(tr && tr.step > 0) && !busy;
    $('adapter-save', HTMLButtonElement).disabled = !canSave;
    $('adapter-save', HTMLButtonElement).title = tr && tr.step > 0 ? '' : 'Fine-tune first: there is no trained step to save yet';
    $('adapter-save-form').hidden = !tr;
    $('adapter-import', HTMLInputElement).disabled = busy || !app.model();
  }

  /** @param {string | null} [prefer] */
  async function refresh(prefer = null) {
    const client = app.client();
    if (!client) return;
    try {
      a.list = await client.listAdapters();
    } catch (err) {
      a.list = [];
      fail(`Cannot read the stored adapters: ${message(err)}`);
    }
    render();
    app.compare.refreshAdapters(a.list, prefer);
    sync();
    app.publish();
  }

  function render() {
    const ul = $('adapter-list');
    ul.replaceChildren();
    if (!a.list.length) {
      status('No adapters stored in this browser yet.');
      return;
    }
    for (const info of [...a.list].sort((x, y) => y.createdAt - x.createdAt)) {
      const li = document.createElement('li');
      li.dataset.name = info.name;
      const name = document.createElement('div');
      name.className = 'name';
      name.textContent = info.name;
      const meta = document.createElement('p');
      meta.className = 'meta';
      const targets = info.targets.map((x) => TARGET_LABELS[x] ?? x).join(', ');
      meta.textContent = [
        `rank ${info.r}, alpha ${info.alpha} on ${targets}`,
        `${fmtParams(info.params)} parameters, ${fmtBytes(info.bytes)}`,
        info.source === 'imported' ? 'imported' : `trained${info.step ? ` ${fmtInt(info.step)} steps` : ''}`,
        `for ${info.model?.name ?? info.model?.key ?? 'unknown model'}`,
        fmtDate(info.createdAt),
      ].filter(Boolean).join(' · ');
      const row = document.createElement('div');
      row.className = 'row';
      row.append(
        button('Chat with it', 'adapter-chat', () => app.compare.select(info.name)),
        button('Export PEFT files', 'adapter-export', () => exportAdapter(info.name)),
        button('GGUF for llama.cpp', 'adapter-export-gguf', () => exportAdapter(info.name, { format: 'gguf', target: 'llama' }),
          'A .gguf LoRA adapter for llama.cpp (llama-cli --lora): the same update as the PEFT files'),
        button('GGUF for QVAC', 'adapter-export-qvac', () => exportAdapter(info.name, { format: 'gguf', target: 'qvac' }),
          'A .gguf LoRA adapter for QVAC Fabric\'s BitNet graph, which scales the LoRA term by the weight scale: B is pre-divided by it'),
        button('Delete', 'adapter-delete danger', (btn) => confirmDelete(btn, info.name)),
      );
      const hint = document.createElement('p');
      hint.className = 'hint';
      hint.textContent = 'PEFT: for Python (PeftModel.from_pretrained). GGUF for llama.cpp: llama-cli --lora. ' +
        'GGUF for QVAC: QVAC Fabric, whose BitNet graph applies the weight scale after the LoRA term (B is divided by it to match). ' +
        'GGUF needs this adapter\'s model loaded.';
      li.append(name, meta, row, hint);
      ul.append(li);
    }
    status(`${a.list.length === 1 ? '1 adapter' : `${a.list.length} adapters`} stored in this browser, ` +
      `${fmtBytes(a.list.reduce((n, x) => n + (x.bytes ?? 0), 0))}.`);
  }

  function button(text, cls, onClick, title = '') {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = cls;
    b.textContent = text;
    if (title) b.title = title;
    b.addEventListener('click', () => onClick(b));
    return b;
  }

  function fail(msg) {
    a.error = msg;
    showError('adapter-error', msg);
    app.publish();
  }

  async function withBusy(fn) {
    clearError('adapter-error', $('adapters'));
    a.error = null;
    busy = true;
    sync();
    try {
      return await fn();
    } catch (err) {
      fail(message(err));
      return null;
    } finally {
      busy = false;
      sync();
    }
  }

  async function save() {
    const tr = app.trainer;
    if (!tr) return;
    const name = $('adapter-name', HTMLInputElement).value.trim() || defaultName(tr);
    if (!NAME_RE.test(name)) {
      showError('adapter-error', `Name: use letters, digits, spaces, dots, dashes or underscores (up to 80), got “${name}”`, 'adapter-name');
      return;
    }
    await withBusy(async () => {
      status(`Saving “${name}”…`);
      const info = await tr.saveAdapter(name);
      $('adapter-name', HTMLInputElement).value = '';
      await refresh(info.name);
      status(`Saved “${info.name}” (${fmtBytes(info.bytes)}, step ${fmtInt(info.step ?? tr.step)}). ${$('adapter-status').textContent}`);
      app.bus.dispatchEvent(new Event('adapters'));
    });
  }

  /** "train-r4" from the run's data file and rank, made unique among the stored adapters. */
  function defaultName(tr) {
    const base = `${(tr.data?.fileName ?? 'adapter').replace(/\.[^.]*$/, '').replace(/[^\w.-]+/gu, '-').slice(0, 60) || 'adapter'}-r${tr.config?.rank ?? ''}`;
    return unique(base);
  }

  function unique(base) {
    const names = new Set(a.list.map((x) => x.name));
    if (!names.has(base)) return base;
    for (let i = 2; ; i++) if (!names.has(`${base}-${i}`)) return `${base}-${i}`;
  }

  /**
   * @param {string} name
   * @param {import('../bitlora.js').ExportAdapterOptions} [options]
   */
  async function exportAdapter(name, options = {}) {
    const gguf = options.format === 'gguf';
    const what = gguf ? `a GGUF adapter for ${options.target === 'qvac' ? 'QVAC Fabric' : 'llama.cpp'}` : 'PEFT files';
    await withBusy(async () => {
      status(`Exporting “${name}” as ${what}…`);
      const files = await started(app.client()).exportAdapter(name, options);
      for (const u of urls.splice(0)) URL.revokeObjectURL(u);
      const box = $('adapter-downloads');
      box.replaceChildren(document.createTextNode(`“${name}” as ${what}: `));
      for (const f of files) {
        const type = f.name.endsWith('.json') ? 'application/json' : 'application/octet-stream';
        // TypeScript 5.9 types a Uint8Array that may sit on a SharedArrayBuffer as no BlobPart;
        // these bytes come from the worker's structured clone, a plain ArrayBuffer.
        const url = URL.createObjectURL(new Blob([/** @type {Uint8Array<ArrayBuffer>} */ (f.bytes)], { type }));
        urls.push(url);
        const link = document.createElement('a');
        link.href = url;
        link.download = f.name;
        link.textContent = `${f.name} (${fmtBytes(f.bytes.length)})`;
        box.append(link);
      }
      box.hidden = false;
      // Download both at once; the links stay for a browser that asks before a second download.
      for (const link of box.querySelectorAll('a')) link.click();
      a.exported = { name, format: gguf ? 'gguf' : 'peft', files: files.map((f) => ({ name: f.name, size: f.bytes.length })) };
      status(gguf
        ? `Exported “${name}”: ${files[0].name} (${options.target === 'qvac' ? 'for QVAC Fabric\'s BitNet graph' : 'llama-cli -m MODEL.gguf --lora ' + files[0].name}).`
        : `Exported “${name}”: ${files.map((f) => f.name).join(' and ')} (put them in one folder for PeftModel.from_pretrained).`);
      app.publish();
    });
  }

  function confirmDelete(btn, name) {
    if (btn.dataset.confirm !== 'yes') {
      btn.dataset.confirm = 'yes';
      btn.textContent = 'Delete: sure? Click again';
      setTimeout(() => {
        if (btn.isConnected) {
          delete btn.dataset.confirm;
          btn.textContent = 'Delete';
        }
      }, CONFIRM_MS);
      return;
    }
    withBusy(async () => {
      await started(app.client()).deleteAdapter(name);
      await refresh();
      status(`Deleted “${name}”. ${$('adapter-status').textContent}`);
      app.bus.dispatchEvent(new Event('adapters'));
    });
  }

  async function importFiles() {
    const files = Array.from($('adapter-import', HTMLInputElement).files ?? []);
    if (!files.length) return;
    await withBusy(async () => {
      const names = files.map((f) => f.name);
      if (!names.includes('adapter_config.json') || !names.some((n) => n.endsWith('.safetensors'))) {
        throw new Error(`Import: pick both adapter_config.json and adapter_model.safetensors (got ${names.join(', ')})`);
      }
      status(`Importing ${names.join(', ')}…`);
      const info = await started(app.client()).importAdapter(files, unique('imported'));
      await refresh(info.name);
      status(`Imported “${info.name}” (rank ${info.r} on ${info.targets.map((x) => TARGET_LABELS[x] ?? x).join(', ')}). ${$('adapter-status').textContent}`);
      app.bus.dispatchEvent(new Event('adapters'));
    });
    $('adapter-import', HTMLInputElement).value = '';
  }

  $('adapter-save-form', HTMLFormElement).addEventListener('submit', (event) => {
    event.preventDefault();
    save();
  });
  $('adapter-name', HTMLInputElement).addEventListener('input', () => $('adapter-name', HTMLInputElement).removeAttribute('aria-invalid'));
  $('adapter-import', HTMLInputElement).addEventListener('change', importFiles);
  app.bus.addEventListener('trainer', sync);
  app.bus.addEventListener('progress', sync);
  app.bus.addEventListener('trained', () => {
    if (!$('adapter-name', HTMLInputElement).value && app.trainer) $('adapter-name', HTMLInputElement).placeholder = defaultName(app.trainer);
    sync();
  });
  app.bus.addEventListener('model', () => refresh());
  sync();
  status('');
  return { refresh };
}
