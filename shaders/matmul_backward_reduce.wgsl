// Second pass of matmul_backward.wgsl when it splits O across workgroups: dx rows
// dx_row0 .. dx_row0+T = the sum of the S slabs of partial sums, added in slab order.
//   dx[dx_row0 + t, i] = sum_{z < S} part[z, t, i]
// Dispatch (ceil(I / WG), T, 1).

override I: u32;        // in features (C)
override WG: u32 = 64u; // workgroup size

struct Dims {
    t: u32,           // T
    dx_row0: u32,     // first row of dx written
    slabs: u32,       // S
    slab_stride: u32, // TP * I
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> part: array<f32>;     // (S, TP, I), TP >= T
@group(0) @binding(2) var<storage, read_write> dx: array<f32>; // (R, I), R >= dx_row0 + T

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if i >= I || t >= dims.t {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < dims.slabs; z++) {
        s += part[z * dims.slab_stride + t * I + i];
    }
    dx[(dims.dx_row0 + t) * I + i] = s;
}
