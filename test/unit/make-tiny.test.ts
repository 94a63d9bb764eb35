import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { run } from '../../cli/main.js';
import { Checkpoint, expectedTensors, INDEX_FILE, tensorNames } from '../../lib/model/checkpoint.js';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';

const root = mkdtempSync(join(tmpdir(), 'make-tiny-test-'));
const dirs = {
  a: join(root, 'a'),
  b: join(root, 'b'),
  other: join(root, 'other'),
  sharded: join(root, 'sharded'),
  bf16: join(root, 'bf16'),
};

before(() => {
  writeTinyEmu3(dirs.a, { seed: 7, preset: 'tiny', dtype: 'f32', shards: 1 });
  writeTinyEmu3(dirs.b, { seed: 7, preset: 'tiny', dtype: 'f32', shards: 1 });
  writeTinyEmu3(dirs.other, { seed: 8, preset: 'tiny', dtype: 'f32', shards: 1 });
  writeTinyEmu3(dirs.sharded, { seed: 7, preset: 'tiny', dtype: 'f32', shards: 3 });
  writeTinyEmu3(dirs.bf16, { seed: 7, preset: 'tiny', dtype: 'bf16', shards: 1 });
});
after(() => rmSync(root, { recursive: true, force: true }));

describe('make-tiny: files in the upstream layout', () => {
  it('writes config.json with the real keys and ids, parsed back by Checkpoint', () => {
    const raw = JSON.parse(readFileSync(join(dirs.a, 'config.json'), 'utf8'));
    assert.equal(raw.model_type, 'Emu3');
    assert.deepEqual(raw.architectures, ['Emu3ForCausalLM']);
    assert.equal(raw.torch_dtype, 'float32');
    const ck = Checkpoint.open(dirs.a);
    try {
      const c = ck.config;
      // docs/model.md, "config.json" and "Special tokens and ids"
      assert.deepEqual(
        [
          c.vocabSize,
          c.padTokenId,
          c.bosTokenId,
          c.eosTokenId,
          c.imgTokenId,
          c.boiTokenId,
          c.eoiTokenId,
          c.eolTokenId,
          c.eofTokenId,
        ],
        [184622, 151643, 151849, 151850, 151851, 151852, 151853, 151846, 151847],
      );
      assert.deepEqual(
        [c.hiddenSize, c.numAttentionHeads, c.numKeyValueHeads, c.numHiddenLayers, c.intermediateSize],
        [64, 4, 2, 4, 176],
      );
      assert.equal(c.maxPositionEmbeddings, 2048);
      assert.equal(ck.layout, 'torch');
      assert.equal(expectedTensors(c).length, 4 * 9 + 3);
    } finally {
      ck.close();
    }
  });

  it('writes generation_config.json and special_tokens_map.json as on the hub', () => {
    const gen = readFileSync(join(dirs.a, 'generation_config.json'), 'utf8');
    assert.deepEqual(JSON.parse(gen), {
      _from_model_config: true,
      bos_token_id: 151849,
      eos_token_id: 151850,
      pad_token_id: 151643,
      transformers_version: '4.44.0',
    });
    assert.equal(Buffer.byteLength(gen), 147); // hub listing size
    const stm = readFileSync(join(dirs.a, 'special_tokens_map.json'), 'utf8');
    assert.deepEqual(JSON.parse(stm), {
      bos_token: '<|extra_203|>',
      eos_token: '<|extra_204|>',
      pad_token: '<|endoftext|>',
    });
    assert.equal(Buffer.byteLength(stm), 99); // hub listing size
    const tok = JSON.parse(readFileSync(join(dirs.a, 'tokenizer_config.json'), 'utf8'));
    assert.equal(tok.tokenizer_class, 'Emu3Tokenizer');
    assert.equal(tok.bos_token, '<|extra_203|>');
  });

  it('is deterministic: same seed, same bytes; another seed, another fingerprint', () => {
    for (const f of readdirSync(dirs.a)) {
      assert.ok(
        readFileSync(join(dirs.a, f)).equals(readFileSync(join(dirs.b, f))),
        `${f} differs between two runs with seed 7`,
      );
    }
    const [a, b, o] = [dirs.a, dirs.b, dirs.other].map((d) => {
      const ck = Checkpoint.open(d);
      const fp = ck.fingerprint();
      ck.close();
      return fp;
    });
    assert.equal(a, b);
    assert.notEqual(a, o);
  });

  it('shards like HF: K files + index with total_size, same values as the single file', () => {
    const files = readdirSync(dirs.sharded)
      .filter((f) => f.endsWith('.safetensors'))
      .sort();
    assert.deepEqual(
      files,
      [1, 2, 3].map((i) => `model-0000${i}-of-00003.safetensors`),
    );
    assert.ok(!existsSync(join(dirs.sharded, 'model.safetensors')));
    const index = JSON.parse(readFileSync(join(dirs.sharded, INDEX_FILE), 'utf8'));
    const single = Checkpoint.open(dirs.a);
    const sharded = Checkpoint.open(dirs.sharded);
    try {
      const expected = expectedTensors(single.config);
      assert.deepEqual(Object.keys(index.weight_map).sort(), expected.map((t) => t.name).sort());
      assert.equal(new Set(Object.values(index.weight_map)).size, 3);
      const total = expected.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1) * 4, 0);
      assert.equal(index.metadata.total_size, total);
      for (const t of expected) assert.deepEqual(sharded.read(t.name, t.shape), single.read(t.name, t.shape), t.name);
    } finally {
      single.close();
      sharded.close();
    }
  });

  it('bf16 weights are the f32 weights rounded to bf16 (relative error <= 2^-8: half an ulp of an 8-bit significand)', () => {
    const f32 = Checkpoint.open(dirs.a);
    const bf = Checkpoint.open(dirs.bf16);
    try {
      assert.equal(JSON.parse(readFileSync(join(dirs.bf16, 'config.json'), 'utf8')).torch_dtype, 'bfloat16');
      for (const t of expectedTensors(f32.config).slice(0, 12)) {
        assert.equal(bf.info(t.name).dtype, 'BF16');
        const x = f32.read(t.name, t.shape);
        const y = bf.read(t.name, t.shape);
        for (let i = 0; i < x.length; i += 97)
          assert.ok(Math.abs(x[i] - y[i]) <= Math.abs(x[i]) * 2 ** -8, `${t.name}[${i}]`);
      }
    } finally {
      f32.close();
      bf.close();
    }
  });

  it('has non-degenerate logits: greedy decoding with a float64 reference forward pass does not repeat one token', () => {
    const ck = Checkpoint.open(dirs.a);
    try {
      const prompt = [151849, 40, 1079, 264, 1273, 13, 151852];
      const { generated, logitStd } = greedy(ck, prompt, 10);
      assert.ok(logitStd > 1 && logitStd < 20, `logit std ${logitStd} outside (1, 20)`);
      const distinct = new Set(generated).size;
      assert.ok(distinct >= 4, `greedy continuation ${generated.join(',')} has only ${distinct} distinct tokens`);
    } finally {
      ck.close();
    }
  });
});

describe('emu3 make-tiny (CLI)', () => {
  it('writes the model and tokenizer files with --no-vq, and rejects bad flags', async () => {
    const dir = join(root, 'cli');
    const log = console.log;
    const lines: string[] = [];
    console.log = (msg: string) => lines.push(msg);
    try {
      assert.equal(await run(['make-tiny', '--out', dir, '--seed', '3', '--shards', '2', '--no-vq']), 0);
    } finally {
      console.log = log;
    }
    assert.ok(
      lines.some((l) => l.includes('model-00002-of-00002.safetensors')),
      lines.join('\n'),
    );
    for (const f of ['config.json', INDEX_FILE, 'emu3.tiktoken', 'emu3_vision_tokens.txt'])
      assert.ok(existsSync(join(dir, f)), f);
    assert.ok(!existsSync(join(dir, 'vq')));
    const err = console.error;
    const errors: string[] = [];
    console.error = (msg: string) => errors.push(msg);
    try {
      assert.equal(await run(['make-tiny', '--out', dir, '--preset', 'huge']), 2);
      assert.equal(await run(['make-tiny', '--out', dir, '--shards', '0']), 2);
      assert.equal(await run(['make-tiny', '--shards', '2']), 2);
    } finally {
      console.error = err;
    }
    assert.match(errors[0], /--preset must be one of tiny\|small/);
    assert.match(errors[1], /--shards must be in \[1, 1000\]/);
    assert.match(errors[2], /--out is required/);
  });
});

/** A plain float64 Emu3 forward pass (docs/model.md, "Forward pass"), recomputing the whole sequence per step. */
function greedy(ck: Checkpoint, prompt: number[], steps: number): { generated: number[]; logitStd: number } {
  const c = ck.config;
  const H = c.hiddenSize;
  const hd = c.headDim;
  const nh = c.numAttentionHeads;
  const nkv = c.numKeyValueHeads;
  const I = c.intermediateSize;
  const embed = ck.read(tensorNames.embed, [c.vocabSize, H]);
  const lm = ck.readLinear(tensorNames.lmHead, c.vocabSize, H);
  const norm = ck.read(tensorNames.norm, [H]);
  const layers = Array.from({ length: c.numHiddenLayers }, (_, i) => {
    const n = tensorNames.layer(i);
    return {
      inNorm: ck.read(n.inputNorm, [H]),
      postNorm: ck.read(n.postNorm, [H]),
      q: ck.readLinear(n.q, H, H),
      k: ck.readLinear(n.k, nkv * hd, H),
      v: ck.readLinear(n.v, nkv * hd, H),
      o: ck.readLinear(n.o, H, H),
      gate: ck.readLinear(n.gate, I, H),
      up: ck.readLinear(n.up, I, H),
      down: ck.readLinear(n.down, H, I),
    };
  });
  const rms = (x: Float64Array, w: Float32Array) => {
    let s = 0;
    for (const v of x) s += v * v;
    const r = 1 / Math.sqrt(s / x.length + c.rmsNormEps);
    return x.map((v, i) => v * r * w[i]);
  };
  const matvec = (w: Float32Array, x: Float64Array, out: number) => {
    const y = new Float64Array(out);
    for (let o = 0; o < out; o++) {
      let s = 0;
      for (let i = 0; i < x.length; i++) s += w[o * x.length + i] * x[i];
      y[o] = s;
    }
    return y;
  };
  const rope = (x: Float64Array, heads: number, pos: number) => {
    const half = hd / 2;
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < half; i++) {
        const ang = pos / c.ropeTheta ** ((2 * i) / hd);
        const a = x[h * hd + i];
        const b = x[h * hd + i + half];
        x[h * hd + i] = a * Math.cos(ang) - b * Math.sin(ang);
        x[h * hd + i + half] = b * Math.cos(ang) + a * Math.sin(ang);
      }
    }
  };
  const ids = [...prompt];
  const generated: number[] = [];
  let logitStd = 0;
  for (let step = 0; step < steps; step++) {
    let hs = ids.map((id) => Float64Array.from(embed.subarray(id * H, (id + 1) * H)));
    for (const L of layers) {
      const a = hs.map((h) => rms(h, L.inNorm));
      const q = a.map((x, p) => {
        const y = matvec(L.q, x, H);
        rope(y, nh, p);
        return y;
      });
      const k = a.map((x, p) => {
        const y = matvec(L.k, x, nkv * hd);
        rope(y, nkv, p);
        return y;
      });
      const v = a.map((x) => matvec(L.v, x, nkv * hd));
      hs = hs.map((h, t) => {
        const att = new Float64Array(H);
        for (let head = 0; head < nh; head++) {
          const kvh = Math.floor(head / (nh / nkv));
          const scores = Array.from({ length: t + 1 }, (_, s) => {
            let d = 0;
            for (let i = 0; i < hd; i++) d += q[t][head * hd + i] * k[s][kvh * hd + i];
            return d / Math.sqrt(hd);
          });
          const m = Math.max(...scores);
          const e = scores.map((x) => Math.exp(x - m));
          const z = e.reduce((x, y) => x + y, 0);
          for (let s = 0; s <= t; s++)
            for (let i = 0; i < hd; i++) att[head * hd + i] += (e[s] / z) * v[s][kvh * hd + i];
        }
        const h1 = Float64Array.from(h);
        const o = matvec(L.o, att, H);
        for (let i = 0; i < H; i++) h1[i] += o[i];
        const m2 = rms(h1, L.postNorm);
        const g = matvec(L.gate, m2, I);
        const u = matvec(L.up, m2, I);
        const act = g.map((x, i) => (x / (1 + Math.exp(-x))) * u[i]);
        const d = matvec(L.down, act, H);
        for (let i = 0; i < H; i++) h1[i] += d[i];
        return h1;
      });
    }
    const last = rms(hs[hs.length - 1], norm);
    const logits = matvec(lm, last, c.vocabSize);
    let best = 0;
    let mean = 0;
    for (let i = 0; i < logits.length; i++) {
      if (logits[i] > logits[best]) best = i;
      mean += logits[i] / logits.length;
    }
    let varSum = 0;
    for (const l of logits) varSum += (l - mean) ** 2;
    logitStd = Math.sqrt(varSum / logits.length);
    ids.push(best);
    generated.push(best);
  }
  return { generated, logitStd };
}
