// A random-weight Emu3-VisionTokenizer in the upstream file formats (config.json, model.safetensors with the upstream
// key names, preprocessor_config.json), deterministic from a seed. 'tiny' is small (ch 32) for tests; 'small' has the
// real shape (ch 256, ch_mult [1,2,2,4], 270.7 M parameters, 1.0 GiB) for benchmarks.
// Weights are scaled so activations stay O(1) through the network and latents spread over the codebook.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeSafetensors } from '../model/safetensors.js';
import { Rng } from '../util/rng.js';
import { parseVqConfig, VQ_DEFAULTS } from './config.js';
import { type ParamSpec, vqParamSpecs } from './params.js';

export type VqPreset = 'tiny' | 'small';

export function vqConfigJson(preset: VqPreset): Record<string, unknown> {
  return {
    architectures: ['Emu3VisionVQModel'],
    auto_map: {
      AutoConfig: 'configuration_emu3visionvq.Emu3VisionVQConfig',
      AutoModel: 'modeling_emu3visionvq.Emu3VisionVQModel',
    },
    model_type: 'Emu3VisionVQ',
    ...VQ_DEFAULTS,
    ch: preset === 'tiny' ? 32 : 256,
    torch_dtype: 'float32',
    transformers_version: '4.44.0',
  };
}

/**
 * The upstream preprocessor_config.json keys and values (docs/model.md, "preprocessor_config.json"), except the pixel
 * bounds: upstream's 512²–1024² makes every image a 4,163–16,448-token prompt, beyond the presets' contexts (tiny
 * 2,048, small 4,096). tiny takes 128²–256² (≤ 32×32 codes, ≤ 1,063 tokens); small 256²–384² (≤ 48×48 codes, ≤ 2,359
 * tokens). A real VisionTokenizer directory brings its own file.
 */
export const presetPixelBounds: Record<VqPreset, { minPixels: number; maxPixels: number }> = {
  tiny: { minPixels: 128 * 128, maxPixels: 256 * 256 },
  small: { minPixels: 256 * 256, maxPixels: 384 * 384 },
};

export function preprocessorConfigJson(preset: VqPreset = 'tiny'): Record<string, unknown> {
  const bounds = presetPixelBounds[preset];
  return {
    auto_map: { AutoImageProcessor: 'image_processing_emu3visionvq.Emu3VisionVQImageProcessor' },
    do_convert_rgb: true,
    do_normalize: true,
    do_rescale: true,
    do_resize: true,
    image_mean: [0.5, 0.5, 0.5],
    image_processor_type: 'Emu3VisionVQImageProcessor',
    image_std: [0.5, 0.5, 0.5],
    max_pixels: bounds.maxPixels,
    min_pixels: bounds.minPixels,
    resample: 3,
    rescale_factor: 1 / 255,
    spatial_factor: 8,
  };
}

/** Residual branches end in a damped conv so the residual stream grows slowly. */
function convGain(name: string): number {
  if (/\.(conv2|proj_out)\.weight$/.test(name)) return 0.5;
  if (name === 'decoder.conv_out.weight') return 0.6;
  if (/\.conv_[yb]\.weight$/.test(name)) return 0.3;
  // The encoder's random latents come out small (rms ≈ 0.06); this brings them to the codebook's scale.
  if (name === 'quant_conv.conv.weight') return 8;
  return 1;
}

function initTensor(rng: Rng, p: ParamSpec): Float32Array {
  const n = p.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  switch (p.kind) {
    case 'conv': {
      const fanIn = p.shape.slice(1).reduce((a, b) => a * b, 1);
      return rng.fillNormal(out, convGain(p.name) / Math.sqrt(fanIn));
    }
    case 'bias':
      // SpatialNorm's conv_y is a multiplier: centre it on 1.
      if (/\.conv_y\.bias$/.test(p.name)) return out.map(() => 1 + 0.1 * rng.normal());
      return rng.fillNormal(out, 0.02);
    case 'norm_weight':
      return out.map(() => 1 + 0.1 * rng.normal());
    case 'norm_bias':
      return rng.fillNormal(out, 0.1);
    case 'running_mean':
      return rng.fillNormal(out, 0.1);
    case 'running_var':
      return out.map(() => 0.5 + rng.uniform());
    case 'num_batches_tracked':
      return out.fill(1000 + (rng.nextU32() % 1000));
    case 'codebook':
      return rng.fillNormal(out, 0.5);
  }
}

export function writeTinyVq(dir: string, opts: { seed: number; preset: VqPreset }, log?: (msg: string) => void): void {
  mkdirSync(dir, { recursive: true });
  const configJson = vqConfigJson(opts.preset);
  const cfg = parseVqConfig(configJson, `${opts.preset} VQ preset`);
  const specs = vqParamSpecs(cfg);
  const rng = new Rng(opts.seed);
  writeFileSync(join(dir, 'config.json'), `${JSON.stringify(configJson, null, 2)}\n`);
  writeFileSync(
    join(dir, 'preprocessor_config.json'),
    `${JSON.stringify(preprocessorConfigJson(opts.preset), null, 2)}\n`,
  );
  writeSafetensors(
    join(dir, 'model.safetensors'),
    specs.map((p) => ({
      name: p.name,
      dtype: p.kind === 'num_batches_tracked' ? ('I64' as const) : ('F32' as const),
      shape: p.shape,
      produce: () => initTensor(rng, p),
    })),
  );
  const params = specs.reduce((a, p) => a + p.shape.reduce((x, y) => x * y, 1), 0);
  log?.(`wrote ${opts.preset} VQ (${(params / 1e6).toFixed(2)} M parameters, seed ${opts.seed}) to ${dir}`);
}
