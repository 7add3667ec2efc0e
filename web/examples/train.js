// The README's "For web developers" example, wired to a page (web/examples/train.html).
import { Bitlora } from '../bitlora.js';

const $ = (id) => document.getElementById(id);
const say = (text, state) => { $('status').textContent = text; if (state) document.body.dataset.state = state; };

// ?backend=webgpu|cpu picks one; by default WebGPU on a hardware adapter, else the CPU.
const backend = /** @type {'auto' | 'webgpu' | 'cpu'} */ (new URLSearchParams(location.search).get('backend') ?? 'auto');
// ?threads=N: the CPU backend's threads (1: the single-thread build); by default one per core.
const threadsParam = new URLSearchParams(location.search).get('threads');
const bl = await Bitlora.create({ backend, threads: threadsParam ? Number(threadsParam) : undefined });
say(`${bl.backend.label}; training on ${bl.backend.training}. Loading the model…`, 'loading');
const model = await bl.loadModel({ bundled: 'default' }, {
  onProgress: (p) => say(`Loading the model: ${p.phase} ${Math.round((100 * p.done) / Math.max(p.total, 1))}%`),
});
say(`${model.name} on ${bl.backend.label}`, 'ready');
$('train').disabled = $('generate').disabled = false;
window.bitlora = bl; // for the console (and the browser tests)

$('file').onchange = async () => { $('data').value = await $('file').files[0].text(); };

let trainer = null;
$('train').onclick = async () => {
  const data = { text: $('data').value, fileName: $('file').files[0]?.name ?? 'pasted.jsonl' };
  try {
    const summary = await bl.prepareData(data, { context: 64 });
    const config = { data, steps: Number($('steps').value), context: 64, lr: 3e-3, rank: 8, evalEvery: 10, completionOnly: true };
    const mem = await bl.estimateMemory(config);
    if (!mem.fits) throw new Error(mem.message);
    $('progress').textContent = `${summary.format}: ${summary.trainSequences} training / ${summary.valSequences} validation sequences, ` +
      `${summary.targetTokens} target tokens; about ${(mem.total / 2 ** 20).toFixed(0)} MiB\n`;
    trainer = await bl.createTrainer(config);
    trainer.on('progress', (p) => {
      $('progress').textContent += `step ${p.step}/${p.totalSteps} loss ${p.loss.toFixed(3)}` +
        `${p.valLoss != null ? ` val ${p.valLoss.toFixed(3)}` : ''} ${p.tokensPerSec.toFixed(0)} tok/s, ${p.eta.toFixed(0)} s left\n`;
    });
    trainer.on('state', ({ state }) => { document.body.dataset.train = state; });
    $('pause').disabled = false;
    await trainer.start();
    await trainer.finished;                                            // resolves on 'done' or stop()
    await trainer.saveAdapter('example');
    say('Trained; the adapter "example" is stored in this browser.', 'trained');
  } catch (err) {
    say(`Error: ${err.message}`, 'error');
  }
};
$('pause').onclick = async () => { await trainer.pause(); $('resume').disabled = false; };
$('resume').onclick = async () => { await trainer.resume(); $('resume').disabled = true; };

$('generate').onclick = async () => {
  const adapters = await bl.listAdapters();
  const run = async (adapter, out) => {
    $(out).textContent = adapter ? `[${adapter}] ` : '[base] ';
    for await (const t of bl.generate($('prompt').value, { maxTokens: 40, adapter })) $(out).textContent += t.text;
  };
  await run(null, 'base');
  if (adapters.some((a) => a.name === 'example')) await run('example', 'tuned');
};
