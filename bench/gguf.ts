// A small GGUF v3 writer (bench-only): turns an Emu3 checkpoint into a llama-architecture GGUF that llama.cpp loads,
// with F32 or Q4_0 linear weights, so that bench/llama-cpp.ts can run llama.cpp on exactly our weights.
//
// File layout (little-endian): "GGUF", u32 version 3, u64 tensor count, u64 key/value count; the key/value pairs
// (string key, u32 value type, value); one info per tensor (string name, u32 n_dims, u64 dims innermost first, u32
// ggml type, u64 offset into the data section); zero padding to the alignment; the tensor data, each tensor starting
// at a multiple of the alignment. A string is a u64 byte length and UTF-8 bytes without a terminator.
import { closeSync, openSync, renameSync, writeSync } from 'node:fs';
import { Checkpoint, tensorNames } from '../lib/model/checkpoint.js';
import { floatToHalf } from '../lib/model/dtype.js';

export const GGUF_MAGIC = 'GGUF';
export const GGUF_VERSION = 3;
export const GGUF_ALIGNMENT = 32;

/** GGUF metadata value type ids. */
export const GGUF_VALUE = { u32: 4, i32: 5, f32: 6, bool: 7, string: 8, array: 9, u64: 10 } as const;

export type GgufValue =
  | { type: 'u32'; value: number }
  | { type: 'i32'; value: number }
  | { type: 'f32'; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'u64'; value: number }
  | { type: 'strings'; value: readonly string[] };

export type GgmlType = 'F32' | 'Q4_0';

/** ggml_type ids. */
export const GGML_TYPE_ID: Record<GgmlType, number> = { F32: 0, Q4_0: 2 };

/** Q4_0: blocks of 32 values, each an fp16 scale and 16 bytes of 4-bit codes. */
export const Q4_0_BLOCK = 32;
export const Q4_0_BLOCK_BYTES = 2 + Q4_0_BLOCK / 2;

export interface GgufTensor {
  name: string;
  /** ggml order: dims[0] is the innermost (contiguous) one, so a torch [out, in] weight is [in, out]. */
  dims: number[];
  type: GgmlType;
  /** The encoded data, produced when the writer reaches this tensor (so only one tensor is in memory at a time). */
  data: () => Uint8Array;
}

export function tensorByteSize(type: GgmlType, dims: readonly number[]): number {
  const n = dims.reduce((a, b) => a * b, 1);
  if (type === 'F32') return n * 4;
  if (dims[0] % Q4_0_BLOCK !== 0) throw new Error(`Q4_0 needs rows of a multiple of ${Q4_0_BLOCK}, got ${dims[0]}`);
  return (n / Q4_0_BLOCK) * Q4_0_BLOCK_BYTES;
}

const align = (n: number, a: number) => Math.ceil(n / a) * a;

/** Growable little-endian byte buffer for the header. */
class ByteWriter {
  private buf = Buffer.alloc(1 << 16);
  length = 0;

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    const next = Buffer.alloc(Math.max(this.buf.length * 2, this.length + n));
    this.buf.copy(next, 0, 0, this.length);
    this.buf = next;
  }
  u32(v: number): void {
    this.reserve(4);
    this.buf.writeUInt32LE(v, this.length);
    this.length += 4;
  }
  i32(v: number): void {
    this.reserve(4);
    this.buf.writeInt32LE(v, this.length);
    this.length += 4;
  }
  u64(v: number): void {
    this.reserve(8);
    this.buf.writeBigUInt64LE(BigInt(v), this.length);
    this.length += 8;
  }
  f32(v: number): void {
    this.reserve(4);
    this.buf.writeFloatLE(v, this.length);
    this.length += 4;
  }
  u8(v: number): void {
    this.reserve(1);
    this.buf[this.length++] = v;
  }
  string(s: string): void {
    const bytes = Buffer.from(s, 'utf8');
    this.u64(bytes.length);
    this.reserve(bytes.length);
    bytes.copy(this.buf, this.length);
    this.length += bytes.length;
  }
  zeros(n: number): void {
    this.reserve(n);
    this.buf.fill(0, this.length, this.length + n);
    this.length += n;
  }
  bytes(): Buffer {
    return this.buf.subarray(0, this.length);
  }
}

function writeValue(w: ByteWriter, v: GgufValue): void {
  w.u32(v.type === 'strings' ? GGUF_VALUE.array : GGUF_VALUE[v.type]);
  switch (v.type) {
    case 'u32':
      w.u32(v.value);
      break;
    case 'i32':
      w.i32(v.value);
      break;
    case 'f32':
      w.f32(v.value);
      break;
    case 'bool':
      w.u8(v.value ? 1 : 0);
      break;
    case 'string':
      w.string(v.value);
      break;
    case 'u64':
      w.u64(v.value);
      break;
    case 'strings':
      w.u32(GGUF_VALUE.string);
      w.u64(v.value.length);
      for (const item of v.value) w.string(item);
      break;
  }
}

/**
 * Everything before the tensor data: header, key/values, tensor infos, padding to `alignment`. Also returns each
 * tensor's offset within the data section.
 */
export function encodeGgufHeader(
  kv: ReadonlyArray<[string, GgufValue]>,
  tensors: ReadonlyArray<Pick<GgufTensor, 'name' | 'dims' | 'type'>>,
  alignment = GGUF_ALIGNMENT,
): { header: Buffer; offsets: number[]; dataBytes: number } {
  const w = new ByteWriter();
  for (const c of GGUF_MAGIC) w.u8(c.charCodeAt(0));
  w.u32(GGUF_VERSION);
  w.u64(tensors.length);
  w.u64(kv.length);
  for (const [key, value] of kv) {
    w.string(key);
    writeValue(w, value);
  }
  const offsets: number[] = [];
  let offset = 0;
  for (const t of tensors) {
    offsets.push(offset);
    w.string(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.u64(d);
    w.u32(GGML_TYPE_ID[t.type]);
    w.u64(offset);
    offset = align(offset + tensorByteSize(t.type, t.dims), alignment);
  }
  w.zeros(align(w.length, alignment) - w.length);
  return { header: w.bytes(), offsets, dataBytes: offset };
}

/** Writes a GGUF file (to `path.partial`, renamed when complete, so an interrupted run leaves no truncated file). */
export function writeGguf(
  path: string,
  kv: ReadonlyArray<[string, GgufValue]>,
  tensors: readonly GgufTensor[],
  alignment = GGUF_ALIGNMENT,
): void {
  const { header, offsets } = encodeGgufHeader(kv, tensors, alignment);
  const partial = `${path}.partial`;
  const fd = openSync(partial, 'w');
  try {
    writeSync(fd, header);
    let written = 0;
    tensors.forEach((t, i) => {
      if (written < offsets[i]) {
        writeSync(fd, new Uint8Array(offsets[i] - written));
        written = offsets[i];
      }
      const data = t.data();
      const expected = tensorByteSize(t.type, t.dims);
      if (data.byteLength !== expected)
        throw new Error(`gguf: tensor ${t.name} has ${data.byteLength} bytes, expected ${expected}`);
      writeSync(fd, data);
      written += data.byteLength;
    });
  } finally {
    closeSync(fd);
  }
  renameSync(partial, path);
}

/**
 * Q4_0 as ggml's reference quantiser does it: per block of 32, d = (the value of largest magnitude) / -8, kept as
 * fp16; code q = min(15, trunc(x/d + 8.5)) (computed in float32 with the reciprocal of the unrounded d), so x ≈ d·(q − 8).
 * Element j of a block goes in the low nibble and element j + 16 in the high nibble of byte j.
 */
export function quantizeQ4_0(x: Float32Array): Uint8Array {
  if (x.length % Q4_0_BLOCK !== 0) throw new Error(`Q4_0 needs a multiple of ${Q4_0_BLOCK} values, got ${x.length}`);
  const blocks = x.length / Q4_0_BLOCK;
  const out = new Uint8Array(blocks * Q4_0_BLOCK_BYTES);
  const f = Math.fround;
  const half = Q4_0_BLOCK / 2;
  for (let b = 0; b < blocks; b++) {
    const base = b * Q4_0_BLOCK;
    let amax = 0;
    let max = 0;
    for (let j = 0; j < Q4_0_BLOCK; j++) {
      const v = x[base + j];
      if (Math.abs(v) > amax) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = f(max / -8);
    const id = d === 0 ? 0 : f(1 / d);
    const h = floatToHalf(d);
    const o = b * Q4_0_BLOCK_BYTES;
    out[o] = h & 0xff;
    out[o + 1] = h >>> 8;
    const code = (v: number) => Math.min(15, Math.trunc(f(f(v * id) + 8.5)));
    for (let j = 0; j < half; j++) out[o + 2 + j] = code(x[base + j]) | (code(x[base + half + j]) << 4);
  }
  return out;
}

/**
 * HF applies RoPE to (first half, second half) pairs of each head (rotate_half); llama.cpp's llama architecture
 * rotates adjacent pairs. Its converter therefore reorders the rows of q_proj/k_proj within each head so that
 * new row 2i + a is old row a·(head_dim/2) + i; attention scores are unchanged. `w` is torch [heads·head_dim, cols].
 */
export function permuteForLlamaRope(w: Float32Array, heads: number, cols: number): Float32Array {
  const rows = w.length / cols;
  const headDim = rows / heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0)
    throw new Error(`gguf: ${rows} rows do not split into ${heads} heads of even size`);
  const out = new Float32Array(w.length);
  const halfDim = headDim / 2;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < halfDim; i++) {
      for (let a = 0; a < 2; a++) {
        const src = (h * headDim + a * halfDim + i) * cols;
        const dst = (h * headDim + 2 * i + a) * cols;
        out.set(w.subarray(src, src + cols), dst);
      }
    }
  }
  return out;
}

/**
 * GPT-2's byte-level alphabet: byte b is the character b itself when printable (0x21–0x7e, 0xa1–0xac, 0xae–0xff), and
 * otherwise the character 256 + k for the k-th unprintable byte in byte order.
 */
export function byteLevelAlphabet(): string[] {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let k = 0;
  return Array.from({ length: 256 }, (_, b) => String.fromCodePoint(printable(b) ? b : 256 + k++));
}

/**
 * The smallest tokenizer section node-llama-cpp loads. llama.cpp itself accepts tokenizer.ggml.model "none" (dummy
 * tokens, `llama.vocab_size` of them), but node-llama-cpp tokenizes a test string while loading any model, which
 * aborts on a model without a tokenizer. So: a byte-level BPE ("gpt2") vocabulary whose first 256 tokens are the byte
 * alphabet (any text tokenizes to bytes and back) and whose other tokens are placeholders, with no merges. The
 * benchmark feeds token ids, so these strings are never used for the model's real tokens.
 */
export function placeholderTokenizer(vocabSize: number, bosId: number, eosId: number): [string, GgufValue][] {
  const bytes = byteLevelAlphabet();
  const tokens = Array.from({ length: vocabSize }, (_, i) => (i < 256 ? bytes[i] : `<|emu3_${i}|>`));
  return [
    ['tokenizer.ggml.model', { type: 'string', value: 'gpt2' }],
    ['tokenizer.ggml.pre', { type: 'string', value: 'default' }],
    ['tokenizer.ggml.tokens', { type: 'strings', value: tokens }],
    ['tokenizer.ggml.merges', { type: 'strings', value: [] }],
    ['tokenizer.ggml.bos_token_id', { type: 'u32', value: bosId }],
    ['tokenizer.ggml.eos_token_id', { type: 'u32', value: eosId }],
  ];
}

export type GgufPrecision = 'f32' | 'q4_0';

const f32Bytes = (a: Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/**
 * The llama-architecture GGUF of an Emu3 checkpoint. Norms and the token embedding stay F32 in both precisions (as
 * our int4 stage keeps the embedding fp32; it is a row lookup, so it costs no compute); every Linear weight,
 * lm_head included, is F32 or Q4_0 (F32 where a row is not a whole number of Q4_0 blocks). The tokenizer is a placeholder (see placeholderTokenizer): feed token ids.
 */
export function checkpointToGguf(
  dir: string,
  precision: GgufPrecision,
): { kv: [string, GgufValue][]; tensors: GgufTensor[]; close: () => void } {
  const ck = Checkpoint.open(dir);
  const c = ck.config;
  const D = c.hiddenSize;
  const qDim = c.numAttentionHeads * c.headDim;
  const kvDim = c.numKeyValueHeads * c.headDim;
  const u32 = (value: number): GgufValue => ({ type: 'u32', value });
  const kv: [string, GgufValue][] = [
    ['general.architecture', { type: 'string', value: 'llama' }],
    ['general.name', { type: 'string', value: `emu3 ${c.numHiddenLayers}x${D} (${precision})` }],
    // llama_ftype: 0 = all F32, 2 = mostly Q4_0.
    ['general.file_type', u32(precision === 'q4_0' ? 2 : 0)],
    ['general.alignment', u32(GGUF_ALIGNMENT)],
    ['llama.context_length', u32(c.maxPositionEmbeddings)],
    ['llama.embedding_length', u32(D)],
    ['llama.block_count', u32(c.numHiddenLayers)],
    ['llama.feed_forward_length', u32(c.intermediateSize)],
    ['llama.attention.head_count', u32(c.numAttentionHeads)],
    ['llama.attention.head_count_kv', u32(c.numKeyValueHeads)],
    ['llama.attention.key_length', u32(c.headDim)],
    ['llama.attention.value_length', u32(c.headDim)],
    ['llama.rope.freq_base', { type: 'f32', value: c.ropeTheta }],
    ['llama.rope.dimension_count', u32(c.headDim)],
    ['llama.attention.layer_norm_rms_epsilon', { type: 'f32', value: c.rmsNormEps }],
    ['llama.vocab_size', u32(c.vocabSize)],
    ...placeholderTokenizer(c.vocabSize, c.bosTokenId, c.eosTokenId),
  ];
  const tensors: GgufTensor[] = [
    {
      name: 'token_embd.weight',
      dims: [D, c.vocabSize],
      type: 'F32',
      data: () => f32Bytes(ck.read(tensorNames.embed, [c.vocabSize, D])),
    },
  ];
  const linear = (name: string, gguf: string, out: number, inp: number, heads = 0) => {
    // Q4_0 blocks run along a row; a row length that is not a multiple of 32 stays F32 (as llama.cpp's quantizer
    // also falls back for such tensors). Only emu3-tiny's down_proj (176 columns) has one.
    const type: GgmlType = precision === 'q4_0' && inp % Q4_0_BLOCK === 0 ? 'Q4_0' : 'F32';
    tensors.push({
      name: gguf,
      dims: [inp, out],
      type,
      data: () => {
        const w = ck.readLinear(name, out, inp);
        const rows = heads ? permuteForLlamaRope(w, heads, inp) : w;
        return type === 'Q4_0' ? quantizeQ4_0(rows) : f32Bytes(rows);
      },
    });
  };
  const norm = (name: string, gguf: string) =>
    tensors.push({ name: gguf, dims: [D], type: 'F32', data: () => f32Bytes(ck.read(name, [D])) });
  for (let i = 0; i < c.numHiddenLayers; i++) {
    const n = tensorNames.layer(i);
    const b = `blk.${i}`;
    norm(n.inputNorm, `${b}.attn_norm.weight`);
    linear(n.q, `${b}.attn_q.weight`, qDim, D, c.numAttentionHeads);
    linear(n.k, `${b}.attn_k.weight`, kvDim, D, c.numKeyValueHeads);
    linear(n.v, `${b}.attn_v.weight`, kvDim, D);
    linear(n.o, `${b}.attn_output.weight`, D, qDim);
    norm(n.postNorm, `${b}.ffn_norm.weight`);
    linear(n.gate, `${b}.ffn_gate.weight`, c.intermediateSize, D);
    linear(n.up, `${b}.ffn_up.weight`, c.intermediateSize, D);
    linear(n.down, `${b}.ffn_down.weight`, D, c.intermediateSize);
  }
  norm(tensorNames.norm, 'output_norm.weight');
  linear(tensorNames.lmHead, 'output.weight', c.vocabSize, D);
  return { kv, tensors, close: () => ck.close() };
}

/** Converts the checkpoint in `dir` to a GGUF file at `out`. */
export function convertCheckpointToGguf(dir: string, out: string, precision: GgufPrecision): void {
  const { kv, tensors, close } = checkpointToGguf(dir, precision);
  try {
    writeGguf(out, kv, tensors);
  } finally {
    close();
  }
}
