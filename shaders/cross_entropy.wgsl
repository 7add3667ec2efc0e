// Cross-entropy forward and backward over the vocabulary, one row of logits per workgroup,
// as bitlora_core::train::forward_backward computes it row by row:
//   lse = max + log(sum_v exp(l_v - max)),  loss = lse - l_y,
//   dlogits_v = (exp(l_v - lse) - [v == y]) * weight    (weight = grad_scale / counted),
//   0 where its magnitude is below FLUSH (the softmax's far tail, subnormal on the CPU).
// The logits are overwritten with dlogits in place, so a (T, V) buffer is the only O(T*V)
// memory; a caller with a large vocabulary runs the head and this kernel on windows of rows.
// The T rows of logits may be a window of a longer sequence: their targets and losses are rows
// row0 .. row0+T of those buffers.
// A row whose target is MASKED (0xffffffff: not counted) gets loss 0 and dlogits 0.
// Each invocation walks the row with stride WG; max and sum are tree reductions in workgroup
// memory (a different summation order from the CPU's serial sum: compare with
// KERNEL_TRANSCENDENTAL).
// Dispatch (T, 1, 1).

override V: u32;        // vocabulary
override WG: u32 = 64u; // workgroup size, a power of two
const MASKED: u32 = 0xffffffffu;
const FLUSH: f32 = 1e-30; // dlogits smaller in magnitude are 0 (train.rs LOGIT_GRAD_FLUSH)

struct Dims {
    weight: f32, // grad_scale / counted targets
    row0: u32,   // the window's first row in targets and loss
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>; // (T, V) in: logits, out: dlogits
@group(0) @binding(2) var<storage, read> targets: array<u32>;      // (R) target id or MASKED, R >= row0 + T
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;   // (R) per-row loss

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * V;
    let y = targets[dims.row0 + wid.x];
    let counted = y < V;
    var target_logit = 0.0;
    if lid == 0u && counted {
        target_logit = logits[base + y];
    }
    var m = -3.402823e38;
    for (var c = lid; c < V; c += WG) {
        m = max(m, logits[base + c]);
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
    workgroupBarrier();
    var sum = 0.0;
    for (var c = lid; c < V; c += WG) {
        sum += exp(logits[base + c] - mx);
    }
    red[lid] = sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let lse = mx + log(red[0]);
    for (var c = lid; c < V; c += WG) {
        var g = exp(logits[base + c] - lse);
        if c == y {
            g -= 1.0;
        }
        if counted {
            // bitlora_core::train::LOGIT_GRAD_FLUSH: the far tail of the softmax to zero.
            let d = g * dims.weight;
            logits[base + c] = select(d, 0.0, abs(d) < FLUSH);
        } else {
            logits[base + c] = 0.0;
        }
    }
    if lid == 0u {
        if counted {
            loss[dims.row0 + wid.x] = lse - target_logit;
        } else {
            loss[dims.row0 + wid.x] = 0.0;
        }
    }
}
