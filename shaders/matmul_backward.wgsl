// Backward of matmul.wgsl to its input: dx (T, I) = dy (T, O) . W with W (O, I) dense f32: the
// language-model head's dX (W is the embedding when tied), from the cross-entropy's dlogits.
// As bitlora_core::train::forward_backward's row-by-row `dxn[t] += dlogits[t, v] * head[v]`.
//
// W larger than one storage binding is split along O into chunks of consecutive rows (as for
// the forward), one dispatch each: the chunk holds rows o0 .. o0+OC of W and reads columns
// o0 .. o0+OC of dy; the first chunk writes dx (ACC = 0 in dims), the others add their partial
// sums. dy is a window of a few rows of logits (the caller runs the head and the loss on
// windows of rows so that no (T, V) buffer outgrows a binding), written to rows
// dx_row0 .. dx_row0+T of dx.
//
// One invocation per (i, block of TT tokens): it sums over o in ascending order, reading each
// W[o, i] once for the TT tokens (consecutive invocations read consecutive i: coalesced; dy is
// the same for the whole workgroup).
// Dispatch (ceil(I / WG), ceil(T / TT), 1).

override I: u32;        // in features (C)
override O: u32;        // out features (V), dy's row width
override WG: u32 = 64u; // workgroup size
const TT: u32 = 8u;     // tokens per invocation

struct Dims {
    t: u32,       // T, rows of dy
    dx_row0: u32, // first row of dx written
    oc: u32,      // OC, rows of W in this chunk
    o0: u32,      // the chunk's first row of W = first column of dy read
    acc: u32,     // 1: add into dx
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> dy: array<f32>;       // (T, O)
@group(0) @binding(2) var<storage, read> w: array<f32>;        // (OC, I): rows o0 .. o0+OC of (O, I)
@group(0) @binding(3) var<storage, read_write> dx: array<f32>; // (R, I), R >= dx_row0 + T

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t0 = gid.y * TT;
    if i >= I || t0 >= dims.t {
        return;
    }
    // Rows past T re-read the last row (no branch in the loop) and are not written.
    var rows: array<u32, TT>;
    for (var tt = 0u; tt < TT; tt++) {
        rows[tt] = min(t0 + tt, dims.t - 1u) * O + dims.o0;
    }
    var acc: array<f32, TT>;
    for (var o = 0u; o < dims.oc; o++) {
        let wv = w[o * I + i];
        for (var tt = 0u; tt < TT; tt++) {
            acc[tt] += dy[rows[tt] + o] * wv;
        }
    }
    let nt = min(TT, dims.t - t0);
    for (var tt = 0u; tt < nt; tt++) {
        let idx = (dims.dx_row0 + t0 + tt) * I + i;
        if dims.acc == 1u {
            dx[idx] += acc[tt];
        } else {
            dx[idx] = acc[tt];
        }
    }
}
