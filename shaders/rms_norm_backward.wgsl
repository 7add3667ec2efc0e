// RMSNorm backward with a frozen weight (bitlora_core::train::rms_norm_backward):
//   r = 1 / sqrt(mean(x^2) + EPS),  dx = r * (w*dy - x * r^2 * mean(w*dy*x)).
// One workgroup per row; invocation 0 forms both row sums serially in index order (the CPU
// reference's order), then the row is written in parallel. With ACC = 1 dx is added into
// (the residual stream's gradient, `dh += rms_norm_backward(..)` in the CPU's backward).
// As in rms_norm.wgsl, the row goes a chunk of CH values at a time: all invocations form the
// terms x*x and (w*dy)*x (each rounded alone, as on the CPU) into workgroup memory, then
// invocation 0 adds them in index order; the last chunk is padded with zero terms. Same
// terms, same order as the reference; the serial pass reads workgroup memory only.
// Dispatch (T, 1, 1).

override C: u32;        // row width
override EPS: f32;      // rms_norm_eps
override WG: u32 = 64u; // workgroup size
override ACC: u32 = 0u; // 1: dx += result

@group(0) @binding(0) var<storage, read> x: array<f32>;        // (T, C) the norm's input
@group(0) @binding(1) var<storage, read> w: array<f32>;        // (C)
@group(0) @binding(2) var<storage, read> dy: array<f32>;       // (T, C)
@group(0) @binding(3) var<storage, read_write> dx: array<f32>; // (T, C)

override CH: u32 = WG * 4u; // chunk of the serial sums

var<workgroup> stats: vec2<f32>; // (r, mean(w*dy*x))
var<workgroup> terms: array<vec2<f32>, CH>; // (x*x, w*dy*x) of one chunk

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    var ss = 0.0;
    var wdx = 0.0;
    for (var c0 = 0u; c0 < C; c0 += CH) {
        for (var cc = lid; cc < CH; cc += WG) {
            var tm = vec2<f32>(0.0, 0.0);
            let c = c0 + cc;
            if c < C {
                let v = x[base + c];
                tm = vec2<f32>(v * v, w[c] * dy[base + c] * v);
            }
            terms[cc] = tm;
        }
        workgroupBarrier();
        if lid == 0u {
            for (var cc = 0u; cc < CH; cc++) {
                ss += terms[cc].x;
                wdx += terms[cc].y;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        stats = vec2<f32>(1.0 / sqrt(ss / f32(C) + EPS), wdx / f32(C));
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
