// RoPE backward in place on dq or dk: the transpose of rope.wgsl's rotation
// (bitlora_core::train::rope_backward), pair (d[j], d[j + HS/2]) of each head:
//   d1' = d1 * cos + d2 * sin,   d2' = -d1 * sin + d2 * cos,
// row t at position t, with the forward's tables (bitlora_core::ops::rope_tables).
// Dispatch (ceil(NHEADS * HS/2 / WG), T, 1).

override NHEADS: u32;   // heads per row (NH for dq, NKV for dk)
override HS: u32;       // head size, even
override WG: u32 = 64u; // workgroup size
override HALF: u32 = HS / 2u;

@group(0) @binding(0) var<storage, read_write> d: array<f32>; // (T, NHEADS*HS)
@group(0) @binding(1) var<storage, read> cos_t: array<f32>;   // (P, HS/2), P >= T
@group(0) @binding(2) var<storage, read> sin_t: array<f32>;   // (P, HS/2)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x;
    let t = gid.y;
    if idx >= NHEADS * HALF {
        return;
    }
    let h = idx / HALF;
    let j = idx % HALF;
    let base = t * NHEADS * HS + h * HS;
    let c = cos_t[t * HALF + j];
    let s = sin_t[t * HALF + j];
    let d1 = d[base + j];
    let d2 = d[base + j + HALF];
    d[base + j] = d1 * c + d2 * s;
    d[base + j + HALF] = -d1 * s + d2 * c;
}
