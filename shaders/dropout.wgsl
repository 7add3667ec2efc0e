// LoRA dropout with a mask drawn on the CPU (bitlora_core::train::dropout_draws, in the CPU
// reference's order, so both backends drop the same inputs for the same RNG). Bit n of the
// mask, n = t*I + i counted from word `word0` (the projection's segment of the step's masks),
// is 1 where input (t, i) is kept; m = KEEP = 1 / (1 - p) there and 0 elsewhere, the CPU's
// factors, so every product below is the CPU's to the bit.
//   ACC = 0 (forward):   out = x * m     the adapter's input dropout(x)
//   ACC = 1 (backward):  out += x * m    dx += (du . A) * m, back through the same mask
// Dispatch (ceil(I / WG), T, 1).

override I: u32;        // in features of the adapted projection
override WG: u32 = 64u; // workgroup size
override ACC: u32 = 0u; // 1: out += x * m

struct Dims {
    t: u32,     // T
    word0: u32, // first mask word of this projection
    keep: f32,  // 1 / (1 - p)
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (T, I)
@group(0) @binding(2) var<storage, read> mask: array<u32>;     // (W) bits, W >= word0 + ceil(T*I/32)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (T, I)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if i >= I || t >= dims.t {
        return;
    }
    let n = t * I + i;
    let bit = (mask[dims.word0 + n / 32u] >> (n % 32u)) & 1u;
    var m = 0.0;
    if bit == 1u {
        m = dims.keep;
    }
    let v = x[n] * m;
    if ACC == 1u {
        out[n] += v;
    } else {
        out[n] = v;
    }
}
