//! The threaded build's pool (cargo feature `threads`, web/pkg-threads): rayon's global pool on
//! Web Workers that instantiate this same module on its shared memory.
//!
//! The design and most of the code are wasm-bindgen-rayon 1.3.0's
//! (<https://github.com/RReverser/wasm-bindgen-rayon/blob/1.3.0/src/lib.rs>, Apache-2.0,
//! Copyright 2022 Google Inc.). Only the JS that starts the workers is ours (`threads.js`): the
//! crate's bundler-free variant starts each worker from a `blob:` URL, which the page's
//! Content-Security-Policy (`worker-src 'self'`, crates/cli/src/serve.rs, deploy/_headers)
//! refuses, and its bundler variant imports the glue as `'../../..'`, which needs a bundler.
//! `threads.js` starts them from its own same-origin URL and is told the glue's URL.
//!
//! How a pool starts: the page's worker calls `initThreadPool(n, glueUrl)` once, after
//! instantiating the module and before creating the Session. That starts n workers (threads.js);
//! each instantiates the module on the same memory, says it is ready, then calls
//! `startPoolWorker`, which blocks it on a channel until `PoolBuilder::build` (called once all n
//! are ready) hands it a rayon thread to run. From then on a rayon call on the page's worker
//! queues its blocks on the pool and waits (`Atomics.wait`, allowed in a worker) for them.

use crossbeam_channel::{Receiver, Sender, bounded};
use js_sys::Promise;
use rayon::{ThreadBuilder, ThreadPoolBuilder};
use wasm_bindgen::prelude::*;

/// The pool being started: n threads' rayon ThreadBuilders travel through the channel to the
/// workers that will run them.
#[wasm_bindgen]
pub struct PoolBuilder {
    num_threads: usize,
    sender: Sender<ThreadBuilder>,
    receiver: Receiver<ThreadBuilder>,
}

#[wasm_bindgen(module = "/src/threads.js")]
extern "C" {
    #[wasm_bindgen(js_name = startWorkers)]
    fn start_workers(module: JsValue, memory: JsValue, glue: &str, builder: PoolBuilder)
    -> Promise;
}

#[wasm_bindgen]
impl PoolBuilder {
    #[wasm_bindgen(js_name = numThreads)]
    pub fn num_threads(&self) -> usize {
        self.num_threads
    }

    /// The channel's address in the shared memory, for the workers' `startPoolWorker`.
    pub fn receiver(&self) -> *const Receiver<ThreadBuilder> {
        &self.receiver
    }

    /// Called by threads.js once every worker is ready: makes the global pool, whose spawn
    /// handler sends each thread to a waiting worker. Takes `&mut self`, not `self`: the
    /// receiver must outlive the workers' `recv`.
    pub fn build(&mut self) -> Result<(), JsError> {
        let sender = self.sender.clone();
        ThreadPoolBuilder::new()
            .num_threads(self.num_threads)
            .spawn_handler(move |thread| {
                sender
                    .send(thread)
                    .map_err(|_| std::io::Error::other("no pool worker is waiting"))
            })
            .build_global()
            .map_err(|e| JsError::new(&format!("rayon's pool: {e}")))
    }
}

/// Starts `num_threads` Web Workers on this module and its memory and makes them rayon's
/// global pool; `glue` is the URL of this build's JS glue (web/pkg-threads/bitlora_web.js), which
/// each worker imports. Resolves once the pool is built.
#[wasm_bindgen(js_name = initThreadPool)]
pub fn init_thread_pool(num_threads: usize, glue: &str) -> Result<Promise, JsError> {
    if num_threads == 0 {
        return Err(JsError::new(
            "initThreadPool: num_threads must be at least 1",
        ));
    }
    let (sender, receiver) = bounded(num_threads);
    let builder = PoolBuilder {
        num_threads,
        sender,
        receiver,
    };
    Ok(start_workers(
        wasm_bindgen::module(),
        wasm_bindgen::memory(),
        glue,
        builder,
    ))
}

/// A pool worker's life (threads.js): waits for its rayon thread, then runs rayon's loop, and
/// never returns.
#[wasm_bindgen(js_name = startPoolWorker)]
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn start_pool_worker(receiver: *const Receiver<ThreadBuilder>) -> Result<(), JsError> {
    // SAFETY: `receiver` is PoolBuilder::receiver() of the builder that startWorkers holds
    // until every worker has received its thread (build() runs after all are ready, and the
    // builder is dropped only after it). Only threads.js calls this, with that value.
    let receiver = unsafe { &*receiver };
    let thread = receiver
        .recv()
        .map_err(|_| JsError::new("the pool was dropped before this worker got its thread"))?;
    thread.run();
    Ok(())
}
