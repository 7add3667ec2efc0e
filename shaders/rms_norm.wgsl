// RMSNorm over each row of x, as transformers' BitNetRMSNorm:
//   y = w * (x * inv),  inv = 1 / sqrt(mean(x^2) + EPS)
// One workgroup per row; dispatch (T, 1, 1).
//
// The sum of squares is accumulated by one invocation in index order, the same order as the
// CPU reference (crates/core/src/ops.rs rms_norm). RMSNorm feeds the int8 activation
// quantizer, whose rounding is discontinuous: matching the reference's summation order keeps
// GPU and CPU on the same side of a rounding boundary (a parallel tree sum would flip an int8
// code now and then). The serial pass reads C floats per row, negligible next to the matmul
// that consumes the row. To keep that serial pass short on GPUs, the row goes a chunk of CH
// values at a time: all invocations square their values into workgroup memory in parallel
// (x*x rounded alone, as on the CPU, which never fuses the multiply into the add), four
// consecutive values to a vec4, then invocation 0 adds the chunk in index order, a vec4 load
// and four dependent adds at a time (one load per value, as first written, left the add chain
// waiting on workgroup-memory latency: ~60 us per 768-wide norm on an H100). The last chunk
// is padded with zeros to a whole vec4; they leave a sum of squares unchanged. Same terms, same order: the
// same bits as the reference.

override C: u32;        // row width
override EPS: f32;      // rms_norm_eps
override WG: u32 = 64u; // workgroup size

@group(0) @binding(0) var<storage, read> x: array<f32>;       // (T, C)
@group(0) @binding(1) var<storage, read> w: array<f32>;       // (C)
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // (T, C)

const CH4: u32 = 256u; // vec4s per chunk of the serial sum (1,024 values, 4 KiB)

var<workgroup> inv_rms: f32;
var<workgroup> sq: array<vec4<f32>, CH4>; // x*x of one chunk, values 4k .. 4k+3 in sq[k]

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    var ss = 0.0;
    for (var c0 = 0u; c0 < C; c0 += 4u * CH4) {
        let n4 = min(CH4, (C - c0 + 3u) / 4u); // vec4s in this chunk
        for (var k = lid; k < n4; k += WG) {
            let c = c0 + 4u * k;
            var v = vec4<f32>();
            if c + 3u < C {
                v = vec4<f32>(x[base + c], x[base + c + 1u], x[base + c + 2u], x[base + c + 3u]);
            } else {
                for (var j = 0u; j < 4u; j++) {
                    if c + j < C {
                        v[j] = x[base + c + j];
                    }
                }
            }
            sq[k] = v * v;
        }
        workgroupBarrier();
        if lid == 0u {
            for (var k = 0u; k < n4; k++) {
                let q = sq[k];
                ss += q.x;
                ss += q.y;
                ss += q.z;
                ss += q.w;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        inv_rms = 1.0 / sqrt(ss / f32(C) + EPS);
    }
    workgroupBarrier();
    let inv = inv_rms;
    for (var c = lid; c < C; c += WG) {
        y[base + c] = w[c] * (x[base + c] * inv);
    }
}
