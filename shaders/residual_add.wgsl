// The residual stream update h += b, elementwise over (T, C). Dispatch (ceil(C / WG), T, 1).

override C: u32;        // row width
override WG: u32 = 64u; // workgroup size

@group(0) @binding(0) var<storage, read_write> h: array<f32>; // (T, C)
@group(0) @binding(1) var<storage, read> b: array<f32>;       // (T, C)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if gid.x >= C {
        return;
    }
    let idx = gid.y * C + gid.x;
    h[idx] = h[idx] + b[idx];
}
