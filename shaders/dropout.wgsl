// LoRA dropout with the CPU reference's random numbers: input n = t*I + i of a projection is
// kept when draw n of its stream is not below p, exactly as bitlora_core::train::dropout_draws
// draws them one after another with bitlora_core::rng::Rng (SplitMix64). SplitMix64 is a
// counter-based generator, so draw n from the stream's starting state s is computed directly:
//   z = s + (n + 1) * GAMMA                                   (mod 2^64)
//   z = (z ^ (z >> 30)) * C1;  z = (z ^ (z >> 27)) * C2;  z ^= z >> 31
//   u = f32(z >> 40) / 2^24                                   (24 bits: exact in f32)
// in 64-bit arithmetic emulated on u32 pairs (WGSL has no u64). The host gives each
// projection's starting state (Rng::skip past the draws of the projections before it), so no
// mask is drawn on the CPU or uploaded, and the backward recomputes the forward's mask.
// Kept inputs are multiplied by KEEP = 1 / (1 - p), dropped ones by 0: the CPU's factors, so
// every product is the CPU's to the bit.
//   ACC = 0 (forward):   out = x * m     the adapter's input dropout(x)
//   ACC = 1 (backward):  out += x * m    dx += (du . A) * m, back through the same mask
// Dispatch (ceil(I / WG), T, 1).

override I: u32;        // in features of the adapted projection
override WG: u32 = 64u; // workgroup size
override ACC: u32 = 0u; // 1: out += x * m

struct Dims {
    t: u32,        // T
    keep: f32,     // 1 / (1 - p)
    p: f32,        // dropout probability
    state_lo: u32, // the stream's starting state s (low, high 32 bits)
    state_hi: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;         // (T, I)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (T, I)

// u64 values as vec2<u32>(low, high).
fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

// The full 64-bit product of two u32.
fn mul32(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    return vec2<u32>((p00 & 0xffffu) | (mid << 16u), a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u));
}

// The low 64 bits of a * b.
fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let p = mul32(a.x, b.x);
    return vec2<u32>(p.x, p.y + a.x * b.y + a.y * b.x);
}

// a ^ (a >> k), 0 < k < 32.
fn xorshift(a: vec2<u32>, k: u32) -> vec2<u32> {
    return a ^ vec2<u32>((a.x >> k) | (a.y << (32u - k)), a.y >> k);
}

const GAMMA = vec2<u32>(0x7f4a7c15u, 0x9e3779b9u);
const C1 = vec2<u32>(0x1ce4e5b9u, 0xbf58476du);
const C2 = vec2<u32>(0x133111ebu, 0x94d049bbu);

// Draw n (0-based) of the stream starting at state s, as Rng::uniform.
fn draw(s: vec2<u32>, n: u32) -> f32 {
    var z = add64(s, mul64(vec2<u32>(n + 1u, 0u), GAMMA));
    z = mul64(xorshift(z, 30u), C1);
    z = mul64(xorshift(z, 27u), C2);
    z = xorshift(z, 31u);
    return f32(z.y >> 8u) / 16777216.0;
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if i >= I || t >= dims.t {
        return;
    }
    let n = t * I + i;
    var m = 0.0;
    if draw(vec2<u32>(dims.state_lo, dims.state_hi), n) >= dims.p {
        m = dims.keep;
    }
    let v = x[n] * m;
    if ACC == 1u {
        out[n] += v;
    } else {
        out[n] = v;
    }
}
