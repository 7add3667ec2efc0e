// BitLinear backward to the input, straight-through on the activation quantizer:
//   dx (T, I) = dy (T, O) . W / s_w,   W ternary (O, I), i.e. the transposed product.
// W is the forward's packed weight (ternary_matmul.wgsl, bitlora_gpu::DType::Ternary): word
// (k, p) of an (I4, O4) array holds bytes (p, 4k .. 4k+3), byte (p, i) the codes (value + 1) of
// rows p + s*O4 (s = 0..3) in bits 2s..2s+1. Column i of W is byte i%4 of words (i/4, p).
// One invocation per (i, token); the sum runs over p = 0..O4-1 and s = 0..3 in the order of the
// CPU reference (bitlora_core::train::ternary_backward), each term dy * {-1, 0, 1} exact, then
// one division by s_w. With ACC = 1 the result is added into dx (the q, k and v projections'
// input gradients sum into one buffer; CPU: dx_q + dx_k + dx_v).
// Dispatch (ceil(I / WG), T, 1).

override I: u32;                  // in features
override O: u32;                  // out features
override WG: u32 = 64u;           // workgroup size
override ACC: u32 = 0u;           // 1: dx += result
override O4: u32 = (O + 3u) / 4u; // packed rows

@group(0) @binding(0) var<storage, read> dy: array<f32>;       // (T, O)
@group(0) @binding(1) var<storage, read> w: array<u32>;        // (ceil(I/4), ceil(O/4)) packed words
@group(0) @binding(2) var<storage, read> sw: array<f32>;       // (1) s_w
@group(0) @binding(3) var<storage, read_write> dx: array<f32>; // (T, I)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if i >= I {
        return;
    }
    let row = (i / 4u) * O4;
    let shift = 8u * (i % 4u);
    var acc = 0.0;
    for (var p = 0u; p < O4; p++) {
        let b = (w[row + p] >> shift) & 0xffu;
        for (var s = 0u; s < 4u; s++) {
            let o = p + s * O4;
            var g = 0.0;
            if o < O {
                g = dy[t * O + o];
            }
            acc += g * (f32((b >> (2u * s)) & 3u) - 1.0);
        }
    }
    let r = acc / sw[0];
    if ACC == 1u {
        dx[t * I + i] += r;
    } else {
        dx[t * I + i] = r;
    }
}
