// A float64 reference of the Emu3 forward pass (docs/model.md, "Forward pass"), written straight from the equations for
// tests: embed → per layer [RMSNorm, q/k/v, rotate_half RoPE (theta from config), causal GQA, o, residual, RMSNorm,
// SwiGLU MLP, residual] → RMSNorm → lm_head. No KV cache: every call recomputes the whole sequence.
import { Checkpoint, tensorNames } from '../../lib/model/checkpoint.js';
import type { Emu3Config } from '../../lib/model/config.js';

interface LayerWeights {
  inputNorm: Float32Array;
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  o: Float32Array;
  postNorm: Float32Array;
  gate: Float32Array;
  up: Float32Array;
  down: Float32Array;
}

export class Emu3Reference {
  private constructor(
    readonly config: Emu3Config,
    private readonly embed: Float32Array,
    private readonly layers: LayerWeights[],
    private readonly norm: Float32Array,
    private readonly lmHead: Float32Array,
  ) {}

  /**
   * `linear` maps each linear layer's torch-layout [rows, cols] weight as read (e.g. to its int4-dequantised values,
   * so that the reference is the quantised model in float64).
   */
  static load(
    dir: string,
    opts: { linear?: (w: Float32Array, rows: number, cols: number) => Float32Array } = {},
  ): Emu3Reference {
    const ck = Checkpoint.open(dir);
    const map = opts.linear ?? ((w: Float32Array) => w);
    const readLinear = (name: string, rows: number, cols: number) => map(ck.readLinear(name, rows, cols), rows, cols);
    try {
      const c = ck.config;
      const D = c.hiddenSize;
      const qDim = c.numAttentionHeads * c.headDim;
      const kvDim = c.numKeyValueHeads * c.headDim;
      const layers: LayerWeights[] = [];
      for (let i = 0; i < c.numHiddenLayers; i++) {
        const n = tensorNames.layer(i);
        layers.push({
          inputNorm: ck.read(n.inputNorm, [D]),
          q: readLinear(n.q, qDim, D),
          k: readLinear(n.k, kvDim, D),
          v: readLinear(n.v, kvDim, D),
          o: readLinear(n.o, D, qDim),
          postNorm: ck.read(n.postNorm, [D]),
          gate: readLinear(n.gate, c.intermediateSize, D),
          up: readLinear(n.up, c.intermediateSize, D),
          down: readLinear(n.down, D, c.intermediateSize),
        });
      }
      return new Emu3Reference(
        c,
        ck.read(tensorNames.embed, [c.vocabSize, D]),
        layers,
        ck.read(tensorNames.norm, [D]),
        readLinear(tensorNames.lmHead, c.vocabSize, D),
      );
    } finally {
      ck.close();
    }
  }

  /** Hidden states after layers [0, upTo) for every position (before the final norm). */
  hidden(tokens: number[], upTo = this.config.numHiddenLayers): Float64Array[] {
    const c = this.config;
    const D = c.hiddenSize;
    let h: Float64Array[] = tokens.map((t) => Float64Array.from(this.embed.subarray(t * D, (t + 1) * D)));
    for (let l = 0; l < upTo; l++) {
      const w = this.layers[l];
      const a = h.map((x) => rmsnorm(x, w.inputNorm, c.rmsNormEps));
      const attn = this.attention(a, w);
      h = h.map((x, t) => add(x, matvec(w.o, attn[t], D)));
      const m = h.map((x) => rmsnorm(x, w.postNorm, c.rmsNormEps));
      h = h.map((x, t) => {
        const gate = matvec(w.gate, m[t], c.intermediateSize);
        const up = matvec(w.up, m[t], c.intermediateSize);
        const act = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]);
        return add(x, matvec(w.down, act, D));
      });
    }
    return h;
  }

  /** Logits of the last position. */
  logits(tokens: number[]): Float64Array {
    const h = this.hidden(tokens);
    const last = rmsnorm(h[h.length - 1], this.norm, this.config.rmsNormEps);
    return matvec(this.lmHead, last, this.config.vocabSize);
  }

  /** Greedy continuation, recomputing the whole sequence at every step. */
  greedy(prompt: number[], steps: number): number[] {
    const seq = [...prompt];
    const out: number[] = [];
    for (let s = 0; s < steps; s++) {
      const next = argmax(this.logits(seq));
      out.push(next);
      seq.push(next);
    }
    return out;
  }

  private attention(a: Float64Array[], w: LayerWeights): Float64Array[] {
    const c = this.config;
    const H = c.headDim;
    const groups = c.numAttentionHeads / c.numKeyValueHeads;
    const q = a.map((x, pos) => rope(matvec(w.q, x, c.numAttentionHeads * H), pos, H, c.ropeTheta));
    const k = a.map((x, pos) => rope(matvec(w.k, x, c.numKeyValueHeads * H), pos, H, c.ropeTheta));
    const v = a.map((x) => matvec(w.v, x, c.numKeyValueHeads * H));
    const scale = 1 / Math.sqrt(H);
    return q.map((qt, t) => {
      const out = new Float64Array(c.numAttentionHeads * H);
      for (let head = 0; head < c.numAttentionHeads; head++) {
        const kvHead = Math.floor(head / groups);
        const scores = new Float64Array(t + 1);
        for (let s = 0; s <= t; s++) {
          let dot = 0;
          for (let i = 0; i < H; i++) dot += qt[head * H + i] * k[s][kvHead * H + i];
          scores[s] = dot * scale;
        }
        const max = Math.max(...scores);
        let sum = 0;
        for (let s = 0; s <= t; s++) sum += scores[s] = Math.exp(scores[s] - max);
        for (let s = 0; s <= t; s++) {
          const p = scores[s] / sum;
          for (let i = 0; i < H; i++) out[head * H + i] += p * v[s][kvHead * H + i];
        }
      }
      return out;
    });
  }
}

export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

function rmsnorm(x: Float64Array, weight: Float32Array, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const r = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * r * weight[i]);
}

/** W [rows, x.length] (torch layout) times x. */
function matvec(w: Float32Array, x: Float64Array, rows: number): Float64Array {
  const n = x.length;
  const out = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    const base = r * n;
    for (let i = 0; i < n; i++) s += w[base + i] * x[i];
    out[r] = s;
  }
  return out;
}

function add(a: Float64Array, b: Float64Array): Float64Array {
  return a.map((v, i) => v + b[i]);
}

/** rotate_half RoPE on each head: x·cos + cat(−x[half:], x[:half])·sin, inv_freq[i] = theta^(−2i/H). */
function rope(x: Float64Array, pos: number, H: number, theta: number): Float64Array {
  const out = new Float64Array(x.length);
  const half = H / 2;
  for (let base = 0; base < x.length; base += H) {
    for (let i = 0; i < half; i++) {
      const ang = pos * theta ** ((-2 * i) / H);
      const cos = Math.cos(ang);
      const sin = Math.sin(ang);
      const x1 = x[base + i];
      const x2 = x[base + half + i];
      out[base + i] = x1 * cos - x2 * sin;
      out[base + half + i] = x2 * cos + x1 * sin;
    }
  }
  return out;
}
