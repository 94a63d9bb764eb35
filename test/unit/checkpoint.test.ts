import assert from 'node:assert/strict';
import fs, {
  closeSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Checkpoint, expectedTensors, INDEX_FILE, SINGLE_FILE, tensorNames } from '../../lib/model/checkpoint.js';
import { parseEmu3Config } from '../../lib/model/config.js';
import { CheckpointError } from '../../lib/model/errors.js';
import { Rng } from '../../lib/util/rng.js';

const root = mkdtempSync(join(tmpdir(), 'checkpoint-test-'));
after(() => rmSync(root, { recursive: true, force: true }));

/** A micro Emu3: hidden 32, 2 heads of 16, 1 KV head (k_proj [16, 32], not square), 2 layers, vocab 100. */
const microConfig = {
  model_type: 'Emu3',
  architectures: ['Emu3ForCausalLM'],
  hidden_size: 32,
  intermediate_size: 48,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  num_key_value_heads: 1,
  vocab_size: 100,
  pad_token_id: 0,
  bos_token_id: 1,
  eos_token_id: 2,
  img_token_id: 3,
  boi_token_id: 4,
  eoi_token_id: 5,
  eol_token_id: 6,
  eof_token_id: 7,
};
const config = parseEmu3Config(microConfig, 'micro');

/** Torch-layout values of a tensor, a function of its name only. */
function valuesOf(name: string, n: number): Float32Array {
  let h = 7;
  for (const ch of name) h = (Math.imul(h, 31) + ch.charCodeAt(0)) >>> 0;
  return new Rng(h).fillNormal(new Float32Array(n), 1);
}

interface RawTensor {
  name: string;
  dtype: string;
  shape: number[];
  bytes: Uint8Array;
}

/** Writes a safetensors file by hand (header + data), independent of the library's writer. */
function writeRaw(path: string, tensors: RawTensor[]): void {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let off = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [off, off + t.bytes.length] };
    off += t.bytes.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, ...tensors.map((t) => t.bytes)]));
}

function transpose(a: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(a.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = a[r * cols + c];
  return out;
}

interface Options {
  layout?: 'torch' | 'paddle';
  /** Tensor name → shard number; absent: one model.safetensors. */
  shardOf?: (name: string, i: number) => number;
  shards?: number;
  drop?: string[];
  edit?: (t: RawTensor) => RawTensor;
  config?: Record<string, unknown>;
}

function makeCheckpoint(name: string, opts: Options = {}): string {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  const cfg = opts.config ?? microConfig;
  writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg));
  const tensors: RawTensor[] = [];
  for (const t of expectedTensors(parseEmu3Config(cfg, name))) {
    if (opts.drop?.includes(t.name)) continue;
    let v = valuesOf(
      t.name,
      t.shape.reduce((a, b) => a * b, 1),
    );
    let shape = t.shape;
    if (t.linear && opts.layout === 'paddle') {
      v = transpose(v, t.shape[0], t.shape[1]);
      shape = [t.shape[1], t.shape[0]];
    }
    const raw = { name: t.name, dtype: 'F32', shape, bytes: new Uint8Array(v.buffer) };
    tensors.push(opts.edit ? opts.edit(raw) : raw);
  }
  if (!opts.shardOf) {
    writeRaw(join(dir, SINGLE_FILE), tensors);
    return dir;
  }
  const k = opts.shards ?? 2;
  const file = (s: number) => `model-0000${s + 1}-of-0000${k}.safetensors`;
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < k; s++) {
    const mine = tensors.filter((t, i) => opts.shardOf!(t.name, i) === s);
    writeRaw(join(dir, file(s)), mine);
    for (const t of mine) weightMap[t.name] = file(s);
  }
  writeFileSync(join(dir, INDEX_FILE), JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }, null, 2));
  return dir;
}

function openError(dir: string, ...patterns: RegExp[]): void {
  assert.throws(
    () => Checkpoint.open(dir),
    (e: unknown) => {
      assert.ok(e instanceof CheckpointError, `not a CheckpointError: ${e}`);
      for (const p of patterns) assert.match(e.message, p);
      return true;
    },
  );
}

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('Checkpoint: reading', () => {
  it('opens a single-file torch checkpoint and reads every tensor as written', () => {
    const dir = makeCheckpoint('single');
    const ck = Checkpoint.open(dir);
    try {
      assert.equal(ck.layout, 'torch');
      assert.deepEqual(ck.files, [join(dir, SINGLE_FILE)]);
      assert.equal(ck.config.headDim, 16);
      for (const t of expectedTensors(config)) {
        const n = t.shape[0] * (t.shape[1] ?? 1);
        assert.deepEqual(ck.read(t.name, t.shape), valuesOf(t.name, n), t.name);
        if (t.linear) assert.deepEqual(ck.readLinear(t.name, t.shape[0], t.shape[1]), valuesOf(t.name, n), t.name);
      }
      assert.ok(ck.has(tensorNames.layer(1).down));
      assert.ok(!ck.has('model.layers.2.mlp.down_proj.weight'));
      assert.deepEqual(ck.info(tensorNames.layer(0).k).shape, [16, 32]);
    } finally {
      ck.close();
    }
  });

  it('tells a Paddle [in, out] checkpoint by k_proj and returns torch layout from readLinear', () => {
    const dir = makeCheckpoint('paddle', { layout: 'paddle' });
    const ck = Checkpoint.open(dir);
    try {
      assert.equal(ck.layout, 'paddle');
      for (const t of expectedTensors(config)) {
        const n = t.shape[0] * (t.shape[1] ?? 1);
        if (t.linear) {
          assert.deepEqual(ck.readLinear(t.name, t.shape[0], t.shape[1]), valuesOf(t.name, n), t.name);
          // read() returns what is stored, [in, out]
          assert.deepEqual(
            ck.read(t.name, [t.shape[1], t.shape[0]]),
            transpose(valuesOf(t.name, n), t.shape[0], t.shape[1]),
          );
        } else {
          assert.deepEqual(ck.read(t.name, t.shape), valuesOf(t.name, n), t.name);
        }
      }
    } finally {
      ck.close();
    }
  });

  it('reads a sharded checkpoint (index + files) exactly like the single file', () => {
    const single = Checkpoint.open(makeCheckpoint('single2'));
    const dir = makeCheckpoint('sharded', { shardOf: (_n, i) => i % 3, shards: 3 });
    const sharded = Checkpoint.open(dir);
    try {
      assert.deepEqual(
        sharded.files,
        [1, 2, 3].map((s) => join(dir, `model-0000${s}-of-00003.safetensors`)),
      );
      for (const t of expectedTensors(config))
        assert.deepEqual(sharded.read(t.name, t.shape), single.read(t.name, t.shape));
      // q_proj of layer 0 is tensor 2 in module order (embed, input_layernorm, q_proj): i % 3 = 2, the third file
      assert.equal(sharded.info(tensorNames.layer(0).q).file, join(dir, 'model-00003-of-00003.safetensors'));
    } finally {
      single.close();
      sharded.close();
    }
  });

  it('tied embeddings: lm_head absent, readLinear(lm_head) is the embedding', () => {
    const dir = makeCheckpoint('tied', { config: { ...microConfig, tie_word_embeddings: true } });
    const ck = Checkpoint.open(dir);
    try {
      assert.ok(!ck.has(tensorNames.lmHead));
      assert.deepEqual(ck.readLinear(tensorNames.lmHead, 100, 32), ck.read(tensorNames.embed, [100, 32]));
    } finally {
      ck.close();
    }
  });
});

describe('Checkpoint: errors name the file, the tensor and the limit', () => {
  it('no weights at all', () => {
    const dir = makeCheckpoint('noweights');
    rmSync(join(dir, SINGLE_FILE));
    openError(dir, new RegExp(`${esc(dir)}: neither model.safetensors nor model.safetensors.index.json exists`));
  });

  it('missing config.json', () => {
    const dir = makeCheckpoint('noconfig');
    rmSync(join(dir, 'config.json'));
    openError(dir, new RegExp(`${esc(join(dir, 'config.json'))}: cannot read`));
  });

  it('index naming a missing file', () => {
    const dir = makeCheckpoint('index-missing-file', { shardOf: (_n, i) => i % 2 });
    rmSync(join(dir, 'model-00002-of-00002.safetensors'));
    openError(
      dir,
      new RegExp(`${esc(join(dir, INDEX_FILE))}: names model-00002-of-00002.safetensors .*which does not exist`),
    );
  });

  it('index tensor missing from its file', () => {
    const dir = makeCheckpoint('index-missing-tensor', { shardOf: (_n, i) => i % 2 });
    const index = JSON.parse(readFileSync(join(dir, INDEX_FILE), 'utf8'));
    index.weight_map[tensorNames.norm] = 'model-00001-of-00002.safetensors'; // it is really in file 2
    writeFileSync(join(dir, INDEX_FILE), JSON.stringify(index));
    openError(
      dir,
      new RegExp(
        `${esc(join(dir, 'model-00001-of-00002.safetensors'))}: tensor model.norm.weight is missing \\(${esc(INDEX_FILE)} maps it`,
      ),
    );
  });

  it('index that is not JSON, or names a path outside the directory', () => {
    const dir = makeCheckpoint('index-bad', { shardOf: (_n, i) => i % 2 });
    writeFileSync(join(dir, INDEX_FILE), '{"weight_map": ');
    openError(dir, new RegExp(`${esc(join(dir, INDEX_FILE))}: invalid JSON`));
    writeFileSync(join(dir, INDEX_FILE), JSON.stringify({ weight_map: { [tensorNames.norm]: '../x.safetensors' } }));
    openError(
      dir,
      /weight_map\[model.norm.weight\] must be a file name in the same directory, got "..\/x.safetensors"/,
    );
  });

  it('missing tensor', () => {
    const name = tensorNames.layer(1).o;
    const dir = makeCheckpoint('missing-tensor', { drop: [name] });
    openError(dir, new RegExp(`${esc(dir)}: tensor ${esc(name)} is missing from the checkpoint`));
  });

  it('wrong shape in the file', () => {
    const name = tensorNames.layer(1).up;
    const dir = makeCheckpoint('wrong-shape', { edit: (t) => (t.name === name ? { ...t, shape: [32, 48] } : t) });
    openError(
      dir,
      new RegExp(
        `${esc(join(dir, SINGLE_FILE))}: tensor ${esc(name)} has shape \\[32, 48\\], expected \\[48, 32\\] \\(torch layout`,
      ),
    );
  });

  it('k_proj of layer 0 that is neither torch nor Paddle layout', () => {
    const name = tensorNames.layer(0).k;
    const dir = makeCheckpoint('bad-k', { edit: (t) => (t.name === name ? { ...t, shape: [8, 64] } : t) });
    openError(
      dir,
      new RegExp(
        `${esc(name)} has shape \\[8, 64\\], expected \\[16, 32\\] \\(torch layout\\) or \\[32, 16\\] \\(Paddle layout\\)`,
      ),
    );
  });

  it('unsupported dtype', () => {
    const name = tensorNames.layer(0).inputNorm;
    const dir = makeCheckpoint('int8', {
      edit: (t) => (t.name === name ? { ...t, dtype: 'I8', bytes: new Uint8Array(32) } : t),
    });
    openError(
      dir,
      new RegExp(
        `${esc(join(dir, SINGLE_FILE))}: tensor ${esc(name)} has dtype I8; only F32, BF16 and F16 are supported`,
      ),
    );
  });

  it('read() with a shape other than the stored one', () => {
    const ck = Checkpoint.open(makeCheckpoint('read-shape'));
    try {
      assert.throws(
        () => ck.read(tensorNames.layer(0).v, [32, 16]),
        new RegExp(
          `${esc(join(ck.dir, SINGLE_FILE))}: tensor ${esc(tensorNames.layer(0).v)} has shape \\[16, 32\\], expected \\[32, 16\\]`,
        ),
      );
      assert.throws(() => ck.readLinear(tensorNames.layer(0).v, 32, 16), /has shape \[16, 32\], expected \[32, 16\]/);
      assert.throws(() => ck.read('nope', [1]), /tensor nope is missing from the checkpoint/);
    } finally {
      ck.close();
    }
  });

  it('corrupt header or truncated shard', () => {
    const dir = makeCheckpoint('corrupt', { shardOf: (_n, i) => i % 2 });
    const path = join(dir, 'model-00002-of-00002.safetensors');
    const good = readFileSync(path);
    const bad = Buffer.from(good);
    bad[8 + Number(good.readBigUInt64LE(0)) - 1] = 0x2c; // the header's closing '}' becomes ','
    writeFileSync(path, bad);
    openError(dir, new RegExp(`${esc(path)}: corrupt safetensors header \\(invalid JSON`));
    writeFileSync(path, good.subarray(0, good.length - 3));
    openError(
      dir,
      new RegExp(`${esc(path)}: tensor .* data ends at byte \\d+ but the file has \\d+ bytes \\(truncated file\\?\\)`),
    );
  });
});

describe('Checkpoint.fingerprint', () => {
  it('is stable, and changes when data bytes change', () => {
    const dir = makeCheckpoint('fp');
    const a = Checkpoint.open(dir);
    const fa = a.fingerprint();
    a.close();
    const b = Checkpoint.open(dir);
    assert.equal(b.fingerprint(), fa);
    assert.match(fa, /^[0-9a-f]{64}$/);
    b.close();
    const path = join(dir, SINGLE_FILE);
    const bytes = readFileSync(path);
    bytes[bytes.length - 1] ^= 1; // last data byte: within the last 64 KiB sample
    writeFileSync(path, bytes);
    const c = Checkpoint.open(dir);
    assert.notEqual(c.fingerprint(), fa);
    c.close();
  });

  it('reads only headers and samples: a 64 GiB (sparse) shard costs well under a megabyte', () => {
    const dir = makeCheckpoint('fp-big', { shardOf: (_n, i) => i % 2 });
    // Append a huge extra tensor to shard 2: rewrite its header, extend the file sparsely.
    const path = join(dir, 'model-00002-of-00002.safetensors');
    const old = readFileSync(path);
    const hlen = Number(old.readBigUInt64LE(0));
    const header = JSON.parse(old.subarray(8, 8 + hlen).toString());
    const dataLen = old.length - 8 - hlen;
    const big = 16 * 2 ** 30; // F32 values: 64 GiB
    header['extra.big'] = { dtype: 'F32', shape: [big], data_offsets: [dataLen, dataLen + 4 * big] };
    const json = Buffer.from(JSON.stringify(header));
    const fd = openSync(path, 'w');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    writeSync(fd, Buffer.concat([len, json, old.subarray(8 + hlen)]));
    ftruncateSync(fd, 8 + json.length + dataLen + 4 * big);
    closeSync(fd);

    const original = fs.readSync;
    let bytes = 0;
    fs.readSync = ((...args: Parameters<typeof fs.readSync>) => {
      const n = original(...args);
      bytes += n;
      return n;
    }) as typeof fs.readSync;
    syncBuiltinESMExports();
    let fp: string;
    try {
      const ck = Checkpoint.open(dir);
      fp = ck.fingerprint();
      ck.close();
    } finally {
      fs.readSync = original;
      syncBuiltinESMExports();
    }
    assert.match(fp, /^[0-9a-f]{64}$/);
    assert.ok(bytes < 2 * 3 * 65536 + 10_000, `fingerprint read ${bytes} bytes`);
    assert.ok(bytes > 3 * 65536, `fingerprint read only ${bytes} bytes: no data samples?`);
  });
});
