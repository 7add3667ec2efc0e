// The LoRA products with few outputs and a long sum, for GPUs (lora_matmul.wgsl's other form):
//   out (M, N) = alpha * a (M, K) . opB(b)      (ACC = 0)
//   out (M, N) += alpha * a (M, K) . opB(b)     (ACC = 1)
// opB(b)[k, n] = b[k, n] (TB = 0, b is (K, N)) or b[n, k] (TB = 1, b is (N, K)).
// Used for u = x A^T (N = R, K = I; TB = 1) and du = s dY B (N = R, K = O; TB = 0): with one
// invocation per output, a GPU would run T*R long serial loops (e.g. 1,024 loops of 3,072 terms
// for train-125m's down_proj). Here one workgroup owns one output: lane l sums the terms
// k = l, l + WG, ..., then a tree in workgroup memory adds the WG partial sums, then one
// multiplication by alpha. (A different summation order from the CPU's loop: KERNEL_F32.)
// The M output rows go to rows out_row0 .. out_row0+M of out.
// Dispatch (N, M, 1).

override TB: u32 = 0u;  // 1: b is stored transposed
override ACC: u32 = 0u; // 1: add into out
override WG: u32 = 64u; // workgroup size, a power of two

struct Dims {
    m: u32,
    n: u32,
    k: u32,
    alpha: f32,
    out_row0: u32, // first row of out written
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<f32>;         // (M, K)
@group(0) @binding(2) var<storage, read> b: array<f32>;         // (K, N) or (N, K)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (R, N), R >= out_row0 + M

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = wid.x;
    let m = wid.y;
    let K = dims.k;
    let N = dims.n;
    var acc = 0.0;
    for (var k = lid; k < K; k += WG) {
        var bv: f32;
        if TB == 1u {
            bv = b[n * K + k];
        } else {
            bv = b[k * N + n];
        }
        acc += a[m * K + k] * bv;
    }
    part[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            part[lid] += part[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        let r = dims.alpha * part[0];
        let idx = (dims.out_row0 + m) * N + n;
        if ACC == 1u {
            out[idx] += r;
        } else {
            out[idx] = r;
        }
    }
}
