// The VQ encoder as one ONNX graph in the exact single-image form (docs/model.md, "Single-image form"): the 2-D encoder
// runs once on the image (its 4 time copies are identical), then the 4-channel temporal part runs on the frames it
// needs, then quant_conv. Input `pixels` [1, in_channels, H, W] (H, W dynamic, multiples of 8); output `latents`
// [h·w, embed_dim] in row-major (y, x) order, ready for the quantizer.
import type { GraphBuilder } from '../onnx/graph.js';
import { levelChannels, temporalStages } from './config.js';
import { type Norm, VqBlocks, type VqGraphForm } from './graph-blocks.js';
import { cachedGraph } from './graph-cache.js';
import type { VqWeights } from './weights.js';

export function buildEncoderGraph(g: GraphBuilder, w: VqWeights, form: VqGraphForm = 'shaped'): void {
  const cfg = w.config;
  const b = new VqBlocks(g, w, form);
  const norm: Norm = (x, prefix, c) => b.groupNorm(x, prefix, c);
  const chans = levelChannels(cfg);
  const last = chans.length - 1;

  const pixels = g.input('pixels', 'float', [1, cfg.inChannels, 'H', 'W']);
  let h = b.conv(pixels, 'encoder.conv_in', cfg.ch, cfg.inChannels, 3);
  let cin = cfg.ch;
  for (let level = 0; level <= last; level++) {
    const cout = chans[level];
    for (let i = 0; i < cfg.numResBlocks; i++) {
      h = b.resnet(h, `encoder.down.${level}.block.${i}`, cin, cout, norm);
      cin = cout;
      if (cfg.attnResolutions.includes(level)) h = b.attention(h, `encoder.down.${level}.attn.${i}`, cin, norm);
    }
    // Downsample: zero-pad right and bottom by one, then a stride-2 3×3 conv.
    if (level !== last)
      h = b.conv(h, `encoder.down.${level}.downsample.conv`, cin, cin, 3, { stride: 2, pads: [0, 0, 1, 1] });
  }
  h = b.resnet(h, 'encoder.mid.block_1', cin, cin, norm);
  h = b.attention(h, 'encoder.mid.attn_1', cin, norm);
  h = b.resnet(h, 'encoder.mid.block_2', cin, cin, norm);
  h = b.silu(norm(h, 'encoder.norm_out', cin));
  const z = b.conv(h, 'encoder.conv_out', cfg.zChannels, cin, 3);

  // The image is repeated temporal_downsample_factor times along time; every frame is the same tensor `z`.
  let frames = new Array<string>(cfg.temporalDownsampleFactor).fill(z);
  for (let s = 0; s < temporalStages(cfg); s++) {
    const conv = w.readConv3d(`encoder.time_conv.${s}.conv.conv`, cfg.zChannels, cfg.zChannels, [4, 3, 3]);
    frames = b.causalConvFrames(frames, `encoder.time_conv.${s}`, conv, 2).map((f) => b.silu(f));
  }
  for (let i = 0; i < cfg.numResBlocks; i++)
    frames = b.temporalResnet(frames, `encoder.time_res_stack.${i}`, cfg.zChannels);
  const quantConv = w.readConv3d('quant_conv.conv', cfg.embedDim, cfg.zChannels, [3, 1, 1]);
  frames = b.causalConvFrames(frames, 'quant_conv', quantConv, 1);
  if (frames.length !== 1) throw new Error(`VQ encoder: expected one latent frame, got ${frames.length}`);

  const flat = g.op('Reshape', [frames[0], g.constInt64('latents.flat_shape', [cfg.embedDim, -1])], 'latents.flat');
  const latents = g.op('Transpose', [flat], 'latents', { perm: [1, 0] });
  g.output(latents, 'float', ['hw', cfg.embedDim]);
}

/** Path of the cached encoder graph in the given form (built on first use). */
export function encoderGraphPath(
  w: VqWeights,
  cacheDir: string,
  log?: (msg: string) => void,
  form: VqGraphForm = 'shaped',
): string {
  return cachedGraph(w, 'vq-encoder', form, cacheDir, (g) => buildEncoderGraph(g, w, form), log);
}
