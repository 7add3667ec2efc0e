// @ts-check
// A web app that uses the bitlora package (npm install bitlora): it fine-tunes the package's
// default model on the chat examples in the text box and chats with the result through
// bl.chat.completions.create, streaming, with or without the adapter. Plain ES modules: the
// import map in index.html resolves `bitlora`; with a bundler the same import works.
import { Bitlora } from 'bitlora';

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
/** @param {string} id */
const input = (id) => /** @type {HTMLInputElement} */ (document.getElementById(id));
/**
 * @param {string} text
 * @param {string} [state]
 */
const say = (text, state) => {
  $('status').textContent = text;
  if (state) document.body.dataset.state = state;
};

// bitlora-default-12m is a base model: its tokenizer_config.json has no chat template, which
// chat.completions needs. This app gives it one (a plain "### role:" layout, ended by the EOS
// token that stops generation) by loading the package's model files with its own
// tokenizer_config.json. A model that has a template loads with { bundled } or { stored } as is.
const CHAT_TEMPLATE =
  "{{ bos_token }}{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n" +
  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}" +
  '{% if add_generation_prompt %}### assistant:\n{% endif %}';

/** The package's bundled default model, with CHAT_TEMPLATE, as picked files. */
async function defaultModelWithTemplate() {
  const dir = new URL('./models/default/', import.meta.resolve('bitlora'));
  /** @param {string} name */
  const get = async (name) => {
    const r = await fetch(new URL(name, dir));
    if (!r.ok) throw new Error(`${name}: ${r.status} ${r.statusText}`);
    return r;
  };
  const config = JSON.parse(await (await get('tokenizer_config.json')).text());
  config.chat_template = CHAT_TEMPLATE;
  return [
    new File([await (await get('config.json')).blob()], 'config.json'),
    new File([await (await get('model.safetensors')).blob()], 'model.safetensors'),
    new File([await (await get('tokenizer.json')).blob()], 'tokenizer.json'),
    new File([JSON.stringify(config)], 'tokenizer_config.json'),
  ];
}

const bl = await Bitlora.create(); // WebGPU when the browser grants it, else the CPU (wasm SIMD128)
say(`${bl.backend.label}. Loading the model…`, 'loading');
try {
  const model = await bl.loadModel({ files: await defaultModelWithTemplate() });
  say(`${model.name ?? model.config}: ${model.params ?? ''} on ${bl.backend.label}; chat template: ${model.chatTemplate}`, 'ready');
} catch (err) {
  say(`Error: ${/** @type {Error} */ (err).message}`, 'error');
  throw err;
}
/** @type {Window & { example?: { bl: Bitlora } }} */ (window).example = { bl }; // for the console and the tests
input('train').disabled = input('send').disabled = false;

input('train').onclick = async () => {
  input('train').disabled = true;
  const data = { text: /** @type {HTMLTextAreaElement} */ ($('data')).value, fileName: 'chat.jsonl' };
  try {
    say('Fine-tuning…', 'training');
    const trainer = await bl.createTrainer({ data, steps: Number(input('steps').value), context: 48, lr: 1e-2, rank: 8, seed: 1 });
    trainer.on('progress', (p) => {
      $('progress').textContent += `step ${p.step}/${p.totalSteps} loss ${p.loss.toFixed(3)}` +
        `${p.valLoss != null ? ` val ${p.valLoss.toFixed(3)}` : ''}\n`;
    });
    await trainer.start();
    const done = await trainer.finished;
    await trainer.saveAdapter('chat-example');
    say(`Fine-tuned: ${done.step} steps, loss ${done.loss?.toFixed(3)}; the adapter "chat-example" is stored in this browser.`, 'trained');
  } catch (err) {
    say(`Error: ${/** @type {Error} */ (err).message}`, 'error');
  } finally {
    input('train').disabled = false;
  }
};

/** @type {HTMLFormElement} */ ($('chat')).onsubmit = async (event) => {
  event.preventDefault();
  const content = input('message').value;
  const adapter = input('use-adapter').checked ? 'chat-example' : null;
  const user = document.createElement('li');
  user.className = 'user';
  user.textContent = content;
  const reply = document.createElement('li');
  reply.className = 'assistant';
  $('conversation').append(user, reply);
  input('send').disabled = true;
  say('Answering…', 'answering');
  try {
    const stream = await bl.chat.completions.create({
      messages: [{ role: 'user', content }], stream: true, max_tokens: 40, adapter,
    });
    let finish = null;
    for await (const chunk of stream) {
      const choice = chunk.choices[0];
      reply.textContent += choice?.delta.content ?? '';
      finish = choice?.finish_reason ?? finish;
    }
    reply.dataset.finish = finish ?? '';
    say(`Answered${adapter ? ` through "${adapter}"` : ' by the base model'} (${finish}).`, 'answered');
  } catch (err) {
    say(`Error: ${/** @type {Error} */ (err).message}`, 'error');
  } finally {
    input('send').disabled = false;
  }
};
