// Causal GQA attention backward, pass 2 of 2 (after attention_backward_q.wgsl, whose
// per-row statistics (max, sum, D) it reads): dk and dv, each kv-head's gradient summed over
// the NH/NKV query heads of its group (bitlora_core::train::attention_backward):
//   dv_j += P_ij do_i,  dk_j += P_ij (dP_ij - D_i) / sqrt(HS) q_i,  over heads h of the group
//   (ascending) and rows i >= j (ascending), the CPU reference's order.
// One invocation per (key row j, kv-head g): it owns dk[j, g] and dv[j, g], so no two
// invocations write the same element (WGSL has no float atomics).
// Dispatch (ceil(T / WG), NKV, 1).

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

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let g = gid.y;
    let t = dims.t;
    if j >= t {
        return;
    }
    let scale = 1.0 / sqrt(f32(HS));
    let kb = j * KW + g * HS;
    for (var d = 0u; d < HS; d++) {
        dk[kb + d] = 0.0;
        dv[kb + d] = 0.0;
    }
    for (var hh = 0u; hh < GROUP; hh++) {
        let h = g * GROUP + hh;
        for (var i = j; i < t; i++) {
            let qb = i * QW + h * HS;
            var s = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < HS; d++) {
                s += q[qb + d] * k[kb + d];
                dp += dout[qb + d] * v[kb + d];
            }
            let sbase = (h * t + i) * 3u;
            let p = exp(s * scale - stats[sbase]) / stats[sbase + 1u];
            let ds = p * (dp - stats[sbase + 2u]) * scale;
            for (var d = 0u; d < HS; d++) {
                dv[kb + d] += p * dout[qb + d];
                dk[kb + d] += ds * q[qb + d];
            }
        }
    }
}
