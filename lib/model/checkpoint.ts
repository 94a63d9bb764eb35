// An Emu3 LLM checkpoint directory as published upstream: config.json plus either one `model.safetensors` or
// `model.safetensors.index.json` naming the shards. Tensors are read one at a time; nothing reads a file whole.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { type Emu3Config, loadEmu3Config } from './config.js';
import { isFloatDtype } from './dtype.js';
import { CheckpointError } from './errors.js';
import { SafetensorsFile, type TensorInfo } from './safetensors.js';

export type { TensorInfo } from './safetensors.js';

export const SINGLE_FILE = 'model.safetensors';
export const INDEX_FILE = 'model.safetensors.index.json';

export const tensorNames = {
  embed: 'model.embed_tokens.weight',
  norm: 'model.norm.weight',
  lmHead: 'lm_head.weight',
  layer(i: number) {
    const p = `model.layers.${i}`;
    return {
      inputNorm: `${p}.input_layernorm.weight`,
      q: `${p}.self_attn.q_proj.weight`,
      k: `${p}.self_attn.k_proj.weight`,
      v: `${p}.self_attn.v_proj.weight`,
      o: `${p}.self_attn.o_proj.weight`,
      postNorm: `${p}.post_attention_layernorm.weight`,
      gate: `${p}.mlp.gate_proj.weight`,
      up: `${p}.mlp.up_proj.weight`,
      down: `${p}.mlp.down_proj.weight`,
    };
  },
};

export interface ExpectedTensor {
  name: string;
  /** Torch layout: a Linear weight is [out, in]. */
  shape: number[];
  linear: boolean;
}

/**
 * Every tensor of the model (docs/model.md, "Checkpoint tensors") in module order; lm_head is absent when the
 * embeddings are tied.
 */
export function expectedTensors(c: Emu3Config): ExpectedTensor[] {
  const kv = c.numKeyValueHeads * c.headDim;
  const h = c.hiddenSize;
  const list: ExpectedTensor[] = [{ name: tensorNames.embed, shape: [c.vocabSize, h], linear: false }];
  for (let i = 0; i < c.numHiddenLayers; i++) {
    const n = tensorNames.layer(i);
    list.push(
      { name: n.inputNorm, shape: [h], linear: false },
      { name: n.q, shape: [h, h], linear: true },
      { name: n.k, shape: [kv, h], linear: true },
      { name: n.v, shape: [kv, h], linear: true },
      { name: n.o, shape: [h, h], linear: true },
      { name: n.postNorm, shape: [h], linear: false },
      { name: n.gate, shape: [c.intermediateSize, h], linear: true },
      { name: n.up, shape: [c.intermediateSize, h], linear: true },
      { name: n.down, shape: [h, c.intermediateSize], linear: true },
    );
  }
  list.push({ name: tensorNames.norm, shape: [h], linear: false });
  if (!c.tieWordEmbeddings) list.push({ name: tensorNames.lmHead, shape: [c.vocabSize, h], linear: true });
  return list;
}

const FINGERPRINT_SAMPLE = 64 * 1024;

const shapeStr = (s: readonly number[]) => `[${s.join(', ')}]`;
const sameShape = (a: readonly number[], b: readonly number[]) =>
  a.length === b.length && a.every((d, i) => d === b[i]);

export class Checkpoint {
  private fingerprintCache: string | null = null;

  private constructor(
    readonly dir: string,
    readonly config: Emu3Config,
    readonly layout: 'torch' | 'paddle',
    /** Paths of the safetensors files, in index order. */
    readonly files: string[],
    private readonly shards: SafetensorsFile[],
    private readonly where: Map<string, SafetensorsFile>,
    private readonly indexBytes: Buffer | null,
  ) {}

  /** Opens config.json and the safetensors (single file or sharded index) and checks every tensor's presence and shape. */
  static open(dir: string): Checkpoint {
    const config = loadEmu3Config(dir);
    const indexPath = join(dir, INDEX_FILE);
    const singlePath = join(dir, SINGLE_FILE);
    const shards: SafetensorsFile[] = [];
    const where = new Map<string, SafetensorsFile>();
    let indexBytes: Buffer | null = null;
    try {
      if (existsSync(singlePath)) {
        const f = SafetensorsFile.open(singlePath);
        shards.push(f);
        for (const name of f.tensors.keys()) where.set(name, f);
      } else if (existsSync(indexPath)) {
        indexBytes = readFileSync(indexPath);
        const weightMap = parseIndex(indexPath, indexBytes);
        const byFile = new Map<string, SafetensorsFile>();
        for (const [tensor, file] of Object.entries(weightMap)) {
          let f = byFile.get(file);
          if (!f) {
            const path = join(dir, file);
            if (!existsSync(path))
              throw new CheckpointError(`${indexPath}: names ${file} (for ${tensor}), which does not exist`);
            f = SafetensorsFile.open(path);
            byFile.set(file, f);
            shards.push(f);
          }
          if (!f.tensors.has(tensor)) {
            throw new CheckpointError(`${f.path}: tensor ${tensor} is missing (${INDEX_FILE} maps it to this file)`);
          }
          where.set(tensor, f);
        }
      } else {
        throw new CheckpointError(`${dir}: neither ${SINGLE_FILE} nor ${INDEX_FILE} exists`);
      }
      const layout = detectLayout(dir, config, where);
      const ckpt = new Checkpoint(
        dir,
        config,
        layout,
        shards.map((s) => s.path),
        shards,
        where,
        indexBytes,
      );
      ckpt.validate();
      return ckpt;
    } catch (e) {
      for (const s of shards) s.close();
      throw e;
    }
  }

  /** Checks that every expected tensor exists with its expected shape (in this checkpoint's layout) and a float dtype. */
  private validate(): void {
    for (const t of expectedTensors(this.config)) {
      const stored = this.storedShape(t);
      const info = this.info(t.name);
      if (!sameShape(info.shape, stored)) {
        throw new CheckpointError(
          `${info.file}: tensor ${t.name} has shape ${shapeStr(info.shape)}, expected ${shapeStr(stored)}` +
            ` (${this.layout} layout, from config.json)`,
        );
      }
      if (!isFloatDtype(info.dtype)) {
        throw new CheckpointError(
          `${info.file}: tensor ${t.name} has dtype ${info.dtype}; only F32, BF16 and F16 are supported`,
        );
      }
    }
  }

  private storedShape(t: ExpectedTensor): number[] {
    return t.linear && this.layout === 'paddle' ? [t.shape[1], t.shape[0]] : t.shape;
  }

  has(name: string): boolean {
    return this.where.has(name);
  }

  info(name: string): TensorInfo {
    const f = this.where.get(name);
    if (!f) throw new CheckpointError(`${this.dir}: tensor ${name} is missing from the checkpoint`);
    return f.info(name);
  }

  /** Reads a float tensor (F32, BF16 or F16) as float32, exactly as stored; `shape` must equal the stored shape. */
  read(name: string, shape: number[]): Float32Array {
    const f = this.where.get(name);
    if (!f) throw new CheckpointError(`${this.dir}: tensor ${name} is missing from the checkpoint`);
    const info = f.info(name);
    if (!sameShape(info.shape, shape)) {
      throw new CheckpointError(
        `${f.path}: tensor ${name} has shape ${shapeStr(info.shape)}, expected ${shapeStr(shape)}`,
      );
    }
    return f.readF32(name);
  }

  /** Reads a Linear weight and returns it in torch layout [out, in], transposing a Paddle [in, out] weight. */
  readLinear(name: string, out: number, inp: number): Float32Array {
    // Tied embeddings (upstream tie_word_embeddings): lm_head is the embedding, [vocab, hidden] in both layouts.
    if (name === tensorNames.lmHead && this.config.tieWordEmbeddings && !this.where.has(name)) {
      return this.read(tensorNames.embed, [out, inp]);
    }
    if (this.layout === 'torch') return this.read(name, [out, inp]);
    return transpose(this.read(name, [inp, out]), inp, out);
  }

  /**
   * sha256 (hex) over config.json, the index, and per file: name, size, header and three 64 KiB samples of the
   * data (start, middle, end). Reads well under a megabyte whatever the checkpoint's size.
   */
  fingerprint(): string {
    if (this.fingerprintCache) return this.fingerprintCache;
    const h = createHash('sha256');
    h.update(readFileSync(join(this.dir, 'config.json')));
    h.update(this.indexBytes ?? Buffer.alloc(0));
    for (const f of this.shards) {
      h.update(`\0${basename(f.path)}\0${f.fileSize}\0`);
      h.update(f.headerBytes);
      const dataStart = 8 + f.headerBytes.length;
      const dataLen = f.fileSize - dataStart;
      const starts = [0, Math.floor(dataLen / 2 - FINGERPRINT_SAMPLE / 2), dataLen - FINGERPRINT_SAMPLE];
      for (const s of starts) {
        const begin = Math.max(0, s);
        h.update(f.readAt(dataStart + begin, Math.min(FINGERPRINT_SAMPLE, dataLen - begin)));
      }
    }
    this.fingerprintCache = h.digest('hex');
    return this.fingerprintCache;
  }

  close(): void {
    for (const s of this.shards) s.close();
  }
}

function parseIndex(path: string, bytes: Buffer): Record<string, string> {
  let json: unknown;
  try {
    json = JSON.parse(bytes.toString('utf8'));
  } catch (e) {
    throw new CheckpointError(`${path}: invalid JSON (${(e as Error).message})`);
  }
  const map = (json as { weight_map?: unknown } | null)?.weight_map;
  if (typeof map !== 'object' || map === null || Array.isArray(map)) {
    throw new CheckpointError(`${path}: weight_map must be an object of tensor name → file name`);
  }
  for (const [tensor, file] of Object.entries(map)) {
    // A file name, not a path: the index must not reach outside the model directory.
    if (typeof file !== 'string' || file === '' || file.includes('/') || file.includes('\\') || file === '..') {
      throw new CheckpointError(
        `${path}: weight_map[${tensor}] must be a file name in the same directory, got ${JSON.stringify(file)}`,
      );
    }
  }
  return map as Record<string, string>;
}

/**
 * Torch stores a Linear weight as [out, in], Paddle as [in, out]. Layer 0's k_proj is [kv_heads·head_dim, hidden] in
 * torch layout, which is not square under GQA, so its shape tells the two apart; with MHA (square k_proj) the MLP's
 * gate_proj [intermediate, hidden] decides instead.
 */
function detectLayout(dir: string, c: Emu3Config, where: Map<string, SafetensorsFile>): 'torch' | 'paddle' {
  const n = tensorNames.layer(0);
  const candidates: [string, number, number][] = [
    [n.k, c.numKeyValueHeads * c.headDim, c.hiddenSize],
    [n.gate, c.intermediateSize, c.hiddenSize],
  ];
  for (const [name, out, inp] of candidates) {
    if (out === inp) continue;
    const f = where.get(name);
    if (!f) throw new CheckpointError(`${dir}: tensor ${name} is missing (needed to tell torch from Paddle layout)`);
    const s = f.info(name).shape;
    if (sameShape(s, [out, inp])) return 'torch';
    if (sameShape(s, [inp, out])) return 'paddle';
    throw new CheckpointError(
      `${f.path}: tensor ${name} has shape ${shapeStr(s)}, expected ${shapeStr([out, inp])} (torch layout) or ` +
        `${shapeStr([inp, out])} (Paddle layout) from config.json`,
    );
  }
  throw new CheckpointError(
    `${dir}: cannot tell torch from Paddle layout: k_proj and gate_proj of layer 0 are both square in config.json`,
  );
}

function transpose(a: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(a.length);
  // Blocked so that both the reads and the writes stay within cache lines for large matrices.
  const B = 64;
  for (let r0 = 0; r0 < rows; r0 += B) {
    const r1 = Math.min(rows, r0 + B);
    for (let c0 = 0; c0 < cols; c0 += B) {
      const c1 = Math.min(cols, c0 + B);
      for (let r = r0; r < r1; r++) {
        const src = r * cols;
        for (let c = c0; c < c1; c++) out[c * rows + r] = a[src + c];
      }
    }
  }
  return out;
}
