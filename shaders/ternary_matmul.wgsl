// BitLinear: y (T, O) = (x_q (T, I) . W^T) / (s_a * s_w) with W ternary (O, I).
//
// W holds transformers' packed codes (integrations/bitnet.py pack_weights): (O4, I) bytes with
// O4 = ceil(O/4), byte (p, i) holding the 2-bit codes (value + 1) of rows p, p + O4, p + 2*O4,
// p + 3*O4 in bits 0-1, 2-3, 4-5, 6-7. On the GPU the four bytes (p, 4k .. 4k+3) form word
// (k, p) of an (I4, O4) array (bitlora_gpu::DType::Ternary): invocations owning consecutive
// rows p read consecutive words.
// x_q holds int8 codes packed four per u32 (act_quant.wgsl), zero in the padding columns.
//
// Each invocation owns one packed row p, i.e. the four output columns p + s*O4 (s = 0..3),
// for TT consecutive tokens, so every weight word it loads serves 4 outputs x TT tokens.
// The product is exact in i32: with codes c in {0, 1, 2},
//   sum_i x_i (c_i - 1) = sum_i x_i c_i - sum_i x_i,
// and |acc| <= 128 * I. Per word, slot s's four codes are (word >> 2s) & 0x03030303, four
// bytes in 0..2, and dot4I8Packed multiplies them with the four int8 activations and sums:
// integer arithmetic, exact in any order. Only the final scaling is floating point, in the
// reference's order:
//   y = f32(acc) / (s_a * s_w).
// The T output rows go to rows y_row0 .. y_row0+T of y: the k and v projections write
// straight into the KV cache after the tokens already there (y_row0 = 0 otherwise).
// Dispatch (ceil(O4 / WG), ceil(T / TT), 1).

// dot4I8Packed: a WGSL language extension (every WebGPU browser, naga); declared for portability.
requires packed_4x8_integer_dot_product;

override I: u32;                   // in features
override O: u32;                   // out features
override WG: u32 = 64u;            // workgroup size
override O4: u32 = (O + 3u) / 4u;  // packed rows
override I4: u32 = (I + 3u) / 4u;  // x_q words per token = weight words per packed row
const TT: u32 = 4u;                // tokens per invocation

struct Dims {
    t: u32,      // T, tokens
    y_row0: u32, // first row of y written
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> xq: array<u32>;      // (T, ceil(I/4)) int8 x4
@group(0) @binding(2) var<storage, read> sa: array<f32>;      // (T) s_a
@group(0) @binding(3) var<storage, read> w: array<u32>;       // (ceil(I/4), ceil(O/4)) words of 4 packed bytes
@group(0) @binding(4) var<storage, read> sw: array<f32>;      // (1) s_w
@group(0) @binding(5) var<storage, read_write> y: array<f32>; // (R, O), R >= y_row0 + T

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.x;
    let t0 = gid.y * TT;
    let t_count = dims.t;
    if p >= O4 || t0 >= t_count {
        return;
    }
    let nt = min(TT, t_count - t0);

    var acc: array<array<i32, 4>, TT>; // [token][slot] sum of x * code
    var xsum: array<i32, TT>;          // [token] sum of x
    for (var k = 0u; k < I4; k++) {
        let ww = w[k * O4 + p];
        let c0 = ww & 0x03030303u;
        let c1 = (ww >> 2u) & 0x03030303u;
        let c2 = (ww >> 4u) & 0x03030303u;
        let c3 = (ww >> 6u) & 0x03030303u;
        for (var tt = 0u; tt < nt; tt++) {
            let xw = xq[(t0 + tt) * I4 + k];
            xsum[tt] += dot4I8Packed(xw, 0x01010101u);
            acc[tt][0] += dot4I8Packed(xw, c0);
            acc[tt][1] += dot4I8Packed(xw, c1);
            acc[tt][2] += dot4I8Packed(xw, c2);
            acc[tt][3] += dot4I8Packed(xw, c3);
        }
    }

    let s_w = sw[0];
    for (var tt = 0u; tt < nt; tt++) {
        let t = t0 + tt;
        let denom = sa[t] * s_w;
        let row = dims.y_row0 + t;
        for (var s = 0u; s < 4u; s++) {
            let o = p + s * O4;
            if o < O {
                y[row * O + o] = f32(acc[tt][s] - xsum[tt]) / denom;
            }
        }
    }
}
