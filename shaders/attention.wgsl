// Causal grouped-query attention of T_Q new queries over T_KV = PAST + T_Q keys (a KV cache
// holding PAST earlier tokens, then the queries' own). Query head h reads kv head h / (NH / NKV).
// Query i sits at position PAST + i and sees keys j = 0 ..= PAST + i:
//   s_j = (q_i . k_j) * SCALE,  p_j = exp(s_j - max_j s_j) / sum_j exp(...),
//   out_i = sum_j p_j v_j.
// PAST = 0, T_Q = T_KV is the whole-sequence pass. One workgroup per (query i, head h);
// dispatch (T_Q, NH, 1). WG must be a power of two.
//
// The arithmetic follows the CPU reference (crates/core/src/ops.rs attention) operation by
// operation, so the results differ only by WGSL's exp: each dot product is summed over d in
// order, the denominator over j in order (by one invocation), p_j = e_j / denom, and out_d
// accumulates p_j * v_jd over j in order. A row's arithmetic does not depend on T_Q or PAST,
// so decoding through the cache gives the whole-sequence pass's rows bit for bit.
//
// Rows of at most SMAX keys (every decode step and training row of up to SMAX tokens) keep
// their scores in workgroup memory: the scores are computed once, turned into p_j in place,
// and the output loop reads them from there. Longer rows make three passes over the keys
// (max, denominator, output) that recompute the scores block by block, so workgroup memory
// stays O(HS + WG + SMAX) for any T. Both paths perform the same operations on the same
// values, so they give the same bits (the kernel tests check this).

override NH: u32;              // query heads
override NKV: u32;             // key/value heads
override HS: u32;              // head size
override SCALE: f32;           // HS^-0.5, computed on the CPU as the reference does
override WG: u32 = 64u;        // workgroup size, a power of two
override SMAX: u32 = 1024u;    // longest row whose scores stay in workgroup memory
override QW: u32 = NH * HS;    // q / out row width
override KW: u32 = NKV * HS;   // k / v row width

struct Dims {
    t_q: u32,  // T_Q, new queries
    past: u32, // PAST = T_KV - T_Q, keys cached before them
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> q: array<f32>;         // (T_Q, NH*HS)
@group(0) @binding(2) var<storage, read> k: array<f32>;         // (R, NKV*HS), R >= T_KV
@group(0) @binding(3) var<storage, read> v: array<f32>;         // (R, NKV*HS)
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // (T_Q, NH*HS)

var<workgroup> qs: array<f32, HS>;   // q_i of this head
var<workgroup> o_acc: array<f32, HS>;
var<workgroup> e: array<f32, WG>;    // exp(s_j - max) of one block of keys
var<workgroup> red: array<f32, WG>;  // max reduction
var<workgroup> denom_s: f32;
var<workgroup> sc: array<f32, SMAX>; // the row's scores, then its p_j (rows of <= SMAX keys)

// The loops below that add in a fixed order load several operands before adding them, in
// that order: the adds stay serial (the CPU's order) but the loads, which do not depend on
// them, overlap instead of each waiting for memory in turn.

fn score(j: u32, kv_off: u32) -> f32 {
    let base = j * KW + kv_off;
    var dot = 0.0;
    var d = 0u;
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

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x;
    let h = wid.y;
    let last = dims.past + i; // the query's own position: the last key it sees
    let kv_off = (h / (NH / NKV)) * HS;
    let q_off = i * QW + h * HS;
    for (var d = lid; d < HS; d += WG) {
        qs[d] = q[q_off + d];
        o_acc[d] = 0.0;
    }
    workgroupBarrier();

    if last < SMAX {
        row_cached(last, kv_off, q_off, lid);
    } else {
        row_streamed(last, kv_off, q_off, lid);
    }
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
    return red[0];
}

// A row of last + 1 <= SMAX keys, its scores kept in `sc`.
fn row_cached(last: u32, kv_off: u32, q_off: u32, lid: u32) {
    var m = -3.0e38;
    for (var j = lid; j <= last; j += WG) {
        let s = score(j, kv_off);
        sc[j] = s;
        m = max(m, s);
    }
    let mx = workgroup_max(m, lid); // its barriers also publish sc
    for (var j = lid; j <= last; j += WG) {
        sc[j] = exp(sc[j] - mx);
    }
    workgroupBarrier();
    if lid == 0u {
        var denom = 0.0;
        var j = 0u;
        for (; j + 4u <= last + 1u; j += 4u) {
            let e0 = sc[j];
            let e1 = sc[j + 1u];
            let e2 = sc[j + 2u];
            let e3 = sc[j + 3u];
            denom += e0;
            denom += e1;
            denom += e2;
            denom += e3;
        }
        for (; j <= last; j++) {
            denom += sc[j];
        }
        denom_s = denom;
    }
    workgroupBarrier();
    let dn = denom_s;
    for (var j = lid; j <= last; j += WG) {
        sc[j] = sc[j] / dn;
    }
    workgroupBarrier();
    for (var d = lid; d < HS; d += WG) {
        var o = 0.0;
        var j = 0u;
        for (; j + 8u <= last + 1u; j += 8u) {
            let b = j * KW + kv_off + d;
            let v0 = v[b];
            let v1 = v[b + KW];
            let v2 = v[b + 2u * KW];
            let v3 = v[b + 3u * KW];
            let v4 = v[b + 4u * KW];
            let v5 = v[b + 5u * KW];
            let v6 = v[b + 6u * KW];
            let v7 = v[b + 7u * KW];
            o += sc[j] * v0;
            o += sc[j + 1u] * v1;
            o += sc[j + 2u] * v2;
            o += sc[j + 3u] * v3;
            o += sc[j + 4u] * v4;
            o += sc[j + 5u] * v5;
            o += sc[j + 6u] * v6;
            o += sc[j + 7u] * v7;
        }
        for (; j <= last; j++) {
            o += sc[j] * v[j * KW + kv_off + d];
        }
        out[q_off + d] = o;
    }
}

// A row of more than SMAX keys, in three passes that recompute the scores.
fn row_streamed(last: u32, kv_off: u32, q_off: u32, lid: u32) {
    // Pass 1: the max score.
    var m = -3.0e38;
    for (var j = lid; j <= last; j += WG) {
        m = max(m, score(j, kv_off));
    }
    let mx = workgroup_max(m, lid);

    // Pass 2: denom = sum_j exp(s_j - max), summed in key order by invocation 0.
    var denom = 0.0;
    for (var j0 = 0u; j0 <= last; j0 += WG) {
        let j = j0 + lid;
        if j <= last {
            e[lid] = exp(score(j, kv_off) - mx);
        }
        workgroupBarrier();
        if lid == 0u {
            let n = min(WG, last + 1u - j0);
            for (var jj = 0u; jj < n; jj++) {
                denom += e[jj];
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        denom_s = denom;
    }
    workgroupBarrier();
    let dn = denom_s;

    // Pass 3: out_d = sum_j p_j * v_jd, p_j = e_j / denom, in key order, one invocation per d.
    for (var j0 = 0u; j0 <= last; j0 += WG) {
        let j = j0 + lid;
        if j <= last {
            e[lid] = exp(score(j, kv_off) - mx) / dn;
        }
        workgroupBarrier();
        let n = min(WG, last + 1u - j0);
        for (var d = lid; d < HS; d += WG) {
            var o = o_acc[d];
            for (var jj = 0u; jj < n; jj++) {
                o += e[jj] * v[(j0 + jj) * KW + kv_off + d];
            }
            o_acc[d] = o;
        }
        workgroupBarrier();
    }
    for (var d = lid; d < HS; d += WG) {
        out[q_off + d] = o_acc[d];
    }
}
