// Decoding's BitLinear products with the RMSNorm and the int8 activation quantization of their
// input folded in: one dispatch where three ran (rms_norm.wgsl main_quant, then
// ternary_matmul.wgsl once or twice), for one token (T = 1).
//
//   y_n  = nw * (x * inv),  inv = 1 / sqrt(mean(x^2) + EPS)            (rms_norm.wgsl)
//   s_a  = 127 / max(max|y_n|, 1e-5),  x_q = clamp(round(y_n s_a))     (act_quant.wgsl)
//   main:     y[y_row0] (=, or += with ACCUM) (x_q . W^T) / (s_a * s_w)
//   main_qkv: the same for q, and for k and v into the cache, in one dispatch
//   main_att: main's y += for the o projection, its input the decode attention's chunk
//             records combined (attention.wgsl main_combine folded in)
//   main_glu: out = act((x_q . W^T) / (s_a s_w)) * ((x_q . W2^T) / (s_a s_w2))  (ternary_glu)
//
// Why: at T = 1 the norm ran as its own dispatch on one workgroup (10-16 us on an H100, most
// of it latency, four per layer), and every dispatch costs the host ~7 us of recording.
// Here every workgroup normalises and quantizes the row itself, into workgroup memory, from
// x and nw that the first workgroups bring into L2 for the rest; the row is small (a few KiB)
// next to the weights each workgroup streams.
//
// Bit-exactness: the prologue is rms_norm.wgsl's, operation for operation: the sum of squares
// in the same lane order through workgroup memory (no FMA can form), the same inv, y_n, max
// and rounding, so s_a and the codes are those main_quant writes (the kernel tests compare the
// fused dispatch with the three it replaces, bit for bit). The product is
// ternary_matmul.wgsl's one-token kernel reading the codes from workgroup memory; its sums are
// exact integers and its epilogue the same f32 operations.
//
// Blocking: ternary_matmul.wgsl's one-token kernel, LANES x SPLIT = 256 invocations (the norm
// needs exactly 256: WG below; the launcher checks). Dispatch (ceil(O4 / LANES), 1, 1).

requires packed_4x8_integer_dot_product;

override I: u32;                   // in features (the normalised row's width)
override O: u32;                   // out features (of each matrix)
override EPS: f32;                 // rms_norm_eps
override SPLIT: u32 = 64u;         // invocations sharing each output's K range (workgroup y)
override LANES: u32 = 4u;          // packed rows per workgroup (workgroup x)
override ACCUM: bool = false;      // main: y += result instead of y = result
override ACT: u32 = 0u;            // main_glu: 0 relu^2, 1 silu
override O4: u32 = (O + 3u) / 4u;  // packed rows
override I4: u32 = (I + 3u) / 4u;  // x_q words = weight words per packed row
override OKV: u32 = O;             // main_qkv: k's and v's out features (O is q's)
override OKV4: u32 = (OKV + 3u) / 4u;
// main_att: x is the decode attention's chunk records (attention.wgsl main_part's `part`), and
// the row normalised is their combination (main_combine's), I = NH * HS, HS a multiple of 4.
override ATT: bool = false;
override NH: u32 = 1u;             // query heads
override NKV: u32 = 1u;            // key/value heads
override HS: u32 = 4u;             // head size
override PW: u32 = HS + 2u;        // one chunk's record: u (HS), m, l
override HALF: u32 = HS / 2u;      // RoPE's pairs (d, d + HALF)
// Benchmark switches (the launcher's defaults are the measured best): PRE loads each
// invocation's first four weight words per matrix before the norm; TREE_REG adds the 64 lane
// sums in registers (else one invocation walks them in workgroup memory); PREX keeps the
// invocation's first two groups of x and nw in registers (Held).
override PRE: bool = true;
override TREE_REG: bool = true;
override PREX: bool = true;
// The SPLIT part sums of each output added in a tree through workgroup memory (8 parts an
// invocation, then the 8 results) instead of SPLIT contended atomicAdds on one word: integer
// sums, so the same values in any order. Off (BITLORA_DECODE_ATOMIC=1) for the A/B.
override TREE_PART: bool = true;

const RMS_LANES: u32 = 64u; // rms_norm.wgsl's LANES (the CPU mirror's ops::RMS_LANES)
const WG: u32 = 256u;       // invocations per workgroup = LANES * SPLIT
const CH4: u32 = WG;        // vec4 groups per chunk of the sum of squares
const ACH: u32 = 64u;       // main_att: keys per attention chunk (attention.wgsl's CH)

struct Dims {
    y_row0: u32, // main: the row of y written; main_qkv: the row of the caches
    s_q: f32,    // main_qkv: the three projections' s_w
    s_k: f32,
    s_v: f32,
}

@group(0) @binding(0) var<uniform> dims: Dims;                 // main, main_qkv
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (1, I) the row to normalise
@group(0) @binding(2) var<storage, read> nw: array<f32>;       // (I) the norm's weight
@group(0) @binding(3) var<storage, read> w: array<u32>;        // W: (ceil(I/4), ceil(O/4)) words
@group(0) @binding(4) var<storage, read> sw: array<f32>;       // (1) s_w
@group(0) @binding(5) var<storage, read_write> y: array<f32>;   // (R, O), R > y_row0; main_glu: (1, O)
@group(0) @binding(6) var<storage, read> w2: array<u32>;       // W2 (main_glu), W_k (main_qkv)
@group(0) @binding(7) var<storage, read> sw2: array<f32>;      // (1) s_w2 (main_glu)
// main_qkv: the k cache (R, OKV), W_v and the v cache. Its scales come in `dims`, so that it
// binds eight storage buffers, WebGPU's default limit.
@group(0) @binding(8) var<storage, read_write> y2: array<f32>;
@group(0) @binding(9) var<storage, read> w3: array<u32>;
@group(0) @binding(10) var<storage, read_write> y3: array<f32>;
// main_att: the RoPE tables (P, HALF) (rope.wgsl's), for the new key it leaves rotated in the
// k cache (y2), as main_combine does.
@group(0) @binding(11) var<storage, read> cos_t: array<f32>;
@group(0) @binding(12) var<storage, read> sin_t: array<f32>;

// Squares of one chunk's groups (f32 bits), later TREE_PART's integer part sums (i32 bits).
var<workgroup> sq: array<vec4<u32>, CH4>;
var<workgroup> lane: array<vec4<f32>, RMS_LANES / 4u>; // lane sums: lane l at [l / 4][l % 4]
var<workgroup> total: f32;                   // their sum, the sum of squares
var<workgroup> ymax: atomic<u32>;            // max |y_n| as bits (ordered as u32 for >= 0)
var<workgroup> xs: array<u32, I4>;           // the row's codes, four per word
// [matrix][slot s][lane x]: the workgroup's sums over its SPLIT parts.
var<workgroup> part: array<atomic<i32>, 8u * LANES>;
var<workgroup> head_m: array<f32, NH>;       // main_att: each head's M (the max score) and L
var<workgroup> head_l: array<f32, NH>;

// Group g (elements 4g .. 4g + 3) of x and of nw, zeros past I: zeros square to zero, and
// normalise and quantize to code 0, what the padding of a packed row holds.
fn group_x(g: u32) -> vec4<f32> {
    if ATT {
        return att_group(g);
    }
    let c = 4u * g;
    if c + 3u < I {
        return vec4<f32>(x[c], x[c + 1u], x[c + 2u], x[c + 3u]);
    }
    var v = vec4<f32>();
    for (var j = 0u; j < 4u; j++) {
        if c + j < I {
            v[j] = x[c + j];
        }
    }
    return v;
}

fn group_n(g: u32) -> vec4<f32> {
    let c = 4u * g;
    if c + 3u < I {
        return vec4<f32>(nw[c], nw[c + 1u], nw[c + 2u], nw[c + 3u]);
    }
    var v = vec4<f32>();
    for (var j = 0u; j < 4u; j++) {
        if c + j < I {
            v[j] = nw[c + j];
        }
    }
    return v;
}

// main_att. The decode attention's chunks of the row of head h: (nch, PW) records at
// h * nch * PW of x, nch = ceil(T_KV / ACH), T_KV = past + 1 (one query).
fn att_chunks() -> u32 {
    return (dims.y_row0 + ACH) / ACH;
}

// main_combine's statistics of every head: M = the max of the chunks' m_c, and
// L = sum_c l_c exp(m_c - M) in chunk order, into head_m and head_l. Every invocation calls it.
fn att_stats(li: u32) {
    let nch = att_chunks();
    for (var h = li; h < NH; h += WG) {
        var mx = -3.0e38;
        for (var c = 0u; c < nch; c++) {
            mx = max(mx, x[(h * nch + c) * PW + HS]);
        }
        var l = 0.0;
        for (var c = 0u; c < nch; c++) {
            let rec = (h * nch + c) * PW;
            l = l + x[rec + HS + 1u] * exp(x[rec + HS] - mx);
        }
        head_m[h] = mx;
        head_l[h] = l;
    }
    workgroupBarrier();
}

// Elements 4g .. 4g + 3 of the attention's output row, as main_combine writes them:
// O_d = sum_c u_cd exp(m_c - M) in chunk order, then O_d / L (four d of one head at once).
fn att_group(g: u32) -> vec4<f32> {
    let c = 4u * g;
    if c >= I {
        return vec4<f32>();
    }
    let h = c / HS;
    let d = c % HS;
    let nch = att_chunks();
    let mx = head_m[h];
    var o = vec4<f32>();
    for (var ch = 0u; ch < nch; ch++) {
        let rec = (h * nch + ch) * PW;
        let f = exp(x[rec + HS] - mx);
        o = o + vec4<f32>(x[rec + d], x[rec + d + 1u], x[rec + d + 2u], x[rec + d + 3u]) * f;
    }
    return o / head_l[h];
}

// The new key (row y_row0 of the k cache, every kv head) rotated in place, as main_combine
// leaves it: one workgroup calls it.
fn rotate_new_key(li: u32) {
    let pos = dims.y_row0;
    for (var e = li; e < NKV * HALF; e += WG) {
        let p = e % HALF;
        let base = pos * NKV * HS + (e / HALF) * HS;
        let cs = cos_t[pos * HALF + p];
        let sn = sin_t[pos * HALF + p];
        let x1 = y2[base + p];
        let x2 = y2[base + p + HALF];
        y2[base + p] = x1 * cs - x2 * sn;
        y2[base + p + HALF] = x2 * cs + x1 * sn;
    }
}

// An invocation's groups of the row are k + WG j, k = row_slot(lid), j = 0, 1, ...: lane
// k % RMS_LANES adds group k's square, never invocation lid itself (lid - k = 32 mod 64), so no
// invocation adds a square it wrote and no compiler can fuse the square into the addition.
fn row_slot(lid: u32) -> u32 {
    return (lid + WG - 32u) % WG;
}

// With PREX, the first two of them (x and nw), loaded before the first barrier and kept for
// the sum of squares, the max and the codes (I <= 2,048 then reads the row once, not three
// times). Vectors in a struct, not an array: they stay in registers.
struct Held {
    x0: vec4<f32>,
    x1: vec4<f32>,
    n0: vec4<f32>,
    n1: vec4<f32>,
}

fn held_x(h: Held, j: u32, g: u32) -> vec4<f32> {
    if PREX && j == 0u {
        return h.x0;
    }
    if PREX && j == 1u {
        return h.x1;
    }
    return group_x(g);
}

fn held_n(h: Held, j: u32, g: u32) -> vec4<f32> {
    if PREX && j == 0u {
        return h.n0;
    }
    if PREX && j == 1u {
        return h.n1;
    }
    return group_n(g);
}

// 1 / sqrt(mean(x^2) + EPS): rms_norm.wgsl's inv_rms for the row: its chunks of CH4 groups,
// lane l adding groups l, l + 64, ... in order.
fn inv_rms(lid: u32, h: Held) -> f32 {
    let k = row_slot(lid);
    var acc = vec4<f32>();
    for (var j = 0u; j * CH4 < I4; j++) {
        let g0 = j * CH4;
        let n = min(CH4, I4 - g0);
        if k < n {
            let v = held_x(h, j, g0 + k);
            sq[k] = bitcast<vec4<u32>>(v * v);
        }
        workgroupBarrier();
        if lid < RMS_LANES {
            for (var jj = lid; jj < n; jj += RMS_LANES) {
                acc += bitcast<vec4<f32>>(sq[jj]);
            }
        }
        workgroupBarrier();
    }
    if lid < RMS_LANES {
        lane[lid / 4u][lid % 4u] = (acc.x + acc.y) + (acc.z + acc.w);
    }
    workgroupBarrier();
    // rms_norm.wgsl's tree (lane l += lane l + h, h = 32 .. 1), each addition the same, done
    // by one invocation: one barrier instead of six.
    if lid == 0u {
        if TREE_REG {
            // In registers: lane[i] holds lanes 4i .. 4i + 3, so one vec4 addition is four
            // of the tree's, on the same operands (variables, not an array: a private array
            // indexed in a loop lives in local memory on NVIDIA).
            let a0 = lane[0] + lane[8]; // h = 32
            let a1 = lane[1] + lane[9];
            let a2 = lane[2] + lane[10];
            let a3 = lane[3] + lane[11];
            let a4 = lane[4] + lane[12];
            let a5 = lane[5] + lane[13];
            let a6 = lane[6] + lane[14];
            let a7 = lane[7] + lane[15];
            let b0 = a0 + a4; // h = 16
            let b1 = a1 + a5;
            let b2 = a2 + a6;
            let b3 = a3 + a7;
            let c0 = b0 + b2; // h = 8
            let c1 = b1 + b3;
            let d = c0 + c1; // h = 4
            let e = d.xy + d.zw; // h = 2
            total = e.x + e.y; // h = 1
        } else {
            for (var h = RMS_LANES / 2u; h > 0u; h >>= 1u) {
                for (var l = 0u; l < h; l++) {
                    let m = l + h;
                    lane[l / 4u][l % 4u] = lane[l / 4u][l % 4u] + lane[m / 4u][m % 4u];
                }
            }
            total = lane[0].x;
        }
    }
    workgroupBarrier();
    return 1.0 / sqrt(total / f32(I) + EPS);
}

// Normalises and quantizes the row into xs (rms_norm.wgsl main_quant's operations, four
// elements at a time); returns s_a. Every invocation calls it (barriers); the part sums are
// zeroed on the way.
fn norm_quant(lid: u32) -> f32 {
    let k = row_slot(lid);
    var h: Held;
    if PREX {
        h.x0 = group_x(k);
        h.n0 = group_n(k);
        h.x1 = group_x(k + WG);
        h.n1 = group_n(k + WG);
    }
    for (var e = lid; e < 8u * LANES; e += WG) {
        atomicStore(&part[e], 0);
    }
    if lid == 0u {
        atomicStore(&ymax, 0u);
    }
    let inv = inv_rms(lid, h); // its barriers also publish the zeros
    var m = 0.0;
    for (var j = 0u; j * WG < I4; j++) {
        let g = k + j * WG;
        if g < I4 {
            let y = abs(held_n(h, j, g) * (held_x(h, j, g) * inv)); // zero in the padding
            m = max(m, max(max(y.x, y.y), max(y.z, y.w)));
        }
    }
    // A max is exact in any order, and non-negative floats order as their bits do.
    atomicMax(&ymax, bitcast<u32>(m));
    workgroupBarrier();
    let s_a = 127.0 / max(bitcast<f32>(atomicLoad(&ymax)), 1e-5);
    for (var j = 0u; j * WG < I4; j++) {
        let g = k + j * WG;
        if g < I4 {
            let y = held_n(h, j, g) * (held_x(h, j, g) * inv);
            let q = vec4<i32>(clamp(round(y * s_a), vec4<f32>(-128.0), vec4<f32>(127.0)));
            let b = bitcast<vec4<u32>>(q) & vec4<u32>(0xffu);
            xs[g] = b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
        }
    }
    workgroupBarrier();
    return s_a;
}

// The four int8 dot products of activation word a with the four slots' signed codes of
// weight word ww (ternary_matmul.wgsl's unpacking).
fn dot_word(a: u32, ww: u32) -> vec4<i32> {
    let u = (vec4<u32>(ww) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(0x03030303u);
    let c = ((u | vec4<u32>(0x80808080u)) - vec4<u32>(0x01010101u)) ^ vec4<u32>(0x80808080u);
    return vec4<i32>(dot4I8Packed(a, c.x), dot4I8Packed(a, c.y), dot4I8Packed(a, c.z), dot4I8Packed(a, c.w));
}

// Words k0, k0 + SPLIT, k0 + 2 SPLIT, k0 + 3 SPLIT of packed row pc of W (W2, W3; o4 packed
// rows), 0 past I4: loaded before the norm (PRE), so that the first weights stream in while
// its reductions run. A vector, not an array: it stays in registers.
fn pre_w(pc: u32, k0: u32, o4: u32) -> vec4<u32> {
    var r = vec4<u32>();
    if PRE {
        if k0 < I4 {
            r.x = w[k0 * o4 + pc];
        }
        if k0 + SPLIT < I4 {
            r.y = w[(k0 + SPLIT) * o4 + pc];
        }
        if k0 + 2u * SPLIT < I4 {
            r.z = w[(k0 + 2u * SPLIT) * o4 + pc];
        }
        if k0 + 3u * SPLIT < I4 {
            r.w = w[(k0 + 3u * SPLIT) * o4 + pc];
        }
    }
    return r;
}

fn pre_w2(pc: u32, k0: u32, o4: u32) -> vec4<u32> {
    var r = vec4<u32>();
    if PRE {
        if k0 < I4 {
            r.x = w2[k0 * o4 + pc];
        }
        if k0 + SPLIT < I4 {
            r.y = w2[(k0 + SPLIT) * o4 + pc];
        }
        if k0 + 2u * SPLIT < I4 {
            r.z = w2[(k0 + 2u * SPLIT) * o4 + pc];
        }
        if k0 + 3u * SPLIT < I4 {
            r.w = w2[(k0 + 3u * SPLIT) * o4 + pc];
        }
    }
    return r;
}

fn pre_w3(pc: u32, k0: u32, o4: u32) -> vec4<u32> {
    var r = vec4<u32>();
    if PRE {
        if k0 < I4 {
            r.x = w3[k0 * o4 + pc];
        }
        if k0 + SPLIT < I4 {
            r.y = w3[(k0 + SPLIT) * o4 + pc];
        }
        if k0 + 2u * SPLIT < I4 {
            r.z = w3[(k0 + 2u * SPLIT) * o4 + pc];
        }
        if k0 + 3u * SPLIT < I4 {
            r.w = w3[(k0 + 3u * SPLIT) * o4 + pc];
        }
    }
    return r;
}

// The prefetched words against the codes; returns the first word not yet added.
fn dot_pre(pre: vec4<u32>, k0: u32, a: ptr<function, vec4<i32>>) -> u32 {
    if !PRE {
        return k0;
    }
    // Past I4 a word is 0: its codes are all -1, so it must not be added.
    if k0 < I4 {
        *a += dot_word(xs[k0], pre.x);
    }
    if k0 + SPLIT < I4 {
        *a += dot_word(xs[k0 + SPLIT], pre.y);
    }
    if k0 + 2u * SPLIT < I4 {
        *a += dot_word(xs[k0 + 2u * SPLIT], pre.z);
    }
    if k0 + 3u * SPLIT < I4 {
        *a += dot_word(xs[k0 + 3u * SPLIT], pre.w);
    }
    return k0 + 4u * SPLIT;
}

// Row pc of W (words k0, k0 + SPLIT, ...) against the codes: the prefetched words, then four
// words a step, loaded before any is used (integer sums: exact in any order).
fn row_w(pc: u32, k0: u32, o4: u32, pre: vec4<u32>) -> vec4<i32> {
    var a = vec4<i32>();
    var k = dot_pre(pre, k0, &a);
    for (; k + 3u * SPLIT < I4; k += 4u * SPLIT) {
        let w0 = w[k * o4 + pc];
        let w1 = w[(k + SPLIT) * o4 + pc];
        let w2_ = w[(k + 2u * SPLIT) * o4 + pc];
        let w3_ = w[(k + 3u * SPLIT) * o4 + pc];
        a += dot_word(xs[k], w0) + dot_word(xs[k + SPLIT], w1)
            + dot_word(xs[k + 2u * SPLIT], w2_) + dot_word(xs[k + 3u * SPLIT], w3_);
    }
    for (; k < I4; k += SPLIT) {
        a += dot_word(xs[k], w[k * o4 + pc]);
    }
    return a;
}

// The same for W2.
fn row_w2(pc: u32, k0: u32, o4: u32, pre: vec4<u32>) -> vec4<i32> {
    var a = vec4<i32>();
    var k = dot_pre(pre, k0, &a);
    for (; k + 3u * SPLIT < I4; k += 4u * SPLIT) {
        let w0 = w2[k * o4 + pc];
        let w1 = w2[(k + SPLIT) * o4 + pc];
        let w2_ = w2[(k + 2u * SPLIT) * o4 + pc];
        let w3_ = w2[(k + 3u * SPLIT) * o4 + pc];
        a += dot_word(xs[k], w0) + dot_word(xs[k + SPLIT], w1)
            + dot_word(xs[k + 2u * SPLIT], w2_) + dot_word(xs[k + 3u * SPLIT], w3_);
    }
    for (; k < I4; k += SPLIT) {
        a += dot_word(xs[k], w2[k * o4 + pc]);
    }
    return a;
}

// The same for W3.
fn row_w3(pc: u32, k0: u32, o4: u32, pre: vec4<u32>) -> vec4<i32> {
    var a = vec4<i32>();
    var k = dot_pre(pre, k0, &a);
    for (; k + 3u * SPLIT < I4; k += 4u * SPLIT) {
        let w0 = w3[k * o4 + pc];
        let w1 = w3[(k + SPLIT) * o4 + pc];
        let w2_ = w3[(k + 2u * SPLIT) * o4 + pc];
        let w3_ = w3[(k + 3u * SPLIT) * o4 + pc];
        a += dot_word(xs[k], w0) + dot_word(xs[k + SPLIT], w1)
            + dot_word(xs[k + 2u * SPLIT], w2_) + dot_word(xs[k + 3u * SPLIT], w3_);
    }
    for (; k < I4; k += SPLIT) {
        a += dot_word(xs[k], w3[k * o4 + pc]);
    }
    return a;
}

// Matrix m's sums of lane x into the workgroup's totals. Every invocation calls it, after
// norm_quant (whose last barrier ends the norm's use of sq); the caller's barrier publishes
// the totals.
fn add_part(m: u32, x: u32, a: vec4<i32>, li: u32) {
    let base = m * 4u * LANES + x;
    if !TREE_PART {
        atomicAdd(&part[base], a.x);
        atomicAdd(&part[base + LANES], a.y);
        atomicAdd(&part[base + 2u * LANES], a.z);
        atomicAdd(&part[base + 3u * LANES], a.w);
        return;
    }
    if m > 0u {
        workgroupBarrier(); // the previous matrix's last reads of sq are done
    }
    sq[li] = bitcast<vec4<u32>>(a); // part y of lane x at y * LANES + x (li)
    workgroupBarrier();
    // Invocation (x, c) adds parts 8c .. 8c + 7 of lane x into part 8c's place (its own rows).
    let groups = SPLIT / 8u;
    if li < groups * LANES {
        let c = li / LANES;
        let at = 8u * c * LANES + li % LANES;
        var t = vec4<i32>();
        for (var j = 0u; j < 8u; j++) {
            t += bitcast<vec4<i32>>(sq[at + j * LANES]);
        }
        sq[at] = bitcast<vec4<u32>>(t);
    }
    workgroupBarrier();
    if li < LANES {
        var t = vec4<i32>();
        for (var c = 0u; c < groups; c++) {
            t += bitcast<vec4<i32>>(sq[8u * c * LANES + li]);
        }
        let b = m * 4u * LANES + li;
        atomicStore(&part[b], t.x);
        atomicStore(&part[b + LANES], t.y);
        atomicStore(&part[b + 2u * LANES], t.z);
        atomicStore(&part[b + 3u * LANES], t.w);
    }
}

@compute @workgroup_size(LANES, SPLIT)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    // Row p (clamped: the rows past O4 of the last group compute row O4-1 and write nothing).
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let pa = pre_w(pc, lid.y, O4);
    let s_a = norm_quant(li);
    let a = row_w(pc, lid.y, O4, pa);
    add_part(0u, lid.x, a, li);
    workgroupBarrier();
    let s_w = sw[0];
    for (var e = li; e < 4u * LANES; e += WG) {
        let p = group.x * LANES + e % LANES;
        let o = p + (e / LANES) * O4;
        if p < O4 && o < O {
            let r = f32(atomicLoad(&part[e])) / (s_a * s_w);
            let at = dims.y_row0 * O + o;
            if ACCUM {
                y[at] = y[at] + r;
            } else {
                y[at] = r;
            }
        }
    }
}

// h (y, one row) += the o projection of the decode attention's output: main's ACCUM with
// the attention's combine dispatch folded into its prologue (x = the chunk records, ATT), and
// workgroup 0 rotating the new key in the k cache (y2) as the combine did.
@compute @workgroup_size(LANES, SPLIT)
fn main_att(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let pa = pre_w(pc, lid.y, O4);
    att_stats(li);
    if group.x == 0u {
        rotate_new_key(li);
    }
    let s_a = norm_quant(li);
    let a = row_w(pc, lid.y, O4, pa);
    add_part(0u, lid.x, a, li);
    workgroupBarrier();
    let s_w = sw[0];
    for (var e = li; e < 4u * LANES; e += WG) {
        let p = group.x * LANES + e % LANES;
        let o = p + (e / LANES) * O4;
        if p < O4 && o < O {
            y[o] = y[o] + f32(atomicLoad(&part[e])) / (s_a * s_w);
        }
    }
}

// q (O wide) into row 0 of y, and k and v (OKV wide) into row y_row0 of the caches: the
// first ceil(O4 / LANES) workgroups are main's for W, the rest main's for W_k and W_v at once.
@compute @workgroup_size(LANES, SPLIT)
fn main_qkv(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let nq = (O4 + LANES - 1u) / LANES;
    if group.x < nq { // the same for the whole workgroup: its barriers stay uniform
        let pc = min(group.x * LANES + lid.x, O4 - 1u);
        let pa = pre_w(pc, lid.y, O4);
        let s_a = norm_quant(li);
        let a = row_w(pc, lid.y, O4, pa);
        add_part(0u, lid.x, a, li);
        workgroupBarrier();
        for (var e = li; e < 4u * LANES; e += WG) {
            let p = group.x * LANES + e % LANES;
            let o = p + (e / LANES) * O4;
            if p < O4 && o < O {
                y[o] = f32(atomicLoad(&part[e])) / (s_a * dims.s_q);
            }
        }
        return;
    }
    let gk = group.x - nq;
    let pc = min(gk * LANES + lid.x, OKV4 - 1u);
    let pk = pre_w2(pc, lid.y, OKV4);
    let pv = pre_w3(pc, lid.y, OKV4);
    let s_a = norm_quant(li);
    let a = row_w2(pc, lid.y, OKV4, pk);
    let b = row_w3(pc, lid.y, OKV4, pv);
    add_part(0u, lid.x, a, li);
    add_part(1u, lid.x, b, li);
    workgroupBarrier();
    for (var e = li; e < 4u * LANES; e += WG) {
        let p = gk * LANES + e % LANES;
        let o = p + (e / LANES) * OKV4;
        if p < OKV4 && o < OKV {
            let at = dims.y_row0 * OKV + o;
            y2[at] = f32(atomicLoad(&part[e])) / (s_a * dims.s_k);
            y3[at] = f32(atomicLoad(&part[4u * LANES + e])) / (s_a * dims.s_v);
        }
    }
}

@compute @workgroup_size(LANES, SPLIT)
fn main_glu(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let pg = pre_w(pc, lid.y, O4);
    let pu = pre_w2(pc, lid.y, O4);
    let s_a = norm_quant(li);
    let g = row_w(pc, lid.y, O4, pg);
    let u = row_w2(pc, lid.y, O4, pu);
    add_part(0u, lid.x, g, li);
    add_part(1u, lid.x, u, li);
    workgroupBarrier();
    let s_g = sw[0];
    let s_u = sw2[0];
    for (var e = li; e < 4u * LANES; e += WG) {
        let p = group.x * LANES + e % LANES;
        let o = p + (e / LANES) * O4;
        if p < O4 && o < O {
            let gv = f32(atomicLoad(&part[e])) / (s_a * s_g);
            let uv = f32(atomicLoad(&part[4u * LANES + e])) / (s_a * s_u);
            var act: f32;
            if ACT == 0u {
                let rl = max(gv, 0.0);
                act = rl * rl;
            } else {
                act = gv / (1.0 + exp(-gv));
            }
            y[o] = act * uv;
        }
    }
}
