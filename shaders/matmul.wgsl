// Dense f32 y (T, O) = x (T, I) . W^T with W (O, I): the language-model head (tied: W is the
// embedding table). Classic shared-memory tiling, TILE x TILE outputs per workgroup; each
// invocation accumulates its output over k = 0, 1, ..., I-1 in order, the CPU reference's
// summation order (padding adds exact zeros). Dispatch (ceil(O / TILE), ceil(T / TILE), 1).

override I: u32;          // in features (C)
override O: u32;          // out features (V)
const TILE: u32 = 16u;

struct Dims {
    t: u32, // T, tokens
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;       // (T, I)
@group(0) @binding(2) var<storage, read> w: array<f32>;       // (O, I)
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // (T, O)

var<workgroup> xs: array<array<f32, TILE>, TILE>; // [token][k]
var<workgroup> ws: array<array<f32, TILE>, TILE>; // [out][k]

@compute @workgroup_size(TILE, TILE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let o0 = wid.x * TILE;
    let t0 = wid.y * TILE;
    let t_count = dims.t;
    var acc = 0.0;
    for (var k0 = 0u; k0 < I; k0 += TILE) {
        // lid.y picks the row, lid.x the k within the tile: consecutive invocations read
        // consecutive addresses.
        let kk = k0 + lid.x;
        let tr = t0 + lid.y;
        let orow = o0 + lid.y;
        var xv = 0.0;
        if tr < t_count && kk < I {
            xv = x[tr * I + kk];
        }
        var wv = 0.0;
        if orow < O && kk < I {
            wv = w[orow * I + kk];
        }
        xs[lid.y][lid.x] = xv;
        ws[lid.y][lid.x] = wv;
        workgroupBarrier();
        for (var j = 0u; j < TILE; j++) {
            acc += xs[lid.y][j] * ws[lid.x][j];
        }
        workgroupBarrier();
    }
    let t = t0 + lid.y;
    let o = o0 + lid.x;
    if t < t_count && o < O {
        y[t * O + o] = acc;
    }
}
