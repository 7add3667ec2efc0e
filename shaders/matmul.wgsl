// Dense f32 y (T, O) = x (T, I) . W^T with W (O, I): the language-model head (tied: W is the
// embedding table).
//
// One invocation per output o, for up to TT = 8 tokens: for each token it adds
// x[t, k] * w[o, k] over k = 0, 1, ..., I-1 in order, the CPU reference's summation order
// (row o of W is read from memory once and from cache for the other tokens). No workgroup memory and no barriers: decoding (T = 1) is a matrix-vector
// product bound by reading W, and a barrier-free loop is also what CPU-emulated adapters
// (lavapipe, SwiftShader) run fastest. Each output's arithmetic is the same whatever T is, so a
// decoding step gives the very same values as the whole-sequence pass.
//
// A W larger than one storage binding (2B-4T's head: 128256 x 2560 f32 = 1.3 GB) is split along
// O into chunks of consecutive rows, one dispatch each: the chunk holds rows o0 .. o0+OC of W
// and fills columns o0 .. o0+OC of y. x may be a window of rows (x_row0 .. x_row0+T) of a
// taller buffer, e.g. only the last position when only the next token's logits are wanted.
// Neither the chunking nor the window changes any output's summation.
// Dispatch (ceil(OC / WG), ceil(T / TT), 1).

override I: u32;          // in features (C)
override O: u32;          // out features (V), y's row width
override WG: u32 = 64u;   // workgroup size
const TT: u32 = 8u;       // tokens per invocation

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
    let o = gid.x; // within the chunk
    let t0 = gid.y * TT;
    if o >= dims.oc || t0 >= dims.t {
        return;
    }
    let nt = min(TT, dims.t - t0);
    // The same dot-product loop for every token (re-reading the row of W from cache), so a
    // token's value cannot depend on how many tokens share the invocation.
    for (var tt = 0u; tt < nt; tt++) {
        let xr = (dims.x_row0 + t0 + tt) * I;
        var a = 0.0;
        for (var k = 0u; k < I; k++) {
            a += x[xr + k] * w[o * I + k];
        }
        y[(t0 + tt) * O + dims.o0 + o] = a;
    }
}
