"""Pretrains bitlora's default model: a small BitNet b1.58 (2B-4T architecture: relu2, sub-norms,
GQA, tied embeddings) with quantization-aware training of the ternary weights, on the
public-domain corpus of tools/corpus, with the tokenizer of tools/tokenizer.

Run on the GPU machine (PyTorch + transformers):
    python3 tools/pretrain/pretrain.py --data target/corpus --tokenizer data/tokenizer \
        --out OUT --minutes 7 --seed 0
Writes OUT/model/ (config.json, model.safetensors in transformers' packed `autobitlinear`
format, tokenizer.json, tokenizer_config.json, generation_config.json) and OUT/report.json
(loss curve, held-out loss and perplexity, samples, settings).

QAT maths = transformers' `integrations/bitnet.py` (`WeightQuant`, `ActQuant`, online
AutoBitLinear) with the straight-through estimator: forward uses
`W_q = clamp(round(W / mean|W|), -1, 1) * mean|W|` and per-token int8 activations; backward
passes gradients through both quantizers unchanged. The model is transformers'
`BitNetForCausalLM`, so what is trained is exactly what transformers (and bitlora) runs.
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import pack_weights

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QATLinear(nn.Linear):
    """nn.Linear whose forward is transformers' online AutoBitLinear (WeightQuant + ActQuant)."""

    def forward(self, x):
        w = self.weight.float()
        s = 1.0 / w.abs().mean().clamp(min=1e-5)
        wq = w + ((w * s).round().clamp(-1, 1) / s - w).detach()
        xf = x.float()
        xs = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        xq = xf + ((xf * xs).round().clamp(-128, 127) / xs - xf).detach()
        return F.linear(xq.to(x.dtype), wq.to(x.dtype))


def make_model(vocab, args):
    cfg = BitNetConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=args.context * 2, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="relu2",
        tie_word_embeddings=True, bos_token_id=args.bos, eos_token_id=args.eos, pad_token_id=args.pad,
        initializer_range=0.02,
    )
    model = BitNetForCausalLM(cfg)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ:
                lin = getattr(parent, name, None)
                if lin is not None:
                    q = QATLinear(lin.in_features, lin.out_features, bias=False)
                    q.weight = lin.weight
                    setattr(parent, name, q)
    return model, cfg


def batches(tokens, batch, context, gen):
    n = len(tokens) - context - 1
    while True:
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([torch.from_numpy(tokens[i:i + context + 1].astype(np.int64)) for i in idx.tolist()])
        yield x


@torch.no_grad()
def evaluate(model, tokens, context, device, max_windows=400):
    """Mean next-token loss over non-overlapping windows of the held-out text."""
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(tokens) - context - 1, context))[:max_windows]
    for k in range(0, len(starts), 32):
        x = torch.stack([torch.from_numpy(tokens[s:s + context + 1].astype(np.int64)) for s in starts[k:k + 32]]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def sample(model, tok, prompt, device, n=60, temperature=0.8, top_p=0.95, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt).ids], device=device)
    for _ in range(n):
        logits = model(ids).logits[0, -1].float() / temperature
        probs = torch.softmax(logits, -1)
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p
        sp = sp * keep
        nxt = si[torch.multinomial(sp / sp.sum(), 1, generator=g)]
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return tok.decode(ids[0].tolist())


def export_packed(model, cfg, out_dir, tokenizer_dir):
    """transformers' offline autobitlinear format: u8 `weight` [out/4, in] + f32 `weight_scale`
    (W = T * weight_scale), bf16 embeddings and norms."""
    os.makedirs(out_dir, exist_ok=True)
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if any(name.endswith(p + ".weight") for p in PROJ):
            w = t.float()
            s = 1.0 / w.abs().mean().clamp(min=1e-5)
            tern = (w * s).round().clamp(-1, 1).to(torch.int8)
            sd[name] = pack_weights(tern.clone()).contiguous().cpu()
            sd[name[:-len("weight")] + "weight_scale"] = (1.0 / s).reshape(1).float().cpu()
        else:
            sd[name] = t.to(torch.bfloat16).contiguous().cpu()
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c["architectures"] = ["BitNetForCausalLM"]
    c["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
    c["torch_dtype"] = "bfloat16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, fname), os.path.join(out_dir, fname))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="dir with train.u16 and val.u16")
    ap.add_argument("--tokenizer", required=True, help="dir with tokenizer.json, tokenizer_config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=7.0, help="training time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--bos", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="fix the step count a timed run would choose at step 100 (reproduces a recorded run)")
    ap.add_argument("--eos", type=int, required=True)
    ap.add_argument("--pad", type=int, default=None)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    train = np.fromfile(os.path.join(args.data, "train.u16"), dtype=np.uint16)
    val = np.fromfile(os.path.join(args.data, "val.u16"), dtype=np.uint16)
    model, cfg = make_model(vocab, args)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; train {len(train)} tokens, val {len(val)} tokens", flush=True)

    # The step count is estimated from steps 50-100 (after torch.compile's warm-up), so the
    # cosine schedule ends when the time budget does.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train, args.batch, args.context, gen)
    compiled = torch.compile(model)
    step, t0, curve = 0, time.time(), []
    best = (float("inf"), 0, None)
    total_steps, t50 = None, None
    budget = args.minutes * 60
    while True:
        elapsed = time.time() - t0
        if step == 50:
            t50 = elapsed
        if total_steps is None and step == 100:
            per_step = (elapsed - t50) / 50
            total_steps = 100 + max(0, int((budget - elapsed) / per_step))
            if args.steps is not None:
                total_steps = args.steps
            print(f"{per_step * 1000:.0f} ms/step after warm-up -> {total_steps} steps", flush=True)
        if total_steps is not None and step >= total_steps:
            break
        horizon = total_steps or 10_000
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / horizon))))
        for group in opt.param_groups:
            group["lr"] = lr
        x = next(data).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            entry = {"step": step, "loss": float(loss), "lr": lr, "seconds": round(time.time() - t0, 1)}
            if step % 500 == 0:
                entry["val_loss"] = evaluate(model, val, args.context, device)
                # The corpus is small (a few M tokens): many epochs overfit, so keep the
                # weights with the best held-out loss.
                if entry["val_loss"] < best[0]:
                    best = (entry["val_loss"], step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            curve.append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds = time.time() - t0
    last = evaluate(model, val, args.context, device)
    if best[2] is not None and best[0] < last:
        print(f"restoring the best weights: step {best[1]} (held-out {best[0]:.4f} < final {last:.4f})", flush=True)
        model.load_state_dict(best[2])
    best_step = best[1] if best[2] is not None and best[0] < last else step
    val_loss = evaluate(model, val, args.context, device)
    print(f"held-out loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}", flush=True)
    prompts = ["The ", "To be, or not to be", "Call me Ishmael.", "Mr. Speaker, the state of the Union", "ROMEO:\n"]
    model.eval()
    samples = {p: sample(model, tok, p, device, seed=args.seed) for p in prompts}
    for p, s in samples.items():
        print(repr(s), flush=True)
    model_dir = os.path.join(args.out, "model")
    export_packed(model, cfg, model_dir, args.tokenizer)
    report = {"transformers": transformers.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
              "parameters": n_params, "steps": step, "exported_step": best_step, "train_seconds": round(train_seconds, 1),
              "tokens_seen": step * args.batch * args.context, "held_out_loss": val_loss,
              "held_out_perplexity": math.exp(val_loss), "curve": curve, "samples": samples, "settings": vars(args)}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("model size:", os.path.getsize(os.path.join(model_dir, "model.safetensors")), "bytes", flush=True)


if __name__ == "__main__":
    main()
