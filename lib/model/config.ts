// The LLM's config.json (docs/model.md, "config.json"), parsed with the upstream HF key names and validated: every
// field we use is checked for presence, type and consistency, and every error names the field and the file.
import { join } from 'node:path';
import { CheckpointError } from './errors.js';
import { readJsonFile } from './json-file.js';

export interface Emu3Config {
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  vocabSize: number;
  rmsNormEps: number;
  ropeTheta: number;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  hiddenAct: string;
  padTokenId: number;
  bosTokenId: number;
  eosTokenId: number;
  imgTokenId: number;
  boiTokenId: number;
  eoiTokenId: number;
  eolTokenId: number;
  eofTokenId: number;
  imageArea: number;
  raw: Record<string, unknown>;
}

/**
 * Defaults of upstream `Emu3Config.__init__` (baaivision/Emu3 emu3/mllm/configuration_emu3.py), applied only to keys
 * that may be absent from a config.json. The shape keys (hidden_size, intermediate_size, num_hidden_layers,
 * num_attention_heads, num_key_value_heads, vocab_size) are required even though upstream defaults them to the 8B
 * model: a config.json without them is broken, and silently assuming 8B shapes would only fail later, less clearly.
 */
export const UPSTREAM_DEFAULTS = {
  rms_norm_eps: 1e-5,
  rope_theta: 1_000_000,
  max_position_embeddings: 9216,
  tie_word_embeddings: false,
  hidden_act: 'silu',
  pad_token_id: 151643,
  bos_token_id: 151849,
  eos_token_id: 151850,
  img_token_id: 151851,
  boi_token_id: 151852,
  eoi_token_id: 151853,
  eol_token_id: 151846,
  eof_token_id: 151847,
  image_area: 720 * 720,
} as const;

/**
 * ORT's fused rotary kernels (com.microsoft) need head_dim % 16 === 0
 * (docs/architecture.md, "Stage graphs and devices").
 */
export const HEAD_DIM_MULTIPLE = 16;

export function parseEmu3Config(json: unknown, source: string): Emu3Config {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new CheckpointError(`${source}: config must be a JSON object`);
  }
  const raw = json as Record<string, unknown>;
  const fail = (msg: string): never => {
    throw new CheckpointError(`${source}: ${msg}`);
  };
  const describe = (v: unknown) => (v === undefined ? 'missing' : `got ${JSON.stringify(v)}`);

  const modelType = raw.model_type;
  if (modelType !== 'Emu3') fail(`model_type must be "Emu3", ${describe(modelType)}`);
  if (raw.architectures !== undefined) {
    const a = raw.architectures;
    if (!Array.isArray(a) || !a.includes('Emu3ForCausalLM')) {
      fail(`architectures must include "Emu3ForCausalLM", got ${JSON.stringify(a)}`);
    }
  }

  const int = (key: string, min: number, fallback?: number): number => {
    const v = raw[key] === undefined ? fallback : raw[key];
    if (typeof v !== 'number' || !Number.isInteger(v)) fail(`${key} must be an integer, ${describe(raw[key])}`);
    if ((v as number) < min) fail(`${key} must be >= ${min}, got ${v}`);
    return v as number;
  };
  const positive = (key: string, fallback: number): number => {
    const v = raw[key] === undefined ? fallback : raw[key];
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) {
      fail(`${key} must be a positive number, ${describe(raw[key])}`);
    }
    return v as number;
  };

  const hiddenSize = int('hidden_size', 1);
  const intermediateSize = int('intermediate_size', 1);
  const numHiddenLayers = int('num_hidden_layers', 1);
  const numAttentionHeads = int('num_attention_heads', 1);
  // Upstream: an explicit null means "as many KV heads as query heads" (backward compatibility).
  const numKeyValueHeads = raw.num_key_value_heads === null ? numAttentionHeads : int('num_key_value_heads', 1);
  const vocabSize = int('vocab_size', 1);

  if (hiddenSize % numAttentionHeads !== 0) {
    fail(`hidden_size (${hiddenSize}) must be divisible by num_attention_heads (${numAttentionHeads})`);
  }
  if (numAttentionHeads % numKeyValueHeads !== 0) {
    fail(`num_attention_heads (${numAttentionHeads}) must be divisible by num_key_value_heads (${numKeyValueHeads})`);
  }
  const headDim = hiddenSize / numAttentionHeads;
  if (raw.head_dim !== undefined && raw.head_dim !== null && raw.head_dim !== headDim) {
    fail(
      `head_dim (${JSON.stringify(raw.head_dim)}) must equal hidden_size / num_attention_heads (${headDim}) in Emu3`,
    );
  }
  if (headDim % HEAD_DIM_MULTIPLE !== 0) {
    fail(
      `head dim = hidden_size / num_attention_heads = ${hiddenSize}/${numAttentionHeads} = ${headDim} must be a ` +
        `multiple of ${HEAD_DIM_MULTIPLE} (ORT's fused rotary embedding kernels need it)`,
    );
  }

  const hiddenAct = raw.hidden_act === undefined ? UPSTREAM_DEFAULTS.hidden_act : raw.hidden_act;
  if (hiddenAct !== 'silu')
    fail(`hidden_act must be "silu" (the only activation supported), got ${JSON.stringify(hiddenAct)}`);
  if (raw.rope_scaling !== undefined && raw.rope_scaling !== null) {
    fail(
      `rope_scaling ${JSON.stringify(raw.rope_scaling)} is not supported (only null, as in the released Emu3 models)`,
    );
  }
  for (const key of ['attention_bias', 'mlp_bias']) {
    if (raw[key] !== undefined && raw[key] !== false)
      fail(`${key} must be false (Emu3 has no linear biases), got ${JSON.stringify(raw[key])}`);
  }
  const tie = raw.tie_word_embeddings === undefined ? UPSTREAM_DEFAULTS.tie_word_embeddings : raw.tie_word_embeddings;
  if (typeof tie !== 'boolean') fail(`tie_word_embeddings must be a boolean, got ${JSON.stringify(tie)}`);

  const tokenId = (key: keyof typeof UPSTREAM_DEFAULTS): number => {
    const id = int(key, 0, UPSTREAM_DEFAULTS[key] as number);
    if (id >= vocabSize) fail(`${key} (${id}) must be < vocab_size (${vocabSize})`);
    return id;
  };

  return {
    hiddenSize,
    intermediateSize,
    numHiddenLayers,
    numAttentionHeads,
    numKeyValueHeads,
    headDim,
    vocabSize,
    rmsNormEps: positive('rms_norm_eps', UPSTREAM_DEFAULTS.rms_norm_eps),
    ropeTheta: positive('rope_theta', UPSTREAM_DEFAULTS.rope_theta),
    maxPositionEmbeddings: int('max_position_embeddings', 1, UPSTREAM_DEFAULTS.max_position_embeddings),
    tieWordEmbeddings: tie as boolean,
    hiddenAct: hiddenAct as string,
    padTokenId: tokenId('pad_token_id'),
    bosTokenId: tokenId('bos_token_id'),
    eosTokenId: tokenId('eos_token_id'),
    imgTokenId: tokenId('img_token_id'),
    boiTokenId: tokenId('boi_token_id'),
    eoiTokenId: tokenId('eoi_token_id'),
    eolTokenId: tokenId('eol_token_id'),
    eofTokenId: tokenId('eof_token_id'),
    imageArea: int('image_area', 1, UPSTREAM_DEFAULTS.image_area),
    raw,
  };
}

export function loadEmu3Config(dir: string): Emu3Config {
  const path = join(dir, 'config.json');
  return parseEmu3Config(readJsonFile(path), path);
}
