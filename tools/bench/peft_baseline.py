"""The train-<shape> baseline: PyTorch + transformers' BitNet + PEFT LoRA, timed like
`bitlora bench train` so that both run on the same machine in the same session.

Workload (shared/BENCHMARKS-TARGETS.md): LoRA r 8 / alpha 16 on all seven linear modules,
one sequence of 128 random tokens per optimizer step, AdamW; median tokens/s over the timed
steps after warm-up, and peak GPU memory (torch.cuda.max_memory_allocated).

The model is the directory `bitlora random-model --shape S --out DIR` writes (bf16 master
weights, transformers' AutoBitLinear with online ternary quantization), so both sides train
the same weights. Prints one JSON line.

    python3 tools/bench/peft_baseline.py DIR [--compile] [--steps 20] [--warmup 3]
"""
import argparse
import json
import statistics
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    dev = torch.device(a.device)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(dev)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    run = torch.compile(model) if a.compile else model
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, vocab, (1, a.seq), generator=g).to(dev)
        sync()
        t0 = time.perf_counter()
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss at step {step}")
    med = statistics.median(times)
    print(json.dumps({
        "workload": f"train ({a.model_dir})", "backend": "pytorch+peft" + (" compiled" if a.compile else " eager"),
        "dtype": a.dtype, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "sequence_tokens": a.seq, "steps_timed": a.steps, "tokens_per_s_median": a.seq / med,
        "step_seconds_median": med,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
