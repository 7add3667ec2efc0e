// @ts-check
// Downloads from a Hugging Face-style hub into the model store (web/store.js), resumably.
// Runs in the page's module worker (web/worker.js), beside the model, never on the main thread.
//
// The hub's HTTP API, as huggingface.co serves it (and tests/browser/hub-server.mjs mimics):
//   GET {hub}/api/models/{repo}/tree/{revision}   -> [{ type: 'file'|'directory', path, size, oid,
//                                                      lfs?: { oid (sha256), size } }]
//                                                     (paginated with a Link: <...>; rel="next")
//   GET {hub}/{repo}/resolve/{revision}/{path}    -> the file; LFS files redirect to a CDN; both
//                                                     answer `Range: bytes=a-b` with 206
// Errors: 404 (or 401 with X-Error-Code: RepoNotFound: huggingface.co answers 401 for a repo
// that does not exist, so as not to reveal private ones), 401/403 with X-Error-Code: GatedRepo.
//
// What is fetched: config.json, tokenizer.json and tokenizer_config.json when present,
// model.safetensors.index.json and the shards it names, or else every top-level *.safetensors.
// config.json is fetched first and checked to be a BitNet model before any weight is fetched.
//
// How a download survives interruptions: each file is requested from the first byte not yet
// stored (`Range: bytes=start-`), and its body is cut into the store's 4 MiB chunks; each chunk
// is written in one IndexedDB transaction together with the manifest's count of stored chunks
// and the running SHA-256 state (sha256.js). So a cut connection, a closed tab or a full disk
// loses at most the chunk in flight. A cut connection is retried by itself (4 times, backing off
// 1-8 s; any progress resets the count); after that, or after a pause, a closed tab, or a quota
// error, the partial model stays in the store and the same request resumes it later.
//
// Verification: a file's size must be the listed one, and its SHA-256 the LFS oid when the hub
// gives one (the weights always), or its git blob SHA-1 must be the listed oid (small files).
// The last chunk is written only after the check passes, so a stored complete file is always
// the verified one; a file that fails is forgotten (its chunks deleted) and the download stops
// with a message naming the file and both hashes. Other stored models are never touched.

import * as store from './store.js';
import { Sha256 } from './sha256.js';

/**
 * @import { DownloadOptions, DownloadProgress, DownloadResult } from './bitlora.js'
 * @import { Manifest, ManifestFile } from './store.js'
 */

export const DEFAULT_HUB = 'https://huggingface.co';

/** Requests web/worker.js runs outside its queue: they never touch the wasm session. */
export const OUTSIDE_QUEUE = new Set(['downloadHub', 'cancelDownload', 'listModels', 'deleteModel']);

const CONFIG = 'config.json';
const INDEX = 'model.safetensors.index.json';
const OPTIONAL = ['tokenizer.json', 'tokenizer_config.json'];
const RETRY_DELAYS_S = [1, 2, 4, 8];

// Downloads running in this worker, by model id: { controller, stop: null|'pause'|'cancel', done }.
/** @type {Map<string, { controller: AbortController, stop: null | 'pause' | 'cancel', done: Promise<DownloadResult> | null }>} */
const active = new Map();

// Content-Security-Policy violations seen by this worker (a hub the page's CSP does not allow
// fails like a network error; this event tells the two apart).
/** @type {{ uri: string, directive: string }[]} */
const violations = [];
self.addEventListener?.('securitypolicyviolation', (event) => {
  // A SecurityPolicyViolationEvent, which TypeScript's WebWorker library does not declare.
  const e = /** @type {Event & { blockedURI?: string, effectiveDirective: string, violatedDirective: string }} */ (event);
  violations.push({ uri: String(e.blockedURI ?? ''), directive: e.effectiveDirective || e.violatedDirective });
});

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(t); reject(signal.reason); }, { once: true });
});
const fmt = store.fmtSize;
const hubError = (message, extra = {}) => Object.assign(new Error(message), extra);

/** Checks and normalises a hub base URL: "https://huggingface.co/" -> "https://huggingface.co". */
export function parseHub(hub) {
  const raw = String(hub ?? '').trim() || DEFAULT_HUB;
  let url;
  try {
    url = new URL(raw);
  } catch {
    throw hubError(`hub URL "${raw}" is not a URL; it looks like ${DEFAULT_HUB}`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw hubError(`hub URL "${raw}" must start with https:// (or http://)`);
  }
  if (url.search || url.hash || url.username) throw hubError(`hub URL "${raw}": give only the address, e.g. ${DEFAULT_HUB}`);
  return url.href.replace(/\/+$/, '');
}

/** "owner/name" (or a bare legacy "name"); a pasted hub URL is reduced to the repo id. */
export function parseRepo(repo, hub = DEFAULT_HUB) {
  let r = String(repo ?? '').trim();
  for (const prefix of [`${hub}/`, 'https://huggingface.co/', 'hf.co/', 'huggingface.co/']) {
    if (r.startsWith(prefix)) r = r.slice(prefix.length);
  }
  r = r.replace(/\/(tree|blob|resolve)\/.*$/, '').replace(/\/+$/, '');
  if (!r) throw hubError('type a Hugging Face repo id, e.g. microsoft/bitnet-b1.58-2B-4T');
  if (!/^[\w.-]+(\/[\w.-]+)?$/.test(r) || r.includes('..')) {
    throw hubError(`"${r}" is not a repo id: use owner/name, e.g. microsoft/bitnet-b1.58-2B-4T`);
  }
  return r;
}

/** The store id of a hub model. The revision is URI-encoded so the id has no '/' after '@'. */
export const hubModelId = (hub, repo, revision) => `hub:${hub}/${repo}@${encodeURIComponent(revision)}`;

const resolveUrl = (hub, repo, revision, path) =>
  `${hub}/${repo}/resolve/${encodeURIComponent(revision)}/${path.split('/').map(encodeURIComponent).join('/')}`;

/**
 * fetch() with the hub's errors turned into sentences. `what` names the request in messages
 * ("the file list", "model.safetensors").
 */
async function hubFetch(url, { headers = {}, signal, what, ctx }) {
  let resp;
  const before = violations.length;
  try {
    resp = await fetch(url, { headers, signal, cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer' });
  } catch (err) {
    if (signal?.aborted) throw signal.reason;
    const origin = new URL(url).origin;
    // The violation event can arrive just after the rejection.
    await sleep(50);
    const v = violations.slice(before).find((x) => x.uri.startsWith(origin) || origin.startsWith(x.uri));
    if (v) {
      throw hubError(`this page's Content-Security-Policy does not allow it to connect to ${origin} (${v.directive || 'connect-src'}). ` +
        `If you serve the page with bitlora, start it with \`bitlora serve --hub ${ctx.hub}\`; on another server, add ${origin} ` +
        'to the connect-src of its Content-Security-Policy.', { csp: true });
    }
    throw hubError(`cannot reach ${origin} for ${what}: ${err.message || 'network error'} (offline, the hub is down, ` +
      'or it does not allow this page to read its answers (CORS))', { network: true });
  }
  if (resp.ok) return resp;
  const code = resp.headers.get('x-error-code');
  let detail = resp.headers.get('x-error-message') ?? '';
  if (!detail) {
    try {
      const text = (await resp.text()).slice(0, 500);
      try { detail = JSON.parse(text).error ?? ''; } catch { detail = /<html/i.test(text) ? '' : text.trim(); }
    } catch { /* no body */ }
  }
  const said = detail ? ` (the hub says: "${String(detail).slice(0, 200)}")` : '';
  const { hub, repo, revision } = ctx;
  if (code === 'GatedRepo' || (resp.status === 403 && !code)) {
    throw hubError(`${repo} is gated: ${hub} answered ${resp.status} for ${what}. Its owners ask visitors to accept ` +
      `conditions first: open ${hub}/${repo}, accept them while logged in, then give an access token (Advanced) and ` +
      `try again${said}.`, { status: resp.status, gated: true });
  }
  if (code === 'RepoNotFound' || (resp.status === 404 && what === 'the file list' && !code)) {
    throw hubError(`repo not found: ${hub} has no model ${repo}${resp.status === 401 ? ' (or it is private: then give an access token under Advanced)' : ''}. ` +
      'Check the spelling: owner/name, e.g. microsoft/bitnet-b1.58-2B-4T.', { status: resp.status, notFound: true });
  }
  if (code === 'RevisionNotFound') {
    throw hubError(`${repo} has no revision "${revision}" on ${hub}${said}.`, { status: resp.status, notFound: true });
  }
  if (resp.status === 404 || code === 'EntryNotFound') {
    throw hubError(`${repo}: ${what} is listed but ${hub} answered 404 Not Found for it${said}.`, { status: 404 });
  }
  if (resp.status === 401) {
    throw hubError(`${repo}: ${hub} answered 401 Unauthorized for ${what}: the model is private or gated, or the access ` +
      `token is wrong. Give a token that can read it (Advanced)${said}.`, { status: 401, gated: true });
  }
  throw hubError(`${repo}: ${hub} answered HTTP ${resp.status}${resp.statusText ? ` ${resp.statusText}` : ''} for ${what}${said}.`,
    { status: resp.status, retry: resp.status >= 500 || resp.status === 408 || resp.status === 429 });
}

/** Every entry of the repo's top level (following Link: rel="next" pages). */
async function listTree(ctx, signal) {
  /** @type {string | null} */
  let url = `${ctx.hub}/api/models/${ctx.repo}/tree/${encodeURIComponent(ctx.revision)}`;
  const entries = [];
  for (let page = 0; url && page < 100; page++) {
    const resp = await hubFetch(url, { headers: ctx.headers, signal, what: 'the file list', ctx });
    let list;
    try {
      list = await resp.json();
    } catch {
      throw hubError(`${ctx.hub} did not answer the file list of ${ctx.repo} with JSON: is ${ctx.hub} a Hugging Face-style hub?`);
    }
    if (!Array.isArray(list)) throw hubError(`${ctx.hub}: the file list of ${ctx.repo} is not a JSON array: is ${ctx.hub} a Hugging Face-style hub?`);
    entries.push(...list);
    const next = /<([^>]+)>\s*;\s*rel="?next"?/.exec(resp.headers.get('link') ?? '')?.[1];
    url = next ? new URL(next, url).href : null;
  }
  return entries.filter((e) => e && e.type === 'file' && typeof e.path === 'string');
}

/** A small file, whole, verified against its listing. */
async function fetchSmall(ctx, entry, signal) {
  const resp = await hubFetch(resolveUrl(ctx.hub, ctx.repo, ctx.revision, entry.path),
    { headers: ctx.headers, signal, what: entry.path, ctx });
  const bytes = new Uint8Array(await resp.arrayBuffer());
  if (bytes.length !== entry.size) {
    throw hubError(`${ctx.repo}/${entry.path}: the hub sent ${bytes.length} bytes, its file list says ${entry.size}.`, { corrupt: true });
  }
  const sha256 = await store.sha256Hex(bytes);
  const f = entryToFile(entry);
  await verifyHash(ctx, f, sha256, bytes);
  return { bytes, sha256, verified: f.verified };
}

/**
 * The manifest entry for a listed file (lfs oid = sha256; the git oid for the others).
 * @returns {ManifestFile}
 */
function entryToFile(e) {
  const lfs = e.lfs && typeof e.lfs.oid === 'string' ? e.lfs.oid.replace(/^sha256:/, '').toLowerCase() : null;
  const size = Number(e.lfs?.size ?? e.size);
  return {
    name: e.path, size, chunks: Math.max(1, Math.ceil(size / store.CHUNK_SIZE)),
    sha256: lfs, oid: lfs ? null : (typeof e.oid === 'string' ? e.oid.toLowerCase() : null),
    verified: lfs ? 'lfs-sha256' : 'size', have: 0,
  };
}

/** Git's blob id: sha1("blob <size>\0" + bytes). */
async function gitBlobSha1(bytes) {
  const head = new TextEncoder().encode(`blob ${bytes.length}\0`);
  const all = new Uint8Array(head.length + bytes.length);
  all.set(head);
  all.set(bytes, head.length);
  const d = new Uint8Array(await crypto.subtle.digest('SHA-1', all));
  return Array.from(d, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Throws a clear error when a downloaded file's hash is not the listed one. */
async function verifyHash(ctx, f, sha256, wholeBytes) {
  if (f.sha256 && sha256 !== f.sha256) {
    throw hubError(`${f.name} from ${ctx.repo} failed its sha256 check: the hub lists ${f.sha256.slice(0, 16)}… but the ` +
      `downloaded bytes hash to ${sha256.slice(0, 16)}…. The damaged file was not kept (other stored models are untouched); ` +
      'try again later, and if it happens again the file on the hub is broken.', { corrupt: true, file: f.name });
  }
  // Small files are not in LFS: the listing gives their git blob sha1.
  if (!f.sha256 && f.oid && /^[0-9a-f]{40}$/.test(f.oid) && wholeBytes) {
    const sha1 = await gitBlobSha1(wholeBytes);
    if (sha1 !== f.oid) {
      throw hubError(`${f.name} from ${ctx.repo} failed its git hash check: the hub lists ${f.oid.slice(0, 16)}… but the ` +
        `downloaded bytes hash to ${sha1.slice(0, 16)}…. The damaged file was not kept (other stored models are untouched).`,
      { corrupt: true, file: f.name });
    }
    f.verified = 'git-sha1';
  }
}

/**
 * The same check as core's Config::from_json (crates/core/src/config.rs), done before gigabytes
 * of weights are fetched. The full check runs again when the model is loaded.
 */
function checkBitnet(ctx, bytes) {
  let c;
  try {
    c = JSON.parse(new TextDecoder().decode(bytes));
  } catch (err) {
    throw hubError(`${ctx.repo}/config.json is not JSON (${err.message}); this is not a model bitlora can load.`);
  }
  const type = c?.model_type;
  const archs = Array.isArray(c?.architectures) ? c.architectures : [];
  if (type === 'bitnet' || (type === 'llama' && archs.includes('BitnetForCausalLM'))) return c;
  throw hubError(`${ctx.repo} is not a BitNet model: its config.json has model_type ${JSON.stringify(type ?? null)}` +
    `${archs.length ? ` (architectures ${archs.join(', ')})` : ''}. bitlora runs BitNet b1.58 models: model_type "bitnet" ` +
    '(e.g. microsoft/bitnet-b1.58-2B-4T) or 1bitLLM\'s "llama" with architectures ["BitnetForCausalLM"]. Its weights were not downloaded and nothing was stored.',
  { notBitnet: true });
}

/** Bytes/s over the last few seconds, and the time left. */
class Rate {
  constructor() { this.samples = []; }
  add(at, bytes) {
    this.samples.push([at, bytes]);
    while (this.samples.length > 2 && at - this.samples[0][0] > 5000) this.samples.shift();
  }
  perSecond() {
    const s = this.samples;
    if (s.length < 2) return null;
    const dt = (s.at(-1)[0] - s[0][0]) / 1000;
    return dt > 0.2 ? (s.at(-1)[1] - s[0][1]) / dt : null;
  }
}

/**
 * Downloads (or resumes) `repo` at `revision` from `hub` into the store.
 * `emit(event)`: progress { phase: 'list'|'check'|'download'|'verify', modelId, file, done, total,
 * fileDone, fileTotal, bytesPerSec, etaSeconds, at }.
 * Resolves to { status: 'complete'|'paused'|'cancelled', modelId, model: summary|null, notes };
 * rejects with a clear message (the partial download stays in the store unless it says so).
 */
/**
 * @param {DownloadOptions} options
 * @param {(event: DownloadProgress) => void} [emit]
 * @returns {Promise<DownloadResult>}
 */
export async function downloadHub({ hub, repo, revision, token, fakeFree, persisted = false }, emit = () => {}) {
  const base = parseHub(hub);
  const repoId = parseRepo(repo, base);
  const rev = String(revision ?? '').trim() || 'main';
  const id = hubModelId(base, repoId, rev);
  if (active.has(id)) throw hubError(`${repoId} is already downloading`);
  const run = () => download({ id, hub: base, repo: repoId, revision: rev, token, fakeFree, persisted }, emit);
  // One download of a model at a time across this page's tabs (another tab may hold it).
  if (!self.navigator?.locks) return run();
  return navigator.locks.request(`bitlora-download:${id}`, { ifAvailable: true }, (lock) => {
    if (!lock) throw hubError(`${repoId} is being downloaded in another tab of this page; it continues there`);
    return run();
  });
}

/** Stops a running download: 'pause' keeps what is stored, 'cancel' deletes the partial model. */
/**
 * @param {string} modelId
 * @param {'pause' | 'cancel'} [how]
 */
export async function stopDownload(modelId, how = 'pause') {
  if (typeof modelId !== 'string' || !modelId) throw hubError('cancelDownload: no modelId given');
  const a = active.get(modelId);
  if (!a) {
    if (how === 'cancel') {
      const m = await store.getManifest(modelId);
      if (m && !m.complete) await store.deleteModel(modelId);
    }
    return { running: false };
  }
  a.stop = how;
  a.controller.abort(new DOMException(how === 'cancel' ? 'cancelled' : 'paused', 'AbortError'));
  await a.done?.catch(() => {});
  return { running: true };
}

/** Stops every download (before "Delete all my data"), keeping nothing that is half written. */
export async function stopAll() {
  await Promise.all([...active.keys()].map((id) => stopDownload(id, 'pause')));
}

export const isDownloading = (modelId) => active.has(modelId);
export const downloading = () => [...active.keys()];

/** @returns {Promise<DownloadResult>} */
async function download(ctx, emit) {
  /** @type {{ controller: AbortController, stop: null | 'pause' | 'cancel', done: Promise<DownloadResult> | null }} */
  const entry = { controller: new AbortController(), stop: null, done: null };
  active.set(ctx.id, entry);
  /** @type {Promise<DownloadResult>} */
  const done = (async () => {
    try {
      return await downloadInner(ctx, emit, entry.controller.signal);
    } catch (err) {
      if (entry.stop === 'cancel') {
        await store.deleteModel(ctx.id).catch(() => {});
        return { status: 'cancelled', modelId: ctx.id, model: null, notes: [] };
      }
      if (entry.stop) return { status: 'paused', modelId: ctx.id, model: await summaryOf(ctx.id), notes: [] };
      if (!err.quota && store.isQuotaError(err)) {
        const m = await summaryOf(ctx.id);
        throw hubError(`This browser's storage for this page is full: ${ctx.repo} stopped after ${fmt(m?.storedBytes ?? 0)} of ` +
          `${fmt(m?.bytes ?? 0)}. What was stored is kept (press Resume once there is room), and other stored models are ` +
          'untouched. Delete models you no longer need, or other sites\' data, or Delete this partial download.', { quota: true });
      }
      throw err;
    } finally {
      active.delete(ctx.id);
    }
  })();
  entry.done = done;
  return done;
}

async function summaryOf(id) {
  const m = await store.getManifest(id).catch(() => null);
  return m ? store.summary(m) : null;
}

/** @returns {Promise<DownloadResult>} */
async function downloadInner(ctx, emit, signal) {
  const { id, repo } = ctx;
  ctx.headers = ctx.token ? { Authorization: `Bearer ${String(ctx.token).trim()}` } : {};
  const now = () => performance.timeOrigin + performance.now();
  const notes = [];
  const existing = await store.getManifest(id);
  if (existing?.complete) {
    return { status: 'complete', already: true, modelId: id, model: store.summary(existing),
      notes: [`${repo} is already stored in this browser.`] };
  }

  // 1. The file list, config.json (checked), and the shard index.
  emit({ phase: 'list', modelId: id, at: now() });
  const listed = await listTree(ctx, signal);
  const byPath = new Map(listed.map((e) => [e.path, e]));
  const names = listed.map((e) => e.path);
  if (!byPath.has(CONFIG)) {
    throw hubError(`${repo} has no config.json at its top level, so it is not a model bitlora can load ` +
      `(it has: ${names.slice(0, 12).join(', ') || 'no files'}${names.length > 12 ? ', …' : ''}).`, { notBitnet: true });
  }
  emit({ phase: 'check', modelId: id, at: now() });
  const small = new Map();
  small.set(CONFIG, await fetchSmall(ctx, byPath.get(CONFIG), signal));
  checkBitnet(ctx, small.get(CONFIG).bytes);
  let weights;
  if (byPath.has(INDEX)) {
    small.set(INDEX, await fetchSmall(ctx, byPath.get(INDEX), signal));
    let index;
    try {
      index = JSON.parse(new TextDecoder().decode(small.get(INDEX).bytes));
    } catch (err) {
      throw hubError(`${repo}/${INDEX} is not JSON: ${err.message}`);
    }
    weights = [...new Set(Object.values(index?.weight_map ?? {}))].sort();
    const missing = weights.filter((w) => !byPath.has(w));
    if (!weights.length || missing.length) {
      throw hubError(`${repo}/${INDEX} names shards the repo does not have: ${missing.join(', ') || '(none named)'}`);
    }
  } else {
    weights = names.filter((n) => n.endsWith('.safetensors') && !n.includes('/')).sort();
  }
  if (!weights.length) {
    const other = names.filter((n) => /\.(gguf|bin|pt|pth|ckpt)$/i.test(n));
    throw hubError(`${repo} has no .safetensors weights${other.length ? ` (it has ${other.slice(0, 5).join(', ')})` : ''}; ` +
      'bitlora loads safetensors checkpoints.', { notBitnet: true });
  }
  const plan = [CONFIG, ...OPTIONAL.filter((n) => byPath.has(n)), ...(byPath.has(INDEX) ? [INDEX] : []), ...weights]
    .map((n) => entryToFile(byPath.get(n)));

  // 2. What is stored already (a resumed download), unless the hub's file changed since.
  const files = plan.map((f) => {
    const old = existing?.files.find((x) => x.name === f.name);
    const same = old && old.size === f.size && (old.sha256 ?? null) === (f.sha256 ?? old.sha256 ?? null) &&
      (f.oid ?? null) === (old.oid ?? null) && (old.have ?? 0) <= f.chunks;
    if (!same) return f;
    const keep = { ...f, have: old.have ?? 0 };
    if (old.hash) keep.hash = old.hash;
    if (old.have === f.chunks && old.sha256) Object.assign(keep, { sha256: old.sha256, verified: old.verified ?? f.verified });
    // A partial file without a saved hash state cannot be continued: start it again.
    if (keep.have > 0 && keep.have < f.chunks && !keep.hash) keep.have = 0;
    return keep;
  });
  const changed = (existing?.files ?? []).filter((o) => {
    const n = files.find((f) => f.name === o.name);
    return !n || (n.have ?? 0) === 0;
  }).map((o) => o.name);
  if (existing && changed.some((n) => (existing.files.find((f) => f.name === n)?.have ?? 0) > 0)) {
    notes.push(`Some stored files of ${repo} changed on the hub since they were stored; they are downloaded again.`);
  }

  // 3. Room: what is left to fetch must fit, or nothing starts.
  /** @type {Manifest} */
  const manifest = {
    id, name: repo, source: 'hub', origin: { hub: ctx.hub, repo, revision: ctx.revision },
    chunkSize: store.CHUNK_SIZE, complete: false, startedAt: existing?.startedAt ?? new Date().toISOString(),
    storedAt: existing?.storedAt ?? new Date().toISOString(), updatedAt: new Date().toISOString(), files,
  };
  const { total, stored } = store.modelBytes(manifest);
  const room = await store.checkRoom(total - stored);
  const fakeFree = fakeFreeOf(ctx);
  if (fakeFree != null) Object.assign(room, { free: fakeFree, fits: (total - stored) * 1.05 <= fakeFree });
  if (!room.fits) {
    throw hubError(`Not downloaded: ${repo} needs ${fmt(total - stored)}${stored ? ` more (${fmt(total)} in all, ${fmt(stored)} already stored)` : ''}, ` +
      `this browser allows this page ${fmt(room.free)} more. Delete stored models you no longer need (or other sites' data ` +
      'in the browser\'s settings) and try again.', { quota: true, needs: total - stored, free: room.free });
  }
  if (!room.persisted && !ctx.persisted) {
    notes.push('The browser did not grant persistent storage: it may evict stored models when the disk runs low.');
  }
  await store.deleteFileChunks(id, changed);
  await store.putManifest(manifest);

  // 4. The files, in order; config.json and the index from memory.
  const rate = new Rate();
  let received = stored; // bytes of the model stored or in flight
  let lastEmit = 0;
  const progress = (f, fileDone, force = false) => {
    const at = now();
    rate.add(at, received);
    if (!force && at - lastEmit < 100) return;
    lastEmit = at;
    const bps = rate.perSecond();
    emit({ phase: 'download', modelId: id, file: f.name, done: received, total, fileDone, fileTotal: f.size,
      bytesPerSec: bps, etaSeconds: bps ? (total - received) / bps : null, at });
  };
  progress(files[0], 0, true);
  for (const f of files) {
    if (f.have === f.chunks && f.sha256) continue;
    if (small.has(f.name)) {
      const { bytes, sha256, verified } = small.get(f.name);
      f.verified = verified;
      await storeWhole(ctx, f, bytes, sha256);
      received += bytes.length;
      progress(f, bytes.length, true);
      continue;
    }
    await fetchFile(ctx, f, signal, (n, fileDone) => { received += n; progress(f, fileDone); });
    progress(f, f.size, true);
  }

  // 5. Complete: every file verified and stored.
  emit({ phase: 'verify', modelId: id, done: total, total, at: now() });
  const m = await store.getManifest(id);
  if (!m) throw hubError(`${repo} was deleted while it downloaded`);
  m.complete = true;
  m.storedAt = new Date().toISOString();
  for (const f of m.files) {
    if (!f.sha256 || (f.have ?? f.chunks) !== f.chunks) throw hubError(`${repo}: ${f.name} is not completely stored; press Resume`);
    delete f.have;
    delete f.hash;
  }
  await store.putManifest(m);
  return { status: 'complete', modelId: id, model: store.summary(m), notes };
}

const fakeFreeOf = (ctx) => (ctx.fakeFree == null || ctx.fakeFree === '' ? null : Number(ctx.fakeFree));

/** Writes a file already in memory (and verified) chunk by chunk. */
async function storeWhole(ctx, f, bytes, sha256) {
  const size = store.CHUNK_SIZE;
  for (let i = f.have ?? 0; i < f.chunks; i++) {
    const chunk = bytes.slice(i * size, Math.min((i + 1) * size, bytes.length));
    const last = i === f.chunks - 1;
    await store.writeChunk(ctx.id, f.name, i, chunk, last ? { sha256, verified: f.verified } : {});
  }
  Object.assign(f, { have: f.chunks, sha256 });
}

/**
 * Fetches the rest of file `f` (from chunk f.have on) with Range requests, retrying a cut
 * connection, and stores it chunk by chunk. `onBytes(n, fileDone)` as bytes arrive.
 */
async function fetchFile(ctx, f, signal, onBytes) {
  const size = store.CHUNK_SIZE;
  const url = resolveUrl(ctx.hub, ctx.repo, ctx.revision, f.name);
  let failures = 0;
  for (;;) {
    const start = f.have * size;
    let progressed = false;
    try {
      await fetchRange(ctx, f, url, start, signal, (n, fileDone) => { progressed = true; onBytes(n, fileDone); });
      return;
    } catch (err) {
      if (signal.aborted) throw signal.reason;
      // Bytes of a chunk that was not stored are counted again when they come again.
      const lost = (f.inFlight ?? 0);
      f.inFlight = 0;
      if (lost) onBytes(-lost, f.have * size);
      const retryable = err.network || err.retry || err.cut;
      if (!retryable) throw err;
      if (progressed) failures = 0;
      if (failures >= RETRY_DELAYS_S.length) {
        throw hubError(`${err.message}. The download of ${ctx.repo} stopped at ${f.name} after ${failures + 1} tries; ` +
          `what arrived is stored (${fmt(f.have * size)} of this file): press Resume to continue from there.`, { resumable: true });
      }
      await sleep(RETRY_DELAYS_S[failures++] * 1000, signal);
    }
  }
}

async function fetchRange(ctx, f, url, start, signal, onBytes) {
  const size = store.CHUNK_SIZE;
  const headers = { ...ctx.headers };
  if (f.size > 0) headers.Range = `bytes=${start}-${f.size - 1}`;
  const resp = await hubFetch(url, { headers, signal, what: f.name, ctx });
  let skip = 0;
  if (resp.status === 206) {
    // Content-Range is readable when the hub exposes it (huggingface.co does).
    const cr = /bytes (\d+)-(\d+)\/(\d+|\*)/.exec(resp.headers.get('content-range') ?? '');
    if (cr && (Number(cr[1]) !== start || (cr[3] !== '*' && Number(cr[3]) !== f.size))) {
      throw hubError(`${f.name}: asked ${ctx.hub} for bytes ${start}- of ${f.size}, it sent ${cr[0]}: the file changed on the hub; ` +
        'delete this partial download and download it again.');
    }
  } else if (start > 0) {
    skip = start; // a server that ignores Range sends the whole file: drop what is stored
  }
  const hash = f.have > 0 ? new Sha256(f.hash) : new Sha256();
  // A successful answer to a GET has a body (null only for HEAD-like and 204/304 answers).
  const reader = /** @type {ReadableStream<Uint8Array>} */ (resp.body).getReader();
  let buf = new Uint8Array(Math.min(size, Math.max(f.size - start, 0)));
  let fill = 0;
  let pos = start; // file offset of buf[0] + fill
  f.inFlight = 0;
  const flush = async () => {
    const index = f.have;
    const chunk = buf.subarray(0, fill);
    hash.update(chunk);
    const last = index === f.chunks - 1;
    if (last) {
      const sha256 = hash.hex();
      try {
        await verifyHash(ctx, f, sha256, f.chunks === 1 ? chunk : null);
      } catch (err) {
        await store.resetFile(ctx.id, f.name).catch(() => {});
        f.have = 0;
        delete f.hash;
        throw err;
      }
      await store.writeChunk(ctx.id, f.name, index, chunk.slice(), { sha256, verified: f.verified });
      f.sha256 = sha256;
    } else {
      const saved = hash.save();
      await store.writeChunk(ctx.id, f.name, index, chunk.slice(), { hash: saved });
      f.hash = saved;
    }
    f.have = index + 1;
    f.inFlight = 0;
    fill = 0;
    buf = new Uint8Array(Math.max(0, Math.min(size, f.size - f.have * size)));
  };
  if (f.size === 0) {
    await flush();
    return;
  }
  for (;;) {
    let r;
    try {
      r = await reader.read();
    } catch (err) {
      if (signal.aborted) throw signal.reason;
      throw hubError(`the connection to ${new URL(url).host} broke while downloading ${f.name} ` +
        `(at ${fmt(pos)} of ${fmt(f.size)}: ${err.message || 'network error'})`, { cut: true });
    }
    if (r.done) break;
    let v = r.value;
    if (skip > 0) {
      const s = Math.min(skip, v.length);
      skip -= s;
      v = v.subarray(s);
    }
    while (v.length > 0) {
      if (pos >= f.size) {
        reader.cancel().catch(() => {});
        throw hubError(`${f.name}: ${ctx.hub} sent more than the ${f.size} bytes its file list gives; the file changed on the hub. ` +
          'Delete this partial download and download it again.');
      }
      const take = Math.min(v.length, buf.length - fill);
      buf.set(v.subarray(0, take), fill);
      fill += take;
      pos += take;
      f.inFlight += take;
      v = v.subarray(take);
      onBytes(take, pos);
      if (fill === buf.length) await flush();
    }
  }
  if (pos < f.size) {
    throw hubError(`the connection to ${new URL(url).host} ended early while downloading ${f.name} ` +
      `(${fmt(pos)} of ${fmt(f.size)})`, { cut: true });
  }
}
