// @ts-check
// The training panel's presets. Each sets every field of the form; changing a field afterwards
// switches the panel to "Custom". The minutes are for bitlora's default 12.6 M-parameter model on
// a laptop CPU (the WebAssembly SIMD backend, about 150 tokens/s of training with context 64;
// BENCHMARKS.md has the native figures); the panel replaces them with a live estimate from the
// run's measured speed once one has run.
//
// Why these values:
// - Quick try: a small adapter (rank 4 on q and v, the original LoRA paper's choice) and a high
//   constant-ish learning rate so that the loss visibly falls within two minutes: 60 steps of 2
//   sequences of 64 tokens (~7,700 tokens).
// - Balanced: rank 8 on every linear layer of attention and the FFN, as most PEFT recipes do;
//   150 steps of 4 x 128 tokens (~77k tokens, about one epoch of the demo data).
// - Thorough: rank 16 everywhere, a lower learning rate for 2 epochs of 8 x 256 tokens.
// alpha = 2 x rank keeps the adapter's scale (alpha / r) at 2 across presets.

export const ALL_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

export const PRESETS = {
  quick: {
    label: 'Quick try', minutes: 2,
    rank: 4, alpha: 8, lr: 2e-3, length: 60, unit: 'steps', context: 64, batch: 2,
    evalEvery: 10, checkpointEvery: 20, targets: ['q_proj', 'v_proj'],
  },
  balanced: {
    label: 'Balanced', minutes: 10,
    rank: 8, alpha: 16, lr: 1e-3, length: 150, unit: 'steps', context: 128, batch: 4,
    evalEvery: 25, checkpointEvery: 25, targets: ALL_TARGETS,
  },
  thorough: {
    label: 'Thorough', minutes: 30,
    rank: 16, alpha: 32, lr: 5e-4, length: 2, unit: 'epochs', context: 256, batch: 8,
    evalEvery: 50, checkpointEvery: 50, targets: ALL_TARGETS,
  },
};

/** The preset whose values equal `values` exactly, else "custom". */
export function matchPreset(values) {
  for (const [name, p] of Object.entries(PRESETS)) {
    const same = ['rank', 'alpha', 'lr', 'length', 'unit', 'context', 'batch', 'evalEvery', 'checkpointEvery']
      .every((k) => p[k] === values[k])
      && p.targets.length === values.targets.length && p.targets.every((t) => values.targets.includes(t));
    if (same) return name;
  }
  return 'custom';
}
