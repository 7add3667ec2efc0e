// Causal grouped-query attention of T_Q new queries over T_KV = PAST + T_Q keys (a KV cache
// holding PAST earlier tokens, then the queries' own). Query head h reads kv head h / (NH / NKV).
// Query i sits at position PAST + i and sees keys j = 0 ..= PAST + i (n = PAST + i + 1 keys).
//
// The softmax is taken over chunks of CH keys (flash-decoding's order), which the CPU
// reference mirrors operation for operation (crates/core/src/ops.rs attention_cached), so the
// two differ only by WGSL's exp:
//   s_j = (q_i . k_j) * SCALE                      (the dot product summed over d in order)
//   M = max_j s_j
//   chunk c (keys cCH .. cCH + CH - 1 that the query sees):
//     m_c = max_{j in c} s_j,  e_j = exp(s_j - m_c),
//     l_c = sum_{j in c} e_j,  u_cd = sum_{j in c} e_j v_jd       (in key order)
//     f_c = exp(m_c - M)
//   L = sum_c l_c f_c,  O_d = sum_c u_cd f_c                        (in chunk order)
//   out_id = O_d / L
// A row's arithmetic depends only on the row, not on T_Q, PAST or how the work is spread, so
// decoding through the cache gives the whole-sequence pass's rows bit for bit.
//
// Two ways to run it, the same operations on the same values, so the same bits (the kernel
// tests check this):
// - `main`: one workgroup per (query i, head h), dispatch (T_Q, NH, 1), walking the row's
//   chunks in order. Training and prefill: T_Q x NH workgroups are plenty. Rows of at most
//   SMAX keys keep their scores in workgroup memory; longer rows compute them twice (once for
//   M, once in their chunk), so workgroup memory stays O(HS + CH + SMAX) for any T.
// - split over the keys, for decoding (T_Q = 1 gives only NH workgroups, and one workgroup's
//   ordered loops over hundreds of keys are bound by memory latency): `main_part`, dispatch
//   (chunks, NH, T_Q), one workgroup per chunk, writes (u_c, m_c, l_c) to `part`; then
//   `main_combine`, dispatch (T_Q, NH, 1), adds the chunks up in order.
//   The split path also applies RoPE (rope.wgsl's arithmetic, the same tables), so a decoded
//   token needs no rope dispatch: its queries and its own keys (rows PAST .. T_KV of k) come
//   in unrotated; `main_part` rotates q_i as it loads it and each new key as it scores it,
//   and `main_combine` writes the new keys back rotated (the workgroups of the first query
//   head of each kv head; nothing else touches those rows in that dispatch), as rope.wgsl
//   would have left them for the tokens after.
// WG must be a power of two.

override NH: u32;              // query heads
override NKV: u32;             // key/value heads
override HS: u32;              // head size
override SCALE: f32;           // HS^-0.5, computed on the CPU as the reference does
override WG: u32 = 64u;        // workgroup size, a power of two
override SMAX: u32 = 1024u;    // `main`: longest row whose scores stay in workgroup memory
override QW: u32 = NH * HS;    // q / out row width
override KW: u32 = NKV * HS;   // k / v row width
override PW: u32 = HS + 2u;    // one chunk's record in `part`: u_c (HS), m_c, l_c
override HALF: u32 = HS / 2u;  // RoPE's pairs (d, d + HALF)
// score and chunk_u with 32 loads in flight (k read as vec4: HS a multiple of 4), else 4 and
// 8; the same sums in the same order either way.
override WIDE: bool = true;

const CH: u32 = 64u; // keys per chunk: the CPU reference's ops::ATTENTION_CHUNK

struct Dims {
    t_q: u32,  // T_Q, new queries
    past: u32, // PAST = T_KV - T_Q, keys cached before them
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> q: array<f32>;         // (T_Q, NH*HS)
@group(0) @binding(2) var<storage, read> k: array<f32>;         // (R, NKV*HS), R >= T_KV
@group(0) @binding(3) var<storage, read> v: array<f32>;         // (R, NKV*HS)
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // (T_Q, NH*HS)
// The split path's chunk records: (T_Q, NH, NCH, PW), NCH = ceil(T_KV / CH). `main_part`
// writes it, `main_combine` reads it. Bound: main 0-4, main_part 0-3 and 5, main_combine 0,
// 4 and 5.
@group(0) @binding(5) var<storage, read_write> part: array<f32>;
// The split path's RoPE: k again (main_combine rotates the new keys in place) and the tables
// (P, HS/2) of rope.wgsl, P >= T_KV. Bound: main_part 7-8, main_combine 6-8.
@group(0) @binding(6) var<storage, read_write> k_new: array<f32>;
@group(0) @binding(7) var<storage, read> cos_t: array<f32>;
@group(0) @binding(8) var<storage, read> sin_t: array<f32>;
// k again as vec4 (WIDE; main and main_part).
@group(0) @binding(9) var<storage, read> k4: array<vec4<f32>>;

var<workgroup> qs: array<f32, HS>;   // q_i of this head
var<workgroup> o_acc: array<f32, HS>;
var<workgroup> e: array<f32, CH>;    // one chunk's scores, then exp(s_j - m_c)
var<workgroup> red: array<f32, WG>;  // max reduction
var<workgroup> l_s: f32;             // one chunk's l_c
var<workgroup> sc: array<f32, SMAX>; // `main`: the row's scores (rows of <= SMAX keys)

// The loops below that add in a fixed order load several operands before adding them, in
// that order: the adds stay serial (the CPU's order) but the loads, which do not depend on
// them, overlap instead of each waiting for memory in turn.

fn score(j: u32, kv_off: u32) -> f32 {
    let base = j * KW + kv_off;
    var dot = 0.0;
    var d = 0u;
    if WIDE {
        // 32 elements of the key in flight at a time, 16 bytes a load: the cache's rows come
        // from memory, and a decoded token's split dispatch was bound by their latency.
        for (; d + 32u <= HS; d += 32u) {
            let b = (base + d) / 4u;
            let c0 = k4[b + 0u];
            let c1 = k4[b + 1u];
            let c2 = k4[b + 2u];
            let c3 = k4[b + 3u];
            let c4 = k4[b + 4u];
            let c5 = k4[b + 5u];
            let c6 = k4[b + 6u];
            let c7 = k4[b + 7u];
            dot += qs[d + 0u] * c0.x;
            dot += qs[d + 1u] * c0.y;
            dot += qs[d + 2u] * c0.z;
            dot += qs[d + 3u] * c0.w;
            dot += qs[d + 4u] * c1.x;
            dot += qs[d + 5u] * c1.y;
            dot += qs[d + 6u] * c1.z;
            dot += qs[d + 7u] * c1.w;
            dot += qs[d + 8u] * c2.x;
            dot += qs[d + 9u] * c2.y;
            dot += qs[d + 10u] * c2.z;
            dot += qs[d + 11u] * c2.w;
            dot += qs[d + 12u] * c3.x;
            dot += qs[d + 13u] * c3.y;
            dot += qs[d + 14u] * c3.z;
            dot += qs[d + 15u] * c3.w;
            dot += qs[d + 16u] * c4.x;
            dot += qs[d + 17u] * c4.y;
            dot += qs[d + 18u] * c4.z;
            dot += qs[d + 19u] * c4.w;
            dot += qs[d + 20u] * c5.x;
            dot += qs[d + 21u] * c5.y;
            dot += qs[d + 22u] * c5.z;
            dot += qs[d + 23u] * c5.w;
            dot += qs[d + 24u] * c6.x;
            dot += qs[d + 25u] * c6.y;
            dot += qs[d + 26u] * c6.z;
            dot += qs[d + 27u] * c6.w;
            dot += qs[d + 28u] * c7.x;
            dot += qs[d + 29u] * c7.y;
            dot += qs[d + 30u] * c7.z;
            dot += qs[d + 31u] * c7.w;
        }
    }
    for (; d + 4u <= HS; d += 4u) {
        let k0 = k[base + d];
        let k1 = k[base + d + 1u];
        let k2 = k[base + d + 2u];
        let k3 = k[base + d + 3u];
        dot += qs[d] * k0;
        dot += qs[d + 1u] * k1;
        dot += qs[d + 2u] * k2;
        dot += qs[d + 3u] * k3;
    }
    for (; d < HS; d++) {
        dot += qs[d] * k[base + d];
    }
    return dot * SCALE;
}

// (x1, x2) rotated by the angle whose cosine and sine are (c, s): rope.wgsl's rotate.
fn rotate(x1: f32, x2: f32, c: f32, s: f32) -> vec2<f32> {
    return vec2<f32>(x1 * c - x2 * s, x2 * c + x1 * s);
}

// Key j (at position j), stored unrotated, rotated as rope.wgsl would have stored it, scored
// with score's operations in score's order.
fn score_new(j: u32, kv_off: u32) -> f32 {
    let base = j * KW + kv_off;
    var dot = 0.0;
    for (var d = 0u; d < HS; d++) {
        let p = d % HALF;
        let r = rotate(k[base + p], k[base + p + HALF], cos_t[j * HALF + p], sin_t[j * HALF + p]);
        dot += qs[d] * select(r.y, r.x, d < HALF);
    }
    return dot * SCALE;
}

// The max of m over the workgroup (exact in any order).
fn workgroup_max(m: f32, lid: u32) -> f32 {
    red[lid] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier(); // red is free again
    return r;
}

// Loads q_i of head h into qs; every invocation calls it.
fn load_q(q_off: u32, lid: u32) {
    for (var d = lid; d < HS; d += WG) {
        qs[d] = q[q_off + d];
    }
    workgroupBarrier();
}

// load_q, the query rotated to position pos (rope.wgsl's arithmetic).
fn load_q_rope(q_off: u32, pos: u32, lid: u32) {
    for (var d = lid; d < HS; d += WG) {
        let p = d % HALF;
        let r = rotate(q[q_off + p], q[q_off + p + HALF], cos_t[pos * HALF + p], sin_t[pos * HALF + p]);
        qs[d] = select(r.y, r.x, d < HALF);
    }
    workgroupBarrier();
}

// Chunk statistics of keys j0 .. j0 + n - 1 (n <= CH) whose scores are in e[0 .. n): leaves
// e_j = exp(s_j - m_c) in e and l_c in l_s; returns m_c. Every invocation calls it.
fn chunk_stats(n: u32, lid: u32) -> f32 {
    var m = -3.0e38;
    for (var jj = lid; jj < n; jj += WG) {
        m = max(m, e[jj]);
    }
    let mc = workgroup_max(m, lid); // its barriers also publish e
    for (var jj = lid; jj < n; jj += WG) {
        e[jj] = exp(e[jj] - mc);
    }
    workgroupBarrier();
    if lid == 0u {
        var l = 0.0;
        var jj = 0u;
        for (; jj + 4u <= n; jj += 4u) {
            let e0 = e[jj];
            let e1 = e[jj + 1u];
            let e2 = e[jj + 2u];
            let e3 = e[jj + 3u];
            l += e0;
            l += e1;
            l += e2;
            l += e3;
        }
        for (; jj < n; jj++) {
            l += e[jj];
        }
        l_s = l;
    }
    workgroupBarrier();
    return mc;
}

// u_cd = sum_{jj < n} e_jj v_(j0 + jj)d, in key order.
fn chunk_u(d: u32, j0: u32, n: u32, kv_off: u32) -> f32 {
    var u = 0.0;
    var jj = 0u;
    if WIDE {
        for (; jj + 32u <= n; jj += 32u) {
            let b = (j0 + jj) * KW + kv_off + d;
            let v0 = v[b + 0u * KW];
            let v1 = v[b + 1u * KW];
            let v2 = v[b + 2u * KW];
            let v3 = v[b + 3u * KW];
            let v4 = v[b + 4u * KW];
            let v5 = v[b + 5u * KW];
            let v6 = v[b + 6u * KW];
            let v7 = v[b + 7u * KW];
            let v8 = v[b + 8u * KW];
            let v9 = v[b + 9u * KW];
            let v10 = v[b + 10u * KW];
            let v11 = v[b + 11u * KW];
            let v12 = v[b + 12u * KW];
            let v13 = v[b + 13u * KW];
            let v14 = v[b + 14u * KW];
            let v15 = v[b + 15u * KW];
            let v16 = v[b + 16u * KW];
            let v17 = v[b + 17u * KW];
            let v18 = v[b + 18u * KW];
            let v19 = v[b + 19u * KW];
            let v20 = v[b + 20u * KW];
            let v21 = v[b + 21u * KW];
            let v22 = v[b + 22u * KW];
            let v23 = v[b + 23u * KW];
            let v24 = v[b + 24u * KW];
            let v25 = v[b + 25u * KW];
            let v26 = v[b + 26u * KW];
            let v27 = v[b + 27u * KW];
            let v28 = v[b + 28u * KW];
            let v29 = v[b + 29u * KW];
            let v30 = v[b + 30u * KW];
            let v31 = v[b + 31u * KW];
            u += e[jj + 0u] * v0;
            u += e[jj + 1u] * v1;
            u += e[jj + 2u] * v2;
            u += e[jj + 3u] * v3;
            u += e[jj + 4u] * v4;
            u += e[jj + 5u] * v5;
            u += e[jj + 6u] * v6;
            u += e[jj + 7u] * v7;
            u += e[jj + 8u] * v8;
            u += e[jj + 9u] * v9;
            u += e[jj + 10u] * v10;
            u += e[jj + 11u] * v11;
            u += e[jj + 12u] * v12;
            u += e[jj + 13u] * v13;
            u += e[jj + 14u] * v14;
            u += e[jj + 15u] * v15;
            u += e[jj + 16u] * v16;
            u += e[jj + 17u] * v17;
            u += e[jj + 18u] * v18;
            u += e[jj + 19u] * v19;
            u += e[jj + 20u] * v20;
            u += e[jj + 21u] * v21;
            u += e[jj + 22u] * v22;
            u += e[jj + 23u] * v23;
            u += e[jj + 24u] * v24;
            u += e[jj + 25u] * v25;
            u += e[jj + 26u] * v26;
            u += e[jj + 27u] * v27;
            u += e[jj + 28u] * v28;
            u += e[jj + 29u] * v29;
            u += e[jj + 30u] * v30;
            u += e[jj + 31u] * v31;
        }
    }
    for (; jj + 8u <= n; jj += 8u) {
        let b = (j0 + jj) * KW + kv_off + d;
        let v0 = v[b];
        let v1 = v[b + KW];
        let v2 = v[b + 2u * KW];
        let v3 = v[b + 3u * KW];
        let v4 = v[b + 4u * KW];
        let v5 = v[b + 5u * KW];
        let v6 = v[b + 6u * KW];
        let v7 = v[b + 7u * KW];
        u += e[jj] * v0;
        u += e[jj + 1u] * v1;
        u += e[jj + 2u] * v2;
        u += e[jj + 3u] * v3;
        u += e[jj + 4u] * v4;
        u += e[jj + 5u] * v5;
        u += e[jj + 6u] * v6;
        u += e[jj + 7u] * v7;
    }
    for (; jj < n; jj++) {
        u += e[jj] * v[(j0 + jj) * KW + kv_off + d];
    }
    return u;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x;
    let h = wid.y;
    let n_keys = dims.past + i + 1u;
    let kv_off = (h / (NH / NKV)) * HS;
    let q_off = i * QW + h * HS;
    for (var d = lid; d < HS; d += WG) {
        o_acc[d] = 0.0;
    }
    load_q(q_off, lid);

    // M, the row's largest score.
    let cached = n_keys <= SMAX;
    var m = -3.0e38;
    for (var j = lid; j < n_keys; j += WG) {
        let s = score(j, kv_off);
        if cached {
            sc[j] = s;
        }
        m = max(m, s);
    }
    let mx = workgroup_max(m, lid); // its barriers also publish sc

    var l_sum = 0.0; // L, kept alike by every invocation
    for (var j0 = 0u; j0 < n_keys; j0 += CH) {
        let n = min(CH, n_keys - j0);
        for (var jj = lid; jj < n; jj += WG) {
            if cached {
                e[jj] = sc[j0 + jj];
            } else {
                e[jj] = score(j0 + jj, kv_off);
            }
        }
        let mc = chunk_stats(n, lid);
        let f = exp(mc - mx);
        l_sum = l_sum + l_s * f;
        for (var d = lid; d < HS; d += WG) {
            o_acc[d] = o_acc[d] + chunk_u(d, j0, n, kv_off) * f;
        }
        workgroupBarrier(); // e and l_s are rewritten by the next chunk
    }
    for (var d = lid; d < HS; d += WG) {
        out[q_off + d] = o_acc[d] / l_sum;
    }
}

// One chunk c of one row: dispatch (NCH, NH, T_Q). Chunks past the row's last key write
// nothing (main_combine does not read them).
@compute @workgroup_size(WG)
fn main_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let h = wid.y;
    let i = wid.z;
    let n_keys = dims.past + i + 1u;
    let j0 = c * CH;
    if j0 >= n_keys {
        return; // uniform across the workgroup: no barrier is skipped by some and not others
    }
    let n = min(CH, n_keys - j0);
    let kv_off = (h / (NH / NKV)) * HS;
    load_q_rope(i * QW + h * HS, dims.past + i, lid);
    for (var jj = lid; jj < n; jj += WG) {
        if j0 + jj < dims.past {
            e[jj] = score(j0 + jj, kv_off);
        } else {
            e[jj] = score_new(j0 + jj, kv_off);
        }
    }
    let mc = chunk_stats(n, lid);
    let nch = (dims.past + dims.t_q + CH - 1u) / CH;
    let rec = ((i * NH + h) * nch + c) * PW;
    for (var d = lid; d < HS; d += WG) {
        part[rec + d] = chunk_u(d, j0, n, kv_off);
    }
    if lid == 0u {
        part[rec + HS] = mc;
        part[rec + HS + 1u] = l_s;
    }
}

// Adds up the chunks of row (i, h) in order: dispatch (T_Q, NH, 1).
@compute @workgroup_size(WG)
fn main_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x;
    let h = wid.y;
    let n_keys = dims.past + i + 1u;
    let nch = (dims.past + dims.t_q + CH - 1u) / CH;
    let row = (i * NH + h) * nch;
    let chunks = (n_keys + CH - 1u) / CH;
    // M = the max of the m_c: the max of every score, exactly (a max is exact in any order).
    var mx = -3.0e38;
    for (var c = 0u; c < chunks; c++) {
        mx = max(mx, part[(row + c) * PW + HS]);
    }
    var l_sum = 0.0;
    for (var c = 0u; c < chunks; c++) {
        let rec = (row + c) * PW;
        l_sum = l_sum + part[rec + HS + 1u] * exp(part[rec + HS] - mx);
    }
    for (var d = lid; d < HS; d += WG) {
        var o = 0.0;
        for (var c = 0u; c < chunks; c++) {
            let rec = (row + c) * PW;
            o = o + part[rec + d] * exp(part[rec + HS] - mx);
        }
        out[i * QW + h * HS + d] = o / l_sum;
    }
    // Key PAST + i of kv head h / G, rotated in place by its first query head's workgroup.
    if h % (NH / NKV) == 0u {
        let pos = dims.past + i;
        let base = pos * KW + (h / (NH / NKV)) * HS;
        for (var p = lid; p < HALF; p += WG) {
            let r = rotate(k_new[base + p], k_new[base + p + HALF], cos_t[pos * HALF + p], sin_t[pos * HALF + p]);
            k_new[base + p] = r.x;
            k_new[base + p + HALF] = r.y;
        }
    }
}
