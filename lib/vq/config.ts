// The Emu3-VisionTokenizer config.json (docs/model.md, "VQ config"): parsed, validated, with errors that name the
// field.
import { join } from 'node:path';
import { CheckpointError } from '../model/errors.js';
import { readJsonFile } from '../model/json-file.js';

export interface VqConfig {
  codebookSize: number;
  embedDim: number;
  zChannels: number;
  doubleZ: boolean;
  inChannels: number;
  outChannels: number;
  temporalDownsampleFactor: number;
  ch: number;
  chMult: number[];
  numResBlocks: number;
  /** Level indices (not pixel sizes) whose blocks are followed by attention. */
  attnResolutions: number[];
  dropout: number;
  raw: Record<string, unknown>;
}

/** GroupNorm in every 2-D block uses this many groups (docs/model.md, "Blocks"). */
export const GROUP_NORM_GROUPS = 32;

/** Upstream defaults (configuration_emu3visionvq.py), used for keys a config.json leaves out. */
export const VQ_DEFAULTS = {
  codebook_size: 32768,
  embed_dim: 4,
  z_channels: 4,
  double_z: false,
  in_channels: 3,
  out_channels: 3,
  temporal_downsample_factor: 4,
  ch: 256,
  ch_mult: [1, 2, 2, 4],
  num_res_blocks: 2,
  attn_resolutions: [3],
  dropout: 0.0,
} as const;

export function parseVqConfig(json: unknown, source: string): VqConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new CheckpointError(`${source}: VQ config must be a JSON object`);
  }
  const raw = json as Record<string, unknown>;
  const get = (key: keyof typeof VQ_DEFAULTS): unknown => (key in raw ? raw[key] : VQ_DEFAULTS[key]);
  const fail = (key: string, why: string): never => {
    throw new CheckpointError(`${source}: field ${key} ${why} (got ${JSON.stringify(raw[key])})`);
  };
  const int = (key: keyof typeof VQ_DEFAULTS, min: number): number => {
    const v = get(key);
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min) fail(key, `must be an integer >= ${min}`);
    return v as number;
  };
  const intList = (key: keyof typeof VQ_DEFAULTS, min: number, allowEmpty: boolean): number[] => {
    const v = get(key);
    if (!Array.isArray(v) || (!allowEmpty && v.length === 0)) fail(key, 'must be a non-empty list of integers');
    const list = v as unknown[];
    if (!list.every((x) => typeof x === 'number' && Number.isInteger(x) && x >= min)) {
      fail(key, `must be a list of integers >= ${min}`);
    }
    return list as number[];
  };

  const cfg: VqConfig = {
    codebookSize: int('codebook_size', 1),
    embedDim: int('embed_dim', 1),
    zChannels: int('z_channels', 1),
    doubleZ: get('double_z') as boolean,
    inChannels: int('in_channels', 1),
    outChannels: int('out_channels', 1),
    temporalDownsampleFactor: int('temporal_downsample_factor', 1),
    ch: int('ch', 1),
    chMult: intList('ch_mult', 1, false),
    numResBlocks: int('num_res_blocks', 1),
    attnResolutions: intList('attn_resolutions', 0, true),
    dropout: get('dropout') as number,
    raw,
  };
  if (typeof cfg.doubleZ !== 'boolean') fail('double_z', 'must be a boolean');
  // With double_z the encoder emits 2·z_channels, which the single-stream temporal layers cannot take.
  if (cfg.doubleZ) fail('double_z', 'must be false (the Emu3 VQ encoder has no double_z variant)');
  if (typeof cfg.dropout !== 'number' || !(cfg.dropout >= 0 && cfg.dropout < 1)) fail('dropout', 'must be in [0, 1)');
  // The decoder runs the quantized stream and the codebook stream through the same temporal layers.
  if (cfg.embedDim !== cfg.zChannels) {
    fail('embed_dim', `must equal z_channels (${cfg.zChannels}): both streams share the decoder's temporal layers`);
  }
  const f = cfg.temporalDownsampleFactor;
  if ((f & (f - 1)) !== 0) fail('temporal_downsample_factor', 'must be a power of two');
  if (cfg.ch % GROUP_NORM_GROUPS !== 0) fail('ch', `must be divisible by ${GROUP_NORM_GROUPS} (GroupNorm groups)`);
  for (const m of cfg.chMult) {
    const c = cfg.ch * m;
    if (c % GROUP_NORM_GROUPS !== 0) {
      fail(
        'ch_mult',
        `× ch (${cfg.ch}) must give channel counts divisible by ${GROUP_NORM_GROUPS} (GroupNorm groups); ${c} is not`,
      );
    }
  }
  for (const level of cfg.attnResolutions) {
    if (level >= cfg.chMult.length)
      fail('attn_resolutions', `holds level indices, each < ch_mult length ${cfg.chMult.length}`);
  }
  return cfg;
}

export function loadVqConfig(dir: string): VqConfig {
  const path = join(dir, 'config.json');
  return parseVqConfig(readJsonFile(path, 'VQ config'), path);
}

/** Channel count of each level: ch·ch_mult[i]. */
export function levelChannels(cfg: VqConfig): number[] {
  return cfg.chMult.map((m) => cfg.ch * m);
}

/** Number of temporal down/upsample stages: log2(temporal_downsample_factor). */
export function temporalStages(cfg: VqConfig): number {
  return Math.log2(cfg.temporalDownsampleFactor);
}

/** Spatial downsampling factor: 2^(levels − 1). */
export function spatialFactor(cfg: VqConfig): number {
  return 2 ** (cfg.chMult.length - 1);
}
