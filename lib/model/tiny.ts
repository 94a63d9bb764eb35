// emu3-tiny: a small random-weight Emu3 LLM written in exactly the upstream directory layout (config.json with the
// real key names and token ids, generation/tokenizer configs, HF-style safetensors, single or sharded), deterministic
// from a seed. The tokenizer files and the VQ model are written by their own modules (see cli/make-tiny.ts).
import { mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Rng } from '../util/rng.js';
import { type ExpectedTensor, expectedTensors, INDEX_FILE, SINGLE_FILE, tensorNames } from './checkpoint.js';
import { parseEmu3Config, UPSTREAM_DEFAULTS } from './config.js';
import { bytesPerElement, type FloatDtype } from './dtype.js';
import { writeSafetensors } from './safetensors.js';

export type Preset = 'tiny' | 'small';

interface PresetShape {
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  max_position_embeddings: number;
  /** Generated image area in pixels: small enough that a tiny model generates an image in few steps. */
  image_area: number;
}

/**
 * The real vocabulary (docs/model.md, "Special tokens and ids"): the real tokenizer files work unchanged with these
 * models.
 */
export const EMU3_VOCAB_SIZE = 184622;

export const presets: Record<Preset, PresetShape> = {
  // 128×128 px → 16×16 codes → 16·17 + 3 = 275 generated tokens.
  tiny: {
    hidden_size: 64,
    intermediate_size: 176,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 2048,
    image_area: 128 * 128,
  },
  // 256×256 px → 32×32 codes → 1059 generated tokens.
  small: {
    hidden_size: 1024,
    intermediate_size: 2816,
    num_hidden_layers: 12,
    num_attention_heads: 16,
    num_key_value_heads: 4,
    max_position_embeddings: 4096,
    image_area: 256 * 256,
  },
};

const TRANSFORMERS_VERSION = '4.44.0';

/**
 * config.json with the upstream keys and values (docs/model.md, "config.json"); only the sizes come from the preset.
 */
export function tinyConfigJson(preset: Preset, dtype: 'f32' | 'bf16'): Record<string, unknown> {
  const p = presets[preset];
  const d = UPSTREAM_DEFAULTS;
  const json: Record<string, unknown> = {
    architectures: ['Emu3ForCausalLM'],
    attention_dropout: 0.1,
    auto_map: {
      AutoConfig: 'configuration_emu3.Emu3Config',
      AutoModelForCausalLM: 'modeling_emu3.Emu3ForCausalLM',
    },
    boi_token_id: d.boi_token_id,
    bos_token_id: d.bos_token_id,
    eof_token_id: d.eof_token_id,
    eoi_token_id: d.eoi_token_id,
    eol_token_id: d.eol_token_id,
    eos_token_id: d.eos_token_id,
    hidden_act: 'silu',
    hidden_size: p.hidden_size,
    image_area: p.image_area,
    img_token_id: d.img_token_id,
    initializer_range: 0.02,
    intermediate_size: p.intermediate_size,
    max_position_embeddings: p.max_position_embeddings,
    model_type: 'Emu3',
    num_attention_heads: p.num_attention_heads,
    num_hidden_layers: p.num_hidden_layers,
    num_key_value_heads: p.num_key_value_heads,
    pad_token_id: d.pad_token_id,
    pretraining_tp: 1,
    rms_norm_eps: d.rms_norm_eps,
    rope_scaling: null,
    rope_theta: d.rope_theta,
    tie_word_embeddings: false,
    torch_dtype: dtype === 'f32' ? 'float32' : 'bfloat16',
    transformers_version: TRANSFORMERS_VERSION,
    use_cache: true,
    vocab_size: EMU3_VOCAB_SIZE,
  };
  return json;
}

/** HF writes its JSON files with indent 2 and a final newline. */
function writeJson(path: string, value: unknown): void {
  writeFileSync(path, `${JSON.stringify(value, null, 2)}\n`);
}

function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/**
 * Random weights scaled so a forward pass stays well conditioned: unit-variance embeddings, projections with
 * std ≈ 1/√fan_in (so every branch adds O(1) to the residual stream; attention scores have std ≈ 2), norm weights
 * 1 ± 0.1, and lm_head rows of equal norm 4 (logits with std ≈ 4 and no "hub" token that wins for every input,
 * which random rows of unequal norm produce). A normal(0, 0.02) init would give near-uniform logits instead.
 * Each tensor has its own generator, seeded from (seed, name), so sharding does not change any value.
 */
function produceWeights(t: ExpectedTensor, seed: number): Float32Array {
  const rng = new Rng(fnv1a(`${seed}:${t.name}`));
  const n = t.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  if (t.shape.length === 1) {
    for (let i = 0; i < n; i++) out[i] = 1 + 0.1 * rng.normal();
    return out;
  }
  if (t.name === tensorNames.embed) return rng.fillNormal(out, 1);
  const fanIn = t.shape[1];
  if (t.name === tensorNames.lmHead) {
    rng.fillNormal(out, 1);
    for (let r = 0; r < t.shape[0]; r++) {
      const row = out.subarray(r * fanIn, (r + 1) * fanIn);
      let ss = 0;
      for (let i = 0; i < fanIn; i++) ss += row[i] * row[i];
      const scale = 4 / Math.sqrt(ss);
      for (let i = 0; i < fanIn; i++) row[i] *= scale;
    }
    return out;
  }
  const gain = /q_proj|k_proj/.test(t.name) ? Math.SQRT2 : /o_proj/.test(t.name) ? 0.5 : 1;
  return rng.fillNormal(out, gain / Math.sqrt(fanIn));
}

/** Splits tensors (in order) into `shards` groups of about equal bytes, none empty. */
function splitIntoShards<T extends { bytes: number }>(tensors: T[], shards: number): T[][] {
  const total = tensors.reduce((a, t) => a + t.bytes, 0);
  const groups: T[][] = Array.from({ length: shards }, () => []);
  let s = 0;
  let cumulative = 0;
  tensors.forEach((t, j) => {
    const tensorsLeft = tensors.length - j;
    const shardsAfter = shards - 1 - s;
    if (
      groups[s].length > 0 &&
      shardsAfter > 0 &&
      (cumulative >= (total * (s + 1)) / shards || tensorsLeft <= shardsAfter)
    )
      s++;
    groups[s].push(t);
    cumulative += t.bytes;
  });
  return groups;
}

export function shardFileName(i: number, shards: number): string {
  const pad = (k: number) => String(k).padStart(5, '0');
  return `model-${pad(i + 1)}-of-${pad(shards)}.safetensors`;
}

export function writeTinyEmu3(
  dir: string,
  opts: { seed: number; preset: Preset; dtype: 'f32' | 'bf16'; shards: number },
  log: (msg: string) => void = () => {},
): void {
  const { seed, preset, dtype, shards } = opts;
  if (!(preset in presets)) throw new Error(`make-tiny: unknown preset ${JSON.stringify(preset)} (tiny|small)`);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff)
    throw new Error(`make-tiny: seed must be an integer in [0, 2^32), got ${seed}`);
  const configJson = tinyConfigJson(preset, dtype);
  const config = parseEmu3Config(configJson, `${preset} preset`);
  const tensors = expectedTensors(config);
  if (!Number.isInteger(shards) || shards < 1 || shards > tensors.length) {
    throw new Error(
      `make-tiny: shards must be an integer in [1, ${tensors.length}] (the number of tensors), got ${shards}`,
    );
  }

  mkdirSync(dir, { recursive: true });
  // Remove weights of an earlier run so that a single file and an index never coexist.
  for (const f of readdirSync(dir)) {
    if (f === INDEX_FILE || /^model(-\d{5}-of-\d{5})?\.safetensors$/.test(f)) rmSync(join(dir, f));
  }

  writeJson(join(dir, 'config.json'), configJson);
  log(`wrote ${join(dir, 'config.json')} (${preset}: hidden ${config.hiddenSize}, ${config.numHiddenLayers} layers)`);
  // As on the hub: bos/eos/pad ids only, no sampling defaults (Emu3-Chat decodes greedily).
  writeJson(join(dir, 'generation_config.json'), {
    _from_model_config: true,
    bos_token_id: config.bosTokenId,
    eos_token_id: config.eosTokenId,
    pad_token_id: config.padTokenId,
    transformers_version: TRANSFORMERS_VERSION,
  });
  log(`wrote ${join(dir, 'generation_config.json')}`);
  // The role strings are the upstream tokenizer's defaults; the hub's tokenizer_config.json itself was never seen, so
  // its other keys are a plausible reconstruction (nothing here reads them).
  const specialTokens = { bos_token: '<|extra_203|>', eos_token: '<|extra_204|>', pad_token: '<|endoftext|>' };
  writeJson(join(dir, 'tokenizer_config.json'), {
    added_tokens_decoder: {},
    auto_map: { AutoTokenizer: ['tokenization_emu3.Emu3Tokenizer', null] },
    ...specialTokens,
    clean_up_tokenization_spaces: false,
    model_max_length: config.maxPositionEmbeddings,
    padding_side: 'left',
    tokenizer_class: 'Emu3Tokenizer',
  });
  log(`wrote ${join(dir, 'tokenizer_config.json')}`);
  writeJson(join(dir, 'special_tokens_map.json'), specialTokens);
  log(`wrote ${join(dir, 'special_tokens_map.json')}`);

  const st: FloatDtype = dtype === 'f32' ? 'F32' : 'BF16';
  const items = tensors.map((t) => ({
    t,
    bytes: t.shape.reduce((a, b) => a * b, 1) * bytesPerElement[st],
  }));
  const groups = splitIntoShards(items, shards);
  const weightMap: Record<string, string> = {};
  groups.forEach((group, i) => {
    const file = shards === 1 ? SINGLE_FILE : shardFileName(i, shards);
    writeSafetensors(
      join(dir, file),
      group.map(({ t }) => ({ name: t.name, dtype: st, shape: t.shape, produce: () => produceWeights(t, seed) })),
      { format: 'pt' },
    );
    for (const { t } of group) weightMap[t.name] = file;
    const mb = group.reduce((a, g) => a + g.bytes, 0) / 1e6;
    log(`wrote ${join(dir, file)} (${group.length} tensors, ${mb.toFixed(1)} MB ${st})`);
  });
  if (shards > 1) {
    const sorted = Object.fromEntries(
      Object.keys(weightMap)
        .sort()
        .map((k) => [k, weightMap[k]]),
    );
    const totalSize = items.reduce((a, g) => a + g.bytes, 0);
    writeJson(join(dir, INDEX_FILE), { metadata: { total_size: totalSize }, weight_map: sorted });
    log(`wrote ${join(dir, INDEX_FILE)}`);
  }
}
