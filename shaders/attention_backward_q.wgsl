// Causal GQA attention backward, pass 1 of 2 (pass 2: attention_backward_kv.wgsl):
// dq, and each query row's softmax statistics for pass 2
// (bitlora_core::train::attention_backward). The probabilities are recomputed from q and k
// (nothing (NH, T, T) is stored):
//   s_j = (q_i . k_j) / sqrt(HS),  P_j = exp(s_j - max) / sum_j' exp(s_j' - max),  j <= i,
//   dP_j = do_i . v_j,  D = sum_j P_j dP_j,  dq_i = sum_j P_j (dP_j - D) / sqrt(HS) k_j.
// Query head h reads kv-head h / (NH/NKV); stats[h, i] = (max, sum, D).
//
// One workgroup per (query row i, head h): its WG invocations take the keys j a block of WG
// at a time, one key each (the dot products over d, in ascending d). The arithmetic and
// every summation order are the CPU reference's (and this kernel's earlier one-invocation
// form's): the max is exact in any order; the denominator and D are summed over j in
// ascending order by invocation 0 from the block's values in workgroup memory; dq[d] is
// summed over j in ascending order by the invocation owning d (d = lid, lid + WG, ...).
// The score s_j and dP_j of each key are computed once, in the first pass, and kept in
// workgroup memory for the passes after it (each by the invocation that computed it, so no
// barrier is needed for them) when the row has at most SMAX keys; longer rows recompute them
// in each pass (4 dot products over HS for s_j, 2 for dP_j, each reading a row of k or v).
// The values are the same either way: the same dot product in the same order.
// Dispatch (T, NH, 1).

override NH: u32;       // query heads
override NKV: u32;      // kv heads, dividing NH
override HS: u32;       // head size
override WG: u32 = 64u; // workgroup size, a power of two
override GROUP: u32 = NH / NKV;
override QW: u32 = NH * HS;
override KW: u32 = NKV * HS;
override SMAX: u32 = 1024u; // keys whose s_j and dP_j are kept (8 KiB of workgroup memory)

struct Dims {
    t: u32, // T, tokens
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> q: array<f32>;           // (T, NH*HS) after RoPE
@group(0) @binding(2) var<storage, read> k: array<f32>;           // (T, NKV*HS) after RoPE
@group(0) @binding(3) var<storage, read> v: array<f32>;           // (T, NKV*HS)
@group(0) @binding(4) var<storage, read> dout: array<f32>;        // (T, NH*HS)
@group(0) @binding(5) var<storage, read_write> stats: array<f32>; // (NH, T, 3)
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;    // (T, NH*HS)

var<workgroup> qs: array<f32, HS>;     // q_i of head h
var<workgroup> dos: array<f32, HS>;    // do_i of head h
var<workgroup> dq_acc: array<f32, HS>; // dq_i, each d owned by invocation d % WG
var<workgroup> blk: array<f32, WG>;    // one value per key of the current block
var<workgroup> sc: array<f32, SMAX>;   // s_j, rows of at most SMAX keys
var<workgroup> dpv: array<f32, SMAX>;  // dP_j, likewise
var<workgroup> red: array<f32, WG>;    // max reduction
var<workgroup> den_s: f32;
var<workgroup> dsum_s: f32;

fn score(j: u32, kb: u32, scale: f32) -> f32 {
    var a = 0.0;
    for (var d = 0u; d < HS; d++) {
        a += qs[d] * k[j * KW + kb + d];
    }
    return a * scale;
}

fn dprob(j: u32, kb: u32) -> f32 {
    var a = 0.0;
    for (var d = 0u; d < HS; d++) {
        a += dos[d] * v[j * KW + kb + d];
    }
    return a;
}

// s_j: kept by this invocation in the first pass, or computed again.
fn s_of(j: u32, kb: u32, scale: f32, cached: bool) -> f32 {
    if cached {
        return sc[j];
    }
    return score(j, kb, scale);
}

// dP_j, likewise.
fn dp_of(j: u32, kb: u32, cached: bool) -> f32 {
    if cached {
        return dpv[j];
    }
    return dprob(j, kb);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x;
    let h = wid.y;
    let t = dims.t;
    let kb = (h / GROUP) * HS;
    let qb = i * QW + h * HS;
    let scale = 1.0 / sqrt(f32(HS));
    for (var d = lid; d < HS; d += WG) {
        qs[d] = q[qb + d];
        dos[d] = dout[qb + d];
        dq_acc[d] = 0.0;
    }
    workgroupBarrier();

    // The max score (exact in any order); s_j and dP_j kept where the row fits.
    let cached = i < SMAX;
    var m = -3.402823e38;
    for (var j = lid; j <= i; j += WG) {
        let sj = score(j, kb, scale);
        if cached {
            sc[j] = sj;
            dpv[j] = dprob(j, kb);
        }
        m = max(m, sj);
    }
    red[lid] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let mx = red[0];

    // den = sum_j exp(s_j - max), in key order by invocation 0.
    var den = 0.0;
    for (var j0 = 0u; j0 <= i; j0 += WG) {
        let j = j0 + lid;
        var e = 0.0;
        if j <= i {
            e = exp(s_of(j, kb, scale, cached) - mx);
        }
        blk[lid] = e;
        workgroupBarrier();
        if lid == 0u {
            let n = min(WG, i + 1u - j0);
            for (var jj = 0u; jj < n; jj++) {
                den += blk[jj];
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        den_s = den;
    }
    workgroupBarrier();
    den = den_s;

    // D = sum_j P_j dP_j, in key order by invocation 0.
    var dsum = 0.0;
    for (var j0 = 0u; j0 <= i; j0 += WG) {
        let j = j0 + lid;
        var pd = 0.0;
        if j <= i {
            let p = exp(s_of(j, kb, scale, cached) - mx) / den;
            pd = p * dp_of(j, kb, cached);
        }
        blk[lid] = pd;
        workgroupBarrier();
        if lid == 0u {
            let n = min(WG, i + 1u - j0);
            for (var jj = 0u; jj < n; jj++) {
                dsum += blk[jj];
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        dsum_s = dsum;
        let sbase = (h * t + i) * 3u;
        stats[sbase] = mx;
        stats[sbase + 1u] = den;
        stats[sbase + 2u] = dsum;
    }
    workgroupBarrier();
    dsum = dsum_s;

    // dq_i = sum_j ds_j k_j, j ascending, each d by its own invocation.
    for (var j0 = 0u; j0 <= i; j0 += WG) {
        let j = j0 + lid;
        var ds = 0.0;
        if j <= i {
            let p = exp(s_of(j, kb, scale, cached) - mx) / den;
            ds = p * (dp_of(j, kb, cached) - dsum) * scale;
        }
        blk[lid] = ds;
        workgroupBarrier();
        let n = min(WG, i + 1u - j0);
        for (var d = lid; d < HS; d += WG) {
            var a = dq_acc[d];
            for (var jj = 0u; jj < n; jj++) {
                a += blk[jj] * k[(j0 + jj) * KW + kb + d];
            }
            dq_acc[d] = a;
        }
        workgroupBarrier();
    }
    for (var d = lid; d < HS; d += WG) {
        dq[qb + d] = dq_acc[d];
    }
}
