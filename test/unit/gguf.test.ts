// bench/gguf.ts: Q4_0 packing against a float64 decoding written here from the format's definition, the file layout
// read back by a small GGUF reader written here, the Q/K row order against RoPE itself (attention scores must not
// change), and a converted emu3-tiny checkpoint.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import {
  byteLevelAlphabet,
  convertCheckpointToGguf,
  type GgufTensor,
  type GgufValue,
  permuteForLlamaRope,
  quantizeQ4_0,
  writeGguf,
} from '../../bench/gguf.js';
import { Checkpoint, tensorNames } from '../../lib/model/checkpoint.js';
import { halfToFloat } from '../../lib/model/dtype.js';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';
import { Rng } from '../../lib/util/rng.js';

const root = mkdtempSync(join(tmpdir(), 'emu3-gguf-test-'));
after(() => rmSync(root, { recursive: true, force: true }));

/** One Q4_0 block decoded from its definition: fp16 scale d, then byte j = code(j) | code(j + 16) << 4. */
function decodeQ4Block(bytes: Uint8Array, block: number): { d: number; codes: number[] } {
  const o = block * 18;
  const d = halfToFloat(bytes[o] | (bytes[o + 1] << 8));
  const codes = new Array<number>(32);
  for (let j = 0; j < 16; j++) {
    codes[j] = bytes[o + 2 + j] & 0x0f;
    codes[j + 16] = bytes[o + 2 + j] >> 4;
  }
  return { d, codes };
}

test(
  'Q4_0: scale from the signed absmax, codes round(x/d) + 8 clamped to [0, 15], nibbles j / j+16',
  { timeout: 10_000 },
  () => {
    const rng = new Rng(11);
    const blocks = 64;
    const x = rng.fillNormal(new Float32Array(blocks * 32), 0.05);
    x.fill(0, 0, 32); // block 0: all zeros
    x[32 + 5] = -0.9; // block 1: the largest magnitude is negative
    x[64 + 30] = 0.7; // block 2: a positive outlier in the high half
    x[64 + 3] = -0.69; // ... and a value of opposite sign nearly as large, which must clamp at 15
    const q = quantizeQ4_0(x);
    assert.equal(q.length, blocks * 18);
    for (let b = 0; b < blocks; b++) {
      const v = Array.from(x.subarray(b * 32, (b + 1) * 32));
      let max = 0;
      for (const e of v) if (Math.abs(e) > Math.abs(max)) max = e;
      const dRef = max / -8;
      const { d, codes } = decodeQ4Block(q, b);
      assert.ok(Math.abs(d - dRef) <= Math.abs(dRef) * 2 ** -11, `block ${b}: scale ${d} vs ${dRef}`);
      for (let j = 0; j < 32; j++) {
        const want = dRef === 0 ? 8 : Math.min(15, Math.max(0, Math.floor(v[j] / dRef + 8.5)));
        assert.equal(codes[j], want, `block ${b} element ${j}`);
        const err = Math.abs(v[j] - d * (codes[j] - 8));
        const step = Math.abs(dRef) * (1 + 2 ** -8);
        assert.ok(err <= (codes[j] === 15 ? step : step / 2) + 1e-12, `block ${b} element ${j}: error ${err}`);
      }
    }
    assert.deepEqual(decodeQ4Block(q, 0).codes, new Array(32).fill(8));
    assert.equal(decodeQ4Block(q, 1).codes[5], 0, 'the largest magnitude maps to code 0 (d has the opposite sign)');
    assert.ok(decodeQ4Block(q, 1).d > 0);
    assert.equal(decodeQ4Block(q, 2).codes[30], 0);
    assert.equal(decodeQ4Block(q, 2).codes[3], 15);
    assert.throws(() => quantizeQ4_0(new Float32Array(33)), /multiple of 32/);
  },
);

interface ParsedGguf {
  version: number;
  kv: Map<string, unknown>;
  tensors: { name: string; dims: number[]; type: number; offset: number }[];
  dataStart: number;
}

/** A GGUF reader written from the format description, for the value types the writer uses. */
function parseGguf(buf: Buffer): ParsedGguf {
  let p = 0;
  const u32 = () => {
    const v = buf.readUInt32LE(p);
    p += 4;
    return v;
  };
  const u64 = () => {
    const v = Number(buf.readBigUInt64LE(p));
    p += 8;
    return v;
  };
  const str = () => {
    const n = u64();
    const s = buf.toString('utf8', p, p + n);
    p += n;
    return s;
  };
  const value = (type: number): unknown => {
    switch (type) {
      case 4:
        return u32();
      case 5: {
        const v = buf.readInt32LE(p);
        p += 4;
        return v;
      }
      case 6: {
        const v = buf.readFloatLE(p);
        p += 4;
        return v;
      }
      case 7:
        return buf[p++] !== 0;
      case 8:
        return str();
      case 9: {
        const itemType = u32();
        const n = u64();
        return Array.from({ length: n }, () => value(itemType));
      }
      case 10:
        return u64();
      default:
        throw new Error(`unexpected GGUF value type ${type} at byte ${p}`);
    }
  };
  assert.equal(buf.toString('latin1', 0, 4), 'GGUF');
  p = 4;
  const version = u32();
  const nTensors = u64();
  const nKv = u64();
  const kv = new Map<string, unknown>();
  for (let i = 0; i < nKv; i++) {
    const key = str();
    kv.set(key, value(u32()));
  }
  const tensors: ParsedGguf['tensors'] = [];
  for (let i = 0; i < nTensors; i++) {
    const name = str();
    const nDims = u32();
    const dims = Array.from({ length: nDims }, () => u64());
    tensors.push({ name, dims, type: u32(), offset: u64() });
  }
  const alignment = (kv.get('general.alignment') as number | undefined) ?? 32;
  return { version, kv, tensors, dataStart: Math.ceil(p / alignment) * alignment };
}

test('a written GGUF parses back: header, every value type, tensor infos, aligned data', { timeout: 10_000 }, () => {
  const f32 = Float32Array.from({ length: 6 }, (_, i) => i * 0.5 - 1);
  const odd = Float32Array.from([1, 2, 3, 4, 5]); // 20 bytes: the next tensor must be padded to the alignment
  const w = new Rng(2).fillNormal(new Float32Array(128), 1);
  const kv: [string, GgufValue][] = [
    ['general.architecture', { type: 'string', value: 'llama' }],
    ['general.alignment', { type: 'u32', value: 32 }],
    ['t.i32', { type: 'i32', value: -7 }],
    ['t.f32', { type: 'f32', value: 0.25 }],
    ['t.bool', { type: 'bool', value: true }],
    ['t.u64', { type: 'u64', value: 2 ** 40 + 3 }],
    ['t.strings', { type: 'strings', value: ['a', 'Ġb', ''] }],
    ['t.empty', { type: 'strings', value: [] }],
  ];
  const bytes = (a: Float32Array) => new Uint8Array(a.buffer);
  const tensors: GgufTensor[] = [
    { name: 'a', dims: [3, 2], type: 'F32', data: () => bytes(f32) },
    { name: 'odd', dims: [5], type: 'F32', data: () => bytes(odd) },
    { name: 'q', dims: [64, 2], type: 'Q4_0', data: () => quantizeQ4_0(w) },
  ];
  const path = join(root, 'small.gguf');
  writeGguf(path, kv, tensors);
  const buf = readFileSync(path);
  const g = parseGguf(buf);
  assert.equal(g.version, 3);
  assert.deepEqual(
    [...g.kv.entries()],
    kv.map(([k, v]) => [k, v.value]),
  );
  assert.deepEqual(
    g.tensors.map((t) => [t.name, t.dims, t.type]),
    [
      ['a', [3, 2], 0],
      ['odd', [5], 0],
      ['q', [64, 2], 2],
    ],
  );
  assert.equal(g.dataStart % 32, 0);
  for (const t of g.tensors) assert.equal(t.offset % 32, 0, `${t.name} offset ${t.offset}`);
  assert.deepEqual(
    g.tensors.map((t) => t.offset),
    [0, 32, 64],
  );
  const at = (i: number, n: number) =>
    buf.subarray(g.dataStart + g.tensors[i].offset, g.dataStart + g.tensors[i].offset + n);
  assert.deepEqual(new Float32Array(at(0, 24).buffer.slice(at(0, 24).byteOffset, at(0, 24).byteOffset + 24)), f32);
  assert.deepEqual([...at(1, 20)], [...bytes(odd)]);
  assert.deepEqual([...at(2, 72)], [...quantizeQ4_0(w)]);
  assert.equal(buf.length, g.dataStart + 64 + 72);
});

/** RoPE on one head in place, either on (i, i + d/2) pairs (HF rotate_half) or on (2i, 2i + 1) pairs (llama.cpp). */
function rope(v: Float64Array, pos: number, base: number, pairs: 'half' | 'adjacent'): Float64Array {
  const d = v.length;
  const out = new Float64Array(d);
  for (let i = 0; i < d / 2; i++) {
    const angle = pos * base ** ((-2 * i) / d);
    const [a, b] = pairs === 'half' ? [i, i + d / 2] : [2 * i, 2 * i + 1];
    out[a] = v[a] * Math.cos(angle) - v[b] * Math.sin(angle);
    out[b] = v[b] * Math.cos(angle) + v[a] * Math.sin(angle);
  }
  return out;
}

function matVec(w: Float32Array, x: Float64Array, rows: number): Float64Array {
  const cols = x.length;
  const out = new Float64Array(rows);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[r] += w[r * cols + c] * x[c];
  return out;
}

test(
  'the Q/K row permutation turns rotate_half RoPE into adjacent-pair RoPE with the same attention scores',
  { timeout: 10_000 },
  () => {
    const heads = 4;
    const kvHeads = 2;
    const d = 8;
    const cols = 12;
    const rng = new Rng(4);
    const wq = rng.fillNormal(new Float32Array(heads * d * cols), 1);
    const wk = rng.fillNormal(new Float32Array(kvHeads * d * cols), 1);
    const x1 = Float64Array.from(rng.fillNormal(new Float32Array(cols), 1));
    const x2 = Float64Array.from(rng.fillNormal(new Float32Array(cols), 1));
    const [p1, p2, base] = [7, 3, 10000];
    const pq = permuteForLlamaRope(wq, heads, cols);
    const pk = permuteForLlamaRope(wk, kvHeads, cols);
    const head = (v: Float64Array, h: number) => v.subarray(h * d, (h + 1) * d);
    const qHf = matVec(wq, x1, heads * d);
    const kHf = matVec(wk, x2, kvHeads * d);
    const qLl = matVec(pq, x1, heads * d);
    const kLl = matVec(pk, x2, kvHeads * d);
    for (let h = 0; h < heads; h++) {
      const kvh = Math.floor(h / (heads / kvHeads));
      const a = rope(head(qHf, h), p1, base, 'half');
      const b = rope(head(kHf, kvh), p2, base, 'half');
      const c = rope(head(qLl, h), p1, base, 'adjacent');
      const e = rope(head(kLl, kvh), p2, base, 'adjacent');
      const dot = (u: Float64Array, v: Float64Array) => u.reduce((s, ui, i) => s + ui * v[i], 0);
      assert.ok(Math.abs(dot(a, b) - dot(c, e)) < 1e-9, `head ${h}: ${dot(a, b)} vs ${dot(c, e)}`);
      assert.ok(Math.abs(dot(a, b)) > 1e-3, 'a non-trivial score');
    }
    // The permutation is not the identity (otherwise the check above would be vacuous for a rope-symmetric input).
    assert.notDeepEqual([...pq], [...wq]);
  },
);

test(
  'the GPT-2 byte alphabet: printable bytes are themselves, space is Ġ, newline is Ċ, 256 distinct',
  { timeout: 10_000 },
  () => {
    const a = byteLevelAlphabet();
    assert.equal(new Set(a).size, 256);
    assert.equal(a[0x41], 'A');
    assert.equal(a[0x20], 'Ġ');
    assert.equal(a[0x0a], 'Ċ');
    assert.equal(a[0x00], 'Ā');
    assert.equal(a[0xad], 'Ń');
    assert.equal(a[0xff], 'ÿ');
  },
);

test(
  'emu3-tiny converts to a llama GGUF with its hyperparameters, a full vocabulary and its own weights',
  { timeout: 120_000 },
  () => {
    const dir = join(root, 'tiny');
    writeTinyEmu3(dir, { seed: 1, preset: 'tiny', dtype: 'f32', shards: 2 });
    const out = join(root, 'tiny.q4_0.gguf');
    convertCheckpointToGguf(dir, out, 'q4_0');
    const buf = readFileSync(out);
    const g = parseGguf(buf);
    const ck = Checkpoint.open(dir);
    try {
      const c = ck.config;
      const expectKv: Record<string, unknown> = {
        'general.architecture': 'llama',
        'general.file_type': 2,
        'llama.context_length': c.maxPositionEmbeddings,
        'llama.embedding_length': c.hiddenSize,
        'llama.block_count': c.numHiddenLayers,
        'llama.feed_forward_length': c.intermediateSize,
        'llama.attention.head_count': c.numAttentionHeads,
        'llama.attention.head_count_kv': c.numKeyValueHeads,
        'llama.rope.dimension_count': c.headDim,
        'llama.vocab_size': c.vocabSize,
        'tokenizer.ggml.model': 'gpt2',
      };
      for (const [k, v] of Object.entries(expectKv)) assert.equal(g.kv.get(k), v, k);
      assert.equal(g.kv.get('llama.rope.freq_base'), Math.fround(c.ropeTheta));
      assert.equal(g.kv.get('llama.attention.layer_norm_rms_epsilon'), Math.fround(c.rmsNormEps));
      const tokens = g.kv.get('tokenizer.ggml.tokens') as string[];
      assert.equal(tokens.length, c.vocabSize);
      assert.equal(new Set(tokens).size, c.vocabSize, 'token strings are unique');
      assert.deepEqual(g.kv.get('tokenizer.ggml.merges'), []);
      assert.equal(g.tensors.length, 2 + 9 * c.numHiddenLayers + 1);
      const info = (name: string) => {
        const t = g.tensors.find((x) => x.name === name);
        assert.ok(t, name);
        return t;
      };
      assert.deepEqual(info('token_embd.weight').dims, [c.hiddenSize, c.vocabSize]);
      assert.equal(info('token_embd.weight').type, 0);
      assert.deepEqual(info('output.weight').dims, [c.hiddenSize, c.vocabSize]);
      assert.equal(info('output.weight').type, 2);
      assert.equal(info('blk.0.ffn_norm.weight').type, 0);
      assert.deepEqual(info('blk.0.ffn_down.weight').dims, [c.intermediateSize, c.hiddenSize]);
      assert.equal(c.intermediateSize % 32, 16, "tiny's down_proj rows are not whole Q4_0 blocks...");
      assert.equal(info('blk.0.ffn_down.weight').type, 0, '... so it stays F32');
      assert.equal(info('blk.0.ffn_up.weight').type, 2);

      // The embedding is stored as is.
      const embed = ck.read(tensorNames.embed, [c.vocabSize, c.hiddenSize]);
      const e = info('token_embd.weight');
      const stored = buf.subarray(g.dataStart + e.offset, g.dataStart + e.offset + embed.byteLength);
      assert.ok(stored.equals(new Uint8Array(embed.buffer, embed.byteOffset, embed.byteLength)));

      // attn_q row 2i + a of head h dequantises to q_proj row h·d + a·d/2 + i (within a Q4_0 step).
      const D = c.hiddenSize;
      const d = c.headDim;
      const wq = ck.readLinear(tensorNames.layer(0).q, c.numAttentionHeads * d, D);
      const q = info('blk.0.attn_q.weight');
      const qBytes = buf.subarray(g.dataStart + q.offset);
      const blocksPerRow = D / 32;
      for (const [h, i, a] of [
        [0, 0, 0],
        [0, 0, 1],
        [1, 3, 1],
        [c.numAttentionHeads - 1, d / 2 - 1, 0],
      ]) {
        const row = h * d + 2 * i + a;
        const src = h * d + a * (d / 2) + i;
        for (let b = 0; b < blocksPerRow; b++) {
          const { d: scale, codes } = decodeQ4Block(qBytes, row * blocksPerRow + b);
          for (let j = 0; j < 32; j++) {
            const want = wq[src * D + b * 32 + j];
            assert.ok(
              Math.abs(scale * (codes[j] - 8) - want) <= Math.abs(scale) * 1.01 + 1e-12,
              `row ${row} col ${b * 32 + j}`,
            );
          }
        }
      }
    } finally {
      ck.close();
    }
  },
);
