import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { loadEmu3Config, parseEmu3Config } from '../../lib/model/config.js';
import { CheckpointError } from '../../lib/model/errors.js';

/** The released 8B config (upstream key names and values; docs/model.md, "config.json"). */
const upstream8b = (): Record<string, unknown> => ({
  architectures: ['Emu3ForCausalLM'],
  model_type: 'Emu3',
  hidden_size: 4096,
  intermediate_size: 14336,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  vocab_size: 184622,
  rms_norm_eps: 1e-5,
  rope_theta: 1000000.0,
  rope_scaling: null,
  max_position_embeddings: 5120,
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
  image_area: 262144,
  pretraining_tp: 1,
  torch_dtype: 'float32',
});

const SRC = '/models/Emu3-Chat/config.json';

function rejects(json: Record<string, unknown>, ...patterns: RegExp[]): void {
  assert.throws(
    () => parseEmu3Config(json, SRC),
    (e: unknown) => {
      assert.ok(e instanceof CheckpointError, `not a CheckpointError: ${e}`);
      assert.ok(e.message.startsWith(`${SRC}: `), `message does not name the file: ${e.message}`);
      for (const p of patterns) assert.match(e.message, p);
      return true;
    },
  );
}

describe('parseEmu3Config', () => {
  it('reads the upstream 8B config with its real key names', () => {
    const c = parseEmu3Config(upstream8b(), SRC);
    assert.equal(c.hiddenSize, 4096);
    assert.equal(c.intermediateSize, 14336);
    assert.equal(c.numHiddenLayers, 32);
    assert.equal(c.numAttentionHeads, 32);
    assert.equal(c.numKeyValueHeads, 8);
    assert.equal(c.headDim, 128);
    assert.equal(c.vocabSize, 184622);
    assert.equal(c.rmsNormEps, 1e-5);
    assert.equal(c.ropeTheta, 1e6);
    assert.equal(c.maxPositionEmbeddings, 5120);
    assert.equal(c.tieWordEmbeddings, false);
    assert.equal(c.hiddenAct, 'silu');
    assert.deepEqual(
      [c.padTokenId, c.bosTokenId, c.eosTokenId, c.imgTokenId, c.boiTokenId, c.eoiTokenId, c.eolTokenId, c.eofTokenId],
      [151643, 151849, 151850, 151851, 151852, 151853, 151846, 151847],
    );
    assert.equal(c.imageArea, 262144);
    assert.equal(c.raw.torch_dtype, 'float32');
  });

  it('applies the upstream defaults to optional keys', () => {
    const json = upstream8b();
    for (const k of [
      'rms_norm_eps',
      'rope_theta',
      'rope_scaling',
      'max_position_embeddings',
      'tie_word_embeddings',
      'hidden_act',
      'pad_token_id',
      'bos_token_id',
      'eos_token_id',
      'img_token_id',
      'boi_token_id',
      'eoi_token_id',
      'eol_token_id',
      'eof_token_id',
      'image_area',
      'architectures',
    ]) {
      delete json[k];
    }
    const c = parseEmu3Config(json, SRC);
    assert.equal(c.imageArea, 720 * 720);
    assert.equal(c.maxPositionEmbeddings, 9216);
    assert.equal(c.rmsNormEps, 1e-5);
    assert.equal(c.ropeTheta, 1e6);
    assert.equal(c.tieWordEmbeddings, false);
    assert.equal(c.hiddenAct, 'silu');
    assert.equal(c.bosTokenId, 151849);
    assert.equal(c.eolTokenId, 151846);
  });

  it('num_key_value_heads: null means one KV head per query head (upstream backward compatibility)', () => {
    const json = { ...upstream8b(), num_key_value_heads: null };
    assert.equal(parseEmu3Config(json, SRC).numKeyValueHeads, 32);
  });

  for (const key of [
    'hidden_size',
    'intermediate_size',
    'num_hidden_layers',
    'num_attention_heads',
    'num_key_value_heads',
    'vocab_size',
  ]) {
    it(`rejects a config without ${key}, naming the field and the file`, () => {
      const json = upstream8b();
      delete json[key];
      rejects(json, new RegExp(`${key} must be an integer, missing`));
    });
  }

  const wrongTypes: [string, unknown, RegExp][] = [
    ['hidden_size', '4096', /hidden_size must be an integer, got "4096"/],
    ['num_hidden_layers', 2.5, /num_hidden_layers must be an integer, got 2.5/],
    ['vocab_size', 0, /vocab_size must be >= 1, got 0/],
    ['rms_norm_eps', '1e-5', /rms_norm_eps must be a positive number, got "1e-5"/],
    ['rope_theta', -1, /rope_theta must be a positive number, got -1/],
    ['max_position_embeddings', null, /max_position_embeddings must be an integer, got null/],
    ['tie_word_embeddings', 'false', /tie_word_embeddings must be a boolean, got "false"/],
    ['bos_token_id', [151849], /bos_token_id must be an integer, got \[151849\]/],
    ['image_area', 518400.5, /image_area must be an integer/],
    ['model_type', 'llama', /model_type must be "Emu3", got "llama"/],
    ['architectures', ['LlamaForCausalLM'], /architectures must include "Emu3ForCausalLM"/],
  ];
  for (const [key, value, pattern] of wrongTypes) {
    it(`rejects ${key} = ${JSON.stringify(value)}`, () => rejects({ ...upstream8b(), [key]: value }, pattern));
  }

  it('rejects a missing model_type', () => {
    const json = upstream8b();
    delete json.model_type;
    rejects(json, /model_type must be "Emu3", missing/);
  });

  it('rejects inconsistent head counts, naming both fields', () => {
    rejects(
      { ...upstream8b(), num_attention_heads: 30 },
      /hidden_size \(4096\) must be divisible by num_attention_heads \(30\)/,
    );
    rejects(
      { ...upstream8b(), num_key_value_heads: 5 },
      /num_attention_heads \(32\) must be divisible by num_key_value_heads \(5\)/,
    );
  });

  it('rejects a head dim that is not a multiple of 16 and says why', () => {
    // 96 / 4 = 24
    rejects(
      { ...upstream8b(), hidden_size: 96, num_attention_heads: 4, num_key_value_heads: 2 },
      /hidden_size \/ num_attention_heads = 96\/4 = 24 must be a multiple of 16/,
      /ORT's fused rotary embedding kernels need it/,
    );
    rejects({ ...upstream8b(), head_dim: 64 }, /head_dim \(64\) must equal hidden_size \/ num_attention_heads \(128\)/);
  });

  it('rejects unsupported features by name', () => {
    rejects({ ...upstream8b(), hidden_act: 'gelu' }, /hidden_act must be "silu".*got "gelu"/);
    rejects(
      { ...upstream8b(), rope_scaling: { type: 'linear', factor: 2.0 } },
      /rope_scaling .*"linear".* is not supported/,
    );
    rejects({ ...upstream8b(), attention_bias: true }, /attention_bias must be false/);
  });

  it('rejects token ids outside the vocabulary', () => {
    rejects({ ...upstream8b(), vocab_size: 151800 }, /bos_token_id \(151849\) must be < vocab_size \(151800\)/);
    rejects({ ...upstream8b(), eol_token_id: -1 }, /eol_token_id must be >= 0, got -1/);
  });

  it('rejects a non-object', () => {
    rejects([] as unknown as Record<string, unknown>, /config must be a JSON object/);
  });
});

describe('loadEmu3Config', () => {
  it('reads DIR/config.json and names the file in its errors', () => {
    const dir = mkdtempSync(join(tmpdir(), 'config-test-'));
    try {
      const path = join(dir, 'config.json');
      assert.throws(
        () => loadEmu3Config(dir),
        (e: Error) => e.message.includes(path) && /cannot read \(ENOENT\)/.test(e.message),
      );
      writeFileSync(path, '{"hidden_size": 4096,');
      assert.throws(
        () => loadEmu3Config(dir),
        (e: Error) => e.message.startsWith(`${path}: invalid JSON`),
      );
      writeFileSync(path, JSON.stringify({ ...upstream8b(), hidden_size: 'big' }));
      assert.throws(
        () => loadEmu3Config(dir),
        (e: Error) => e.message.startsWith(`${path}: hidden_size must be an integer`),
      );
      writeFileSync(path, JSON.stringify(upstream8b()));
      assert.equal(loadEmu3Config(dir).headDim, 128);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
