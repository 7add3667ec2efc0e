// Causal GQA attention backward, pass 1 of 2 (pass 2: attention_backward_kv.wgsl):
// dq, and each query row's softmax statistics for pass 2
// (bitlora_core::train::attention_backward). The probabilities are recomputed from q and k
// (nothing (NH, T, T) is stored):
//   s_j = (q_i . k_j) / sqrt(HS),  P_j = exp(s_j - max) / sum_j' exp(s_j' - max),  j <= i,
//   dP_j = do_i . v_j,  D = sum_j P_j dP_j,  dq_i = sum_j P_j (dP_j - D) / sqrt(HS) k_j.
// Query head h reads kv-head h / (NH/NKV). One invocation per (query row i, head h), every
// sum over j in ascending order as the CPU reference; stats[h, i] = (max, sum, D).
// Dispatch (ceil(T / WG), NH, 1).

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
@group(0) @binding(1) var<storage, read> q: array<f32>;           // (T, NH*HS) after RoPE
@group(0) @binding(2) var<storage, read> k: array<f32>;           // (T, NKV*HS) after RoPE
@group(0) @binding(3) var<storage, read> v: array<f32>;           // (T, NKV*HS)
@group(0) @binding(4) var<storage, read> dout: array<f32>;        // (T, NH*HS)
@group(0) @binding(5) var<storage, read_write> stats: array<f32>; // (NH, T, 3)
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;    // (T, NH*HS)

fn score(i: u32, j: u32, h: u32, g: u32, scale: f32) -> f32 {
    var a = 0.0;
    for (var d = 0u; d < HS; d++) {
        a += q[i * QW + h * HS + d] * k[j * KW + g * HS + d];
    }
    return a * scale;
}

fn dprob(i: u32, j: u32, h: u32, g: u32) -> f32 {
    var a = 0.0;
    for (var d = 0u; d < HS; d++) {
        a += dout[i * QW + h * HS + d] * v[j * KW + g * HS + d];
    }
    return a;
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let h = gid.y;
    if i >= dims.t {
        return;
    }
    let g = h / GROUP;
    let scale = 1.0 / sqrt(f32(HS));
    var mx = -3.402823e38;
    for (var j = 0u; j <= i; j++) {
        mx = max(mx, score(i, j, h, g, scale));
    }
    var den = 0.0;
    for (var j = 0u; j <= i; j++) {
        den += exp(score(i, j, h, g, scale) - mx);
    }
    var dsum = 0.0;
    for (var j = 0u; j <= i; j++) {
        let p = exp(score(i, j, h, g, scale) - mx) / den;
        dsum += p * dprob(i, j, h, g);
    }
    let sbase = (h * dims.t + i) * 3u;
    stats[sbase] = mx;
    stats[sbase + 1u] = den;
    stats[sbase + 2u] = dsum;
    let qb = i * QW + h * HS;
    for (var d = 0u; d < HS; d++) {
        dq[qb + d] = 0.0;
    }
    for (var j = 0u; j <= i; j++) {
        let p = exp(score(i, j, h, g, scale) - mx) / den;
        let ds = p * (dprob(i, j, h, g) - dsum) * scale;
        for (var d = 0u; d < HS; d++) {
            dq[qb + d] += ds * k[j * KW + g * HS + d];
        }
    }
}
