// `bitlora serve --port 0` from `dir` with binary `bin`, for the page benchmarks: resolves to
// { url, stop() } once the server prints its URL.
import { spawn } from 'node:child_process';

export function serve(dir, bin) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['serve', '--port', '0'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.on('error', reject);
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/at (http:\/\/127\.0\.0\.1:\d+\/)/);
      if (m) resolve({ url: m[1], stop: () => child.kill() });
    });
  });
}
