// Backward of the gated activation f = act(gate) * up, elementwise over (T, F)
// (bitlora_core::train::gated_act_backward):
//   dgate = df * up * act'(gate),  dup = df * act(gate),
// ACT = 0: act = relu(g)^2, act' = 2 relu(g);  ACT = 1: act = g s, act' = s (1 + g (1 - s)),
// s = 1 / (1 + exp(-g)).
// Dispatch (ceil(F / WG), T, 1).

override F: u32;        // ffn width
override ACT: u32 = 0u; // 0 relu^2, 1 silu
override WG: u32 = 64u; // workgroup size

@group(0) @binding(0) var<storage, read> gate: array<f32>;       // (T, F)
@group(0) @binding(1) var<storage, read> up: array<f32>;         // (T, F)
@group(0) @binding(2) var<storage, read> df: array<f32>;         // (T, F)
@group(0) @binding(3) var<storage, read_write> dgate: array<f32>; // (T, F)
@group(0) @binding(4) var<storage, read_write> dup: array<f32>;   // (T, F)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if gid.x >= F {
        return;
    }
    let idx = gid.y * F + gid.x;
    let g = gate[idx];
    var a: f32;
    var da: f32;
    if ACT == 0u {
        let r = max(g, 0.0);
        a = r * r;
        da = 2.0 * r;
    } else {
        let s = 1.0 / (1.0 + exp(-g));
        a = g * s;
        da = s * (1.0 + g * (1.0 - s));
    }
    dgate[idx] = df[idx] * up[idx] * da;
    dup[idx] = df[idx] * a;
}
