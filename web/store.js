// The model store: models kept in this browser's IndexedDB, so a later visit loads them without
// fetching anything. Used by web/worker.js and web/hub.js (module worker code); no DOM needed.
//
// Database `bitlora` (version 1):
//   manifests  key: model id: "bundled:default", "hub:https://huggingface.co/owner/name@main"
//              (the revision URI-encoded, so an id never contains '/' after its '@'),
//              "local:<time>-<random>"
//              { id, name, source: 'bundled'|'hub'|'local', chunkSize, complete: boolean,
//                storedAt, updatedAt?, origin?: { hub, repo, revision } (hub models),
//                files: [{ name, size, sha256, chunks,
//                          have?    chunks stored so far (a partial download; absent = all),
//                          hash?    the running SHA-256 state after `have` chunks (sha256.js),
//                          oid?     the hub's git blob sha1 (files not in LFS),
//                          verified? how the file was checked: 'lfs-sha256' | 'git-sha1' | 'size' }] }
//   chunks     key: `${modelId}/${fileName}/${index}` -> Uint8Array (chunkSize bytes; a file's
//              last chunk may be shorter)
//
// Invariants:
// - `complete: true` means every chunk of every file is stored and each file's `sha256` is that
//   of its bytes (the hub's LFS sha256, or computed here while storing).
// - A download writes each chunk in ONE transaction together with its file's `have` count and
//   running hash in the manifest, so a tab closed or a quota error at any point leaves a manifest
//   that describes exactly the chunks stored: the download resumes from there.
// - Reading re-computes each file's sha256 (crypto.subtle) before the model is used.
// - Bundled models are written in one go (storeModel): a visit that finds one incomplete
//   discards it and fetches it again (the page's own server is fast and always there).

import { Sha256 } from './sha256.js';

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
// Keys `${id}/${file}/...`: '/' + 1 is '0', so this range holds exactly that file's chunks (or,
// without `file`, the model's).
const chunkRange = (id, file) => (file == null
  ? IDBKeyRange.bound(`${id}/`, `${id}0`, false, true)
  : IDBKeyRange.bound(`${id}/${file}/`, `${id}/${file}0`, false, true));

/** True for a browser's "storage is full" error, however it arrives (put, commit, abort). */
export function isQuotaError(err) {
  return err?.name === 'QuotaExceededError' ||
    (typeof DOMException !== 'undefined' && err instanceof DOMException && /quota/i.test(err.message));
}

/** Bytes a manifest describes, and bytes of it stored so far. */
export function modelBytes(m) {
  let total = 0, stored = 0;
  for (const f of m.files) {
    total += f.size;
    const have = m.complete ? f.chunks : (f.have ?? 0);
    stored += Math.min(f.size, have * m.chunkSize);
  }
  return { total, stored };
}

/** What the page lists: { id, name, source, origin, bytes, storedBytes, complete, storedAt, files }. */
export function summary(m) {
  const { total, stored } = modelBytes(m);
  return {
    id: m.id, name: m.name, source: m.source, origin: m.origin ?? null, bytes: total, storedBytes: stored,
    complete: Boolean(m.complete), storedAt: m.storedAt, updatedAt: m.updatedAt ?? m.storedAt,
    files: m.files.map((f) => f.name),
  };
}

export async function getManifest(id) {
  const db = await openDb();
  return result(db.transaction('manifests').objectStore('manifests').get(id));
}

export async function listManifests() {
  const db = await openDb();
  return result(db.transaction('manifests').objectStore('manifests').getAll());
}

/**
 * listManifests() without creating the database when there is none (after "Delete all my data"
 * the page lists the store again; that must not bring an empty database back).
 */
export async function listIfAny() {
  if (!dbPromise) {
    const exists = await new Promise((resolve) => {
      if (typeof indexedDB === 'undefined') return resolve(false);
      const req = indexedDB.open(DB_NAME);
      req.onupgradeneeded = () => req.transaction.abort(); // none yet: do not create it
      req.onsuccess = () => { req.result.close(); resolve(true); };
      req.onerror = (e) => { e.preventDefault?.(); resolve(false); };
      req.onblocked = () => resolve(true);
    });
    if (!exists) return [];
  }
  return listManifests();
}

export async function putManifest(manifest) {
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
  tx.objectStore('chunks').delete(chunkRange(id));
  await done(tx);
}

/** Removes the chunks of the files named (a download whose file changed on the hub). */
export async function deleteFileChunks(id, names) {
  if (!names.length) return;
  const db = await openDb();
  const tx = db.transaction('chunks', 'readwrite');
  for (const name of names) tx.objectStore('chunks').delete(chunkRange(id, name));
  await done(tx);
}

/**
 * Forgets one file's chunks (a failed hash: it is downloaded again on resume) and marks the
 * model incomplete, in one transaction.
 */
export async function resetFile(id, name) {
  const db = await openDb();
  const tx = db.transaction(['manifests', 'chunks'], 'readwrite');
  tx.objectStore('chunks').delete(chunkRange(id, name));
  const manifests = tx.objectStore('manifests');
  const get = manifests.get(id);
  get.onsuccess = () => {
    const m = get.result;
    if (!m) return;
    const f = m.files.find((x) => x.name === name);
    if (f) {
      f.have = 0;
      delete f.hash;
    }
    for (const g of m.files) if (g.have == null) g.have = g.chunks;
    m.complete = false;
    m.updatedAt = new Date().toISOString();
    manifests.put(m);
  };
  await done(tx);
}

/**
 * Stores chunk `index` of file `name` of model `id` and, in the same transaction, updates the
 * manifest: the file's `have` becomes index + 1, `patch` (e.g. { hash } or { sha256 }) is merged
 * into the file's entry. Resolves to the manifest as written. A quota error rejects with the
 * browser's QuotaExceededError and leaves both stores as they were before the call.
 */
export async function writeChunk(id, name, index, bytes, patch = {}) {
  const db = await openDb();
  const tx = db.transaction(['manifests', 'chunks'], 'readwrite');
  let outcome = null; // the manifest as written, 'stale', or a synchronous put error
  const manifests = tx.objectStore('manifests');
  const get = manifests.get(id);
  get.onsuccess = () => {
    const m = get.result;
    const f = m?.files.find((x) => x.name === name);
    // Deleted meanwhile (Delete, "Delete all my data") or written by someone else: write nothing.
    if (!f || (f.have ?? 0) !== index) {
      outcome = 'stale';
      tx.abort();
      return;
    }
    try {
      tx.objectStore('chunks').put(bytes, chunkKey(id, name, index));
      Object.assign(f, patch, { have: index + 1 });
      m.updatedAt = new Date().toISOString();
      manifests.put(m);
      outcome = m;
    } catch (err) {
      // A synchronous put error (QuotaExceededError in some browsers, DataCloneError).
      outcome = err;
      tx.abort();
    }
  };
  try {
    await done(tx);
  } catch (err) {
    if (outcome instanceof Error) throw outcome;
    if (outcome === 'stale') throw staleWrite(id, name, index);
    throw err;
  }
  return outcome;
}

const staleWrite = (id, name, index) => Object.assign(
  new Error(`${name}: chunk ${index} was not stored: the model ${id} was deleted or changed meanwhile`),
  { stale: true });

export async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Stores `files` ([{ name, bytes }]) as model `id` in one go (the bundled models).
 * `onProgress({ done, total })` in bytes. Throws on a quota error (after removing what it wrote).
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
 * Stores the user's files (File objects, or { name, size, slice() }-alikes) as a new complete
 * model, reading each file in chunks (never the whole file at once) and hashing as it goes.
 * `entries`: [{ name (as stored), file }]. On any error (quota included) what was written is
 * removed again: an import is all or nothing, since the files are still on the user's disk.
 * Resolves to the manifest.
 */
export async function importFiles({ id, name }, entries, onProgress) {
  const manifest = {
    id, name, source: 'local', chunkSize: CHUNK_SIZE, complete: false, storedAt: new Date().toISOString(),
    files: entries.map(({ name: n, file }) => ({
      name: n, size: file.size, sha256: null, chunks: Math.max(1, Math.ceil(file.size / CHUNK_SIZE)), have: 0,
      verified: 'size',
    })),
  };
  const total = entries.reduce((n, e) => n + e.file.size, 0);
  let written = 0;
  try {
    await putManifest(manifest);
    for (const [k, { name: n, file }] of entries.entries()) {
      const hash = new Sha256();
      const { chunks } = manifest.files[k];
      for (let i = 0; i < chunks; i++) {
        const bytes = new Uint8Array(await file.slice(i * CHUNK_SIZE, Math.min((i + 1) * CHUNK_SIZE, file.size)).arrayBuffer());
        hash.update(bytes);
        const last = i === chunks - 1;
        await writeChunk(id, n, i, bytes, last ? { sha256: hash.hex() } : { hash: hash.save() });
        written += bytes.length;
        onProgress?.({ done: written, total, file: n });
      }
    }
    const m = await getManifest(id);
    m.complete = true;
    for (const f of m.files) {
      delete f.have;
      delete f.hash;
    }
    await putManifest(m);
    return m;
  } catch (err) {
    await deleteModel(id).catch(() => {});
    throw err;
  }
}

/**
 * Reads model `id` back: resolves to { manifest, files: [{ name, bytes }] }, or to
 * { problem: '...' } (incomplete, missing chunk, size or sha256 mismatch), or to null when
 * nothing is stored. `onProgress({ done, total })` in bytes.
 *
 * What happens to a bad copy: `onProblem: 'discard'` (the bundled models) deletes it;
 * 'keep-partial' (downloads and imports) leaves an incomplete download alone (it can be
 * resumed), and on a failed chunk or hash forgets only the damaged file (resetFile), so a resume
 * fetches just that file again.
 */
export async function readModel(id, onProgress, { onProblem = 'discard', chunked = false } = {}) {
  const manifest = await getManifest(id);
  if (!manifest) return null;
  const problem = async (text, file) => {
    if (onProblem === 'discard') await deleteModel(id);
    else if (file) await resetFile(id, file);
    return { problem: text, file, manifest };
  };
  if (!manifest.complete) {
    if (onProblem === 'discard') return problem('the stored copy was incomplete (an earlier visit was interrupted while storing it)');
    return { problem: 'it is only partly downloaded', manifest };
  }
  const db = await openDb();
  const total = manifest.files.reduce((n, f) => n + f.size, 0);
  let read = 0;
  const files = [];
  for (const f of manifest.files) {
    // chunked: the chunks as stored, hashed incrementally, never joined (see fileRange).
    const bytes = chunked ? null : new Uint8Array(f.size);
    const chunks = [];
    const hash = chunked ? new Sha256() : null;
    let off = 0;
    for (let i = 0; i < f.chunks; i++) {
      const chunk = await result(db.transaction('chunks').objectStore('chunks').get(chunkKey(id, f.name, i)));
      if (!(chunk instanceof Uint8Array)) return problem(`chunk ${i} of ${f.name} is missing from the store`, f.name);
      if (off + chunk.length > f.size) return problem(`${f.name} is larger in the store than its manifest says`, f.name);
      if (chunked) { chunks.push(chunk); hash.update(chunk); } else bytes.set(chunk, off);
      off += chunk.length;
      read += chunk.length;
      onProgress?.({ done: read, total });
    }
    if (off !== f.size) return problem(`${f.name} is ${off} bytes in the store, its manifest says ${f.size}`, f.name);
    const sha = chunked ? hash.hex() : await sha256Hex(bytes);
    if (sha !== f.sha256) {
      return problem(`${f.name} failed its sha256 check (stored ${f.sha256.slice(0, 12)}…, read back ${sha.slice(0, 12)}…)`, f.name);
    }
    files.push(chunked ? { name: f.name, size: f.size, chunks } : { name: f.name, bytes });
  }
  return { manifest, files };
}

/**
 * Bytes [start, end) of a file read with `chunked` ({ size, chunks }): a view into the chunk
 * when one chunk holds them all, else a copy of just those bytes.
 */
export function fileRange({ chunks }, start, end) {
  let i = 0, base = 0;
  while (i < chunks.length && base + chunks[i].length <= start) base += chunks[i++].length;
  if (i < chunks.length && end <= base + chunks[i].length) return chunks[i].subarray(start - base, end - base);
  const out = new Uint8Array(end - start);
  for (let at = start; at < end; i++) {
    const c = chunks[i];
    const piece = c.subarray(at - base, Math.min(c.length, end - base));
    out.set(piece, at - start);
    at += piece.length;
    base += c.length;
  }
  return out;
}

/** The sentence the page shows when readModel found a problem ({ problem, file, manifest }). */
export function problemMessage({ problem, file, manifest: m }) {
  if (m.source === 'hub') {
    return file
      ? `${m.name}: ${problem}. The damaged file was removed from the store; press Resume to download it again (other stored models are untouched).`
      : `${m.name} cannot be loaded yet: ${problem}. Press Resume to finish the download.`;
  }
  if (m.source === 'local') {
    return `${m.name}: ${problem}. ${file ? 'The damaged file was removed from the store. ' : ''}Delete it and import its files again.`;
  }
  return `${m.name}: ${problem}. It was removed from the store; load the bundled model again to fetch it.`;
}

/**
 * Keeps the files of a model just loaded from the user's disk ('importFiles'): the ones the
 * loader used (`model`: its reply: config, files, tokenizer, tokenizerConfig), stored as
 * config.json, the .safetensors names, tokenizer.json, tokenizer_config.json (and
 * model.safetensors.index.json when picked). Checks the room first; never throws: a model that
 * is not kept runs from memory and `notes` say why.
 * Resolves to { stored, storeId, name, notes, config (parsed, or null) }.
 */
export async function keepFiles(list, model, { persisted = false, fakeFree } = {}, onProgress) {
  const byName = new Map(list.map((f) => [f.name, f]));
  const entries = [];
  const add = (name, file) => { if (file) entries.push({ name, file }); };
  add('config.json', byName.get(model.config));
  for (const w of model.files) add(w, byName.get(w));
  if (model.tokenizer) add('tokenizer.json', byName.get(model.tokenizer));
  if (model.tokenizerConfig) add('tokenizer_config.json', byName.get(model.tokenizerConfig));
  add('model.safetensors.index.json', byName.get('model.safetensors.index.json'));
  let config = null;
  try { config = JSON.parse(await byName.get(model.config).text()); } catch { /* the loader read it; naming only */ }
  const name = localName(config, model.files);
  const total = entries.reduce((n, e) => n + e.file.size, 0);
  const notes = [];
  const out = (stored, storeId = null) => ({ stored, storeId, name, notes, config });
  let room;
  try {
    room = await checkRoom(total);
    if (fakeFree != null && fakeFree !== '') Object.assign(room, { free: Number(fakeFree), fits: total * 1.05 <= Number(fakeFree) });
  } catch (err) {
    notes.push(`Not kept in this browser: its storage cannot be used here (${err.message}). The model runs from memory.`);
    return out(false);
  }
  if (!room.fits) {
    notes.push(`Not kept in this browser: this model needs ${fmtSize(total)}, this browser allows this page ${fmtSize(room.free)} more. ` +
      'It runs from memory; pick its files again next time, or delete stored models you no longer need.');
    return out(false);
  }
  const id = `local:${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  let m;
  try {
    m = await importFiles({ id, name }, entries, onProgress);
  } catch (err) {
    notes.push(isQuotaError(err)
      ? 'Not kept in this browser: its storage for this page is full. Nothing of it was kept and other stored models are ' +
        'untouched; it runs from memory. Delete stored models you no longer need to make room.'
      : `Not kept in this browser (${err?.message ?? err}); it runs from memory.`);
    return out(false);
  }
  // The same files imported again: keep one copy.
  const key = (x) => x.files.map((f) => `${f.name}:${f.size}:${f.sha256}`).sort().join('|');
  for (const other of await listManifests().catch(() => [])) {
    if (other.id !== id && other.source === 'local' && other.complete && key(other) === key(m)) {
      await deleteModel(other.id).catch(() => {});
      notes.push('It replaces an identical copy stored earlier.');
    }
  }
  if (!room.persisted && !persisted) {
    notes.push('Kept in this browser (it may evict it under storage pressure: persistent storage was not granted).');
  }
  return out(true, id);
}

/** A name for imported files: the config's _name_or_path, else the weights' file name. */
function localName(config, weights) {
  const fromConfig = typeof config?._name_or_path === 'string' ? config._name_or_path.split(/[\\/]/).filter(Boolean).pop() : '';
  if (fromConfig) return fromConfig;
  const w = weights[0]?.replace(/(-\d{5}-of-\d{5})?\.safetensors$/, '');
  return w && w !== 'model' ? w : 'Your model';
}

/** Deletes the whole database. Resolves to what was in it: { models, bytes }. */
export async function deleteAll() {
  let models = 0, bytes = 0;
  try {
    for (const m of await listManifests()) {
      models++;
      bytes += modelBytes(m).stored;
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

/** Sizes as the page shows them: 1.2 GiB, 300 MiB, 8.3 MiB, 12.0 KiB, 1000 B. */
export function fmtSize(n) {
  if (n == null) return 'an unknown amount';
  if (n < 1024) return `${n} B`;
  const [v, u] = n >= 2 ** 30 ? [n / 2 ** 30, 'GiB'] : n >= 2 ** 20 ? [n / 2 ** 20, 'MiB'] : [n / 1024, 'KiB'];
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${u}`;
}
