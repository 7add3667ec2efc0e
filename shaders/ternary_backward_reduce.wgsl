// Second pass of ternary_backward.wgsl when it splits the packed rows across workgroups
// (PS > 0): dx = the sum of the S partial sums, added in split order, over s_w.
//   dx[t, i] (= or +=) (part[0, t, i] + part[1, t, i] + ... + part[S-1, t, i]) / s_w
// Dispatch (ceil(I / WG), T, 1).

override I: u32;        // in features
override ACC: u32 = 0u; // 1: dx += result
override WG: u32 = 64u; // workgroup size

struct Dims {
    t: u32,      // T
    splits: u32, // S
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> part: array<f32>;     // (S, T, I)
@group(0) @binding(2) var<storage, read> sw: array<f32>;       // (1) s_w
@group(0) @binding(3) var<storage, read_write> dx: array<f32>; // (T, I)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if i >= I || t >= dims.t {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < dims.splits; z++) {
        s += part[(z * dims.t + t) * I + i];
    }
    let r = s / sw[0];
    if ACC == 1u {
        dx[t * I + i] += r;
    } else {
        dx[t * I + i] = r;
    }
}
