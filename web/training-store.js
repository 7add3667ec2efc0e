// @ts-check
// The training store: training runs (their config, the visitor's data, the latest checkpoint and
// the loss history) and saved LoRA adapters, kept in this browser's IndexedDB so that a run
// continues after a reload and adapters stay until deleted. Used by web/worker.js (a module
// worker); no DOM needed. Its own database, apart from the model store (web/store.js, `bitlora`),
// so that neither's upgrades or deletions touch the other.
//
// Database `bitlora-training` (version 1):
//   runs         key: run id -> { id, name, createdAt, updatedAt, model: { key, name }, state,
//                step, totalSteps, checkpointStep, loss, valLoss, config (as given), resolved
//                (defaults filled in), data: { fileName, format, bytes }, history: ProgressEvent[],
//                bytes }
//   data         key: run id -> Uint8Array (the training data's UTF-8 bytes; it never leaves the tab)
//   checkpoints  key: run id -> { step, bytes: Uint8Array } (core's Trainer::checkpoint: one
//                safetensors file with the adapter, AdamW's moments and the loop's state)
//   adapters     key: name -> { name, source, createdAt, model: { key, name }, r, alpha, dropout,
//                rslora, targets, params, bytes, runId?, step?, config: string (adapter_config.json),
//                weights: Uint8Array (adapter_model.safetensors) }
//
// A checkpoint and the run record that points at it are written in one transaction, so the
// record's checkpointStep always names the checkpoint that is there.

export const DB_NAME = 'bitlora-training';
const STORES = ['runs', 'data', 'checkpoints', 'adapters'];

/** @type {Promise<IDBDatabase> | null} */
let dbPromise = null;

export function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      if (typeof indexedDB === 'undefined') return reject(new Error('IndexedDB is not available in this browser'));
      const req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = () => {
        const db = req.result;
        if (!db.objectStoreNames.contains('runs')) db.createObjectStore('runs', { keyPath: 'id' });
        if (!db.objectStoreNames.contains('data')) db.createObjectStore('data');
        if (!db.objectStoreNames.contains('checkpoints')) db.createObjectStore('checkpoints');
        if (!db.objectStoreNames.contains('adapters')) db.createObjectStore('adapters', { keyPath: 'name' });
      };
      req.onsuccess = () => {
        const db = req.result;
        db.onversionchange = () => { db.close(); dbPromise = null; };
        resolve(db);
      };
      req.onerror = () => reject(req.error ?? new Error('cannot open IndexedDB'));
      req.onblocked = () => reject(new Error('the training store (IndexedDB) is blocked by another tab of this page'));
    }).catch((err) => { dbPromise = null; throw err; });
  }
  return dbPromise;
}

/** @type {(tx: IDBTransaction) => Promise<void>} */
const done = (tx) => new Promise((resolve, reject) => {
  tx.oncomplete = () => resolve();
  tx.onerror = () => reject(storageError(tx.error));
  tx.onabort = () => reject(storageError(tx.error ?? new Error('IndexedDB transaction aborted')));
});
const result = (req) => new Promise((resolve, reject) => {
  req.onsuccess = () => resolve(req.result);
  req.onerror = () => reject(storageError(req.error));
});

/** A quota error says what to do; others pass through. */
function storageError(err) {
  const quota = err?.name === 'QuotaExceededError' || /quota/i.test(err?.message ?? '');
  if (!quota) return err;
  return Object.assign(new Error('browser storage is full: delete old training runs, adapters or models, then try again'), { quota: true });
}

async function tx(stores, mode, fn) {
  const db = await openDb();
  const t = db.transaction(stores, mode);
  const out = fn(Object.fromEntries([stores].flat().map((s) => [s, t.objectStore(s)])));
  await done(t);
  return out instanceof IDBRequest ? out.result : out;
}

/** Stores a new run: its record, its data and its first checkpoint, in one transaction. */
export function createRun(record, dataBytes, checkpoint) {
  return tx(['runs', 'data', 'checkpoints'], 'readwrite', (s) => {
    s.runs.put(record);
    s.data.put(dataBytes, record.id);
    if (checkpoint) s.checkpoints.put(checkpoint, record.id);
  });
}

/** Replaces a run's record; with `checkpoint` ({ step, bytes }) also its checkpoint, atomically. */
export function saveRun(record, checkpoint) {
  return tx(['runs', 'checkpoints'], 'readwrite', (s) => {
    s.runs.put(record);
    if (checkpoint) s.checkpoints.put(checkpoint, record.id);
  });
}

export async function getRun(id) {
  return tx('runs', 'readonly', (s) => s.runs.get(id));
}

export async function listRuns() {
  const runs = await tx('runs', 'readonly', (s) => s.runs.getAll());
  return runs.sort((a, b) => b.updatedAt - a.updatedAt);
}

/** The run's data bytes and checkpoint ({ step, bytes }), or null where missing. */
export async function loadRunState(id) {
  const db = await openDb();
  const t = db.transaction(['data', 'checkpoints'], 'readonly');
  const data = t.objectStore('data').get(id);
  const ckpt = t.objectStore('checkpoints').get(id);
  await done(t);
  return { data: data.result ?? null, checkpoint: ckpt.result ?? null };
}

export function deleteRun(id) {
  return tx(['runs', 'data', 'checkpoints'], 'readwrite', (s) => {
    s.runs.delete(id);
    s.data.delete(id);
    s.checkpoints.delete(id);
  });
}

export function putAdapter(entry) {
  return tx('adapters', 'readwrite', (s) => { s.adapters.put(entry); });
}

export async function getAdapter(name) {
  return tx('adapters', 'readonly', (s) => s.adapters.get(name));
}

/** Every adapter's description, without its bytes. */
export async function listAdapters() {
  const all = await tx('adapters', 'readonly', (s) => s.adapters.getAll());
  return all.map(({ config, weights, ...info }) => info).sort((a, b) => b.createdAt - a.createdAt);
}

export function deleteAdapter(name) {
  return tx('adapters', 'readwrite', (s) => { s.adapters.delete(name); });
}

/** Deletes the whole training store (the model store is separate). */
/** @returns {Promise<void>} */
export function deleteAll() {
  return new Promise((resolve, reject) => {
    const close = dbPromise ? dbPromise.then((db) => db.close()).catch(() => {}) : Promise.resolve();
    dbPromise = null;
    close.then(() => {
      if (typeof indexedDB === 'undefined') return resolve();
      const req = indexedDB.deleteDatabase(DB_NAME);
      req.onsuccess = () => resolve();
      req.onerror = () => reject(req.error ?? new Error('cannot delete the training store'));
      req.onblocked = () => reject(new Error('the training store is open in another tab of this page; close it and try again'));
    });
  });
}

export { STORES };
