// RMSNorm backward with a frozen weight (bitlora_core::train::rms_norm_backward):
//   r = 1 / sqrt(mean(x^2) + EPS),  dx = r * (w*dy - x * r^2 * mean(w*dy*x)).
// One workgroup per row; invocation 0 forms both row sums serially in index order (the CPU
// reference's order), then the row is written in parallel. With ACC = 1 dx is added into
// (the residual stream's gradient, `dh += rms_norm_backward(..)` in the CPU's backward).
// As in rms_norm.wgsl, the row goes a chunk of values at a time: all invocations form the
// terms x*x and (w*dy)*x (each rounded alone, as on the CPU) into workgroup memory, four
// consecutive values' terms to a pair of vec4s, then invocation 0 adds them in index order,
// one vec4 load per four dependent adds; the last vec4 is padded with zero terms. Same
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

const CH4: u32 = 256u; // vec4s per chunk of the serial sums (1,024 values, 8 KiB)

var<workgroup> stats: vec2<f32>; // (r, mean(w*dy*x))
var<workgroup> sq: array<vec4<f32>, CH4>;  // x*x of one chunk, values 4k .. 4k+3 in [k]
var<workgroup> wdyx: array<vec4<f32>, CH4>; // (w*dy)*x of the same values

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    var ss = 0.0;
    var wdx = 0.0;
    for (var c0 = 0u; c0 < C; c0 += 4u * CH4) {
        let n4 = min(CH4, (C - c0 + 3u) / 4u); // vec4s in this chunk
        for (var k = lid; k < n4; k += WG) {
            var v = vec4<f32>();
            var g = vec4<f32>(); // w*dy
            for (var j = 0u; j < 4u; j++) {
                let c = c0 + 4u * k + j;
                if c < C {
                    v[j] = x[base + c];
                    g[j] = w[c] * dy[base + c];
                }
            }
            sq[k] = v * v;
            wdyx[k] = g * v;
        }
        workgroupBarrier();
        if lid == 0u {
            for (var k = 0u; k < n4; k++) {
                let q = sq[k];
                let d = wdyx[k];
                ss += q.x;
                wdx += d.x;
                ss += q.y;
                wdx += d.y;
                ss += q.z;
                wdx += d.z;
                ss += q.w;
                wdx += d.w;
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
