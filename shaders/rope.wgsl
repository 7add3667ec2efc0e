// Rotary position embedding in place, transformers' rotate_half convention: within a head
// the pair is (x[j], x[j + HS/2]) and
//   x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin,
// with cos/sin[pos, j] for angle pos / theta^(2j/HS), tabulated on the CPU
// (bitlora_core::ops::rope_tables) so both backends use the very same f32 values.
// Rotates rows row0 .. row0+T of x; row row0 + t holds the token at position pos0 + t. The
// queries of a forward pass sit at rows 0.. of their own buffer (row0 = 0); the keys are
// rotated where they land in the KV cache (row0 = pos0 = tokens already cached).
// Dispatch (ceil(NHEADS * HS/2 / WG), T, 1).
// `main_pair` rotates the queries and the keys of a pass in one dispatch: rows row0.. of x
// (NHEADS heads) and rows row0_k.. of x_k (NHEADS_K heads), the same T positions from pos0,
// each element by the same arithmetic as `main`. Dispatch
// (ceil((NHEADS + NHEADS_K) * HS/2 / WG), T, 1).

override NHEADS: u32;           // heads in x (NH for q, NKV for k)
override HS: u32;               // head size, even
override WG: u32 = 64u;         // workgroup size
override HALF: u32 = HS / 2u;
override NHEADS_K: u32 = 0u;    // main_pair: heads in x_k

struct Dims {
    t: u32,    // T, rows to rotate
    row0: u32, // first row of x
    pos0: u32, // position of that row
    row0_k: u32, // main_pair: first row of x_k
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read_write> x: array<f32>; // (R, NHEADS*HS), R >= row0 + T
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;   // (P, HS/2), P >= pos0 + T
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;   // (P, HS/2)
@group(0) @binding(4) var<storage, read_write> x_k: array<f32>; // main_pair: (R_K, NHEADS_K*HS)

// (x1, x2) rotated by the angle whose cosine and sine are (c, s).
fn rotate(x1: f32, x2: f32, c: f32, s: f32) -> vec2<f32> {
    return vec2<f32>(x1 * c - x2 * s, x2 * c + x1 * s);
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x;
    let t = gid.y;
    if idx >= NHEADS * HALF || t >= dims.t {
        return;
    }
    let h = idx / HALF;
    let j = idx % HALF;
    let base = (dims.row0 + t) * NHEADS * HS + h * HS;
    let pos = dims.pos0 + t;
    let r = rotate(x[base + j], x[base + j + HALF], cos_t[pos * HALF + j], sin_t[pos * HALF + j]);
    x[base + j] = r.x;
    x[base + j + HALF] = r.y;
}

@compute @workgroup_size(WG)
fn main_pair(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    if gid.x >= (NHEADS + NHEADS_K) * HALF || t >= dims.t {
        return;
    }
    let pos = dims.pos0 + t;
    if gid.x < NHEADS * HALF {
        let h = gid.x / HALF;
        let j = gid.x % HALF;
        let base = (dims.row0 + t) * NHEADS * HS + h * HS;
        let r = rotate(x[base + j], x[base + j + HALF], cos_t[pos * HALF + j], sin_t[pos * HALF + j]);
        x[base + j] = r.x;
        x[base + j + HALF] = r.y;
    } else {
        let idx = gid.x - NHEADS * HALF;
        let h = idx / HALF;
        let j = idx % HALF;
        let base = (dims.row0_k + t) * NHEADS_K * HS + h * HS;
        let r = rotate(x_k[base + j], x_k[base + j + HALF], cos_t[pos * HALF + j], sin_t[pos * HALF + j]);
        x_k[base + j] = r.x;
        x_k[base + j + HALF] = r.y;
    }
}
