// BitLinear backward to the input, straight-through on the activation quantizer:
//   dx (T, I) = dy (T, O) . W / s_w,   W ternary (O, I), i.e. the transposed product.
// W is the forward's packed weight (ternary_matmul.wgsl, bitlora_gpu::DType::Ternary): word
// (k, p) of an (I4, O4) array holds bytes (p, 4k .. 4k+3), byte (p, i) the codes (value + 1) of
// rows p + s*O4 (s = 0..3) in bits 2s..2s+1. Column i of W is byte i%4 of words (i/4, p).
// The sum for each dx[t, i] runs over p = 0..O4-1 and s = 0..3 in the order of the CPU
// reference (bitlora_core::train::ternary_backward), each term dy * {-1, 0, 1} exact, then one
// division by s_w. With ACC = 1 the result is added into dx (the q, k and v projections' input
// gradients sum into one buffer; CPU: dx_q + dx_k + dx_v).
//
// One invocation per word column k (the four columns i = 4k .. 4k+3, whose codes share each
// word) and TT tokens. With TT = 4 (CPU-emulated adapters, which pay for every load an
// invocation makes) it loads one word and 4 x 4 values of dy per packed row p for 64
// multiply-adds; with TT = 1 (GPUs, which need the invocations more than the reuse) one word
// and 4 values for 16. The blocks are spelled out in variables (CPU adapters keep private
// arrays indexed in loops in memory).
// Dispatch (ceil(ceil(I / 4) / WG), ceil(T / TT), 1).

override I: u32;                  // in features
override O: u32;                  // out features
override WG: u32 = 64u;           // workgroup size
override ACC: u32 = 0u;           // 1: dx += result
override O4: u32 = (O + 3u) / 4u; // packed rows
override I4: u32 = (I + 3u) / 4u; // word columns
override TT: u32 = 4u;            // tokens per invocation: 4 or 1

struct Dims {
    t: u32, // T
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> dy: array<f32>;       // (T, O)
@group(0) @binding(2) var<storage, read> w: array<u32>;        // (ceil(I/4), ceil(O/4)) packed words
@group(0) @binding(3) var<storage, read> sw: array<f32>;       // (1) s_w
@group(0) @binding(4) var<storage, read_write> dx: array<f32>; // (T, I)

// The codes minus one of slot s (rows p + s*O4) of the word's four columns.
fn slot(ww: u32, s: u32) -> vec4<f32> {
    let sh = 2u * s;
    let c = (vec4<u32>(ww, ww >> 8u, ww >> 16u, ww >> 24u) >> vec4<u32>(sh)) & vec4<u32>(3u);
    return vec4<f32>(c) - vec4<f32>(1.0);
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let t0 = gid.y * TT;
    if k >= I4 || t0 >= dims.t {
        return;
    }
    // Tokens past T are clamped (computed, not written); rows past O read row O-1 times 0.
    let last = dims.t - 1u;
    let r0 = min(t0, last) * O;
    let r1 = min(t0 + 1u, last) * O;
    let r2 = min(t0 + 2u, last) * O;
    let r3 = min(t0 + 3u, last) * O;
    var a0 = vec4<f32>(); // token t0, columns 4k .. 4k+3
    var a1 = vec4<f32>();
    var a2 = vec4<f32>();
    var a3 = vec4<f32>();
    for (var p = 0u; p < O4; p++) {
        let ww = w[k * O4 + p];
        for (var s = 0u; s < 4u; s++) {
            let o = p + s * O4;
            let oc = min(o, O - 1u);
            let live = o < O;
            let c = slot(ww, s);
            a0 += select(0.0, dy[r0 + oc], live) * c;
            if TT == 4u {
                a1 += select(0.0, dy[r1 + oc], live) * c;
                a2 += select(0.0, dy[r2 + oc], live) * c;
                a3 += select(0.0, dy[r3 + oc], live) * c;
            }
        }
    }
    let acc = array<vec4<f32>, 4>(a0, a1, a2, a3);
    let s_w = sw[0];
    let nt = min(TT, dims.t - t0);
    let ni = min(4u, I - 4u * k);
    for (var tt = 0u; tt < nt; tt++) {
        for (var j = 0u; j < ni; j++) {
            let idx = (t0 + tt) * I + 4u * k + j;
            let r = acc[tt][j] / s_w;
            if ACC == 1u {
                dx[idx] += r;
            } else {
                dx[idx] = r;
            }
        }
    }
}
