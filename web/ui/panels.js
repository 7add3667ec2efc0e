// The page's fine-tuning panels (training data, fine-tune, chat comparison, adapters), mounted
// by web/main.js once. They share one small context: the Bitlora client (web/bitlora.js), the
// loaded model, window.__bitlora, and an event bus:
//   'model'          a model was loaded (main.js calls modelLoaded())
//   'data'           the training data was checked (ok or not)
//   'train-options'  the context or batch changed (the data's sequence counts depend on them)
//   'trainer'        a run started, paused, resumed, stopped or ended
//   'trained'        a run finished (done or stopped)
//   'adapters'       the adapter store changed

import { mountDataPanel } from './data-panel.js';
import { mountTrainPanel } from './train-panel.js';
import { mountComparePanel } from './compare-panel.js';
import { mountAdaptersPanel } from './adapters-panel.js';
import { plural, fmtBytes } from './format.js';
import { debounce } from './dom.js';

/**
 * `client()`: the Bitlora client or null while it starts; `model()`: the loaded ModelInfo or
 * null; `state`: window.__bitlora; `publish()`: refreshes the page's JSON summary.
 */
export function mountPanels({ client, model, state, publish }) {
  const bus = new EventTarget();
  const app = { client, model, state, publish, bus, trainer: null };
  app.trainOptions = () => app.train.options();
  app.data = mountDataPanel(app);
  app.compare = mountComparePanel(app);
  app.train = mountTrainPanel(app);
  app.adapters = mountAdaptersPanel(app);

  // The "Your data" panel also says what the training store holds (#training-status).
  const storage = debounce(async () => {
    const c = client();
    if (!c) return;
    try {
      const [runs, adapters] = await Promise.all([c.listRuns(), c.listAdapters()]);
      const bytes = [...runs, ...adapters].reduce((n, x) => n + (x.bytes ?? 0), 0);
      state.trainingStore = { runs: runs.length, adapters: adapters.length, bytes };
      document.getElementById('training-status').textContent = runs.length || adapters.length
        ? `Training runs (with their data and checkpoints) and adapters kept in this browser (IndexedDB): ` +
          `${plural(runs.length, 'run')} and ${plural(adapters.length, 'adapter')}, ${fmtBytes(bytes)}.`
        : 'No training runs or adapters are kept in this browser.';
    } catch (err) {
      document.getElementById('training-status').textContent = `The training store cannot be read: ${err.message}`;
    }
  }, 300);
  for (const e of ['model', 'adapters', 'trained']) bus.addEventListener(e, storage);
  bus.addEventListener('trainer', () => { if (app.trainer?.state !== 'running') storage(); });

  return {
    app,
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
