// A local Hugging Face-style hub for the browser tests: the two endpoints web/hub.js uses, with
// huggingface.co's behaviour where it matters, and faults a test can switch on.
//
//   GET /api/models/{owner}/{name}/tree/{revision}   -> [{ type, oid, size, path, lfs? }], paginated
//                                                      (Link: <...?cursor=N>; rel="next") by `pageSize`
//   GET /{owner}/{name}/resolve/{revision}/{path}     -> the file; LFS files (*.safetensors) answer
//                                                      302 to /cdn/{owner}/{name}/{sha256}, as
//                                                      huggingface.co redirects to its CDN
//   Range: bytes=a-b / bytes=a- -> 206 with Content-Range; OPTIONS -> CORS preflight
// CORS on everything (Access-Control-Allow-Origin: *, the headers huggingface.co exposes), so the
// page's worker can read answers cross-origin under COEP.
//
// Repos (REPOS below): bitlora/default-12m (web/models/default), bitlora/sharded
// (tests/fixtures/formats/sharded), bitlora/corrupt-12m (model.safetensors served with a flipped
// byte while the listing gives the true sha256), bitlora/gated-12m (files answer 401 GatedRepo),
// bitlora/gpt2-like (config.json says model_type "gpt2"), bitlora/ids-only (the tiny model, no
// tokenizer). Any other repo: 404 with X-Error-Code: RepoNotFound.
//
// Faults (set on the returned object's `faults`, effective for the next requests):
//   cut:   { file, at, times }  the body of `file` stops at file offset `at` and the connection is
//                               destroyed, `times` times (then served normally)
//   stall: { file, at }         the body stops at `at` and the connection stays open, silent
//   rate:  bytes/s              bodies are sent at about this rate (in 64 KiB pieces)
// `log` records every request: { method, path, range, status, from, sent }.

import http from 'node:http';
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { REPO } from './helpers.mjs';

const dirFiles = (dir, skip = []) => Object.fromEntries(readdirSync(dir)
  .filter((f) => !skip.includes(f))
  .map((f) => [f, readFileSync(path.join(dir, f))]));

const DEFAULT_DIR = path.join(REPO, 'web/models/default');

/** The fixture repos: name -> { files: { path: Buffer }, served?: { path: Buffer }, gated? }. */
export function fixtureRepos() {
  const def = dirFiles(DEFAULT_DIR);
  const corrupt = Buffer.from(def['model.safetensors']);
  corrupt[5_000_000] ^= 0x01; // in the second 4 MiB chunk
  const gpt2Config = { ...JSON.parse(def['config.json']), model_type: 'gpt2', architectures: ['GPT2LMHeadModel'] };
  return {
    'bitlora/default-12m': { files: { ...def, 'README.md': Buffer.from('# bitlora-default-12m\n'), '.gitattributes': Buffer.from('*.safetensors filter=lfs\n') } },
    'bitlora/sharded': { files: dirFiles(path.join(REPO, 'tests/fixtures/formats/sharded'), ['golden.json']) },
    'bitlora/corrupt-12m': { files: def, served: { 'model.safetensors': corrupt } },
    'bitlora/gated-12m': { files: def, gated: true },
    'bitlora/gpt2-like': { files: { 'config.json': Buffer.from(JSON.stringify(gpt2Config)), 'model.safetensors': def['model.safetensors'] } },
    'bitlora/ids-only': { files: dirFiles(path.join(REPO, 'web/models/tiny')) },
  };
}

const isLfs = (name) => name.endsWith('.safetensors');
const sha256 = (b) => createHash('sha256').update(b).digest('hex');
const gitOid = (b) => createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex');

const CORS = {
  'Access-Control-Allow-Origin': '*',
  'Access-Control-Expose-Headers': 'Content-Range, Content-Length, Accept-Ranges, ETag, Link, X-Error-Code, X-Error-Message, X-Repo-Commit',
  'Cross-Origin-Resource-Policy': 'cross-origin',
};

/** Starts the hub on 127.0.0.1 (a free port). Resolves to { url, log, faults, repos, stop() }. */
export function startHubServer({ repos = fixtureRepos(), pageSize = 1000 } = {}) {
  const log = [];
  const faults = { cut: null, stall: null, rate: null };
  const sockets = new Set();
  const byOid = new Map(); // `${repo}/${sha256}` -> path: the "CDN"
  for (const [name, r] of Object.entries(repos)) {
    for (const [p, b] of Object.entries(r.files)) if (isLfs(p)) byOid.set(`${name}/${sha256(b)}`, p);
  }

  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://hub');
    const entry = { method: req.method, path: url.pathname, range: req.headers.range ?? null, auth: Boolean(req.headers.authorization), status: 0, sent: 0 };
    log.push(entry);
    const send = (status, body, headers = {}) => {
      entry.status = status;
      res.writeHead(status, { ...CORS, ...headers });
      res.end(body);
    };
    const fail = (status, code, message) =>
      send(status, JSON.stringify({ error: message }), { 'Content-Type': 'application/json', 'X-Error-Code': code, 'X-Error-Message': message });

    if (req.method === 'OPTIONS') {
      return send(204, '', {
        'Access-Control-Allow-Methods': 'GET, HEAD, OPTIONS',
        'Access-Control-Allow-Headers': 'Range, Authorization, Content-Type',
        'Access-Control-Max-Age': '600',
      });
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') return send(405, 'method not allowed');

    let m = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)\/?$/.exec(url.pathname);
    if (m) {
      const repo = repos[m[1]];
      if (!repo) return fail(404, 'RepoNotFound', 'Repository not found');
      if (decodeURIComponent(m[2]) !== 'main') return fail(404, 'RevisionNotFound', `Invalid rev id: ${m[2]}`);
      const all = Object.entries(repo.files).sort(([a], [b]) => a.localeCompare(b)).map(([p, b]) => ({
        type: 'file', oid: gitOid(isLfs(p) ? Buffer.from(`version https://git-lfs.github.com/spec/v1\noid sha256:${sha256(b)}\nsize ${b.length}\n`) : b),
        size: isLfs(p) ? 134 : b.length, path: p,
        ...(isLfs(p) ? { lfs: { oid: sha256(b), size: b.length, pointerSize: 134 } } : {}),
      }));
      const from = Number(url.searchParams.get('cursor') ?? 0);
      const page = all.slice(from, from + pageSize);
      const headers = { 'Content-Type': 'application/json' };
      if (from + pageSize < all.length) headers.Link = `<${url.pathname}?cursor=${from + pageSize}>; rel="next"`;
      return send(200, JSON.stringify(page), headers);
    }

    let file = null; // { repo, path, bytes }
    m = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    if (m) {
      const [, name, rev, p] = m;
      const repo = repos[name];
      const filePath = decodeURIComponent(p);
      if (!repo) return fail(404, 'RepoNotFound', 'Repository not found');
      if (decodeURIComponent(rev) !== 'main') return fail(404, 'RevisionNotFound', `Invalid rev id: ${rev}`);
      if (repo.gated) {
        return fail(401, 'GatedRepo', `Access to model ${name} is restricted. You must have access to it and be authenticated to access it. Please log in.`);
      }
      const bytes = repo.files[filePath];
      if (!bytes) return fail(404, 'EntryNotFound', `${filePath} does not exist on "main"`);
      if (isLfs(filePath)) {
        entry.status = 302;
        res.writeHead(302, { ...CORS, Location: `/cdn/${name}/${sha256(bytes)}` });
        return res.end();
      }
      file = { name, path: filePath, bytes: repo.served?.[filePath] ?? bytes };
    }
    m = /^\/cdn\/([^/]+\/[^/]+)\/([0-9a-f]{64})$/.exec(url.pathname);
    if (m) {
      const p = byOid.get(`${m[1]}/${m[2]}`);
      if (!p) return send(404, 'no such object');
      const repo = repos[m[1]];
      file = { name: m[1], path: p, bytes: repo.served?.[p] ?? repo.files[p] };
    }
    if (!file) return send(404, 'not found');

    // The body, or the part a Range asks for.
    const size = file.bytes.length;
    let start = 0, end = size - 1, status = 200;
    const headers = { 'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes', ETag: `"${sha256(file.bytes).slice(0, 16)}"` };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    if (req.headers.range && !range) return send(416, 'bad range', { 'Content-Range': `bytes */${size}` });
    if (range) {
      start = Number(range[1]);
      end = range[2] ? Math.min(Number(range[2]), size - 1) : size - 1;
      if (start >= size || start > end) return send(416, 'range not satisfiable', { 'Content-Range': `bytes */${size}` });
      status = 206;
      headers['Content-Range'] = `bytes ${start}-${end}/${size}`;
    }
    headers['Content-Length'] = String(end - start + 1);
    entry.status = status;
    entry.from = start;
    res.writeHead(status, { ...CORS, ...headers });
    if (req.method === 'HEAD') return res.end();

    const base = path.basename(file.path);
    const cut = faults.cut && faults.cut.file === base && faults.cut.times > 0 && faults.cut.at > start && faults.cut.at <= end ? faults.cut : null;
    const stall = faults.stall && faults.stall.file === base && faults.stall.at > start && faults.stall.at <= end ? faults.stall : null;
    const stopAt = cut ? cut.at : stall ? stall.at : end + 1;
    if (cut) cut.times -= 1;
    let pos = start;
    const pump = () => {
      if (res.destroyed) return;
      while (pos < stopAt) {
        const n = Math.min(64 * 1024, stopAt - pos);
        const ok = res.write(file.bytes.subarray(pos, pos + n));
        pos += n;
        entry.sent += n;
        if (faults.rate) return setTimeout(pump, (n / faults.rate) * 1000);
        if (!ok) return res.once('drain', pump);
      }
      if (cut) {
        entry.cut = true;
        // Let the bytes so far leave, then break the connection mid-body.
        setTimeout(() => res.socket?.destroy(), 50);
      } else if (stall) {
        entry.stalled = true; // nothing more, connection left open
      } else {
        res.end();
      }
    };
    pump();
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      const url = `http://127.0.0.1:${server.address().port}`;
      resolve({
        url, log, faults, repos,
        stop: () => new Promise((done) => {
          for (const s of sockets) s.destroy();
          server.close(() => done());
        }),
      });
    });
  });
}

/** The sha256 of a fixture repo's file, as the listing gives it. */
export const fileSha256 = (repos, repo, file) => sha256(repos[repo].files[file]);
