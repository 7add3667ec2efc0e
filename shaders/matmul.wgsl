// Dense f32 y (T, O) = x (T, I) . W^T with W (O, I): the language-model head (tied: W is the
// embedding table).
//
// Each output y[t, o] is one sum of x[t, k] * w[o, k] over k = 0, 1, ..., I-1 in order, the CPU
// reference's summation order, whatever the blocking below: so a decoding step gives the very
// same values as the whole-sequence pass.
//
// Blocking (the `TT` override): with TT = 8 (a pass over many tokens, training) one invocation
// computes TO = 4 outputs for 8 tokens, loading 4 values of W and 8 of x per k for 32
// multiply-adds (CPU-emulated adapters such as lavapipe and SwiftShader pay for every load an
// invocation makes; real GPUs reuse the registers). With TT = 1 (decoding, T = 1) an invocation
// computes one output (TO = 1): the matrix-vector product bound by reading W gets one
// invocation per row. No workgroup memory and no barriers. The blocks are spelled out in
// variables (private arrays indexed in loops stay in memory on CPU adapters).
//
// A W larger than one storage binding (2B-4T's head: 128256 x 2560 f32 = 1.3 GB) is split along
// O into chunks of consecutive rows, one dispatch each: the chunk holds rows o0 .. o0+OC of W
// and fills columns o0 .. o0+OC of y. x may be a window of rows (x_row0 .. x_row0+T) of a
// taller buffer, e.g. only the last position when only the next token's logits are wanted.
// Neither the chunking nor the window changes any output's summation.
// Dispatch (ceil(ceil(OC / TO) / WG), ceil(T / TT), 1).

override I: u32;          // in features (C)
override O: u32;          // out features (V), y's row width
override WG: u32 = 64u;   // workgroup size
override TT: u32 = 8u;    // tokens per invocation: 8, or 1 (then TO = 1)
override TO: u32 = 4u;    // outputs per invocation: 4, or 1 (with TT = 1)

struct Dims {
    t: u32,      // T, rows of x and y
    x_row0: u32, // first row of x read
    oc: u32,     // OC, rows of W in this chunk
    o0: u32,     // the chunk's first row of W = first column of y written
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;       // (R, I), R >= x_row0 + T
@group(0) @binding(2) var<storage, read> w: array<f32>;       // (OC, I): rows o0 .. o0+OC of (O, I)
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // (T, O)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ob = gid.x * TO; // first output, within the chunk
    let t0 = gid.y * TT;
    if ob >= dims.oc || t0 >= dims.t {
        return;
    }
    // Outputs past the chunk and tokens past T are clamped: computed, never written.
    let lo = dims.oc - 1u;
    let w0 = min(ob, lo) * I;
    let w1 = min(ob + 1u, lo) * I;
    let w2 = min(ob + 2u, lo) * I;
    let w3 = min(ob + 3u, lo) * I;
    let last = dims.t - 1u;
    let x0 = (dims.x_row0 + min(t0, last)) * I;
    let x1 = (dims.x_row0 + min(t0 + 1u, last)) * I;
    let x2 = (dims.x_row0 + min(t0 + 2u, last)) * I;
    let x3 = (dims.x_row0 + min(t0 + 3u, last)) * I;
    let x4 = (dims.x_row0 + min(t0 + 4u, last)) * I;
    let x5 = (dims.x_row0 + min(t0 + 5u, last)) * I;
    let x6 = (dims.x_row0 + min(t0 + 6u, last)) * I;
    let x7 = (dims.x_row0 + min(t0 + 7u, last)) * I;
    // a<t>[j]: output ob + j of token t0 + t.
    var a0 = vec4<f32>();
    var a1 = vec4<f32>();
    var a2 = vec4<f32>();
    var a3 = vec4<f32>();
    var a4 = vec4<f32>();
    var a5 = vec4<f32>();
    var a6 = vec4<f32>();
    var a7 = vec4<f32>();
    for (var k = 0u; k < I; k++) {
        var wv: vec4<f32>;
        if TO == 4u {
            wv = vec4<f32>(w[w0 + k], w[w1 + k], w[w2 + k], w[w3 + k]);
        } else {
            wv = vec4<f32>(w[w0 + k]);
        }
        a0 += x[x0 + k] * wv;
        if TT == 8u {
            a1 += x[x1 + k] * wv;
            a2 += x[x2 + k] * wv;
            a3 += x[x3 + k] * wv;
            a4 += x[x4 + k] * wv;
            a5 += x[x5 + k] * wv;
            a6 += x[x6 + k] * wv;
            a7 += x[x7 + k] * wv;
        }
    }
    let acc = array<vec4<f32>, 8>(a0, a1, a2, a3, a4, a5, a6, a7);
    let nt = min(TT, dims.t - t0);
    let no = min(TO, dims.oc - ob);
    for (var tt = 0u; tt < nt; tt++) {
        for (var j = 0u; j < no; j++) {
            y[(t0 + tt) * O + dims.o0 + ob + j] = acc[tt][j];
        }
    }
}
