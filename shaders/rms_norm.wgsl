// RMSNorm over each row of x, as transformers' BitNetRMSNorm:
//   y = w * (x * inv),  inv = 1 / sqrt(mean(x^2) + EPS)
// One workgroup per row; dispatch (T, 1, 1).
//
// The sum of squares is accumulated by one invocation in index order, the same order as the
// CPU reference (crates/core/src/ops.rs rms_norm). RMSNorm feeds the int8 activation
// quantizer, whose rounding is discontinuous: matching the reference's summation order keeps
// GPU and CPU on the same side of a rounding boundary (a parallel tree sum would flip an int8
// code now and then). The serial pass reads C floats per row, negligible next to the matmul
// that consumes the row.

override C: u32;        // row width
override EPS: f32;      // rms_norm_eps
override WG: u32 = 64u; // workgroup size

@group(0) @binding(0) var<storage, read> x: array<f32>;       // (T, C)
@group(0) @binding(1) var<storage, read> w: array<f32>;       // (C)
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // (T, C)

var<workgroup> inv_rms: f32;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    if lid == 0u {
        var ss = 0.0;
        for (var c = 0u; c < C; c++) {
            let v = x[base + c];
            ss += v * v;
        }
        inv_rms = 1.0 / sqrt(ss / f32(C) + EPS);
    }
    workgroupBarrier();
    let inv = inv_rms;
    for (var c = lid; c < C; c += WG) {
        y[base + c] = w[c] * (x[base + c] * inv);
    }
}
