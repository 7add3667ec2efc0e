"""The train-<shape> baseline: PyTorch + transformers' BitNet + PEFT LoRA, timed like
`bitlora bench train` so that both run on the same machine in the same session.

Workload (shared/BENCHMARKS-TARGETS.md): LoRA r 8 / alpha 16 on all seven linear modules,
one sequence of 128 random tokens per optimizer step, AdamW; median tokens/s over the timed
steps after warm-up, and peak GPU memory (torch.cuda.max_memory_allocated).

The model is the directory `bitlora random-model --shape S --out DIR` writes (bf16 master
weights, transformers' AutoBitLinear with online ternary quantization), so both sides train
the same weights. Prints one JSON line.

    python3 tools/bench/peft_baseline.py DIR [--compile] [--steps 20] [--warmup 3]

`--bitlora-seed S` runs `bitlora bench train --seed S`'s exact workload instead of fresh torch
random tokens (tools/bench/cpu-train.sh, on the CPU with `--device cpu --dtype f32`): the same
`warmup + steps` sequences of SEQ + 1 tokens from bitlora's SplitMix64 stream (seed S ^ 0x7a1),
taken in the trainer's epoch-0 order, the loss over all SEQ next-token targets (not the HF
`labels=ids` shift over SEQ - 1), AdamW lr 1e-4 with bitlora's cosine decay over all the steps
and the global gradient norm clipped at 1.0. Without it nothing changes (the GPU runs). The JSON
also carries the step-0 loss (`loss_step0`) and the process's peak RSS (`peak_rss_mib`, VmHWM).

`--bitlora-step0 BIN` only prints the loss that bitlora's model gives step 0's sequence of that
workload (`BIN logits` on the CPU, cross-entropy here in f64; the adapter's B starts at zero on
both sides, so this is bitlora's training loss at step 0), to set beside `loss_step0`.
"""
import argparse
import json
import math
import statistics
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


class SplitMix64:
    """crates/core/src/rng.rs's Rng: next_u64 and below."""

    def __init__(self, seed):
        self.state = seed & MASK

    def next_u64(self):
        self.state = (self.state + GAMMA) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        return self.next_u64() % n


def bitlora_sequences(seed, n, seq, vocab):
    """`bitlora bench train --seed seed`'s n training sequences (tokens, targets) in the order its
    trainer takes them (bench.rs random_sequence, data.rs epoch_order for epoch 0)."""
    rng = SplitMix64(seed ^ 0x7A1)
    seqs = []
    for _ in range(n):
        toks = [rng.below(vocab) for _ in range(seq + 1)]
        seqs.append((toks[:seq], toks[1:]))
    order = list(range(n))
    orng = SplitMix64(seed ^ 1)  # epoch 0: seed ^ (0 * GAMMA + 1)
    for i in range(n - 1, 0, -1):
        j = orng.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return [seqs[i] for i in order]


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def bitlora_step0(a):
    """Cross-entropy of bitlora's own logits (CPU) on step 0's sequence, in f64."""
    import subprocess
    with open(f"{a.model_dir}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    toks, targets = bitlora_sequences(a.bitlora_seed, a.warmup + a.steps, a.seq, vocab)[0]
    out = subprocess.run([a.bitlora_step0, "logits", "--model", a.model_dir, "--backend", "cpu",
                          "--tokens", ",".join(map(str, toks))],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)["logits"]
    total = 0.0
    for row, t in zip(rows, targets):
        m = max(row)
        total += m + math.log(sum(math.exp(x - m) for x in row)) - row[t]
    print(json.dumps({"workload": f"bitlora step 0 ({a.model_dir}, seed {a.bitlora_seed})",
                      "bitlora_loss_step0": total / len(targets)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--bitlora-seed", type=int, default=None,
                    help="run `bitlora bench train --seed S`'s workload (see the module doc)")
    ap.add_argument("--bitlora-step0", metavar="BIN", default=None,
                    help="only print bitlora's step-0 loss of that workload (needs --bitlora-seed)")
    a = ap.parse_args()
    if a.bitlora_step0:
        if a.bitlora_seed is None:
            raise SystemExit("--bitlora-step0 needs --bitlora-seed")
        return bitlora_step0(a)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    dev = torch.device(a.device)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(dev)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    run = torch.compile(model) if a.compile else model
    vocab = base.config.vocab_size
    seqs = None
    if a.bitlora_seed is not None:
        seqs = bitlora_sequences(a.bitlora_seed, a.warmup + a.steps, a.seq, vocab)
        total = a.warmup + a.steps  # bitlora's AdamWConfig: cosine over all steps, no warm-up
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k / total, 1.0))))
    losses = []
    g = torch.Generator().manual_seed(0)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(a.warmup + a.steps):
        if seqs is None:
            ids = torch.randint(0, vocab, (1, a.seq), generator=g).to(dev)
        else:
            ids = torch.tensor([seqs[step][0]], dtype=torch.long).to(dev)
            tgt = torch.tensor(seqs[step][1], dtype=torch.long).to(dev)
        sync()
        t0 = time.perf_counter()
        if seqs is None:
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
        else:
            logits = run(input_ids=ids).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits, tgt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss at step {step}")
    med = statistics.median(times)
    print(json.dumps({
        "workload": f"train ({a.model_dir})", "backend": "pytorch+peft" + (" compiled" if a.compile else " eager"),
        "dtype": a.dtype, "device": torch.cuda.get_device_name() if cuda else a.device,
        "threads": torch.get_num_threads(),
        "data": "random torch tokens" if seqs is None else f"bitlora bench train --seed {a.bitlora_seed}",
        "sequence_tokens": a.seq, "steps_timed": a.steps, "tokens_per_s_median": a.seq / med,
        "step_seconds_median": med,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_rss_mib": peak_rss_mib(), "loss_step0": losses[0], "loss_last": losses[-1],
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
