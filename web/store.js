// @ts-check
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
// - Reading (openModel, StoredFile) streams each file front to back, one chunk at a time, and
//   re-computes its sha256 as it goes; a file whose hash or size differs from its manifest fails
//   the load, naming the file, before the model is finished (worker.js loadModelFiles).
// - Bundled models are written in one go (storeModel): a visit that finds one incomplete
//   discards it and fetches it again (the page's own server is fast and always there).

import { Sha256 } from './sha256.js';

/**
 * A file of a stored model, as its manifest describes it (see the header).
 * @typedef {{ name: string, size: number, sha256: string | null, chunks: number, have?: number,
 *   hash?: import('./sha256.js').Sha256State, oid?: string | null,
 *   verified?: 'lfs-sha256' | 'git-sha1' | 'size', inFlight?: number }} ManifestFile
 */
/**
 * @typedef {{ id: string, name: string, source: 'bundled' | 'hub' | 'local', chunkSize: number,
 *   complete: boolean, storedAt: string, updatedAt?: string, startedAt?: string,
 *   origin?: { hub: string, repo: string, revision: string }, files: ManifestFile[] }} Manifest
 */

export const DB_NAME = 'bitlora';
export const CHUNK_SIZE = 4 * 1024 * 1024;

/** @type {Promise<IDBDatabase> | null} */
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

/** @type {(tx: IDBTransaction) => Promise<void>} */
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

/**
 * Bytes a manifest describes, and bytes of it stored so far.
 * @param {Manifest} m
 */
export function modelBytes(m) {
  let total = 0, stored = 0;
  for (const f of m.files) {
    total += f.size;
    const have = m.complete ? f.chunks : (f.have ?? 0);
    stored += Math.min(f.size, have * m.chunkSize);
  }
  return { total, stored };
}

/**
 * What the page lists: { id, name, source, origin, bytes, storedBytes, complete, storedAt, files }.
 * @param {Manifest} m
 * @returns {import('./bitlora.js').StoredModel}
 */
export function summary(m) {
  const { total, stored } = modelBytes(m);
  return {
    id: m.id, name: m.name, source: m.source, origin: m.origin ?? null, bytes: total, storedBytes: stored,
    complete: Boolean(m.complete), storedAt: m.storedAt, updatedAt: m.updatedAt ?? m.storedAt,
    files: m.files.map((f) => f.name),
  };
}

/**
 * @param {string} id
 * @returns {Promise<Manifest | undefined>}
 */
export async function getManifest(id) {
  const db = await openDb();
  return result(db.transaction('manifests').objectStore('manifests').get(id));
}

/** @returns {Promise<Manifest[]>} */
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
    /** @type {boolean} */
    const exists = await new Promise((resolve) => {
      if (typeof indexedDB === 'undefined') return resolve(false);
      const req = indexedDB.open(DB_NAME);
      req.onupgradeneeded = () => req.transaction?.abort(); // none yet: do not create it
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
  /** @type {Manifest | 'stale' | Error | null} */
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
      outcome = /** @type {Error} */ (err);
      tx.abort();
    }
  };
  try {
    await done(tx);
  } catch (err) {
    // Set by the request's callback above, which TypeScript's flow analysis does not follow.
    const o = /** @type {Manifest | 'stale' | Error | null} */ (outcome);
    if (o instanceof Error) throw o;
    if (o === 'stale') throw staleWrite(id, name, index);
    throw err;
  }
  return /** @type {Manifest | null} */ (outcome);
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
    if (!m) throw staleWrite(id, entries[0]?.name ?? name, 0);
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
 * A problem with a stored model, found while opening or reading it: `problem` says what (a
 * phrase that names the file when one is at fault), `file` names the damaged file (absent when
 * the model as a whole is incomplete), `manifest` is the model's. problemMessage() gives the
 * page's sentence. When it is thrown, the store has already dealt with the bad copy as
 * openModel's `onProblem` asked.
 */
export class StoreProblem extends Error {
  /**
   * @param {string} problem
   * @param {string | undefined} file
   * @param {Manifest} manifest
   */
  constructor(problem, file, manifest) {
    super(problem);
    this.name = 'StoreProblem';
    this.problem = problem;
    this.file = file;
    this.manifest = manifest;
  }
}

/**
 * Opens model `id` for reading file by file: resolves to { manifest, files: StoredFile[] } (the
 * manifest's files in order; nothing is read yet), or to null when nothing is stored. Throws a
 * StoreProblem when the model is incomplete; its files throw one when a chunk is missing, a size
 * is wrong or a sha256 fails.
 *
 * What happens to a bad copy: `onProblem: 'discard'` (the bundled models) deletes it;
 * 'keep-partial' (downloads and imports) leaves an incomplete download alone (it can be
 * resumed), and on a failed chunk or hash forgets only the damaged file (resetFile), so a resume
 * fetches just that file again.
 * @param {string} id
 * @param {{ onProblem?: 'discard' | 'keep-partial' }} [options]
 * @returns {Promise<{ manifest: Manifest, files: StoredFile[] } | null>}
 */
export async function openModel(id, { onProblem = 'discard' } = {}) {
  const manifest = await getManifest(id);
  if (!manifest) return null;
  /** @type {FailStored} */
  const fail = async (text, file) => {
    if (onProblem === 'discard') await deleteModel(id);
    else if (file) await resetFile(id, file);
    return new StoreProblem(text, file, manifest);
  };
  if (!manifest.complete) {
    if (onProblem === 'discard') throw await fail('the stored copy was incomplete (an earlier visit was interrupted while storing it)');
    throw new StoreProblem('it is only partly downloaded', undefined, manifest);
  }
  return { manifest, files: manifest.files.map((f) => new StoredFile(id, f, fail)) };
}

/**
 * What openModel's files call on a bad copy: deals with it as `onProblem` asked and resolves to
 * the StoreProblem to throw.
 * @typedef {(text: string, file?: string) => Promise<StoreProblem>} FailStored
 */

/**
 * Chunk `index` of a stored file as IndexedDB gives it back (undefined when it is missing).
 * @param {string} id
 * @param {string} name
 * @param {number} index
 * @returns {Promise<unknown>}
 */
async function getChunk(id, name, index) {
  /** @type {unknown} */
  let chunk;
  try {
    const db = await openDb();
    chunk = await result(db.transaction('chunks').objectStore('chunks').get(chunkKey(id, name, index)));
  } catch (err) {
    // Not a damaged copy: the store cannot be read (a bundled model is then fetched again).
    throw Object.assign(new Error(`${name}: chunk ${index} cannot be read from the store: ${err?.message ?? err}`), { storeError: true });
  }
  if (chunk instanceof Uint8Array) heldBytes.watch(chunk.buffer, 'chunk', `${name}/${index}`);
  return chunk;
}

/**
 * One file of a stored model, read front to back a chunk at a time: worker.js streams it into
 * wasm tensor by tensor. Each chunk is fetched from IndexedDB once, added to the file's running
 * SHA-256 (sha256.js) and let go as soon as the reads have moved past it, so the JS heap holds
 * the chunk in hand plus the copy a read makes of a range that crosses chunks (the tensor in
 * flight), never the whole file. finish() reads what is left and checks the size and the
 * sha256 against the manifest: a damaged file fails there, naming itself, before the model it
 * fed is finished (the tensors already handed over are thrown away with the failed load).
 */
export class StoredFile {
  /** @type {string} */
  #id;
  /** @type {ManifestFile} the manifest's { name, size, sha256, chunks } */
  #entry;
  /** @type {FailStored} openModel's: deals with the bad copy, returns the StoreProblem to throw */
  #fail;
  #hash = new Sha256();
  /** @type {Uint8Array | null} the chunk in hand, bytes [#base, #end) of the file */
  #chunk = null;
  #base = 0;
  #end = 0; // also: bytes fetched and hashed so far
  #next = 0; // index of the next chunk to fetch
  #verified = false;

  /**
   * @param {string} id
   * @param {ManifestFile} entry
   * @param {FailStored} fail
   */
  constructor(id, entry, fail) {
    this.#id = id;
    this.#entry = entry;
    this.#fail = fail;
    this.name = entry.name;
    this.size = entry.size;
  }

  /** Fetches the next chunk, hashes it, and makes it the chunk in hand. */
  async #advance() {
    const { name, size, chunks } = this.#entry;
    const i = this.#next;
    if (i >= chunks) throw await this.#fail(`${name} is ${this.#end} bytes in the store, its manifest says ${size}`, name);
    this.#chunk = null; // let the one in hand go before the next arrives
    const chunk = await getChunk(this.#id, name, i);
    if (!(chunk instanceof Uint8Array)) throw await this.#fail(`chunk ${i} of ${name} is missing from the store`, name);
    if (this.#end + chunk.length > size) throw await this.#fail(`${name} is larger in the store than its manifest says`, name);
    this.#hash.update(chunk);
    this.#chunk = chunk;
    this.#base = this.#end;
    this.#end += chunk.length;
    this.#next = i + 1;
    await heldBytes.sample();
  }

  /**
   * Bytes [start, end) of the file: a view into the chunk in hand when it holds them all, else a
   * copy of just those bytes. Reads go front to back: `start` may not lie before the chunk in
   * hand (tensors come in file order; safetensors forbids overlapping ones).
   * @param {number} start
   * @param {number} end
   * @returns {Promise<Uint8Array>}
   */
  async read(start, end) {
    if (!(start >= this.#base && start <= end && end <= this.size)) {
      throw new Error(`${this.name}: cannot read bytes ${start}..${end} of ${this.size}: the file is read front to back and is at ${this.#base}`);
    }
    if (start === end) return new Uint8Array(0);
    while (this.#end <= start) await this.#advance();
    if (end <= this.#end) return /** @type {Uint8Array} */ (this.#chunk).subarray(start - this.#base, end - this.#base);
    const out = new Uint8Array(end - start);
    heldBytes.watch(out.buffer, 'copy', `${this.name}[${start}..${end})`);
    // No view into the chunk in a local across the await: a suspended async function keeps its
    // locals alive, and a view would keep the chunk it has just moved past.
    for (let at = start; ;) {
      const n = Math.min(end, this.#end) - at;
      out.set(/** @type {Uint8Array} */ (this.#chunk).subarray(at - this.#base, at - this.#base + n), at - start);
      at += n;
      if (at === end) return out;
      await this.#advance();
    }
  }

  /** Reads the rest of the file and checks its size and sha256 (StoreProblem if they differ). */
  async finish() {
    if (this.#verified) return;
    const { name, size, sha256, chunks } = this.#entry;
    while (this.#next < chunks) await this.#advance();
    this.#chunk = null;
    if (this.#end !== size) throw await this.#fail(`${name} is ${this.#end} bytes in the store, its manifest says ${size}`, name);
    const sha = this.#hash.hex();
    if (sha !== sha256) {
      throw await this.#fail(`${name} failed its sha256 check (stored ${String(sha256).slice(0, 12)}…, read back ${sha.slice(0, 12)}…)`, name);
    }
    this.#verified = true;
  }
}

/**
 * Test instrumentation (tests/browser/stream-load.test.mjs): the most bytes of model data the JS
 * heap held at once while a stored model was read. Every chunk fetched from the store and every
 * copy a StoredFile read makes is watched through a WeakRef on its ArrayBuffer; sample() runs a
 * full garbage collection (`gc`, which Chromium offers with --js-flags=--expose-gc) and adds up
 * the buffers still alive, so it measures what is actually held, whoever holds it, not what the
 * code meant to hold. Samples are taken at each chunk fetched and each tensor handed to wasm.
 * Off (and free) unless start() was called.
 */
export const heldBytes = {
  /** @type {{ ref: WeakRef<ArrayBufferLike>, kind: 'chunk' | 'copy', what: string, bytes: number }[] | null} while on */
  watched: null,
  /** @type {import('./protocol.js').HeldBytesPeak | null} */
  peak: null,

  start() {
    if (typeof /** @type {any} */ (globalThis).gc !== 'function') throw new Error('heldBytes needs gc(): launch Chromium with --js-flags=--expose-gc');
    this.watched = [];
    this.peak = { bytes: 0, chunkBytes: 0, chunks: 0, samples: 0, held: [] };
  },

  /**
   * @param {ArrayBufferLike} buffer
   * @param {'chunk' | 'copy'} kind
   * @param {string} what
   */
  watch(buffer, kind, what) {
    this.watched?.push({ ref: new WeakRef(buffer), kind, what, bytes: buffer.byteLength });
  },

  async sample() {
    const p = this.peak;
    if (!this.watched || !p) return;
    // A GC run as its own task, with no stack to scan conservatively: only what is reachable stays.
    await /** @type {any} */ (globalThis).gc({ type: 'major', execution: 'async' });
    const watched = (this.watched = this.watched.filter((w) => w.ref.deref() !== undefined));
    const chunks = watched.filter((w) => w.kind === 'chunk');
    const bytes = watched.reduce((n, w) => n + w.bytes, 0);
    // What was alive at the largest sample, for a failing test to show.
    if (bytes > p.bytes) p.held = watched.map((w) => `${w.what} (${w.bytes} bytes)`);
    p.bytes = Math.max(p.bytes, bytes);
    p.chunkBytes = Math.max(p.chunkBytes, chunks.reduce((n, w) => n + w.bytes, 0));
    p.chunks = Math.max(p.chunks, chunks.length);
    p.samples++;
  },

  /**
   * Stops watching; returns the peak { bytes, chunkBytes, chunks, samples, held: what at most bytes }.
   * @returns {import('./protocol.js').HeldBytesPeak | null}
   */
  stop() {
    const p = this.peak;
    this.watched = null;
    return p;
  },
};

/**
 * The sentence the page shows for a StoreProblem ({ problem, file, manifest }).
 * @param {{ problem: string, file?: string, manifest: Manifest }} found
 */
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
 * model.safetensors.index.json when picked), or a .gguf model's one file under its name. Checks the room first; never throws: a model that
 * is not kept runs from memory and `notes` say why.
 * Resolves to { stored, storeId, name, notes, config (parsed, or null) }.
 */
/**
 * @param {File[]} list
 * @param {import('./bitlora.js').ModelInfo} model
 * @param {{ persisted?: boolean, fakeFree?: number }} options
 * @param {(p: { done: number, total: number, file: string }) => void} [onProgress]
 */
export async function keepFiles(list, model, { persisted = false, fakeFree } = {}, onProgress) {
  const byName = new Map(list.map((f) => [f.name, f]));
  const entries = [];
  const add = (name, file) => { if (file) entries.push({ name, file }); };
  // A .gguf model is one file (its config is in its metadata), kept under its own name.
  if (!model.ggufArchitecture) add('config.json', byName.get(model.config));
  for (const w of model.files) add(w, byName.get(w));
  if (model.tokenizer) add('tokenizer.json', byName.get(model.tokenizer));
  if (model.tokenizerConfig) add('tokenizer_config.json', byName.get(model.tokenizerConfig));
  add('model.safetensors.index.json', byName.get('model.safetensors.index.json'));
  let config = null;
  if (model.ggufConfig) config = model.ggufConfig;
  else try { config = JSON.parse(await /** @type {File} */ (byName.get(model.config)).text()); } catch { /* the loader read it; naming only */ }
  const name = localName(config, model.files);
  const total = entries.reduce((n, e) => n + e.file.size, 0);
  const notes = [];
  const out = (/** @type {boolean} */ stored, /** @type {string | null} */ storeId = null) => ({ stored, storeId, name, notes, config });
  let room;
  try {
    room = await checkRoom(total);
    if (fakeFree != null && String(fakeFree) !== '') Object.assign(room, { free: Number(fakeFree), fits: total * 1.05 <= Number(fakeFree) });
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
  const w = weights[0]?.replace(/(-\d{5}-of-\d{5})?\.safetensors$|\.gguf$/i, '');
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
  await /** @type {Promise<void>} */ (new Promise((resolve, reject) => {
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
  }));
  return { models, bytes };
}

/**
 * Asks for persistent storage and whether `bytes` more fit. Resolves to
 * { persisted, fits, quota, usage, free } (quota/usage null when the browser does not say).
 */
/** @param {number} bytes */
export async function checkRoom(bytes) {
  // persist() exists on pages only, but this module runs in the worker too.
  const storage = /** @type {StorageManager & { persist?: () => Promise<boolean> } | undefined} */ (navigator.storage);
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
