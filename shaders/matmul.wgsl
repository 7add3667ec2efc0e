// Dense y (T, O) = x (T, I) . W^T, W (O, I) f32 or bf16, summed in f32: the language-model
// head (tied: W is the embedding table).
//
// Each output y[t, o] is one sum of x[t, k] * w[o, k] over k = 0, 1, ..., I-1 in order, the CPU
// reference's summation order, whatever the blocking below: every kernel variant accumulates
// with the same expression `a += x[t, k] * wv` (wv: a vec4 of W over four outputs, or one value
// splatted), one k at a time, so a decoding step gives the very same values as the
// whole-sequence pass, on any adapter.
//
// Two kernels, chosen by the `TILED` override.
//
// Tiled (TILED = true, WG = 256: a pass over many tokens on a GPU). A workgroup owns a tile of
// BO = 128 consecutive outputs (rows of W) by BT = 64 consecutive tokens; invocation
// (lo, lt) = (lid % 32, lid / 32) owns outputs 4 lo .. 4 lo + 3 of the tile for the 8 tokens
// 8 lt .. 8 lt + 7 (32 accumulators, a vec4 per token). K goes by in chunks of KC = 16 values,
// staged through workgroup memory:
//   ws[k][o4]: W at the chunk's k for the tile's outputs 4 o4 .. 4 o4 + 3, as a vec4;
//   xs[k][t4]: x at the chunk's k for the tile's tokens 4 t4 .. 4 t4 + 3, as a vec4.
// Staging element e (BO * KC of W, BT * KC of x) is row e / KC at k = e % KC: consecutive
// invocations load consecutive k of a row (coalesced: 64 bytes per row; the direct kernel's
// warps read 32 rows at once), 8 values of W and 4 of x per invocation per chunk, into
// registers while the previous chunk is summed, then into workgroup memory between two
// barriers. The rows of ws and xs are padded by one vec4 (strides 33 and 17): a warp's stores
// (16 k of 2 rows) then meet two-way bank conflicts instead of 16-way. Per k an invocation
// reads one vec4 of W (a warp: 32 consecutive vec4, conflict-free) and two of x (one address
// across the warp: a broadcast) for 32 multiply-adds. The last chunk sums only the k below I
// (its staged values past I are clamped copies, never added). Invocations whose tokens all
// lie past T stage and meet the barriers but add nothing. Workgroup memory:
// KC * 16 * (33 + 17) bytes = 12.5 KiB, within WebGPU's 16 KiB; 256 invocations, WebGPU's
// default limit.
//
// Direct (TILED = false: decoding, and CPU-emulated adapters). No workgroup memory and no
// barriers: with TT = 8 one invocation computes TO = 4 outputs for 8 tokens straight from the
// storage buffers, loading 4 values of W and 8 of x per k for 32 multiply-adds (CPU-emulated
// adapters such as lavapipe and SwiftShader pay for every load an invocation makes, and for
// barriers and workgroup memory: there the tiled kernel is slower). With TT = 1 (decoding,
// T = 1) an invocation computes one output (TO = 1): the matrix-vector product bound by
// reading W gets one invocation per row.
//
// Both spell the blocks out in variables (private arrays indexed in loops stay in memory on CPU
// adapters, and in local memory on NVIDIA). Outputs past the chunk and tokens past T are
// clamped to the last one: computed, never written.
//
// A W larger than one storage binding (2B-4T's head: 128256 x 2560 f32 = 1.3 GB) is split along
// O into chunks of consecutive rows, one dispatch each: the chunk holds rows o0 .. o0+OC of W
// and fills columns o0 .. o0+OC of y. x may be a window of rows (x_row0 .. x_row0+T) of a
// taller buffer, e.g. only the last position when only the next token's logits are wanted.
// Neither the chunking nor the window changes any output's summation.
//
// W is f32, or bf16 packed two per word (BF16: element 2k in the low half, 2k + 1 in the high
// half; the model stores a bf16 checkpoint's embedding and head so, at half the bytes). w_at
// widens a bf16 exactly to its f32, so both formats give the same products and sums, bit for
// bit.
// `main_rows` is the direct kernel for one token (TT = TO = 1) reading its row of W 16 bytes a
// load (two loads a step) instead of one element: the same sum in the same order, a quarter to
// an eighth of the load instructions, so more of the row is in flight (2B-4T's head, 656 MB of
// bf16, took 1.45 ms on an H100 with one element a load).
// Dispatch: tiled (ceil(OC / BO), ceil(T / BT), 1); direct (ceil(ceil(OC / TO) / WG),
// ceil(T / TT), 1); main_rows (ceil(OC / WG), 1, 1), T = 1.

override I: u32;          // in features (C)
override O: u32;          // out features (V), y's row width
override WG: u32 = 64u;   // workgroup size: 256 when tiled
override TILED = false;   // the tiled kernel (WG = 256), else the direct one
override TT: u32 = 8u;    // direct: tokens per invocation: 8, or 1 (then TO = 1)
override TO: u32 = 4u;    // direct: outputs per invocation: 4, or 1 (with TT = 1)
override BF16 = false;    // W is bf16 pairs, else f32 bits

const KC: u32 = 16u;      // tiled: k per staged chunk
const NO: u32 = 32u;      // tiled: invocations along the outputs (lid % NO)
const BO: u32 = 128u;     // tiled: outputs per workgroup, 4 per invocation
const BT: u32 = 64u;      // tiled: tokens per workgroup, 8 per invocation (WG / NO = 8 rows)
const WS: u32 = 33u;      // row stride of ws in vec4: BO / 4 + 1
const XS: u32 = 17u;      // row stride of xs in vec4: BT / 4 + 1
// The staging arrays; one vec4 each in the direct kernel, which never touches them.
override WSN: u32 = select(1u, KC * WS, TILED);
override XSN: u32 = select(1u, KC * XS, TILED);

struct Dims {
    t: u32,      // T, rows of x and y
    x_row0: u32, // first row of x read
    oc: u32,     // OC, rows of W in this chunk
    o0: u32,     // the chunk's first row of W = first column of y written
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;       // (R, I), R >= x_row0 + T
@group(0) @binding(2) var<storage, read> w: array<u32>;       // (OC, I) f32 or bf16: rows o0 .. o0+OC of (O, I)
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // (T, O)
// main_rows: W again, 16 bytes at a time (8 bf16 or 4 f32; rows start 16-byte aligned).
@group(0) @binding(4) var<storage, read> w4: array<vec4<u32>>;

// Element i of the W chunk as f32 (bf16: its bits shifted up, exact).
fn w_at(i: u32) -> f32 {
    if BF16 {
        let word = w[i >> 1u];
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
    }
    return bitcast<f32>(w[i]);
}

var<workgroup> ws: array<vec4<f32>, WSN>; // tiled: [k][o4], row stride WS
var<workgroup> xs: array<vec4<f32>, XSN>; // tiled: [k][t4], row stride XS

// y[t, o0 + o .. o0 + o + n - 1] = a[0 .. n-1] for the outputs below OC; nothing past T.
fn put(t: u32, o: u32, n: u32, a: vec4<f32>) {
    if t >= dims.t || o >= dims.oc {
        return;
    }
    let idx = t * O + dims.o0 + o;
    let m = min(n, dims.oc - o);
    y[idx] = a.x;
    if m > 1u { y[idx + 1u] = a.y; }
    if m > 2u { y[idx + 2u] = a.z; }
    if m > 3u { y[idx + 3u] = a.w; }
}

// Staging element e of the chunk at k0: W row ob0 + e / KC (clamped to the chunk), x row
// tb0 + e / KC (clamped to T), k = k0 + e % KC (clamped to I: the copies are never summed).
fn w_load(e: u32, k0: u32, ob0: u32) -> f32 {
    return w_at(min(ob0 + e / KC, dims.oc - 1u) * I + min(k0 + e % KC, I - 1u));
}

fn x_load(e: u32, k0: u32, tb0: u32) -> f32 {
    return x[(dims.x_row0 + min(tb0 + e / KC, dims.t - 1u)) * I + min(k0 + e % KC, I - 1u)];
}

fn w_store(e: u32, v: f32) {
    ws[(e % KC) * WS + e / (4u * KC)][(e / KC) % 4u] = v;
}

fn x_store(e: u32, v: f32) {
    xs[(e % KC) * XS + e / (4u * KC)][(e / KC) % 4u] = v;
}

fn tiled(group: vec2<u32>, lid: u32) {
    let ob0 = group.x * BO; // the workgroup's first output, within the chunk
    let tb0 = group.y * BT; // its first token
    let lo = lid % NO;
    let lt = lid / NO;
    // Invocations whose 8 tokens all lie past T stage values and meet the barriers but sum
    // nothing (a prompt shorter than BT).
    let busy = tb0 + 8u * lt < dims.t;
    // This invocation's staging elements: lid + n WG, n = 0..7 of W, 0..3 of x.
    var wa = vec4<f32>(w_load(lid, 0u, ob0), w_load(lid + WG, 0u, ob0),
                       w_load(lid + 2u * WG, 0u, ob0), w_load(lid + 3u * WG, 0u, ob0));
    var wb = vec4<f32>(w_load(lid + 4u * WG, 0u, ob0), w_load(lid + 5u * WG, 0u, ob0),
                       w_load(lid + 6u * WG, 0u, ob0), w_load(lid + 7u * WG, 0u, ob0));
    var xa = vec4<f32>(x_load(lid, 0u, tb0), x_load(lid + WG, 0u, tb0),
                       x_load(lid + 2u * WG, 0u, tb0), x_load(lid + 3u * WG, 0u, tb0));
    // a<t>[j]: output ob0 + 4 lo + j of token tb0 + 8 lt + t.
    var a0 = vec4<f32>();
    var a1 = vec4<f32>();
    var a2 = vec4<f32>();
    var a3 = vec4<f32>();
    var a4 = vec4<f32>();
    var a5 = vec4<f32>();
    var a6 = vec4<f32>();
    var a7 = vec4<f32>();
    for (var k0 = 0u; k0 < I; k0 += KC) {
        workgroupBarrier(); // the last chunk's reads are done
        w_store(lid, wa.x);
        w_store(lid + WG, wa.y);
        w_store(lid + 2u * WG, wa.z);
        w_store(lid + 3u * WG, wa.w);
        w_store(lid + 4u * WG, wb.x);
        w_store(lid + 5u * WG, wb.y);
        w_store(lid + 6u * WG, wb.z);
        w_store(lid + 7u * WG, wb.w);
        x_store(lid, xa.x);
        x_store(lid + WG, xa.y);
        x_store(lid + 2u * WG, xa.z);
        x_store(lid + 3u * WG, xa.w);
        workgroupBarrier();

        // The next chunk's loads, in flight while this one is summed.
        let k1 = k0 + KC;
        if k1 < I {
            wa = vec4<f32>(w_load(lid, k1, ob0), w_load(lid + WG, k1, ob0),
                           w_load(lid + 2u * WG, k1, ob0), w_load(lid + 3u * WG, k1, ob0));
            wb = vec4<f32>(w_load(lid + 4u * WG, k1, ob0), w_load(lid + 5u * WG, k1, ob0),
                           w_load(lid + 6u * WG, k1, ob0), w_load(lid + 7u * WG, k1, ob0));
            xa = vec4<f32>(x_load(lid, k1, tb0), x_load(lid + WG, k1, tb0),
                           x_load(lid + 2u * WG, k1, tb0), x_load(lid + 3u * WG, k1, tb0));
        }

        if busy {
            let kn = min(KC, I - k0);
            for (var k = 0u; k < kn; k++) {
                let wv = ws[k * WS + lo];
                let xl = xs[k * XS + 2u * lt];
                let xh = xs[k * XS + 2u * lt + 1u];
                a0 += xl.x * wv;
                a1 += xl.y * wv;
                a2 += xl.z * wv;
                a3 += xl.w * wv;
                a4 += xh.x * wv;
                a5 += xh.y * wv;
                a6 += xh.z * wv;
                a7 += xh.w * wv;
            }
        }
    }
    let o = ob0 + 4u * lo;
    let t = tb0 + 8u * lt;
    put(t, o, 4u, a0);
    put(t + 1u, o, 4u, a1);
    put(t + 2u, o, 4u, a2);
    put(t + 3u, o, 4u, a3);
    put(t + 4u, o, 4u, a4);
    put(t + 5u, o, 4u, a5);
    put(t + 6u, o, 4u, a6);
    put(t + 7u, o, 4u, a7);
}

fn direct(gid: vec2<u32>) {
    let ob = gid.x * TO; // first output, within the chunk
    let t0 = gid.y * TT;
    if ob >= dims.oc || t0 >= dims.t {
        return;
    }
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
            wv = vec4<f32>(w_at(w0 + k), w_at(w1 + k), w_at(w2 + k), w_at(w3 + k));
        } else {
            wv = vec4<f32>(w_at(w0 + k));
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
    put(t0, ob, TO, a0);
    if TT == 8u {
        put(t0 + 1u, ob, TO, a1);
        put(t0 + 2u, ob, TO, a2);
        put(t0 + 3u, ob, TO, a3);
        put(t0 + 4u, ob, TO, a4);
        put(t0 + 5u, ob, TO, a5);
        put(t0 + 6u, ob, TO, a6);
        put(t0 + 7u, ob, TO, a7);
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    if TILED {
        tiled(group.xy, lid);
    } else {
        direct(gid.xy);
    }
}

// The four f32 of a vec4<u32> of f32 bits, or the lower (hi = false) or upper four bf16 of one
// of bf16 pairs, widened exactly.
fn lo_bf16(u: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(vec4<u32>(u.x << 16u, u.x & 0xffff0000u, u.y << 16u, u.y & 0xffff0000u));
}

fn hi_bf16(u: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(vec4<u32>(u.z << 16u, u.z & 0xffff0000u, u.w << 16u, u.w & 0xffff0000u));
}

// a + x[xk .. xk + 3] . v, one k at a time in order, each as the direct kernel's `a += x * wv`.
fn add4(a: f32, xk: u32, v: vec4<f32>) -> f32 {
    var r = a;
    r += x[xk] * v.x;
    r += x[xk + 1u] * v.y;
    r += x[xk + 2u] * v.z;
    r += x[xk + 3u] * v.w;
    return r;
}

@compute @workgroup_size(WG)
fn main_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.x;
    if o >= dims.oc {
        return;
    }
    let per = select(I / 4u, I / 8u, BF16); // vec4<u32> per row
    let base = o * per;
    let xb = dims.x_row0 * I;
    let kq = select(4u, 8u, BF16); // elements per vec4<u32>
    var a = 0.0;
    var q = 0u;
    for (; q + 2u <= per; q += 2u) {
        let u0 = w4[base + q];
        let u1 = w4[base + q + 1u];
        let k = xb + q * kq;
        if BF16 {
            a = add4(a, k, lo_bf16(u0));
            a = add4(a, k + 4u, hi_bf16(u0));
            a = add4(a, k + 8u, lo_bf16(u1));
            a = add4(a, k + 12u, hi_bf16(u1));
        } else {
            a = add4(a, k, bitcast<vec4<f32>>(u0));
            a = add4(a, k + 4u, bitcast<vec4<f32>>(u1));
        }
    }
    if q < per {
        let u0 = w4[base + q];
        let k = xb + q * kq;
        if BF16 {
            a = add4(a, k, lo_bf16(u0));
            a = add4(a, k + 4u, hi_bf16(u0));
        } else {
            a = add4(a, k, bitcast<vec4<f32>>(u0));
        }
    }
    y[dims.o0 + o] = a;
}
