// RMSNorm backward with a frozen weight (bitlora_core::train::rms_norm_backward):
//   r = 1 / sqrt(mean(x^2) + EPS),  dx = r * (w*dy - x * r^2 * mean(w*dy*x)).
// One workgroup per row; invocation 0 forms both row sums serially in index order (the CPU
// reference's order), then the row is written in parallel. With ACC = 1 dx is added into
// (the residual stream's gradient, `dh += rms_norm_backward(..)` in the CPU's backward).
// Dispatch (T, 1, 1).

override C: u32;        // row width
override EPS: f32;      // rms_norm_eps
override WG: u32 = 64u; // workgroup size
override ACC: u32 = 0u; // 1: dx += result

@group(0) @binding(0) var<storage, read> x: array<f32>;        // (T, C) the norm's input
@group(0) @binding(1) var<storage, read> w: array<f32>;        // (C)
@group(0) @binding(2) var<storage, read> dy: array<f32>;       // (T, C)
@group(0) @binding(3) var<storage, read_write> dx: array<f32>; // (T, C)

var<workgroup> stats: vec2<f32>; // (r, mean(w*dy*x))

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    if lid == 0u {
        var ss = 0.0;
        var dot = 0.0;
        for (var c = 0u; c < C; c++) {
            let v = x[base + c];
            ss += v * v;
            dot += w[c] * dy[base + c] * v;
        }
        stats = vec2<f32>(1.0 / sqrt(ss / f32(C) + EPS), dot / f32(C));
    }
    workgroupBarrier();
    let r = stats.x;
    let dot = stats.y;
    for (var c = lid; c < C; c += WG) {
        let g = r * (w[c] * dy[base + c] - x[base + c] * r * r * dot);
        if ACC == 1u {
            dx[base + c] += g;
        } else {
            dx[base + c] = g;
        }
    }
}
