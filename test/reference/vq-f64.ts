// Float64 reference of the Emu3 VisionTokenizer, written straight from docs/model.md
// ("Blocks", "Encoder, quantizer, decoder"): the FULL network on 4 frames (the image repeated in time; 3-D causal
// convs over zero-padded volumes; BatchNorm3d from running stats; decoding all 4 frames and keeping frame 0).
// Deliberately naive and independent of lib/vq's graph code. Test-only.
import { join } from 'node:path';
import { SafetensorsFile } from '../../lib/model/safetensors.js';
import { loadVqConfig, type VqConfig } from '../../lib/vq/config.js';

/** A [C, H, W] tensor. */
export interface Img {
  c: number;
  h: number;
  w: number;
  d: Float64Array;
}

const img = (c: number, h: number, w: number): Img => ({ c, h, w, d: new Float64Array(c * h * w) });

export class VqReference {
  readonly cfg: VqConfig;
  private readonly file: SafetensorsFile;
  private readonly cache = new Map<string, Float64Array>();

  constructor(dir: string) {
    this.cfg = loadVqConfig(dir);
    this.file = SafetensorsFile.open(join(dir, 'model.safetensors'));
  }

  close(): void {
    this.file.close();
  }

  p(name: string): Float64Array {
    let v = this.cache.get(name);
    if (!v) {
      v = Float64Array.from(this.file.readF32(name));
      this.cache.set(name, v);
    }
    return v;
  }

  // ---- 2-D ops -------------------------------------------------------------------------------------------------

  conv2d(
    x: Img,
    prefix: string,
    cout: number,
    k: number,
    stride = 1,
    pad: [number, number, number, number] | null = null,
  ): Img {
    const wt = this.p(`${prefix}.weight`);
    const b = this.p(`${prefix}.bias`);
    const p = (k - 1) / 2;
    const [pt, pl, pb, pr] = pad ?? [p, p, p, p];
    const oh = Math.floor((x.h + pt + pb - k) / stride) + 1;
    const ow = Math.floor((x.w + pl + pr - k) / stride) + 1;
    const out = img(cout, oh, ow);
    const xd = x.d;
    for (let o = 0; o < cout; o++) {
      const od = out.d.subarray(o * oh * ow, (o + 1) * oh * ow);
      od.fill(b[o]);
      for (let i = 0; i < x.c; i++) {
        for (let ky = 0; ky < k; ky++) {
          for (let kx = 0; kx < k; kx++) {
            const wv = wt[((o * x.c + i) * k + ky) * k + kx];
            // Output columns whose source column lies inside the image (the rest read zero padding).
            const x0 = Math.max(0, Math.ceil((pl - kx) / stride));
            const x1 = Math.min(ow - 1, Math.floor((x.w - 1 + pl - kx) / stride));
            for (let y = 0; y < oh; y++) {
              const sy = y * stride + ky - pt;
              if (sy < 0 || sy >= x.h) continue;
              const src = (i * x.h + sy) * x.w + kx - pl;
              const dst = y * ow;
              if (stride === 1) for (let xx = x0; xx <= x1; xx++) od[dst + xx] += wv * xd[src + xx];
              else for (let xx = x0; xx <= x1; xx++) od[dst + xx] += wv * xd[src + xx * stride];
            }
          }
        }
      }
    }
    return out;
  }

  groupNorm(x: Img, prefix: string, groups = 32, eps = 1e-6): Img {
    const gamma = this.p(`${prefix}.weight`);
    const beta = this.p(`${prefix}.bias`);
    const out = img(x.c, x.h, x.w);
    const hw = x.h * x.w;
    const per = (x.c / groups) * hw;
    for (let g = 0; g < groups; g++) {
      const seg = x.d.subarray(g * per, (g + 1) * per);
      let mean = 0;
      for (const v of seg) mean += v;
      mean /= per;
      let variance = 0;
      for (const v of seg) variance += (v - mean) ** 2;
      variance /= per;
      const inv = 1 / Math.sqrt(variance + eps);
      for (let j = 0; j < per; j++) {
        const c = g * (x.c / groups) + Math.floor(j / hw);
        out.d[g * per + j] = (seg[j] - mean) * inv * gamma[c] + beta[c];
      }
    }
    return out;
  }

  silu(x: Img): Img {
    return { ...x, d: x.d.map((v) => v / (1 + Math.exp(-v))) };
  }

  add(a: Img, b: Img): Img {
    return { ...a, d: a.d.map((v, i) => v + b.d[i]) };
  }

  /** Nearest resize as torch F.interpolate(mode="nearest"): src = floor(dst · in / out). */
  nearest(x: Img, oh: number, ow: number): Img {
    const out = img(x.c, oh, ow);
    for (let c = 0; c < x.c; c++) {
      for (let y = 0; y < oh; y++) {
        const sy = Math.min(x.h - 1, Math.floor((y * x.h) / oh));
        for (let xx = 0; xx < ow; xx++) {
          const sx = Math.min(x.w - 1, Math.floor((xx * x.w) / ow));
          out.d[(c * oh + y) * ow + xx] = x.d[(c * x.h + sy) * x.w + sx];
        }
      }
    }
    return out;
  }

  spatialNorm(x: Img, prefix: string, zq: Img): Img {
    const z = this.nearest(zq, x.h, x.w);
    const n = this.groupNorm(x, `${prefix}.norm_layer`);
    const y = this.conv2d(z, `${prefix}.conv_y`, x.c, 1);
    const b = this.conv2d(z, `${prefix}.conv_b`, x.c, 1);
    return { ...n, d: n.d.map((v, i) => v * y.d[i] + b.d[i]) };
  }

  resnet(x: Img, prefix: string, cout: number, norm: (x: Img, prefix: string) => Img): Img {
    let h = this.silu(norm(x, `${prefix}.norm1`));
    h = this.conv2d(h, `${prefix}.conv1`, cout, 3);
    h = this.silu(norm(h, `${prefix}.norm2`));
    h = this.conv2d(h, `${prefix}.conv2`, cout, 3);
    const shortcut = x.c === cout ? x : this.conv2d(x, `${prefix}.nin_shortcut`, cout, 1);
    return this.add(shortcut, h);
  }

  attention(x: Img, prefix: string, norm: (x: Img, prefix: string) => Img): Img {
    const n = norm(x, `${prefix}.norm`);
    const q = this.conv2d(n, `${prefix}.q`, x.c, 1);
    const k = this.conv2d(n, `${prefix}.k`, x.c, 1);
    const v = this.conv2d(n, `${prefix}.v`, x.c, 1);
    const N = x.h * x.w;
    const C = x.c;
    const o = img(C, x.h, x.w);
    const row = new Float64Array(N);
    for (let i = 0; i < N; i++) {
      let max = Number.NEGATIVE_INFINITY;
      for (let j = 0; j < N; j++) {
        let s = 0;
        for (let c = 0; c < C; c++) s += q.d[c * N + i] * k.d[c * N + j];
        row[j] = s / Math.sqrt(C);
        max = Math.max(max, row[j]);
      }
      let sum = 0;
      for (let j = 0; j < N; j++) {
        row[j] = Math.exp(row[j] - max);
        sum += row[j];
      }
      for (let c = 0; c < C; c++) {
        let s = 0;
        for (let j = 0; j < N; j++) s += v.d[c * N + j] * row[j];
        o.d[c * N + i] = s / sum;
      }
    }
    return this.add(x, this.conv2d(o, `${prefix}.proj_out`, C, 1));
  }

  // ---- 3-D (temporal) ops on frame lists ------------------------------------------------------------------------

  /** CausalConv3d: zero-pad time (2 front, 0 back) and space ((k−s)//2 + (k−s)%2, (k−s)//2), then plain Conv3d. */
  causalConv3d(frames: Img[], prefix: string, kernel: [number, number, number], strideT: number): Img[] {
    const wt = this.p(`${prefix}.weight`);
    const b = this.p(`${prefix}.bias`);
    const [kt, kh, kw] = kernel;
    const { c: cin, h: H, w: W } = frames[0];
    const cout = b.length;
    const padded: (Img | null)[] = [null, null, ...frames];
    const ph = Math.floor((kh - 1) / 2) + ((kh - 1) % 2);
    const pw = Math.floor((kw - 1) / 2) + ((kw - 1) % 2);
    const T = Math.floor((padded.length - kt) / strideT) + 1;
    const out: Img[] = [];
    for (let t = 0; t < T; t++) {
      const o = img(cout, H, W);
      for (let oc = 0; oc < cout; oc++) {
        for (let y = 0; y < H; y++) {
          for (let x = 0; x < W; x++) {
            let s = b[oc];
            for (let ic = 0; ic < cin; ic++) {
              for (let dt = 0; dt < kt; dt++) {
                const f = padded[t * strideT + dt];
                if (!f) continue;
                for (let dy = 0; dy < kh; dy++) {
                  const sy = y + dy - ph;
                  if (sy < 0 || sy >= H) continue;
                  for (let dx = 0; dx < kw; dx++) {
                    const sx = x + dx - pw;
                    if (sx < 0 || sx >= W) continue;
                    s += wt[(((oc * cin + ic) * kt + dt) * kh + dy) * kw + dx] * f.d[(ic * H + sy) * W + sx];
                  }
                }
              }
            }
            o.d[(oc * H + y) * W + x] = s;
          }
        }
      }
      out.push(o);
    }
    return out;
  }

  batchNorm3d(x: Img, prefix: string, eps = 1e-5): Img {
    const w = this.p(`${prefix}.weight`);
    const b = this.p(`${prefix}.bias`);
    const mean = this.p(`${prefix}.running_mean`);
    const v = this.p(`${prefix}.running_var`);
    const hw = x.h * x.w;
    return {
      ...x,
      d: x.d.map((val, i) => {
        const c = Math.floor(i / hw);
        return ((val - mean[c]) / Math.sqrt(v[c] + eps)) * w[c] + b[c];
      }),
    };
  }

  temporalResnet(frames: Img[], prefix: string): Img[] {
    let h = frames.map((f) => this.silu(this.batchNorm3d(f, `${prefix}.norm1`)));
    h = this.causalConv3d(h, `${prefix}.conv1.conv`, [3, 3, 3], 1);
    h = h.map((f) => this.silu(this.batchNorm3d(f, `${prefix}.norm2`)));
    h = this.causalConv3d(h, `${prefix}.conv2.conv`, [3, 3, 3], 1);
    return frames.map((f, t) => this.add(f, h[t]));
  }

  // ---- the network ----------------------------------------------------------------------------------------------

  encoder2d(x: Img): Img {
    const cfg = this.cfg;
    const norm = (t: Img, p: string) => this.groupNorm(t, p);
    const levels = cfg.chMult.length;
    let h = this.conv2d(x, 'encoder.conv_in', cfg.ch, 3);
    for (let l = 0; l < levels; l++) {
      for (let i = 0; i < cfg.numResBlocks; i++) {
        h = this.resnet(h, `encoder.down.${l}.block.${i}`, cfg.ch * cfg.chMult[l], norm);
        if (cfg.attnResolutions.includes(l)) h = this.attention(h, `encoder.down.${l}.attn.${i}`, norm);
      }
      if (l !== levels - 1) h = this.conv2d(h, `encoder.down.${l}.downsample.conv`, h.c, 3, 2, [0, 0, 1, 1]);
    }
    h = this.resnet(h, 'encoder.mid.block_1', h.c, norm);
    h = this.attention(h, 'encoder.mid.attn_1', norm);
    h = this.resnet(h, 'encoder.mid.block_2', h.c, norm);
    h = this.silu(this.groupNorm(h, 'encoder.norm_out'));
    return this.conv2d(h, 'encoder.conv_out', cfg.zChannels, 3);
  }

  /** Latents [4, h, w] of one image [3, H, W]: the image repeated over 4 frames, the whole encoder, quant_conv. */
  encode(pixels: Img): Img {
    const cfg = this.cfg;
    let frames = Array.from({ length: cfg.temporalDownsampleFactor }, () => this.encoder2d(pixels));
    for (let s = 0; s < Math.log2(cfg.temporalDownsampleFactor); s++) {
      frames = this.causalConv3d(frames, `encoder.time_conv.${s}.conv.conv`, [4, 3, 3], 2).map((f) => this.silu(f));
    }
    for (let i = 0; i < cfg.numResBlocks; i++) frames = this.temporalResnet(frames, `encoder.time_res_stack.${i}`);
    frames = this.causalConv3d(frames, 'quant_conv.conv', [3, 1, 1], 1);
    if (frames.length !== 1) throw new Error(`reference encoder: ${frames.length} latent frames`);
    return frames[0];
  }

  /** Codes, plus each position's margin between the best and second-best squared distance. */
  quantize(latents: Img): { codes: Int32Array; margins: Float64Array } {
    const e = this.p('quantize.embedding.weight');
    const D = latents.c;
    const N = latents.h * latents.w;
    const K = e.length / D;
    const codes = new Int32Array(N);
    const margins = new Float64Array(N);
    for (let i = 0; i < N; i++) {
      let best = Number.POSITIVE_INFINITY;
      let second = Number.POSITIVE_INFINITY;
      let idx = -1;
      for (let j = 0; j < K; j++) {
        let d = 0;
        for (let c = 0; c < D; c++) d += (latents.d[c * N + i] - e[j * D + c]) ** 2;
        if (d < best) {
          second = best;
          best = d;
          idx = j;
        } else if (d < second) second = d;
      }
      codes[i] = idx;
      margins[i] = second - best;
    }
    return { codes, margins };
  }

  decoder2d(z: Img, zq: Img): Img {
    const cfg = this.cfg;
    const norm = (t: Img, p: string) => this.spatialNorm(t, p, zq);
    const levels = cfg.chMult.length;
    let h = this.conv2d(z, 'decoder.conv_in', cfg.ch * cfg.chMult[levels - 1], 3);
    h = this.resnet(h, 'decoder.mid.block_1', h.c, norm);
    h = this.attention(h, 'decoder.mid.attn_1', norm);
    h = this.resnet(h, 'decoder.mid.block_2', h.c, norm);
    for (let l = levels - 1; l >= 0; l--) {
      for (let i = 0; i <= cfg.numResBlocks; i++) {
        h = this.resnet(h, `decoder.up.${l}.block.${i}`, cfg.ch * cfg.chMult[l], norm);
        if (cfg.attnResolutions.includes(l)) h = this.attention(h, `decoder.up.${l}.attn.${i}`, norm);
      }
      if (l !== 0) h = this.conv2d(this.nearest(h, h.h * 2, h.w * 2), `decoder.up.${l}.upsample.conv`, h.c, 3);
    }
    h = this.silu(this.spatialNorm(h, 'decoder.norm_out', zq));
    return this.conv2d(h, 'decoder.conv_out', cfg.outChannels, 3);
  }

  /** Decoded image [3, 8h, 8w] of a code grid: all 4 output frames are computed, frame 0 is returned. */
  decode(codes: Int32Array, h: number, w: number): Img {
    const cfg = this.cfg;
    const e = this.p('quantize.embedding.weight');
    const D = cfg.embedDim;
    const quant = img(D, h, w);
    for (let i = 0; i < h * w; i++) for (let c = 0; c < D; c++) quant.d[c * h * w + i] = e[codes[i] * D + c];
    const quant2 = this.causalConv3d([quant], 'post_quant_conv.conv', [3, 1, 1], 1);
    const temporal = (frames: Img[]): Img[] => {
      for (let i = 0; i < cfg.numResBlocks; i++) frames = this.temporalResnet(frames, `decoder.time_res_stack.${i}`);
      for (let s = 0; s < Math.log2(cfg.temporalDownsampleFactor); s++) {
        const doubled = frames.flatMap((f) => [f, f]);
        frames = this.causalConv3d(doubled, `decoder.time_conv.${s}.conv.conv`, [3, 3, 3], 1).map((f) => this.silu(f));
      }
      return frames;
    };
    const hs = temporal(quant2);
    const zqs = temporal([quant]);
    const out = hs.map((f, t) => this.decoder2d(f, zqs[t]));
    return out[0];
  }
}

/** docs/model.md, "Postprocess": floor(clamp((x + 1) / 2 · 255, 0, 255)). */
export function toU8(x: number): number {
  return Math.floor(Math.min(255, Math.max(0, ((x + 1) / 2) * 255)));
}
