// int8 weights per output channel, in the layout com.microsoft DynamicQuantizeMatMul takes:
//   B       int8  [K, N]  (the torch [N, K] weight transposed)
//   scales  float [N]     value = code · scale, code in [-127, 127] (symmetric: no zero point)

export interface Int8Columns {
  /** Output features. */
  n: number;
  /** Input features. */
  k: number;
  values: Int8Array;
  scales: Float32Array;
}

/** Quantises a torch-layout [n, k] float32 weight, each output channel on its own scale (its largest |w| ↦ 127). */
export function quantizeInt8Columns(weight: Float32Array, n: number, k: number): Int8Columns {
  if (weight.length !== n * k)
    throw new Error(`quantizeInt8Columns: weight has ${weight.length} values, [${n}, ${k}] needs ${n * k}`);
  const values = new Int8Array(k * n);
  const scales = new Float32Array(n);
  for (let row = 0; row < n; row++) {
    let absMax = 0;
    for (let i = 0; i < k; i++) absMax = Math.max(absMax, Math.abs(weight[row * k + i]));
    const scale = absMax / 127;
    const inv = scale > 0 ? 1 / scale : 0;
    for (let i = 0; i < k; i++)
      values[i * n + row] = Math.max(-127, Math.min(127, Math.round(weight[row * k + i] * inv)));
    scales[row] = scale;
  }
  return { n, k, values, scales };
}

/** The float values the codes stand for, back in torch layout [n, k]. */
export function dequantizeInt8Columns(w: Int8Columns): Float32Array {
  const out = new Float32Array(w.n * w.k);
  for (let row = 0; row < w.n; row++)
    for (let i = 0; i < w.k; i++) out[row * w.k + i] = w.values[i * w.n + row] * w.scales[row];
  return out;
}
