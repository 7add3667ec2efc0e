// The model store: models kept in this browser's IndexedDB, so a later visit loads them without
// fetching anything. Used by web/worker.js (a module worker); no DOM needed.
//
// Database `bitlora` (version 1):
//   manifests  key: model id ("bundled:default")
//              { id, name, source, chunkSize, files: [{ name, size, sha256, chunks }],
//                complete: boolean, storedAt }
//   chunks     key: `${modelId}/${fileName}/${index}` -> Uint8Array (at most chunkSize bytes)
//
// Writing: the manifest is first written with complete: false, then every chunk, then the
// manifest again with complete: true. A visit that finds complete: false (a tab closed
// mid-write, a quota error) discards the model and fetches it again. Reading re-computes each
// file's sha256 (crypto.subtle) and discards the model on any mismatch or missing chunk.

export const DB_NAME = 'bitlora';
export const CHUNK_SIZE = 4 * 1024 * 1024;

let dbPromise = null;

export function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      if (typeof indexedDB === 'undefined') return reject(new Error('IndexedDB is not available in this browser'));
      const req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = () => {
        const db = req.result;
        if (!db.objectStoreNames.contains('manifests')) db.createObjectStore('manifests', { keyPath: 'id' });
        if (!db.objectStoreNames.contains('chunks')) db.createObjectStore('chunks');
      };
      req.onsuccess = () => {
        const db = req.result;
        // Another tab deleting the database: let it, and reopen next time.
        db.onversionchange = () => { db.close(); dbPromise = null; };
        resolve(db);
      };
      req.onerror = () => reject(req.error ?? new Error('cannot open IndexedDB'));
      req.onblocked = () => reject(new Error('IndexedDB is blocked by another tab of this page'));
    }).catch((err) => { dbPromise = null; throw err; });
  }
  return dbPromise;
}

const done = (tx) => new Promise((resolve, reject) => {
  tx.oncomplete = () => resolve();
  tx.onerror = () => reject(tx.error ?? new Error('IndexedDB transaction failed'));
  tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
});
const result = (req) => new Promise((resolve, reject) => {
  req.onsuccess = () => resolve(req.result);
  req.onerror = () => reject(req.error);
});

export const chunkKey = (id, file, i) => `${id}/${file}/${i}`;

export async function getManifest(id) {
  const db = await openDb();
  return result(db.transaction('manifests').objectStore('manifests').get(id));
}

export async function listManifests() {
  const db = await openDb();
  return result(db.transaction('manifests').objectStore('manifests').getAll());
}

async function putManifest(manifest) {
  const db = await openDb();
  const tx = db.transaction('manifests', 'readwrite');
  tx.objectStore('manifests').put(manifest);
  await done(tx);
}

/** Removes a model's manifest and every chunk it may have written. */
export async function deleteModel(id) {
  const db = await openDb();
  const tx = db.transaction(['manifests', 'chunks'], 'readwrite');
  tx.objectStore('manifests').delete(id);
  // Keys `${id}/...`: '/' + 1 is '0', so this range holds exactly this model's chunks.
  tx.objectStore('chunks').delete(IDBKeyRange.bound(`${id}/`, `${id}0`, false, true));
  await done(tx);
}

export async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Stores `files` ([{ name, bytes }]) as model `id`. `onProgress({ done, total })` in bytes.
 * Throws on a quota error (after removing what it wrote).
 */
export async function storeModel({ id, name, source }, files, onProgress) {
  const manifest = {
    id, name, source, chunkSize: CHUNK_SIZE, complete: false, storedAt: new Date().toISOString(),
    files: await Promise.all(files.map(async (f) => ({
      name: f.name, size: f.bytes.length, sha256: await sha256Hex(f.bytes),
      chunks: Math.ceil(f.bytes.length / CHUNK_SIZE),
    }))),
  };
  const total = files.reduce((n, f) => n + f.bytes.length, 0);
  let written = 0;
  try {
    await deleteModel(id);
    await putManifest(manifest);
    const db = await openDb();
    for (const f of files) {
      for (let i = 0, off = 0; off < f.bytes.length || i === 0; i++, off += CHUNK_SIZE) {
        // A copy, so the stored value is exactly the chunk (not the whole file's buffer).
        const chunk = f.bytes.slice(off, Math.min(off + CHUNK_SIZE, f.bytes.length));
        const tx = db.transaction('chunks', 'readwrite');
        tx.objectStore('chunks').put(chunk, chunkKey(id, f.name, i));
        await done(tx);
        written += chunk.length;
        onProgress?.({ done: written, total });
        if (off + CHUNK_SIZE >= f.bytes.length) break;
      }
    }
    manifest.complete = true;
    await putManifest(manifest);
  } catch (err) {
    await deleteModel(id).catch(() => {});
    throw err;
  }
  return manifest;
}

/**
 * Reads model `id` back: resolves to { manifest, files: [{ name, bytes }] }, or to
 * { problem: '...' } (incomplete, missing chunk, size or sha256 mismatch) after discarding the
 * stored copy, or to null when nothing is stored. `onProgress({ done, total })` in bytes.
 */
export async function readModel(id, onProgress) {
  const manifest = await getManifest(id);
  if (!manifest) return null;
  const discard = async (problem) => {
    await deleteModel(id);
    return { problem };
  };
  if (!manifest.complete) return discard('the stored copy was incomplete (an earlier visit was interrupted while storing it)');
  const db = await openDb();
  const total = manifest.files.reduce((n, f) => n + f.size, 0);
  let read = 0;
  const files = [];
  for (const f of manifest.files) {
    const bytes = new Uint8Array(f.size);
    let off = 0;
    for (let i = 0; i < f.chunks; i++) {
      const chunk = await result(db.transaction('chunks').objectStore('chunks').get(chunkKey(id, f.name, i)));
      if (!(chunk instanceof Uint8Array)) return discard(`chunk ${i} of ${f.name} is missing from the store`);
      if (off + chunk.length > f.size) return discard(`${f.name} is larger in the store than its manifest says`);
      bytes.set(chunk, off);
      off += chunk.length;
      read += chunk.length;
      onProgress?.({ done: read, total });
    }
    if (off !== f.size) return discard(`${f.name} is ${off} bytes in the store, its manifest says ${f.size}`);
    const sha = await sha256Hex(bytes);
    if (sha !== f.sha256) {
      return discard(`${f.name} failed its sha256 check (stored ${f.sha256.slice(0, 12)}…, read back ${sha.slice(0, 12)}…)`);
    }
    files.push({ name: f.name, bytes });
  }
  return { manifest, files };
}

/** Deletes the whole database. Resolves to what was in it: { models, bytes }. */
export async function deleteAll() {
  let models = 0, bytes = 0;
  try {
    for (const m of await listManifests()) {
      models++;
      bytes += m.files.reduce((n, f) => n + f.size, 0);
    }
  } catch {
    // Nothing readable: delete anyway.
  }
  if (dbPromise) {
    const db = await dbPromise.catch(() => null);
    db?.close();
    dbPromise = null;
  }
  await new Promise((resolve, reject) => {
    const req = indexedDB.deleteDatabase(DB_NAME);
    let timer = null;
    req.onsuccess = () => { clearTimeout(timer); resolve(); };
    req.onerror = () => { clearTimeout(timer); reject(req.error ?? new Error('cannot delete the IndexedDB database')); };
    // Blocked: another connection is still open (another tab, or a page being unloaded). Other
    // tabs of this page close theirs on `versionchange`; the deletion then goes ahead by itself.
    req.onblocked = () => {
      timer ??= setTimeout(() => reject(new Error(
        'another tab of this page still has the store open; close it and the deletion completes')), 10_000);
    };
  });
  return { models, bytes };
}

/**
 * Asks for persistent storage and whether `bytes` more fit. Resolves to
 * { persisted, fits, quota, usage, free } (quota/usage null when the browser does not say).
 */
export async function checkRoom(bytes) {
  const storage = navigator.storage;
  let persisted = false;
  try {
    persisted = Boolean(await storage?.persist?.());
  } catch {
    // persist() is only a request; the browser may refuse or not offer it in workers.
  }
  if (!persisted) {
    try { persisted = Boolean(await storage?.persisted?.()); } catch { /* ditto */ }
  }
  let quota = null, usage = null;
  try {
    const est = await storage?.estimate?.();
    if (est) ({ quota = null, usage = null } = est);
  } catch {
    // No estimate: try to store and handle a quota error.
  }
  const free = quota == null ? null : Math.max(0, quota - (usage ?? 0));
  // A 5% margin for IndexedDB's own overhead.
  const fits = free == null ? true : bytes * 1.05 <= free;
  return { persisted, fits, quota, usage, free };
}
