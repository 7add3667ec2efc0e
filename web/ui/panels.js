// @ts-check
// The page's fine-tuning panels (training data, fine-tune, chat comparison, adapters), mounted
// by web/main.js once. They share one small context: the Bitlora client (web/bitlora.js), the
// loaded model, window.__bitlora, and an event bus:
//   'model'          a model was loaded (main.js calls modelLoaded())
//   'data'           the training data was checked (ok or not)
//   'train-options'  the context or batch changed (the data's sequence counts depend on them)
//   'trainer'        a run started, paused, resumed, stopped or ended
//   'trained'        a run finished (done or stopped)
//   'adapters'       the adapter store changed
//   'progress'       a training step (or validation) reported progress
//   'compare'        the chat started or ended a turn
// and web/ui/steps.js reads them all to show each step's state and the next step.

import { mountDataPanel } from './data-panel.js';
import { mountTrainPanel } from './train-panel.js';
import { mountComparePanel } from './compare-panel.js';
import { mountAdaptersPanel } from './adapters-panel.js';
import { mountSteps } from './steps.js';
import { plural, fmtBytes } from './format.js';
import { debounce, $ } from './dom.js';

/**
 * @import { Bitlora, ModelInfo, Trainer, BackendInfo, ModelStoreList, DataSummary, MemoryEstimate, AdapterInfo, StoredModel, DownloadProgress, DownloadResult } from '../bitlora.js'
 */

/**
 * The loaded model as the page keeps it: ModelInfo and where it came from ("Bundled default model").
 * @typedef {ModelInfo & { origin: string }} PageModel
 */

/**
 * window.__bitlora: what the page publishes for tests and embedders (web/main.js's header says
 * what each part means; each panel owns its part).
 * @typedef {object} PageState
 * @property {string} state
 * @property {string | null} backend
 * @property {string | null} adapter
 * @property {BackendInfo | null} backendInfo
 * @property {PageModel | null} model
 * @property {number[] | null} tokens
 * @property {number[][] | null} logits
 * @property {{ token: number, prob: number }[] | null} top
 * @property {number | null} ms
 * @property {string} [ranOn]
 * @property {string | null} error
 * @property {{ state: string, error?: string | null } | GenState} generation the Generate panel's generation (main.js)
 * @property {{ phase: string, at: number, done?: number, total?: number, end?: number, text?: string }[]} loadProgress
 * @property {boolean} [persisted]
 * @property {ModelStoreList | { available: true, models: [] }} [store]
 * @property {ModelsState} [models]
 * @property {DataState} [data]
 * @property {Record<string, unknown>} [training] the training panel's run (train-panel.js)
 * @property {Record<string, unknown>} [compare] the chat comparison (compare-panel.js)
 * @property {{ list: AdapterInfo[], exported: { name: string, format?: 'peft' | 'gguf', files: { name: string, size: number }[] } | null, error: string | null }} [adapters]
 * @property {{ runs: number, adapters: number, bytes: number }} [trainingStore]
 */

/**
 * The Generate panel's generation (main.js).
 * @typedef {{ state: string, prompt: { text: string, chat: boolean } | { tokens: number[] },
 *   options: Record<string, number>, maxTokens: number, tokens: number[], text: string, events: number,
 *   firstAt: number | null, lastAt: number | null, result: import('../bitlora.js').GenerateResult | null,
 *   error: string | null, stoppedBy?: string }} GenState
 */

/**
 * The model panel's part (models-panel.js).
 * @typedef {{ list: StoredModel[], usage?: number | null, quota?: number | null, available?: boolean,
 *   downloading?: string[], download: { state: string, modelId?: string, repo?: string,
 *   progress?: DownloadProgress | null, error?: string | null, notes?: string[], result?: DownloadResult | null,
 *   loaded?: boolean, line?: string } }} ModelsState
 */

/**
 * The training-data panel's part (data-panel.js).
 * @typedef {{ state: 'empty' | 'checking' | 'ok' | 'error', fileName: string, summary: DataSummary | null, error: string | null }} DataState
 */

/**
 * What the panels share.
 * @typedef {object} App
 * @property {() => Bitlora | null} client the client, or null while it starts
 * @property {() => PageModel | null} model
 * @property {PageState} state
 * @property {() => void} publish
 * @property {EventTarget} bus
 * @property {Trainer | null} trainer the run shown in the training panel
 * @property {() => { context: number, batch: number }} trainOptions
 * @property {ReturnType<typeof mountDataPanel>} data
 * @property {ReturnType<typeof mountComparePanel>} compare
 * @property {ReturnType<typeof mountTrainPanel>} train
 * @property {ReturnType<typeof mountAdaptersPanel>} adapters
 */

/**
 * `client()`: the Bitlora client or null while it starts; `model()`: the loaded ModelInfo or
 * null; `state`: window.__bitlora; `publish()`: refreshes the page's JSON summary.
 * @param {Pick<App, 'client' | 'model' | 'state' | 'publish'>} page
 */
export function mountPanels({ client, model, state, publish }) {
  const bus = new EventTarget();
  // The panels are mounted one after another below, each given `app`; a panel reads the others
  // (app.data, app.train, ...) only in event handlers, after all of them are mounted.
  const app = /** @type {App} */ ({ client, model, state, publish, bus, trainer: null });
  app.trainOptions = () => app.train.options();
  app.data = mountDataPanel(app);
  app.compare = mountComparePanel(app);
  app.train = mountTrainPanel(app);
  app.adapters = mountAdaptersPanel(app);
  const steps = mountSteps(app);

  // The "Your data" panel also says what the training store holds (#training-status).
  const storage = debounce(async () => {
    const c = client();
    if (!c) return;
    try {
      const [runs, adapters] = await Promise.all([c.listRuns(), c.listAdapters()]);
      const bytes = [...runs, ...adapters].reduce((n, x) => n + (x.bytes ?? 0), 0);
      state.trainingStore = { runs: runs.length, adapters: adapters.length, bytes };
      $('training-status').textContent = runs.length || adapters.length
        ? `Training runs (with their data and checkpoints) and adapters kept in this browser (IndexedDB): ` +
          `${plural(runs.length, 'run')} and ${plural(adapters.length, 'adapter')}, ${fmtBytes(bytes)}.`
        : 'No training runs or adapters are kept in this browser.';
    } catch (err) {
      $('training-status').textContent = `The training store cannot be read: ${err.message}`;
    }
  }, 300);
  for (const e of ['model', 'adapters', 'trained']) bus.addEventListener(e, storage);
  bus.addEventListener('trainer', () => { if (app.trainer?.state !== 'running') storage(); });

  return {
    app,
    /** Shows the steps' states again (main.js: the model's loading state changed). */
    steps,
    /** A model was loaded (the first one, or another picked later). */
    modelLoaded() {
      bus.dispatchEvent(new Event('model'));
    },
    /** Before "Delete all my data": a run in progress is stopped first. */
    beforeDeleteAll: () => app.train.beforeDeleteAll(),
    /**
     * Deletes the training store (runs, checkpoints, adapters) and says what went:
     * "2 training runs and 1 adapter".
     */
    async deleteTrainingData() {
      const c = client();
      if (!c) return '';
      const [runs, adapters] = await Promise.all([c.listRuns().catch(() => []), c.listAdapters().catch(() => [])]);
      await c.deleteTrainingData();
      await app.adapters.refresh();
      await app.train.offerResume();
      bus.dispatchEvent(new Event('adapters'));
      storage.now();
      return `${plural(runs.length, 'training run')} and ${plural(adapters.length, 'adapter')}`;
    },
  };
}
