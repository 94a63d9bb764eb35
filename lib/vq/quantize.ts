// The vector quantizer (EMU3.md §5.2): for each latent z, index = argmin_j |z|² + |e_j|² − 2·z·e_j, the first
// minimum on ties (as torch.argmin). Runs in JS over the [n, D] latents; distances in float64.

export class Codebook {
  /** |e_j|² per code. */
  private readonly norms: Float64Array;
  private readonly rows: Float64Array;

  constructor(
    /** E [size, dim], row-major. */
    readonly embedding: Float32Array,
    readonly size: number,
    readonly dim: number,
  ) {
    if (embedding.length !== size * dim) {
      throw new RangeError(`codebook: ${embedding.length} values but size ${size} × dim ${dim} needs ${size * dim}`);
    }
    this.rows = Float64Array.from(embedding);
    this.norms = new Float64Array(size);
    for (let j = 0; j < size; j++) {
      let s = 0;
      for (let d = 0; d < dim; d++) s += this.rows[j * dim + d] ** 2;
      this.norms[j] = s;
    }
  }

  /** Codes of n latent vectors given as [n, dim] row-major. */
  quantize(latents: Float32Array): Int32Array {
    const { dim } = this;
    if (latents.length % dim !== 0) {
      throw new RangeError(`quantize: ${latents.length} latent values is not a multiple of dim ${dim}`);
    }
    const n = latents.length / dim;
    const codes = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      codes[i] = dim === 4 ? this.nearest4(latents, i * 4) : this.nearest(latents, i * dim);
    }
    return codes;
  }

  /** The hot loop, unrolled for Emu3's embed_dim 4 (32,768 codes × every latent). */
  private nearest4(latents: Float32Array, at: number): number {
    const { size, rows, norms } = this;
    const z0 = latents[at];
    const z1 = latents[at + 1];
    const z2 = latents[at + 2];
    const z3 = latents[at + 3];
    const zz = z0 * z0 + z1 * z1 + z2 * z2 + z3 * z3;
    let best = 0;
    let bestDist = Number.POSITIVE_INFINITY;
    for (let j = 0, o = 0; j < size; j++, o += 4) {
      const dist = zz + norms[j] - 2 * (z0 * rows[o] + z1 * rows[o + 1] + z2 * rows[o + 2] + z3 * rows[o + 3]);
      if (dist < bestDist) {
        bestDist = dist;
        best = j;
      }
    }
    return best;
  }

  private nearest(latents: Float32Array, at: number): number {
    const { dim, size, rows, norms } = this;
    let zz = 0;
    for (let d = 0; d < dim; d++) zz += latents[at + d] * latents[at + d];
    let best = 0;
    let bestDist = Number.POSITIVE_INFINITY;
    for (let j = 0; j < size; j++) {
      let dot = 0;
      for (let d = 0; d < dim; d++) dot += latents[at + d] * rows[j * dim + d];
      const dist = zz + norms[j] - 2 * dot;
      if (dist < bestDist) {
        bestDist = dist;
        best = j;
      }
    }
    return best;
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
}
