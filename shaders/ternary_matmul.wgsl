// BitLinear: y (T, O) = (x_q (T, I) . W^T) / (s_a * s_w) with W ternary (O, I).
//
// W holds transformers' packed codes (integrations/bitnet.py pack_weights): (O4, I) bytes with
// O4 = ceil(O/4), byte (p, i) holding the 2-bit codes (value + 1) of rows p, p + O4, p + 2*O4,
// p + 3*O4 in bits 0-1, 2-3, 4-5, 6-7. On the GPU the four bytes (p, 4k .. 4k+3) form word
// (k, p) of an (I4, O4) array (bitlora_gpu::DType::Ternary): invocations owning consecutive
// rows p read consecutive words.
// x_q holds int8 codes packed four per u32 (act_quant.wgsl), zero in the padding columns.
//
// The product is exact in i32. Slot s (rows p + s*O4) of a word is u = (word >> 2s) &
// 0x03030303, four codes c in 0..2, one per byte; the bytes c - 1 in {-1, 0, 1} come out of
//   ((u | 0x80808080) - 0x01010101) ^ 0x80808080
// (each byte is 0x80..0x82 before the subtraction, so no borrow crosses a byte), and
// dot4I8Packed multiplies them with four int8 activations and sums. Every term is an integer
// and |acc| <= 128 * I, so the sum is exact in any order: the K range can be split between
// invocations and the parts added with atomics. Only the final scaling is floating point, in
// the reference's order:
//   y = f32(acc) / (s_a * s_w).
//
// Blocking. A workgroup is LANES x SPLIT invocations and owns LANES consecutive packed rows p
// (4 LANES outputs) for TM consecutive tokens. LANES is 32 over many tokens (a warp's loads of
// weight words are 128 contiguous bytes). Decoding (T = 1) uses 4 and a longer K split:
// there the workgroups are the only parallelism, and ceil(O4 / 32) of them (16 for a
// 2048-wide projection) leave most of a large GPU idle on a memory-bound matrix-vector
// product; 4 rows (16 bytes per k, the neighbouring workgroup reading the sector's other half
// from L2) spread it 8x wider. Invocation (x, y) owns row p = LANES*group + x and the words
// k = y, y + SPLIT, y + 2*SPLIT, ...: per word it loads one weight word (coalesced along x:
// LANES consecutive words) and TM activation words (the same address across x: one broadcast
// load), and does 4 * TM dot4I8Packed. The SPLIT partial sums of each output are added in
// workgroup memory (atomicAdd on i32: exact, order-free), then the workgroup writes its
// 4 LANES x TM outputs. Splitting K is what gives a GPU enough invocations at T = 128 (O4/32 *
// T/TM workgroups alone would be ~100 for the 125m attention projections) and keeps each
// invocation's serial loop short (I4/SPLIT words). The TM tokens are spelled out (a0..a7) so
// that every compiler keeps them in registers; tokens past T are clamped to T - 1 (computed,
// not written), as are rows past O4.
// The T output rows go to rows y_row0 .. y_row0+T of y: the k and v projections write
// straight into the KV cache after the tokens already there (y_row0 = 0 otherwise). With ACCUM
// the kernel adds its result to y instead (y = y + result: the residual add of the o and down
// projections fused, the same f32 addition as residual_add.wgsl).
// Dispatch (ceil(O4 / LANES), ceil(T / TM), 1).

// dot4I8Packed: a WGSL language extension (every WebGPU browser, naga); declared for portability.
requires packed_4x8_integer_dot_product;

override I: u32;                   // in features
override O: u32;                   // out features
override TM: u32 = 8u;             // tokens per invocation: 1, 4 or 8
override SPLIT: u32 = 8u;          // invocations sharing each output's K range (workgroup y)
override O4: u32 = (O + 3u) / 4u;  // packed rows
override I4: u32 = (I + 3u) / 4u;  // x_q words per token = weight words per packed row
override LANES: u32 = 32u;         // packed rows per workgroup (workgroup x)
override ACCUM: bool = false;      // y += result instead of y = result

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

// [token j][slot s][lane x]: the workgroup's sums over its SPLIT parts.
var<workgroup> part: array<atomic<i32>, TM * 4u * LANES>;

// The four int8 dot products of activation word x with the four slots' signed codes c.
fn dot4(x: u32, c: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(
        dot4I8Packed(x, c.x),
        dot4I8Packed(x, c.y),
        dot4I8Packed(x, c.z),
        dot4I8Packed(x, c.w),
    );
}

// The four slots' signed codes c - 1 of weight word ww, one byte each (see the top).
fn codes(ww: u32) -> vec4<u32> {
    let u = (vec4<u32>(ww) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(0x03030303u);
    return ((u | vec4<u32>(0x80808080u)) - vec4<u32>(0x01010101u)) ^ vec4<u32>(0x80808080u);
}

// Token j's sums into the workgroup's totals.
fn add_part(j: u32, lane: u32, a: vec4<i32>) {
    let base = j * 4u * LANES + lane;
    atomicAdd(&part[base], a.x);
    atomicAdd(&part[base + LANES], a.y);
    atomicAdd(&part[base + 2u * LANES], a.z);
    atomicAdd(&part[base + 3u * LANES], a.w);
}

@compute @workgroup_size(LANES, SPLIT, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let n_t = dims.t;
    let t0 = group.y * TM;
    for (var e = li; e < TM * 4u * LANES; e += LANES * SPLIT) {
        atomicStore(&part[e], 0);
    }

    // Row p (clamped: the rows past O4 of the last group compute row O4-1 and write nothing).
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let last = n_t - 1u;
    let r0 = min(t0, last) * I4;
    let r1 = min(t0 + 1u, last) * I4;
    let r2 = min(t0 + 2u, last) * I4;
    let r3 = min(t0 + 3u, last) * I4;
    let r4 = min(t0 + 4u, last) * I4;
    let r5 = min(t0 + 5u, last) * I4;
    let r6 = min(t0 + 6u, last) * I4;
    let r7 = min(t0 + 7u, last) * I4;
    var a0 = vec4<i32>(); // token t0, slots 0..3
    var a1 = vec4<i32>();
    var a2 = vec4<i32>();
    var a3 = vec4<i32>();
    var a4 = vec4<i32>();
    var a5 = vec4<i32>();
    var a6 = vec4<i32>();
    var a7 = vec4<i32>();
    var k = lid.y;
    if TM == 1u {
        // One token (decoding): four words a step, loaded before any is used, so the loads
        // overlap instead of each step waiting on memory (integer sums: exact in any order).
        for (; k + 3u * SPLIT < I4; k += 4u * SPLIT) {
            let w0 = w[k * O4 + pc];
            let w1 = w[(k + SPLIT) * O4 + pc];
            let w2 = w[(k + 2u * SPLIT) * O4 + pc];
            let w3 = w[(k + 3u * SPLIT) * O4 + pc];
            let x0 = xq[r0 + k];
            let x1 = xq[r0 + k + SPLIT];
            let x2 = xq[r0 + k + 2u * SPLIT];
            let x3 = xq[r0 + k + 3u * SPLIT];
            a0 += dot4(x0, codes(w0)) + dot4(x1, codes(w1)) + dot4(x2, codes(w2)) + dot4(x3, codes(w3));
        }
    }
    for (; k < I4; k += SPLIT) {
        let c = codes(w[k * O4 + pc]);
        a0 += dot4(xq[r0 + k], c);
        if TM > 1u {
            a1 += dot4(xq[r1 + k], c);
            a2 += dot4(xq[r2 + k], c);
            a3 += dot4(xq[r3 + k], c);
        }
        if TM > 4u {
            a4 += dot4(xq[r4 + k], c);
            a5 += dot4(xq[r5 + k], c);
            a6 += dot4(xq[r6 + k], c);
            a7 += dot4(xq[r7 + k], c);
        }
    }

    workgroupBarrier();
    add_part(0u, lid.x, a0);
    if TM > 1u {
        add_part(1u, lid.x, a1);
        add_part(2u, lid.x, a2);
        add_part(3u, lid.x, a3);
    }
    if TM > 4u {
        add_part(4u, lid.x, a4);
        add_part(5u, lid.x, a5);
        add_part(6u, lid.x, a6);
        add_part(7u, lid.x, a7);
    }
    workgroupBarrier();

    // The workgroup's TM x 4 x LANES outputs, consecutive invocations on consecutive rows p.
    let s_w = sw[0];
    for (var e = li; e < TM * 4u * LANES; e += LANES * SPLIT) {
        let x = e % LANES;
        let s = (e / LANES) % 4u;
        let t = t0 + e / (4u * LANES);
        let p = group.x * LANES + x;
        let o = p + s * O4;
        if p < O4 && o < O && t < n_t {
            let acc = atomicLoad(&part[e]);
            let r = f32(acc) / (sa[t] * s_w);
            let at = (dims.y_row0 + t) * O + o;
            if ACCUM {
                y[at] = y[at] + r;
            } else {
                y[at] = r;
            }
        }
    }
}
