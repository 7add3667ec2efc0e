// The small dense products of a LoRA adapter, forward and backward (bitlora_core::train
// linear_forward / linear_backward), as one kernel:
//   out (M, N) = alpha * opA(a) . opB(b)      (ACC = 0)
//   out (M, N) += alpha * opA(a) . opB(b)     (ACC = 1)
// opA(a)[m, k] = a[m, k] (TA = 0, a is (M, K)) or a[k, m] (TA = 1, a is (K, M));
// opB(b)[k, n] = b[k, n] (TB = 0, b is (K, N)) or b[n, k] (TB = 1, b is (N, K)).
// With x (T, I), A (R, I), B (O, R), dY (T, O), u (T, R), s the adapter scale:
//   u = x A^T (TB=1) ; y += s u B^T (TB=1, ACC) ; dB += s dY^T u (TA=1, ACC) ;
//   du = s dY B ; dA += du^T x (TA=1, ACC) ; dx += du A (ACC).
// The M output rows go to rows out_row0 .. out_row0+M of out (0 but for the k and v
// projections, which add into the KV cache after the tokens already there).
// One invocation per output element, the outputs numbered row-major (m * N + n) across the
// whole grid so that no invocation idles when N is small (N = R = 8 for dB: a workgroup per
// row would leave 56 of 64 invocations without work). The sum over k runs in ascending
// order, then one multiplication by alpha; its loads are issued four k at a time ahead of
// the four multiply-adds, which stay in order, so that the chain of adds does not wait on a
// load each step (the sum is a chain of T = 128 for dA and dB).
// Dispatch (G, ceil(ceil(M * N / WG) / G), 1) for any G <= the device's group limit.

override TA: u32 = 0u;  // 1: a is stored transposed
override TB: u32 = 0u;  // 1: b is stored transposed
override ACC: u32 = 0u; // 1: add into out
override WG: u32 = 64u; // workgroup size

struct Dims {
    m: u32,
    n: u32,
    k: u32,
    alpha: f32,
    out_row0: u32, // first row of out written
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<f32>;         // (M, K) or (K, M)
@group(0) @binding(2) var<storage, read> b: array<f32>;         // (K, N) or (N, K)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (R, N), R >= out_row0 + M

fn av(m: u32, k: u32) -> f32 {
    if TA == 1u {
        return a[k * dims.m + m];
    }
    return a[m * dims.k + k];
}

fn bv(k: u32, n: u32) -> f32 {
    if TB == 1u {
        return b[n * dims.k + k];
    }
    return b[k * dims.n + n];
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let M = dims.m;
    let N = dims.n;
    let K = dims.k;
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= M * N {
        return;
    }
    let m = idx / N;
    let n = idx % N;
    var acc = 0.0;
    var k = 0u;
    for (; k + 4u <= K; k += 4u) {
        let a0 = av(m, k);
        let a1 = av(m, k + 1u);
        let a2 = av(m, k + 2u);
        let a3 = av(m, k + 3u);
        let b0 = bv(k, n);
        let b1 = bv(k + 1u, n);
        let b2 = bv(k + 2u, n);
        let b3 = bv(k + 3u, n);
        acc += a0 * b0;
        acc += a1 * b1;
        acc += a2 * b2;
        acc += a3 * b3;
    }
    for (; k < K; k++) {
        acc += av(m, k) * bv(k, n);
    }
    let r = dims.alpha * acc;
    let idx_out = (dims.out_row0 + m) * N + n;
    if ACC == 1u {
        out[idx_out] += r;
    } else {
        out[idx_out] = r;
    }
}
