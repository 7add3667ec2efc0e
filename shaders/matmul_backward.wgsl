// Backward of matmul.wgsl to its input: dx (T, I) = dy (T, O) . W with W (O, I) dense: the
// language-model head's dX (W is the embedding when tied), from the cross-entropy's dlogits.
// As bitlora_core::train::forward_backward's row-by-row `dxn[t] += dlogits[t, v] * head[v]`.
//
// W larger than one storage binding is split along O into chunks of consecutive rows (as for
// the forward), one dispatch each: the chunk holds rows o0 .. o0+OC of W and reads columns
// o0 .. o0+OC of dy; the first chunk writes its sums (ACC = 0 in dims), the others add theirs.
// dy is a window of a few rows of logits (the caller runs the head and the loss on windows of
// rows so that no (T, V) buffer outgrows a binding).
//
// Split along O (for GPUs: T x C outputs are few, O = V is long): workgroup z of a dispatch
// sums rows z*SL .. (z+1)*SL of the chunk only and writes its partial sums to slab z of a
// scratch buffer (S, TP, I); matmul_backward_reduce.wgsl then adds the S slabs in order into
// dx. Without the split (S = 1, CPU adapters) the sums go to rows dx_row0 .. dx_row0+T of dx
// directly. Out index: z * slab_stride + (out_row0 + t) * I + i.
//
// One invocation per block of TI = 4 consecutive i and TT = 8 tokens: per o it loads 4 values
// of W and 8 of dy for 32 multiply-adds (register blocking: CPU-emulated adapters such as
// lavapipe pay for every load an invocation makes, real GPUs for the bandwidth). Each sum runs
// over o in ascending order.
// W is f32, or bf16 packed two per word (BF16: element 2k in the low half, 2k + 1 in the high
// half), widened exactly by w_at: the same sums either way.
// Dispatch (ceil(ceil(I / TI) / WG), ceil(T / TT), S).

override I: u32;        // in features (C)
override O: u32;        // out features (V), dy's row width
override WG: u32 = 64u; // workgroup size
override BF16 = false;  // W is bf16 pairs, else f32 bits
const TT: u32 = 8u;     // tokens per invocation
const TI: u32 = 4u;     // columns of dx per invocation

struct Dims {
    t: u32,           // T, rows of dy
    out_row0: u32,    // first row written (dx_row0 without the split, 0 with it)
    oc: u32,          // OC, rows of W in this chunk
    o0: u32,          // the chunk's first row of W = first column of dy read
    acc: u32,         // 1: add into the output
    slab_rows: u32,   // SL, rows of the chunk per workgroup z (OC without the split)
    slab_stride: u32, // TP * I between slabs of the scratch (0 without the split)
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> dy: array<f32>;        // (T, O)
@group(0) @binding(2) var<storage, read> w: array<u32>;         // (OC, I) f32 or bf16: rows o0 .. o0+OC of (O, I)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // dx (R, I), R >= dx_row0 + T; or scratch (S, TP, I)

// Element i of the W chunk as f32 (bf16: its bits shifted up, exact).
fn w_at(i: u32) -> f32 {
    if BF16 {
        let word = w[i >> 1u];
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
    }
    return bitcast<f32>(w[i]);
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i0 = gid.x * TI;
    let z = gid.z;
    let o_begin = z * dims.slab_rows;
    let o_end = min(o_begin + dims.slab_rows, dims.oc);
    let t0 = gid.y * TT;
    if i0 >= I || t0 >= dims.t {
        return;
    }
    // Columns past I and rows past T are clamped: computed, never written. The blocks are
    // spelled out (no private arrays indexed in loops, which CPU adapters keep in memory).
    let c0 = min(i0, I - 1u);
    let c1 = min(i0 + 1u, I - 1u);
    let c2 = min(i0 + 2u, I - 1u);
    let c3 = min(i0 + 3u, I - 1u);
    let last = dims.t - 1u;
    let r0 = min(t0, last) * O + dims.o0;
    let r1 = min(t0 + 1u, last) * O + dims.o0;
    let r2 = min(t0 + 2u, last) * O + dims.o0;
    let r3 = min(t0 + 3u, last) * O + dims.o0;
    let r4 = min(t0 + 4u, last) * O + dims.o0;
    let r5 = min(t0 + 5u, last) * O + dims.o0;
    let r6 = min(t0 + 6u, last) * O + dims.o0;
    let r7 = min(t0 + 7u, last) * O + dims.o0;
    var a0 = vec4<f32>();
    var a1 = vec4<f32>();
    var a2 = vec4<f32>();
    var a3 = vec4<f32>();
    var a4 = vec4<f32>();
    var a5 = vec4<f32>();
    var a6 = vec4<f32>();
    var a7 = vec4<f32>();
    for (var o = o_begin; o < o_end; o++) {
        let b = o * I;
        let wv = vec4<f32>(w_at(b + c0), w_at(b + c1), w_at(b + c2), w_at(b + c3));
        a0 += dy[r0 + o] * wv;
        a1 += dy[r1 + o] * wv;
        a2 += dy[r2 + o] * wv;
        a3 += dy[r3 + o] * wv;
        a4 += dy[r4 + o] * wv;
        a5 += dy[r5 + o] * wv;
        a6 += dy[r6 + o] * wv;
        a7 += dy[r7 + o] * wv;
    }
    let acc = array<vec4<f32>, TT>(a0, a1, a2, a3, a4, a5, a6, a7);
    let nt = min(TT, dims.t - t0);
    let ni = min(TI, I - i0);
    for (var tt = 0u; tt < nt; tt++) {
        for (var j = 0u; j < ni; j++) {
            let idx = z * dims.slab_stride + (dims.out_row0 + t0 + tt) * I + i0 + j;
            if dims.acc == 1u {
                out[idx] += acc[tt][j];
            } else {
                out[idx] = acc[tt][j];
            }
        }
    }
}
