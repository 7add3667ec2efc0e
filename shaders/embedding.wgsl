// Embedding gather: out[t, :] = table[tokens[t], :].
// Dispatch (ceil(C / WG), T, 1). Token ids are checked against V on the CPU before dispatch.

override C: u32;        // hidden size
override WG: u32 = 64u; // workgroup size

@group(0) @binding(0) var<storage, read> tokens: array<u32>;    // (T)
@group(0) @binding(1) var<storage, read> table: array<f32>;     // (V, C)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (T, C)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if c >= C {
        return;
    }
    out[t * C + c] = table[tokens[t] * C + c];
}
