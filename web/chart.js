// @ts-check
// The live loss chart of the training panel: train and validation loss against the step, drawn
// as SVG (no dependencies), with a text summary for screen readers and anyone who prefers numbers.
//
//   const chart = new LossChart(container, { summary: pElement });
//   chart.setTotalSteps(200);
//   chart.add('train', step, loss);      // every step
//   chart.add('val', step, valLoss);     // every evaluation
//   chart.clear();
//
// Why SVG and not canvas: the lines stay sharp at any zoom and on high-DPI phones, the axes'
// text is real text, colours come from the stylesheet (dark mode for free), and the CSP needs no
// exception (presentation attributes and CSS classes, never a style attribute). The chart is
// redrawn at the container's real width (a ResizeObserver), so text is never squashed; redraws
// are coalesced into one per animation frame, so a fast run costs the page a few ms a frame at
// most however many steps arrive.
//
// The training loss of single steps is noisy, so it is drawn twice: the raw values thin and
// faint, and an exponential moving average (the same smoothing TensorBoard applies, with its
// bias correction so the first points are not pulled towards 0) bold. Validation loss is drawn
// as a line with a dot per evaluation.

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Drawn series and their labels (the legend and the summary use the same words). */
export const SERIES = {
  train: 'training loss',
  val: 'validation loss',
};

/** Smoothing of the training-loss line: weight of the previous average (0 = none). */
export const SMOOTHING = 0.8;

/**
 * "Nice" axis ticks covering [lo, hi]: at most about `count` values on multiples of 1, 2 or 5
 * times a power of ten. Returns { ticks, lo, hi } with the range widened to whole ticks.
 */
export function niceTicks(lo, hi, count = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return { ticks: [], lo: 0, hi: 1 };
  if (hi < lo) [lo, hi] = [hi, lo];
  if (hi - lo < 1e-9) {
    // A flat line: give it some room so it sits in the middle.
    const pad = Math.max(Math.abs(lo) * 0.05, 0.05);
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / Math.max(count, 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const first = Math.floor(lo / step + 1e-9) * step;
  const last = Math.ceil(hi / step - 1e-9) * step;
  const ticks = [];
  for (let v = first; v <= last + step * 1e-6; v += step) ticks.push(Number(v.toPrecision(12)));
  return { ticks, lo: first, hi: last };
}

/** Debiased exponential moving average of `values` (TensorBoard's smoothing). */
export function smooth(values, weight = SMOOTHING) {
  const out = [];
  let avg = 0;
  let n = 0;
  for (const v of values) {
    n++;
    avg = avg * weight + (1 - weight) * v;
    out.push(weight === 0 ? v : avg / (1 - weight ** n));
  }
  return out;
}

/** A loss formatted for people: 3 significant digits. */
export const fmtLoss = (x) => (Number.isFinite(x) ? (x >= 100 ? x.toFixed(0) : x.toPrecision(3)) : String(x));

/** Axis label of a tick value: no trailing zeros, thousands as "k". */
function fmtTick(v, isStep) {
  if (isStep && v >= 10_000) return `${Number((v / 1000).toPrecision(3))}k`;
  return String(Number(v.toPrecision(4)));
}

/**
 * The one-paragraph summary of a run's losses, e.g. "Step 40 of 100. Training loss 3.21
 * (smoothed; 5.10 at the start). Validation loss 3.50 at step 40 (best 3.45 at step 30; 5.12 at
 * the start)." `points` = { train: [[step, loss]...], val: [...] }.
 */
export function describe(points, totalSteps = null) {
  const { train, val } = points;
  if (!train.length && !val.length) return 'No losses yet: the chart fills in as training runs.';
  const parts = [];
  const lastStep = Math.max(train.at(-1)?.[0] ?? 0, val.at(-1)?.[0] ?? 0);
  parts.push(totalSteps ? `Step ${lastStep} of ${totalSteps}.` : `Step ${lastStep}.`);
  if (train.length) {
    const sm = smooth(train.map((p) => p[1]));
    const first = train[0][1];
    parts.push(`Training loss ${fmtLoss(sm.at(-1))}${train.length > 1 ? ' (smoothed)' : ''}` +
      (train.length > 1 ? `, ${fmtLoss(first)} at step ${train[0][0]}` : '') + trend(first, sm.at(-1)) + '.');
  }
  if (val.length) {
    const last = val.at(-1);
    const best = val.reduce((a, b) => (b[1] < a[1] ? b : a));
    let s = `Validation loss ${fmtLoss(last[1])} at step ${last[0]}`;
    if (val.length > 1) {
      s += ` (${fmtLoss(val[0][1])} at step ${val[0][0]}`;
      if (best !== last) s += `; best ${fmtLoss(best[1])} at step ${best[0]}`;
      s += ')';
    }
    parts.push(s + '.');
  }
  return parts.join(' ');
}

function trend(first, now) {
  if (!(first > 0) || !Number.isFinite(now)) return '';
  const pct = ((now - first) / first) * 100;
  if (Math.abs(pct) < 0.5) return ', about the same';
  return pct < 0 ? `, down ${Math.abs(pct).toFixed(0)}%` : `, up ${pct.toFixed(0)}%`;
}

/**
 * Points of the two series: [step, loss] pairs.
 * @typedef {{ train: [number, number][], val: [number, number][] }} Points
 */

/** The chart. `container` receives the SVG; `summary` (optional) the text summary. */
export class LossChart {
  /**
   * @param {HTMLElement} container
   * @param {{ summary?: HTMLElement | null, height?: number | null }} [options]
   */
  constructor(container, { summary = null, height = null } = {}) {
    this.container = container;
    this.summaryEl = summary;
    this.fixedHeight = height;
    /** @type {Points} */
    this.points = { train: [], val: [] };
    this.totalSteps = null;
    this.frame = 0;
    this.svg = document.createElementNS(SVG_NS, 'svg');
    this.svg.setAttribute('class', 'loss-chart');
    this.svg.setAttribute('role', 'img');
    this.svg.setAttribute('aria-label', 'Loss chart');
    container.replaceChildren(this.svg);
    this.width = 0;
    if (typeof ResizeObserver !== 'undefined') {
      this.resizer = new ResizeObserver(() => this.schedule());
      this.resizer.observe(container);
    }
    this.draw();
  }

  /** Steps of the whole run: the x axis spans them from the start, so the line grows into it. */
  setTotalSteps(n) {
    this.totalSteps = Number.isFinite(n) && n > 0 ? n : null;
    this.schedule();
  }

  /** Adds a point; a step that comes again (a resumed run replaying it) replaces the old value. */
  add(series, step, value) {
    const list = this.points[series];
    if (!list) throw new Error(`LossChart: unknown series ${JSON.stringify(series)} (train or val)`);
    if (!Number.isFinite(step) || !Number.isFinite(value)) return;
    while (list.length && list.at(-1)[0] >= step) list.pop();
    list.push([step, value]);
    this.schedule();
  }

  /** Replaces all points, e.g. from a stored run's history: { train: [[step, loss]...], val }. */
  load(points) {
    this.points = { train: [...(points.train ?? [])], val: [...(points.val ?? [])] };
    this.schedule();
  }

  clear() {
    this.points = { train: [], val: [] };
    this.schedule();
  }

  /** The text summary of the chart (also the SVG's accessible name). */
  summary() {
    return describe(this.points, this.totalSteps);
  }

  schedule() {
    if (this.frame) return;
    const raf = globalThis.requestAnimationFrame ?? ((f) => setTimeout(f, 16));
    this.frame = raf(() => {
      this.frame = 0;
      this.draw();
    });
  }

  destroy() {
    this.resizer?.disconnect();
    this.svg.remove();
  }

  /** Draws now (tests call it to skip the frame wait). */
  draw() {
    const width = Math.max(200, Math.round(this.container.clientWidth || 600));
    // A phone gets a taller chart relative to its width, so the lines are not flattened.
    const height = this.fixedHeight ?? Math.round(Math.min(320, Math.max(180, width * 0.45)));
    const small = width < 480;
    const font = small ? 11 : 12;
    const m = { top: 10, right: small ? 10 : 16, bottom: font * 2 + 14, left: font * 3.2 + 8 };
    const w = width - m.left - m.right;
    const h = height - m.top - m.bottom;
    const svg = this.svg;
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    svg.setAttribute('width', String(width));
    svg.setAttribute('height', String(height));
    svg.replaceChildren();
    const summary = this.summary();
    svg.setAttribute('aria-label', `Loss chart. ${summary}`);
    if (this.summaryEl && this.summaryEl.textContent !== summary) this.summaryEl.textContent = summary;

    const { train, val } = this.points;
    const all = [...train, ...val];
    const maxStep = Math.max(this.totalSteps ?? 0, ...all.map((p) => p[0]), 1);
    const minStep = Math.min(0, ...all.map((p) => p[0]));
    const losses = all.map((p) => p[1]);
    const x = niceTicks(minStep, maxStep, small ? 4 : 6);
    const y = losses.length ? niceTicks(Math.min(...losses), Math.max(...losses), small ? 4 : 5) : niceTicks(0, 1, 4);
    // The x axis ends at the run's last step, not the next round tick.
    const xHi = Math.max(maxStep, 1);
    const sx = (s) => m.left + ((s - minStep) / Math.max(xHi - minStep, 1e-9)) * w;
    const sy = (v) => m.top + h - ((v - y.lo) / Math.max(y.hi - y.lo, 1e-9)) * h;
    const el = (name, attrs, text) => {
      const e = document.createElementNS(SVG_NS, name);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
      if (text != null) e.textContent = text;
      svg.append(e);
      return e;
    };

    // Grid and axes.
    for (const t of y.ticks) {
      el('line', { class: 'grid', x1: m.left, x2: m.left + w, y1: sy(t), y2: sy(t) });
      el('text', { class: 'tick', x: m.left - 6, y: sy(t), 'text-anchor': 'end', 'dominant-baseline': 'middle', 'font-size': font }, fmtTick(t, false));
    }
    const xTicks = x.ticks.filter((v) => v <= xHi + 1e-9);
    // The run's last step is always labelled (where it does not crowd the last round tick).
    if (xTicks.length && sx(xHi) - sx(xTicks.at(-1)) > font * 3) xTicks.push(xHi);
    for (const t of xTicks) {
      el('line', { class: 'grid', x1: sx(t), x2: sx(t), y1: m.top, y2: m.top + h });
      const anchor = t === xHi && t !== minStep ? 'end' : 'middle';
      el('text', { class: 'tick', x: sx(t), y: m.top + h + font + 4, 'text-anchor': anchor, 'font-size': font }, fmtTick(t, true));
    }
    el('rect', { class: 'frame', x: m.left, y: m.top, width: w, height: h, fill: 'none' });
    el('text', { class: 'axis-label', x: m.left + w / 2, y: height - 4, 'text-anchor': 'middle', 'font-size': font }, 'step');
    el('text', {
      class: 'axis-label', x: 0, y: 0, 'text-anchor': 'middle', 'font-size': font,
      transform: `translate(${font}, ${m.top + h / 2}) rotate(-90)`,
    }, 'loss');

    if (!all.length) {
      el('text', { class: 'empty', x: m.left + w / 2, y: m.top + h / 2, 'text-anchor': 'middle', 'dominant-baseline': 'middle', 'font-size': font + 1 }, 'The losses appear here during training');
      return;
    }
    const path = (pts) => pts.map(([s, v], i) => `${i ? 'L' : 'M'}${sx(s).toFixed(1)},${sy(v).toFixed(1)}`).join('');
    if (train.length) {
      el('path', { class: 'train-raw', d: path(train), fill: 'none' });
      const sm = smooth(train.map((p) => p[1]));
      el('path', { class: 'train', d: path(train.map((p, i) => [p[0], sm[i]])), fill: 'none' });
    }
    if (val.length) {
      el('path', { class: 'val', d: path(val), fill: 'none' });
      // Dots only while they stay apart; hundreds of evaluations make a line on their own.
      if (val.length <= 60) for (const [s, v] of val) el('circle', { class: 'val-dot', cx: sx(s), cy: sy(v), r: small ? 2.5 : 3 });
    }
  }
}
