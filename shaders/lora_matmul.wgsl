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
// One invocation per output element; the sum over k runs in ascending order, then one
// multiplication by alpha.
// Dispatch (ceil(N / WG), M, 1).

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

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    let m = gid.y;
    let M = dims.m;
    let N = dims.n;
    let K = dims.k;
    if n >= N || m >= M {
        return;
    }
    var acc = 0.0;
    for (var k = 0u; k < K; k++) {
        var av: f32;
        var bv: f32;
        if TA == 1u {
            av = a[k * M + m];
        } else {
            av = a[m * K + k];
        }
        if TB == 1u {
            bv = b[n * K + k];
        } else {
            bv = b[k * N + n];
        }
        acc += av * bv;
    }
    let r = dims.alpha * acc;
    let idx = (dims.out_row0 + m) * N + n;
    if ACC == 1u {
        out[idx] += r;
    } else {
        out[idx] = r;
    }
}
