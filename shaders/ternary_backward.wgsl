// BitLinear backward to the input, straight-through on the activation quantizer:
//   dx (T, I) = dy (T, O) . W / s_w,   W ternary (O, I), i.e. the transposed product.
// W is the forward's packed weight (ternary_matmul.wgsl, bitlora_gpu::DType::Ternary): word
// (k, p) of an (I4, O4) array holds bytes (p, 4k .. 4k+3), byte (p, i) the codes (value + 1) of
// rows p + s*O4 (s = 0..3) in bits 2s..2s+1. Column i of W is byte i%4 of words (i/4, p).
// The sum for each dx[t, i] runs over p = 0..O4-1 and s = 0..3 in the order of the CPU
// reference (bitlora_core::train::ternary_backward), each term dy * {-1, 0, 1} exact (so a
// fused multiply-add rounds it as the separate add does), rows past O contributing dy = 0; then
// one division by s_w. With dims.acc = 1 the result is added into dx (the q, k and v projections'
// input gradients sum into one buffer; CPU: dx_q + dx_k + dx_v).
//
// Blocking. Each sum stays with one invocation, serial in that order, so the parallelism is
// in the outputs: a workgroup of KW x TG = 8 x TG invocations owns KW word columns (32
// columns of dx) and TW = TG * TM tokens; invocation (x, y) owns word column k = KW*group.x + x
// (columns 4k .. 4k+3) for the TM tokens tb + TM*y .. tb + TM*y + TM-1. The packed rows go by
// in chunks of PC = 16 / TM, staged through workgroup memory:
//   codes[pp][s][x]: the weight values -1/0/+1 of word (k0 + x, p0 + pp), slot s, as
//                    vec4<f32> (the four columns), decoded once per workgroup, not per token;
//   dys[pp][t]:      dy[t, p0 + pp + s*O4] for s = 0..3, as vec4<f32>, loaded with
//                    consecutive invocations on consecutive p (coalesced).
// Per packed row an invocation then reads 4 + TM vectors and does 16 * TM multiply-adds,
// without indexing any register by a run-time value (a dynamically indexed vector or array
// lands in local memory on NVIDIA: that, in an earlier version of this kernel, cost 10x). A
// warp (32 consecutive invocations: 8 word columns x 4 token blocks) reads 8 distinct code
// vectors and 4 distinct dy vectors, so the reads broadcast. The next chunk's global loads
// are issued before the current chunk is summed. Each invocation stages 8 values of dy per
// chunk whatever TM; the workgroup memory is PC * 16 * (4 KW + TW + 1) bytes: 12.4 KiB for
// (TM, TG) = (1, 16) or (2, 32), 10.1 KiB for (4, 32), within WebGPU's 16 KiB.
// Tokens past T and rows past O4 load zeros; columns past I compute and are not written.
//
// Split sums (dims.ps = PS > 0). At T = 128 the outputs give few workgroups (I/32 x T/16: 96 for
// I = 768), under one per SM on a large GPU, so the packed rows can be split too: workgroup z
// sums rows z*PS .. z*PS + PS - 1 (PS a multiple of PC) in the same order and writes its raw
// partial sum to dx as a scratch of shape (S, T, I); ternary_backward_reduce.wgsl then adds
// the S partials in order z = 0, 1, ... and divides by s_w. That changes the order of dx's
// sum against the CPU reference (within f32 rounding, dot_f32_bound): harmless here, as dx
// feeds only gradients, no int8 quantizer. CPU-emulated adapters keep PS = 0. PS is a uniform,
// not an override, so that one pipeline serves every T (the launcher picks S from T).
// Dispatch (ceil(ceil(I / 4) / KW), ceil(T / (TG * TM)), S), S = 1 when PS = 0.

override I: u32;                  // in features
override O: u32;                  // out features
override TM: u32 = 1u;            // tokens per invocation: 1, 2 or 4
override TG: u32 = 32u;           // token blocks per workgroup (y): 16 or 32
override O4: u32 = (O + 3u) / 4u; // packed rows
override I4: u32 = (I + 3u) / 4u; // word columns
override PC: u32 = 16u / TM;      // packed rows per chunk
override NI: u32 = KW * TG;       // invocations per workgroup
override TW: u32 = TG * TM;       // tokens per workgroup
// Row stride of the dy staging array, padded by one vector so that the invocations staging
// consecutive packed rows write to different banks.
override DS: u32 = TW + 1u;
const KW: u32 = 8u;               // word columns per workgroup (x)

struct Dims {
    t: u32,  // T
    ps: u32, // PS, packed rows per split (a multiple of PC); 0: all, the result written to dx
    acc: u32, // 1: dx += result (PS = 0 only; the reduce pass adds otherwise)
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> dy: array<f32>;       // (T, O)
@group(0) @binding(2) var<storage, read> w: array<u32>;        // (ceil(I/4), ceil(O/4)) packed words
@group(0) @binding(3) var<storage, read> sw: array<f32>;       // (1) s_w
@group(0) @binding(4) var<storage, read_write> dx: array<f32>; // (T, I); (S, T, I) partials if PS > 0

var<workgroup> codes: array<vec4<f32>, PC * 4u * KW>; // [pp][s][x]
var<workgroup> dys: array<vec4<f32>, PC * DS>;   // [pp][token of the workgroup], row stride DS

// The values (code - 1) of slot s of a word's four columns (bytes 0..3).
fn slot(ww: u32, s: u32) -> vec4<f32> {
    let c = (vec4<u32>(ww) >> (vec4<u32>(0u, 8u, 16u, 24u) + 2u * s)) & vec4<u32>(3u);
    return vec4<f32>(vec4<i32>(c) - vec4<i32>(1));
}

// Staging element e (0 .. 4 * PC * TW) of the chunk at p0: packed row pp = e % PC, slot
// s = (e / PC) % 4, token e / (4 PC) of the workgroup (first token tb). Consecutive e are
// consecutive rows: coalesced loads. Zero past T, O4 and O.
fn dy_load(e: u32, p0: u32, tb: u32) -> f32 {
    let p = p0 + e % PC;
    let o = p + ((e / PC) % 4u) * O4;
    let t = tb + e / (4u * PC);
    let n_t = dims.t;
    return select(0.0, dy[min(t, n_t - 1u) * O + min(o, O - 1u)], t < n_t && p < O4 && o < O);
}

fn dy_store(e: u32, v: f32) {
    dys[(e % PC) * DS + e / (4u * PC)][(e / PC) % 4u] = v;
}

// dx[t, 4k .. 4k+3] (= or +=) a / s_w, the columns below I.
fn put(t: u32, k: u32, a: vec4<f32>, s_w: f32, z: u32) {
    if t >= dims.t || k >= I4 {
        return;
    }
    if dims.ps > 0u {
        // The raw partial sum of split z.
        let idx = (z * dims.t + t) * I + 4u * k;
        let ni = I - 4u * k;
        dx[idx] = a.x;
        if ni > 1u { dx[idx + 1u] = a.y; }
        if ni > 2u { dx[idx + 2u] = a.z; }
        if ni > 3u { dx[idx + 3u] = a.w; }
        return;
    }
    let r = a / s_w;
    let idx = t * I + 4u * k;
    let ni = I - 4u * k;
    if dims.acc == 1u {
        dx[idx] += r.x;
        if ni > 1u { dx[idx + 1u] += r.y; }
        if ni > 2u { dx[idx + 2u] += r.z; }
        if ni > 3u { dx[idx + 3u] += r.w; }
    } else {
        dx[idx] = r.x;
        if ni > 1u { dx[idx + 1u] = r.y; }
        if ni > 2u { dx[idx + 2u] = r.z; }
        if ni > 3u { dx[idx + 3u] = r.w; }
    }
}

@compute @workgroup_size(KW, TG, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let k0 = group.x * KW;
    let tb = group.y * TW; // the workgroup's first token
    // This workgroup's packed rows: pb .. pe - 1.
    var pb = 0u;
    var pe = O4;
    if dims.ps > 0u {
        pb = group.z * dims.ps;
        pe = min(O4, pb + dims.ps);
    }
    // The staged word of this invocation: (k0 + li % KW, p0 + li / KW), if li < PC * KW.
    let wk = k0 + li % KW;
    let wp = li / KW;
    let w_live = li < PC * KW && wk < I4;
    let w_base = min(wk, I4 - 1u) * O4 + wp;
    // Its 8 staged dy values per chunk: elements li + n * NI, n = 0..7 (8 = 4 PC TW / NI).
    var w_next = 0x55555555u; // codes 1: zeros
    if w_live && pb + wp < O4 {
        w_next = w[w_base + pb];
    }
    var d_lo = vec4<f32>(dy_load(li, pb, tb), dy_load(li + NI, pb, tb),
                         dy_load(li + 2u * NI, pb, tb), dy_load(li + 3u * NI, pb, tb));
    var d_hi = vec4<f32>(dy_load(li + 4u * NI, pb, tb), dy_load(li + 5u * NI, pb, tb),
                         dy_load(li + 6u * NI, pb, tb), dy_load(li + 7u * NI, pb, tb));

    var a0 = vec4<f32>(); // token tb + TM*y, columns 4k .. 4k+3
    var a1 = vec4<f32>();
    var a2 = vec4<f32>();
    var a3 = vec4<f32>();
    let x = lid.x;
    let tl = lid.y * TM; // first token within the workgroup
    for (var p0 = pb; p0 < pe; p0 += PC) {
        workgroupBarrier(); // the last chunk's reads are done
        if li < PC * KW {
            let c = wp * 4u * KW + li % KW;
            codes[c] = slot(w_next, 0u);
            codes[c + KW] = slot(w_next, 1u);
            codes[c + 2u * KW] = slot(w_next, 2u);
            codes[c + 3u * KW] = slot(w_next, 3u);
        }
        dy_store(li, d_lo.x);
        dy_store(li + NI, d_lo.y);
        dy_store(li + 2u * NI, d_lo.z);
        dy_store(li + 3u * NI, d_lo.w);
        dy_store(li + 4u * NI, d_hi.x);
        dy_store(li + 5u * NI, d_hi.y);
        dy_store(li + 6u * NI, d_hi.z);
        dy_store(li + 7u * NI, d_hi.w);
        workgroupBarrier();

        // The next chunk's loads, in flight while this one is summed.
        let p1 = p0 + PC;
        if p1 < pe {
            w_next = 0x55555555u;
            if w_live && p1 + wp < O4 {
                w_next = w[w_base + p1];
            }
            d_lo = vec4<f32>(dy_load(li, p1, tb), dy_load(li + NI, p1, tb),
                             dy_load(li + 2u * NI, p1, tb), dy_load(li + 3u * NI, p1, tb));
            d_hi = vec4<f32>(dy_load(li + 4u * NI, p1, tb), dy_load(li + 5u * NI, p1, tb),
                             dy_load(li + 6u * NI, p1, tb), dy_load(li + 7u * NI, p1, tb));
        }

        // Per packed row: slots 0..3 in order, each term g * {-1, 0, 1} exact.
        for (var pp = 0u; pp < PC; pp++) {
            let c = pp * 4u * KW + x;
            let c0 = codes[c];
            let c1 = codes[c + KW];
            let c2 = codes[c + 2u * KW];
            let c3 = codes[c + 3u * KW];
            let d = pp * DS + tl;
            let g0 = dys[d];
            a0 += g0.x * c0;
            a0 += g0.y * c1;
            a0 += g0.z * c2;
            a0 += g0.w * c3;
            if TM > 1u {
                let g1 = dys[d + 1u];
                a1 += g1.x * c0;
                a1 += g1.y * c1;
                a1 += g1.z * c2;
                a1 += g1.w * c3;
            }
            if TM > 2u {
                let g2 = dys[d + 2u];
                a2 += g2.x * c0;
                a2 += g2.y * c1;
                a2 += g2.z * c2;
                a2 += g2.w * c3;
                let g3 = dys[d + 3u];
                a3 += g3.x * c0;
                a3 += g3.y * c1;
                a3 += g3.z * c2;
                a3 += g3.w * c3;
            }
        }
    }

    let k = k0 + x;
    let t = tb + tl;
    let s_w = sw[0];
    let z = group.z;
    put(t, k, a0, s_w, z);
    if TM > 1u {
        put(t + 1u, k, a1, s_w, z);
    }
    if TM > 2u {
        put(t + 2u, k, a2, s_w, z);
        put(t + 3u, k, a3, s_w, z);
    }
}
