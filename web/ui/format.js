// @ts-check
// Number and time formatting shared by the page's panels: one wording everywhere.

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Bytes for people: "812 B", "4.2 KiB", "8.3 MiB", "1.5 GiB". */
export function fmtBytes(n) {
  if (n == null || !Number.isFinite(n)) return 'an unknown amount';
  if (n < KiB) return `${n} B`;
  if (n < MiB) return `${(n / KiB).toFixed(1)} KiB`;
  if (n < GiB) return `${(n / MiB).toFixed(1)} MiB`;
  return `${(n / GiB).toFixed(1)} GiB`;
}

/** Seconds for people: "450 ms", "8.2 s", "42 s", "3 min 5 s", "1 h 4 min". */
export function fmtSeconds(s) {
  if (!Number.isFinite(s) || s < 0) return '…';
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** Whole numbers with thousands separators ("61,579"), in the page's language (English). */
export const fmtInt = (n) => (Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : String(n));

/** Parameter counts: "12.6 M", "295 k". */
export const fmtParams = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(1)} B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} M` : n >= 1e3 ? `${(n / 1e3).toFixed(0)} k` : String(n));

/** "1 run", "3 runs". */
export const plural = (n, one, many = `${one}s`) => `${fmtInt(n)} ${n === 1 ? one : many}`;

/** A date for lists: "24 Nov, 11:02" (this year) or "24 Nov 2024". */
export function fmtDate(ms) {
  const d = new Date(ms);
  if (Number.isNaN(d.getTime())) return '';
  const sameYear = d.getFullYear() === new Date().getFullYear();
  const day = d.toLocaleDateString('en-GB', sameYear ? { day: 'numeric', month: 'short' } : { day: 'numeric', month: 'short', year: 'numeric' });
  return sameYear ? `${day}, ${d.toLocaleTimeString('en-GB', { hour: '2-digit', minute: '2-digit' })}` : day;
}

/** A rate of tokens: "212 tokens/s", "8.5 tokens/s". */
export const fmtRate = (r) => `${r >= 100 ? r.toFixed(0) : r.toFixed(1)} tokens/s`;

/** Losses with 3 significant digits. */
export const fmtLoss = (x) => (Number.isFinite(x) ? (x >= 100 ? x.toFixed(0) : x.toPrecision(3)) : '–');

/** A learning rate as people write it: 0.002 -> "2e-3", 0.0005 -> "5e-4". */
export function fmtLr(x) {
  if (!Number.isFinite(x)) return String(x);
  if (x === 0) return '0';
  return x >= 0.01 ? String(x) : x.toExponential().replace(/\.?0*e/, 'e').replace('e-', 'e-');
}
