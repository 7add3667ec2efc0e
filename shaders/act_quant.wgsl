// Per-token absmax int8 activation quantization, as transformers' ActQuant:
//   s_a = 127 / max(max|x|, 1e-5),  x_q = clamp(round(x * s_a), -128, 127)
// WGSL's round() rounds half to even, like torch.round. The codes are packed four per u32,
// little-endian (code of column 4k + j in bits 8j..8j+7, two's complement), padding columns
// hold 0. One workgroup per row; dispatch (T, 1, 1). WG must be a power of two.

override C: u32;                     // row width
override WG: u32 = 64u;              // workgroup size, a power of two
override C4: u32 = (C + 3u) / 4u;    // packed words per row

@group(0) @binding(0) var<storage, read> x: array<f32>;           // (T, C)
@group(0) @binding(1) var<storage, read_write> xq: array<u32>;    // (T, ceil(C/4)) int8 x4
@group(0) @binding(2) var<storage, read_write> scale: array<f32>; // (T) s_a

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let base = t * C;

    // max|x| over the row: a max is exact, so the reduction order does not matter.
    var m = 0.0;
    for (var c = lid; c < C; c += WG) {
        m = max(m, abs(x[base + c]));
    }
    part[lid] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            part[lid] = max(part[lid], part[lid + s]);
        }
        workgroupBarrier();
    }
    let s_a = 127.0 / max(part[0], 1e-5);
    if lid == 0u {
        scale[t] = s_a;
    }

    for (var k = lid; k < C4; k += WG) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let c = 4u * k + j;
            if c < C {
                let q = i32(clamp(round(x[base + c] * s_a), -128.0, 127.0));
                word |= (bitcast<u32>(q) & 0xffu) << (8u * j);
            }
        }
        xq[t * C4 + k] = word;
    }
}
