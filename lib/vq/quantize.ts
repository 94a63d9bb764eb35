// The vector quantizer (docs/model.md, "Blocks"): for each latent z, index = argmin_j |z|² + |e_j|² − 2·z·e_j, the
// first minimum on ties (as torch.argmin). Distances in float64.
//
// `quantize` searches a k-d tree over the codebook instead of scanning all 32,768 codes per latent: a latent visits
// a few hundred codes, ~50–100× less work than the scan, and the answer is bit-for-bit the scan's (`quantizeScan`,
// kept as the reference): a subtree is skipped only when its lower bound on |z − e|² exceeds the best distance so far
// by more than the rounding error of the |z|² + |e|² − 2·z·e formula, so every code that could equal or beat the best
// under that formula is evaluated, and equal distances keep the lowest index.
// (An in-graph MatMul + ArgMin was measured too: it materialises an [h·w, 32768] float distance matrix, 1.06 GB at
// 720×720 and 2.1 GB at 1024×1024, and is slower than this tree; see BENCHMARKS.md.)

/** Codes per k-d tree leaf. */
const LEAF_SIZE = 8;

export class Codebook {
  /** |e_j|² per code. */
  private readonly norms: Float64Array;
  private readonly rows: Float64Array;
  private readonly tree: KdTree;

  constructor(
    /** E [size, dim], row-major. */
    readonly embedding: Float32Array,
    readonly size: number,
    readonly dim: number,
  ) {
    if (!Number.isInteger(size) || size < 1 || !Number.isInteger(dim) || dim < 1) {
      throw new RangeError(`codebook: size ${size} and dim ${dim} must be integers >= 1`);
    }
    if (embedding.length !== size * dim) {
      throw new RangeError(`codebook: ${embedding.length} values but size ${size} × dim ${dim} needs ${size * dim}`);
    }
    this.rows = Float64Array.from(embedding);
    this.norms = new Float64Array(size);
    for (let j = 0; j < size; j++) this.norms[j] = squaredNorm(this.rows, j * dim, dim);
    this.tree = new KdTree(this.rows, this.norms, size, dim);
  }

  /** Codes of n latent vectors given as [n, dim] row-major (k-d tree search; equal to `quantizeScan`). */
  quantize(latents: Float32Array): Int32Array {
    const n = this.count(latents);
    const codes = new Int32Array(n);
    const z = new Float64Array(this.dim);
    for (let i = 0; i < n; i++) {
      for (let d = 0; d < this.dim; d++) z[d] = latents[i * this.dim + d];
      codes[i] = this.tree.nearest(z);
    }
    return codes;
  }

  /** The same codes by scanning every code per latent: the definition, kept as the reference for tests and bench. */
  quantizeScan(latents: Float32Array): Int32Array {
    const { dim, size, rows, norms } = this;
    const n = this.count(latents);
    const codes = new Int32Array(n);
    const z = new Float64Array(dim);
    for (let i = 0; i < n; i++) {
      for (let d = 0; d < dim; d++) z[d] = latents[i * dim + d];
      const zz = squaredNorm(z, 0, dim);
      let best = 0;
      let bestDist = Number.POSITIVE_INFINITY;
      for (let j = 0; j < size; j++) {
        const dist = zz + norms[j] - 2 * dot(z, rows, j * dim, dim);
        if (dist < bestDist) {
          bestDist = dist;
          best = j;
        }
      }
      codes[i] = best;
    }
    return codes;
  }

  /**
   * Codebook rows for a code grid, channels first: [dim, n] (the decoder's `quant` input for n = h·w).
   * Throws a RangeError naming the first code outside [0, size).
   */
  lookupChannelsFirst(codes: Int32Array): Float32Array {
    const { dim, size } = this;
    const n = codes.length;
    const out = new Float32Array(dim * n);
    for (let i = 0; i < n; i++) {
      const c = codes[i];
      if (!(c >= 0 && c < size))
        throw new RangeError(`code ${c} at position ${i} is outside the codebook [0, ${size})`);
      for (let d = 0; d < dim; d++) out[d * n + i] = this.embedding[c * dim + d];
    }
    return out;
  }

  private count(latents: Float32Array): number {
    if (latents.length % this.dim !== 0) {
      throw new RangeError(`quantize: ${latents.length} latent values is not a multiple of dim ${this.dim}`);
    }
    return latents.length / this.dim;
  }
}

// Both searches evaluate distances with exactly these two helpers, in the same summation order, so they agree to
// the bit on every distance and therefore on every argmin.
function squaredNorm(v: Float64Array, at: number, dim: number): number {
  let s = 0;
  for (let d = 0; d < dim; d++) s += v[at + d] * v[at + d];
  return s;
}

function dot(z: Float64Array, rows: Float64Array, at: number, dim: number): number {
  let s = 0;
  for (let d = 0; d < dim; d++) s += z[d] * rows[at + d];
  return s;
}

/** A k-d tree over the codebook: median splits on the widest dimension, codes stored leaf by leaf. */
class KdTree {
  /** Per node: split dimension, or −1 for a leaf. */
  private readonly splitDim: Int32Array;
  private readonly splitValue: Float64Array;
  /** Per node: children (inner nodes) or the [begin, end) range of codes in leaf order (leaves). */
  private readonly left: Int32Array;
  private readonly right: Int32Array;
  /** Codes in leaf order: original index, row and |e|². */
  private readonly order: Int32Array;
  private readonly rows: Float64Array;
  private readonly norms: Float64Array;
  private readonly maxNorm: number;
  private nodes = 0;
  // Query state, reused across queries.
  private readonly offsets: Float64Array;
  private z: Float64Array;
  private zz = 0;
  private best = 0;
  private bestDist = 0;
  private slack = 0;

  constructor(
    rows: Float64Array,
    norms: Float64Array,
    private readonly size: number,
    private readonly dim: number,
  ) {
    const maxNodes = 2 * Math.ceil(size / LEAF_SIZE) * 2 + 1;
    this.splitDim = new Int32Array(maxNodes);
    this.splitValue = new Float64Array(maxNodes);
    this.left = new Int32Array(maxNodes);
    this.right = new Int32Array(maxNodes);
    this.order = new Int32Array(size).map((_, j) => j);
    this.build(rows, 0, size);
    this.rows = new Float64Array(size * dim);
    this.norms = new Float64Array(size);
    let maxNorm = 0;
    for (let k = 0; k < size; k++) {
      const j = this.order[k];
      this.rows.set(rows.subarray(j * dim, (j + 1) * dim), k * dim);
      this.norms[k] = norms[j];
      maxNorm = Math.max(maxNorm, norms[j]);
    }
    this.maxNorm = maxNorm;
    this.offsets = new Float64Array(dim);
    this.z = new Float64Array(dim);
  }

  /** Index of the code nearest to z (first index on ties), as the scan would pick it. */
  nearest(z: Float64Array): number {
    this.z = z;
    this.zz = squaredNorm(z, 0, this.dim);
    this.best = this.size;
    this.bestDist = Number.POSITIVE_INFINITY;
    // Far above the formula's rounding error (a few ulps of |z|² + |e|² ≤ zz + maxNorm, doubled for the bound's own
    // rounding), far below any distance gap that matters: skipping less than possible costs only a little time.
    this.slack = 1e-9 * (1 + this.zz + this.maxNorm);
    this.offsets.fill(0);
    this.search(0, 0);
    // Only NaN latents leave no code chosen; the scan answers 0 for them.
    return this.best === this.size ? 0 : this.best;
  }

  /** `bound` = squared distance from z to the node's cell along the dimensions split so far (a lower bound). */
  private search(node: number, bound: number): void {
    const d = this.splitDim[node];
    if (d < 0) {
      const { z, zz, dim, rows, norms, order } = this;
      for (let k = this.left[node], end = this.right[node]; k < end; k++) {
        const dist = zz + norms[k] - 2 * dot(z, rows, k * dim, dim);
        const j = order[k];
        if (dist < this.bestDist || (dist === this.bestDist && j < this.best)) {
          this.bestDist = dist;
          this.best = j;
        }
      }
      return;
    }
    const diff = this.z[d] - this.splitValue[node];
    const near = diff <= 0 ? this.left[node] : this.right[node];
    const far = diff <= 0 ? this.right[node] : this.left[node];
    this.search(near, bound);
    const old = this.offsets[d];
    const farBound = bound - old * old + diff * diff;
    if (farBound > this.bestDist + this.slack) return;
    this.offsets[d] = diff;
    this.search(far, farBound);
    this.offsets[d] = old;
  }

  /** Builds the subtree over order[begin, end); returns its node index. Left codes ≤ split value ≤ right codes. */
  private build(rows: Float64Array, begin: number, end: number): number {
    const node = this.nodes++;
    const { dim, order } = this;
    if (end - begin <= LEAF_SIZE) {
      this.splitDim[node] = -1;
      this.left[node] = begin;
      this.right[node] = end;
      return node;
    }
    let widest = 0;
    let widestSpread = -1;
    for (let d = 0; d < dim; d++) {
      let lo = Number.POSITIVE_INFINITY;
      let hi = Number.NEGATIVE_INFINITY;
      for (let k = begin; k < end; k++) {
        const v = rows[order[k] * dim + d];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      if (hi - lo > widestSpread) {
        widestSpread = hi - lo;
        widest = d;
      }
    }
    order.subarray(begin, end).sort((a, b) => rows[a * dim + widest] - rows[b * dim + widest]);
    const mid = (begin + end) >> 1;
    this.splitDim[node] = widest;
    this.splitValue[node] = rows[order[mid] * dim + widest];
    this.left[node] = this.build(rows, begin, mid);
    this.right[node] = this.build(rows, mid, end);
    return node;
  }
}
