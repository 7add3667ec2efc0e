// Causal GQA attention backward, pass 2 of 2 (after attention_backward_q.wgsl, whose
// per-row statistics (max, sum, D) it reads): dk and dv, each kv-head's gradient summed over
// the NH/NKV query heads of its group (bitlora_core::train::attention_backward):
//   dv_j += P_ij do_i,  dk_j += P_ij (dP_ij - D_i) / sqrt(HS) q_i,  over heads h of the group
//   (ascending) and rows i >= j (ascending), the CPU reference's order.
//
// One workgroup per (key row j, kv-head g); it owns dk[j, g] and dv[j, g], so no two
// workgroups write the same element (WGSL has no float atomics). Its WG invocations take the
// query rows i a block of WG at a time, one row each (P_ij and ds_ij: dot products over d in
// ascending d); then the invocation owning d (d = lid, lid + WG, ...) adds the block's terms
// into dk[d] and dv[d] in ascending i: every sum in the order of the CPU reference (and of
// this kernel's earlier one-invocation-per-key form).
// Dispatch (T, NKV, 1).

override NH: u32;       // query heads
override NKV: u32;      // kv heads, dividing NH
override HS: u32;       // head size
override WG: u32 = 64u; // workgroup size
override GROUP: u32 = NH / NKV;
override QW: u32 = NH * HS;
override KW: u32 = NKV * HS;

struct Dims {
    t: u32, // T, tokens
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> q: array<f32>;        // (T, NH*HS) after RoPE
@group(0) @binding(2) var<storage, read> k: array<f32>;        // (T, NKV*HS) after RoPE
@group(0) @binding(3) var<storage, read> v: array<f32>;        // (T, NKV*HS)
@group(0) @binding(4) var<storage, read> dout: array<f32>;     // (T, NH*HS)
@group(0) @binding(5) var<storage, read> stats: array<f32>;    // (NH, T, 3) from pass 1
@group(0) @binding(6) var<storage, read_write> dk: array<f32>; // (T, NKV*HS)
@group(0) @binding(7) var<storage, read_write> dv: array<f32>; // (T, NKV*HS)

var<workgroup> ks: array<f32, HS>;     // k_j of kv-head g
var<workgroup> vs: array<f32, HS>;     // v_j of kv-head g
var<workgroup> dk_acc: array<f32, HS>; // each d owned by invocation d % WG
var<workgroup> dv_acc: array<f32, HS>;
var<workgroup> pb: array<f32, WG>;     // P_ij of the block's rows
var<workgroup> dsb: array<f32, WG>;    // P_ij (dP_ij - D_i) / sqrt(HS)

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wid.x;
    let g = wid.y;
    let t = dims.t;
    let scale = 1.0 / sqrt(f32(HS));
    let kb = j * KW + g * HS;
    for (var d = lid; d < HS; d += WG) {
        ks[d] = k[kb + d];
        vs[d] = v[kb + d];
        dk_acc[d] = 0.0;
        dv_acc[d] = 0.0;
    }
    workgroupBarrier();
    for (var hh = 0u; hh < GROUP; hh++) {
        let h = g * GROUP + hh;
        for (var i0 = j; i0 < t; i0 += WG) {
            let i = i0 + lid;
            var p = 0.0;
            var ds = 0.0;
            if i < t {
                let qb = i * QW + h * HS;
                var s = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < HS; d++) {
                    s += q[qb + d] * ks[d];
                    dp += dout[qb + d] * vs[d];
                }
                let sbase = (h * t + i) * 3u;
                p = exp(s * scale - stats[sbase]) / stats[sbase + 1u];
                ds = p * (dp - stats[sbase + 2u]) * scale;
            }
            pb[lid] = p;
            dsb[lid] = ds;
            workgroupBarrier();
            let n = min(WG, t - i0);
            for (var d = lid; d < HS; d += WG) {
                var av = dv_acc[d];
                var ak = dk_acc[d];
                for (var ii = 0u; ii < n; ii++) {
                    let qb = (i0 + ii) * QW + h * HS;
                    av += pb[ii] * dout[qb + d];
                    ak += dsb[ii] * q[qb + d];
                }
                dv_acc[d] = av;
                dk_acc[d] = ak;
            }
            workgroupBarrier();
        }
    }
    for (var d = lid; d < HS; d += WG) {
        dk[kb + d] = dk_acc[d];
        dv[kb + d] = dv_acc[d];
    }
}
