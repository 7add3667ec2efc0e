#!/usr/bin/env node
// A plain static file server that applies a Netlify / Cloudflare Pages style `_headers` file:
// what any static host does with the site tools/build-site.sh assembles, small enough to read.
// The static-deployment and npm-package browser tests serve through it, and it lets you try a
// built site locally:
//
//   tools/build-site.sh target/site && node tools/serve-static.mjs target/site [--port 8080]
//
// It serves GET and HEAD of the files under the root (`/` and directories: their index.html),
// with the Content-Type a host gives by the file's extension, and the headers of every `_headers`
// rule whose path pattern matches (a later rule's value for the same header wins). Supported
// patterns: exact paths and `*` (any characters, `/` included), e.g. `/*` or `/web/pkg/*`. The
// `_headers` file itself is not served. Every file has an ETag (its size and modification time);
// a conditional GET that matches it gets 304. Nothing else: no directory listings, no compression.

import { createServer } from 'node:http';
import { createReadStream, existsSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Content-Type by extension, as static hosts (and nginx's mime.types) give them. */
export const MIME = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8',
  '.json': 'application/json', '.webmanifest': 'application/manifest+json', '.wasm': 'application/wasm',
  '.svg': 'image/svg+xml', '.png': 'image/png', '.ico': 'image/x-icon', '.txt': 'text/plain; charset=utf-8',
  '.md': 'text/plain; charset=utf-8', '.jsonl': 'text/plain; charset=utf-8',
};

/**
 * Parses a `_headers` file: rules of a path pattern (a line starting with `/`) followed by
 * indented `Name: value` lines; `#` starts a comment line.
 * @param {string} text
 * @returns {{ pattern: string, headers: [string, string][] }[]}
 */
export function parseHeadersFile(text) {
  const rules = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trimEnd();
    if (!line.trim() || line.trim().startsWith('#')) return;
    if (!/^\s/.test(line)) {
      if (!line.startsWith('/')) throw new Error(`_headers line ${i + 1}: a path pattern must start with "/": ${line}`);
      rules.push({ pattern: line.trim(), headers: [] });
      return;
    }
    const m = line.trim().match(/^([A-Za-z0-9-]+):\s*(.+)$/);
    if (!m) throw new Error(`_headers line ${i + 1}: expected "Name: value": ${line.trim()}`);
    if (!rules.length) throw new Error(`_headers line ${i + 1}: a header before any path pattern`);
    rules.at(-1).headers.push([m[1], m[2]]);
  });
  return rules;
}

/** @param {string} pattern */
function patternRegex(pattern) {
  const esc = pattern.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*');
  return new RegExp(`^${esc}$`);
}

/**
 * The headers of every rule matching `pathname`, by lowercase name.
 * @param {ReturnType<typeof parseHeadersFile>} rules
 * @param {string} pathname
 */
export function headersFor(rules, pathname) {
  /** @type {Map<string, [string, string]>} */
  const out = new Map();
  for (const r of rules) {
    if (!patternRegex(r.pattern).test(pathname)) continue;
    for (const [k, v] of r.headers) out.set(k.toLowerCase(), [k, v]);
  }
  return [...out.values()];
}

/**
 * Serves `root` on 127.0.0.1:`port` (0: a free one).
 * - `headersFile`: the `_headers` file to apply (default: root/_headers when it exists; null: none).
 * - `edit(headers, pathname)`: tests only, changes the headers of a response (e.g. drops one).
 * Resolves to { url, log: [{ method, path, status }], stop() }.
 */
export function serveStatic(root, { port = 0, headersFile, edit } = {}) {
  root = path.resolve(root);
  const file = headersFile === undefined ? (existsSync(path.join(root, '_headers')) ? path.join(root, '_headers') : null) : headersFile;
  const rules = file ? parseHeadersFile(readFileSync(file, 'utf8')) : [];
  const log = [];
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    let pathname;
    try { pathname = decodeURIComponent(url.pathname); } catch { pathname = null; }
    // Errors carry the rules' headers too (as Netlify's and Cloudflare's do).
    const reply = (status, body, type = 'text/plain; charset=utf-8') => {
      log.push({ method: req.method, path: url.pathname, status });
      for (const [k, v] of headersFor(rules, url.pathname)) res.setHeader(k, v);
      res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) });
      res.end(req.method === 'HEAD' ? undefined : body);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') return reply(405, 'only GET and HEAD\n');
    if (pathname == null || pathname.includes('\0')) return reply(400, 'bad path\n');
    let target = path.join(root, pathname);
    if (target !== root && !target.startsWith(root + path.sep)) return reply(404, 'not found\n');
    if (existsSync(target) && statSync(target).isDirectory()) target = path.join(target, 'index.html');
    if (path.relative(root, target) === '_headers' || !existsSync(target) || !statSync(target).isFile()) return reply(404, 'not found\n');
    let headers = headersFor(rules, url.pathname);
    if (edit) headers = edit(headers, url.pathname);
    const { size, mtimeMs } = statSync(target);
    // An ETag from size and modification time; a conditional GET that still matches gets 304.
    const etag = `"${size.toString(16)}-${Math.floor(mtimeMs).toString(16)}"`;
    res.setHeader('ETag', etag);
    for (const [k, v] of headers) res.setHeader(k, v);
    if ((req.headers['if-none-match'] ?? '').split(/\s*,\s*/).includes(etag)) {
      log.push({ method: req.method, path: url.pathname, status: 304 });
      res.writeHead(304);
      return res.end();
    }
    res.setHeader('Content-Type', MIME[path.extname(target).toLowerCase()] ?? 'application/octet-stream');
    res.setHeader('Content-Length', size);
    log.push({ method: req.method, path: url.pathname, status: 200 });
    res.writeHead(200);
    if (req.method === 'HEAD') return res.end();
    createReadStream(target).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      const { port: p } = /** @type {import('node:net').AddressInfo} */ (server.address());
      resolve({
        url: `http://127.0.0.1:${p}/`, log,
        stop: () => new Promise((done) => { server.closeAllConnections(); server.close(() => done()); }),
      });
    });
  });
}

// As a command: node tools/serve-static.mjs DIR [--port N]
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const dir = args.find((a, i) => !a.startsWith('--') && args[i - 1] !== '--port');
  const portAt = args.indexOf('--port');
  const port = portAt >= 0 ? Number(args[portAt + 1]) : 8080;
  if (!dir || !Number.isInteger(port)) {
    console.error('usage: node tools/serve-static.mjs DIR [--port N]   (DIR: e.g. target/site from tools/build-site.sh)');
    process.exit(2);
  }
  const { url } = await serveStatic(dir, { port });
  console.log(`serve-static: serving ${path.resolve(dir)} at ${url}${existsSync(path.join(dir, '_headers')) ? ' with its _headers' : ' (no _headers file: no COOP/COEP/CSP)'}`);
}
