// BitLinear: y (T, O) = (x_q (T, I) . W^T) / (s_a * s_w) with W ternary (O, I).
//
// W stays in transformers' packed layout (integrations/bitnet.py pack_weights): u8
// (O4, I) with O4 = ceil(O/4), byte (p, i) holding the 2-bit codes (value + 1) of rows
// p, p + O4, p + 2*O4, p + 3*O4 in bits 0-1, 2-3, 4-5, 6-7. The bytes are bound as u32 words
// (little-endian), plus one padding word, so row p starts at byte p*I whatever I is.
// x_q holds int8 codes packed four per u32 (act_quant.wgsl), zero in the padding columns.
//
// Each invocation owns one packed row p, i.e. the four output columns p + s*O4 (s = 0..3),
// for TT consecutive tokens, so every weight word it loads serves 4 outputs x TT tokens.
// The product is exact in i32: with codes c in {0, 1, 2},
//   sum_i x_i (c_i - 1) = sum_i x_i c_i - sum_i x_i,
// and |acc| <= 128 * I. Only the final scaling is floating point, in the reference's order:
//   y = f32(acc) / (s_a * s_w).
// Dispatch (ceil(O4 / WG), ceil(T / TT), 1).

override I: u32;                   // in features
override O: u32;                   // out features
override WG: u32 = 64u;            // workgroup size
override O4: u32 = (O + 3u) / 4u;  // packed rows
override I4: u32 = (I + 3u) / 4u;  // x_q words per token
const TT: u32 = 4u;                // tokens per invocation

struct Dims {
    t: u32, // T, tokens
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> xq: array<u32>;      // (T, ceil(I/4)) int8 x4
@group(0) @binding(2) var<storage, read> sa: array<f32>;      // (T) s_a
@group(0) @binding(3) var<storage, read> w: array<u32>;       // (ceil(O/4), I) u8 codes, + 1 pad word
@group(0) @binding(4) var<storage, read> sw: array<f32>;      // (1) s_w
@group(0) @binding(5) var<storage, read_write> y: array<f32>; // (T, O)

// The four weight bytes (p, 4k .. 4k+3) as one little-endian word, for any alignment of I.
fn weight_word(p: u32, k: u32) -> u32 {
    let byte = p * I + 4u * k;
    let wi = byte >> 2u;
    let sh = (byte & 3u) * 8u;
    if sh == 0u {
        return w[wi];
    }
    return (w[wi] >> sh) | (w[wi + 1u] << (32u - sh));
}

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
        let ww = weight_word(p, k);
        for (var tt = 0u; tt < nt; tt++) {
            let xw = bitcast<i32>(xq[(t0 + tt) * I4 + k]);
            for (var j = 0u; j < 4u; j++) {
                let xv = extractBits(xw, 8u * j, 8u); // sign-extended int8
                xsum[tt] += xv;
                for (var s = 0u; s < 4u; s++) {
                    let code = i32(extractBits(ww, 8u * j + 2u * s, 2u));
                    acc[tt][s] += xv * code;
                }
            }
        }
    }

    let s_w = sw[0];
    for (var tt = 0u; tt < nt; tt++) {
        let t = t0 + tt;
        let denom = sa[t] * s_w;
        for (var s = 0u; s < 4u; s++) {
            let o = p + s * O4;
            if o < O {
                y[t * O + o] = f32(acc[tt][s] - xsum[tt]) / denom;
            }
        }
    }
}
