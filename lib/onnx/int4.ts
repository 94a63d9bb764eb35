// 4-bit block quantisation in the layout of com.microsoft MatMulNBits (bits 4, block 32):
//   B           uint8 [N, blocks, 16]   two codes per byte, element 2j in the low nibble, 2j+1 in the high one
//   scales      float [N, blocks]
//   zero_points uint8 [N, ceil(blocks/2)]  (asymmetric only; packed like B; symmetric uses the implicit 8)
// value = (code - zero_point) * scale. K is padded with zeros up to a whole block.

export const INT4_BLOCK = 32;

export type Int4Scheme = 'symmetric' | 'asymmetric';

export interface Int4Weight {
  /** Output features (rows of the torch [out, in] weight). */
  n: number;
  /** Input features. */
  k: number;
  blocks: number;
  packed: Uint8Array;
  scales: Float32Array;
  zeroPoints: Uint8Array | null;
}

/** Quantises a torch-layout [n, k] float32 weight. */
export function quantizeInt4(weight: Float32Array, n: number, k: number, scheme: Int4Scheme): Int4Weight {
  if (weight.length !== n * k)
    throw new Error(`quantizeInt4: weight has ${weight.length} values, [${n}, ${k}] needs ${n * k}`);
  const blocks = Math.ceil(k / INT4_BLOCK);
  const packed = new Uint8Array(n * blocks * (INT4_BLOCK / 2));
  const scales = new Float32Array(n * blocks);
  const zpStride = Math.ceil(blocks / 2);
  const zeroPoints = scheme === 'asymmetric' ? new Uint8Array(n * zpStride) : null;
  const codes = new Uint8Array(INT4_BLOCK);
  for (let row = 0; row < n; row++) {
    for (let b = 0; b < blocks; b++) {
      const begin = row * k + b * INT4_BLOCK;
      const count = Math.min(INT4_BLOCK, k - b * INT4_BLOCK);
      let lo = 0;
      let hi = 0;
      let absMax = 0;
      for (let i = 0; i < count; i++) {
        const x = weight[begin + i];
        if (x < lo) lo = x;
        if (x > hi) hi = x;
        if (Math.abs(x) > absMax) absMax = Math.abs(x);
      }
      let scale: number;
      let zp: number;
      if (zeroPoints) {
        scale = (hi - lo) / 15;
        zp = scale > 0 ? Math.min(15, Math.max(0, Math.round(-lo / scale))) : 8;
      } else {
        scale = absMax / 7;
        zp = 8;
      }
      const inv = scale > 0 ? 1 / scale : 0;
      codes.fill(zp);
      for (let i = 0; i < count; i++) codes[i] = Math.min(15, Math.max(0, Math.round(weight[begin + i] * inv) + zp));
      const out = (row * blocks + b) * (INT4_BLOCK / 2);
      for (let j = 0; j < INT4_BLOCK / 2; j++) packed[out + j] = codes[2 * j] | (codes[2 * j + 1] << 4);
      scales[row * blocks + b] = scale;
      if (zeroPoints) zeroPoints[row * zpStride + (b >> 1)] |= b & 1 ? zp << 4 : zp;
    }
  }
  return { n, k, blocks, packed, scales, zeroPoints };
}

/** The float32 [n, k] weight that an Int4Weight stands for (for tests and error estimates). */
export function dequantizeInt4(w: Int4Weight): Float32Array {
  const out = new Float32Array(w.n * w.k);
  const zpStride = Math.ceil(w.blocks / 2);
  for (let row = 0; row < w.n; row++) {
    for (let b = 0; b < w.blocks; b++) {
      const zpByte = w.zeroPoints ? w.zeroPoints[row * zpStride + (b >> 1)] : 0x88;
      const zp = b & 1 ? zpByte >> 4 : zpByte & 15;
      const scale = w.scales[row * w.blocks + b];
      for (let i = 0; i < INT4_BLOCK && b * INT4_BLOCK + i < w.k; i++) {
        const byte = w.packed[(row * w.blocks + b) * (INT4_BLOCK / 2) + (i >> 1)];
        const code = i & 1 ? byte >> 4 : byte & 15;
        out[row * w.k + b * INT4_BLOCK + i] = (code - zp) * scale;
      }
    }
  }
  return out;
}
