// The threaded build's pool workers (crates/web/src/threads.rs; the design is
// wasm-bindgen-rayon 1.3.0's workerHelpers.js, Apache-2.0, Copyright 2022 Google Inc.).
// wasm-bindgen copies this file to web/pkg-threads/snippets/bitlora-web-<hash>/src/threads.js and
// the glue imports it. It is both the module that starts the workers (startWorkers, on the page's
// worker) and each pool worker's script: a worker is started from this file's own URL, which
// the page's CSP (worker-src 'self') allows, where wasm-bindgen-rayon's bundler-free variant
// uses a blob: URL, which it refuses. Pool workers carry the name below; any other context that
// imports this file (the page's worker) only gets the export.

const POOL_WORKER = 'bitlora-rayon';

/**
 * @param {Worker | DedicatedWorkerGlobalScope} target
 * @param {string} type
 */
function waitFor(target, type) {
  return new Promise((resolve) => {
    target.addEventListener('message', function onMessage({ data }) {
      if (data?.type !== type) return;
      target.removeEventListener('message', onMessage);
      resolve(data);
    });
  });
}

if (globalThis.name === POOL_WORKER) {
  waitFor(self, 'bitlora_rayon_init').then(async ({ glue, module, memory, receiver }) => {
    const pkg = await import(glue);
    await pkg.default({ module_or_path: module, memory });
    postMessage({ type: 'bitlora_rayon_ready' });
    pkg.startPoolWorker(receiver);
  });
}

// Keeps the workers referenced (Firefox collected unreferenced workers that share a wasm
// memory: https://bugzilla.mozilla.org/show_bug.cgi?id=1702191).
let workers;

/**
 * Starts builder.numThreads() workers on `module` and its shared `memory`, waits until each has
 * instantiated it, then builds rayon's pool (threads.rs PoolBuilder.build).
 */
export async function startWorkers(module, memory, glue, builder) {
  const init = { type: 'bitlora_rayon_init', glue, module, memory, receiver: builder.receiver() };
  workers = await Promise.all(Array.from({ length: builder.numThreads() }, async () => {
    const worker = new Worker(new URL(import.meta.url), { type: 'module', name: POOL_WORKER });
    const ready = waitFor(worker, 'bitlora_rayon_ready');
    worker.postMessage(init);
    await ready;
    return worker;
  }));
  builder.build();
}
