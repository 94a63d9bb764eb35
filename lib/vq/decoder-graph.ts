// The VQ decoder as one ONNX graph in the exact single-image form (docs/model.md, "Single-image form"): only output
// frame 0 is built, so every causal temporal conv reduces to its last kernel slice, the temporal upsamples vanish, and
// the 2-D decoder runs once. Input `quant` [1, embed_dim, h, w] = codebook rows E[codes] (h, w dynamic); output
// `pixels` [1, out_channels, 8h, 8w], the raw decoder output in ≈[−1, 1].
import type { GraphBuilder } from '../onnx/graph.js';
import { levelChannels, temporalStages } from './config.js';
import { type Norm, VqBlocks, type VqGraphForm } from './graph-blocks.js';
import { cachedGraph } from './graph-cache.js';
import type { VqWeights } from './weights.js';

export function buildDecoderGraph(g: GraphBuilder, w: VqWeights, form: VqGraphForm = 'shaped'): void {
  const cfg = w.config;
  const b = new VqBlocks(g, w, form);
  const chans = levelChannels(cfg);
  const last = chans.length - 1;
  const zc = cfg.zChannels;

  const quant = g.input('quant', 'float', [1, cfg.embedDim, 'h', 'w']);
  const postQuant = w.readConv3d('post_quant_conv.conv', zc, cfg.embedDim, [3, 1, 1]);
  const quant2 = b.causalConvFrames([quant], 'post_quant_conv', postQuant, 1, 1)[0];

  // Both streams go through the same temporal layers; only frame 0 is kept (causality makes it exact).
  const temporal = (x: string): string => {
    let frames = [x];
    for (let i = 0; i < cfg.numResBlocks; i++) {
      frames = b.temporalResnet(frames, `decoder.time_res_stack.${i}`, zc, 1);
    }
    for (let s = 0; s < temporalStages(cfg); s++) {
      const conv = w.readConv3d(`decoder.time_conv.${s}.conv.conv`, zc, zc, [3, 3, 3]);
      // Nearest ×2 along time repeats every frame; output frame 0 still sees only input frame 0.
      const doubled = frames.flatMap((f) => [f, f]);
      frames = b.causalConvFrames(doubled, `decoder.time_conv.${s}`, conv, 1, 1).map((f) => b.silu(f));
    }
    return frames[0];
  };
  let h = temporal(quant2);
  const zq = temporal(quant);

  // zq nearest-resized to each resolution the decoder visits (1×, 2×, … 2^last ×).
  const zqAt = new Map<number, string>([[1, zq]]);
  for (let f = 2; f <= 2 ** last; f *= 2) zqAt.set(f, b.upsampleNearest(zq, `zq.x${f}`, f));
  let factor = 1;
  const spatialNorm: Norm = (x, prefix, c) => {
    const z = zqAt.get(factor)!;
    const normed = b.groupNorm(x, prefix, c, `${prefix}.norm_layer`);
    const y = b.conv(z, `${prefix}.conv_y`, c, cfg.embedDim, 1);
    const beta = b.conv(z, `${prefix}.conv_b`, c, cfg.embedDim, 1);
    return g.op('Add', [g.op('Mul', [normed, y], `${prefix}.mul`), beta], `${prefix}.out`);
  };

  let cin = chans[last];
  h = b.conv(h, 'decoder.conv_in', cin, zc, 3);
  h = b.resnet(h, 'decoder.mid.block_1', cin, cin, spatialNorm);
  h = b.attention(h, 'decoder.mid.attn_1', cin, spatialNorm);
  h = b.resnet(h, 'decoder.mid.block_2', cin, cin, spatialNorm);
  for (let level = last; level >= 0; level--) {
    const cout = chans[level];
    for (let i = 0; i <= cfg.numResBlocks; i++) {
      h = b.resnet(h, `decoder.up.${level}.block.${i}`, cin, cout, spatialNorm);
      cin = cout;
      if (cfg.attnResolutions.includes(level)) h = b.attention(h, `decoder.up.${level}.attn.${i}`, cin, spatialNorm);
    }
    if (level !== 0) {
      factor *= 2;
      h = b.conv(
        b.upsampleNearest(h, `decoder.up.${level}.upsample.nearest`, 2),
        `decoder.up.${level}.upsample.conv`,
        cin,
        cin,
        3,
      );
    }
  }
  h = b.silu(spatialNorm(h, 'decoder.norm_out', cin));
  const out = b.conv(h, 'decoder.conv_out', cfg.outChannels, cin, 3);
  const pixels = g.op('Identity', [out], 'pixels');
  g.output(pixels, 'float', [1, cfg.outChannels, 'H', 'W']);
}

/** Path of the cached decoder graph in the given form (built on first use). */
export function decoderGraphPath(
  w: VqWeights,
  cacheDir: string,
  log?: (msg: string) => void,
  form: VqGraphForm = 'shaped',
): string {
  return cachedGraph(w, 'vq-decoder', form, cacheDir, (g) => buildDecoderGraph(g, w, form), log);
}
