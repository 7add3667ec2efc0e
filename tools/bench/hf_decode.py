"""The decode-<shape> baseline: transformers' BitNet, greedy decoding with a KV cache, timed like
`bitlora bench decode` so that both run on the same GPU in the same command.

Workload (shared/BENCHMARKS-TARGETS.md): a prompt of 128 random tokens (one prefill pass), then
128 greedy tokens one at a time through the cache. The model is the directory
`bitlora random-model --shape S --out DIR` writes (bf16 master weights; transformers'
AutoBitLinear quantizes them online, as it does for the released checkpoints), so both sides
decode the same weights. Eager by default; `--compile` uses transformers' static cache with
torch.compile (its fast decoding path). Prints one JSON line: prefill and decode tokens/s
(first run and best of --runs), peak GPU memory.

    python3 tools/bench/hf_decode.py DIR [--prompt-len 128] [--gen-len 128] [--runs 2] [--compile]
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    dev = torch.device(a.device)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(dev).eval()
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if a.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    runs = []
    for _ in range(a.runs):
        ids = torch.randint(0, vocab, (1, a.prompt_len), generator=g).to(dev)
        with torch.no_grad():
            cache = None  # eager: the model returns a DynamicCache
            if a.compile:
                try:
                    cache = transformers.StaticCache(config=model.config,
                                                     max_cache_len=a.prompt_len + a.gen_len)
                except TypeError:  # transformers 4.x spells it with batch, device and dtype
                    cache = transformers.StaticCache(config=model.config, max_batch_size=1,
                                                     max_cache_len=a.prompt_len + a.gen_len,
                                                     device=dev, dtype=dtype)
            sync()
            t0 = time.perf_counter()
            pos = torch.arange(a.prompt_len, device=dev)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=pos)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            tokens = [int(nxt)]
            for i in range(a.gen_len - 1):
                pos = torch.tensor([a.prompt_len + i], device=dev)
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True,
                            cache_position=pos)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(nxt))  # the token id comes back to the host, as in a chat
            sync()
            t2 = time.perf_counter()
        runs.append({"prefill_tokens_per_s": a.prompt_len / (t1 - t0),
                     "decode_tokens_per_s": (a.gen_len - 1) / (t2 - t1)})
    print(json.dumps({
        "workload": f"decode ({a.model_dir})",
        "backend": "transformers" + (" static cache + torch.compile" if a.compile else " eager"),
        "dtype": a.dtype, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "prompt_tokens": a.prompt_len, "generated_tokens": a.gen_len,
        "first_run": runs[0],
        "best_prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in runs),
        "best_decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in runs),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
