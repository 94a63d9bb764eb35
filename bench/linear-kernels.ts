// Which ORT CPU kernel multiplies the projections fastest on this machine: one linear layer y = x · Wᵀ of the `small`
// preset's shapes as a one-node graph, for M rows (1 = a decode step, 128 and 512 = prefill chunks), in each form the
// stage graph could use:
//   Gemm                 fp32 (MLAS SGEMM)
//   MatMulNBits          int4 blocks of 16..128, accuracy_level 0 (fp32 compute) and 4 (int8 compute)
//   DynamicQuantizeMatMul  int8 weights (s8 or u8), activations quantised to uint8 per tensor (MLAS QGEMM)
//   int8 path            the stage graph's form: rows scaled to [-1, 1] first, so the one uint8 range is every row's
//   MatMulInteger s8·s8  activations quantised per row to int8 (QuantizeLinear per axis)
// Usage: node dist/bench/linear-kernels.js [--runs 9] [--rows 1,128,512] [--no-write]
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import ort from 'onnxruntime-node';
import { GraphBuilder } from '../lib/onnx/graph.js';
import { Rng } from '../lib/util/rng.js';
import { median, writeBenchSection } from './report.js';

const args = process.argv.slice(2);
const flag = (name: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
};
const RUNS = Number(flag('runs') ?? 9);
const ROWS = (flag('rows') ?? '1,128,512').split(',').map(Number);
const MS = 'com.microsoft';

/** The small preset's projections (hidden 1024, intermediate 2816, 16 heads, 4 KV heads of 64). */
const SHAPES = [
  { name: 'qkv', n: 1536, k: 1024 },
  { name: 'gate+up', n: 5632, k: 1024 },
  { name: 'down', n: 1024, k: 2816 },
];

type Variant = { name: string; build: (g: GraphBuilder, x: string, n: number, k: number, rng: Rng) => string };

function nbits(block: number, accuracy: number): Variant {
  return {
    name: `MatMulNBits int4 block ${block} acc ${accuracy}`,
    build: (g, x, n, k, rng) => {
      const blocks = Math.ceil(k / block);
      const packed = Uint8Array.from({ length: n * blocks * (block / 2) }, () => rng.nextU32() & 255);
      return g.op(
        'MatMulNBits',
        [
          x,
          g.weight('q', 'uint8', [n, blocks, block / 2], packed),
          g.weight('s', 'float', [n * blocks], new Float32Array(n * blocks).fill(0.01)),
          g.weight('z', 'uint8', [n * Math.ceil(blocks / 2)], new Uint8Array(n * Math.ceil(blocks / 2)).fill(0x88)),
        ],
        'y',
        { K: k, N: n, bits: 4, block_size: block, accuracy_level: accuracy },
        MS,
      );
    },
  };
}

const int8Weights = (n: number, k: number, rng: Rng) =>
  Int8Array.from({ length: k * n }, () => (rng.nextU32() % 255) - 127);

const variants: Variant[] = [
  {
    name: 'Gemm fp32',
    build: (g, x, n, k, rng) =>
      g.op('Gemm', [x, g.weight('w', 'float', [n, k], rng.fillNormal(new Float32Array(n * k), 0.02))], 'y', {
        transB: 1,
      }),
  },
  nbits(32, 0),
  nbits(32, 4),
  nbits(64, 4),
  nbits(128, 4),
  {
    name: 'DynamicQuantizeMatMul u8·s8',
    build: (g, x, n, k, rng) =>
      g.op(
        'DynamicQuantizeMatMul',
        [x, g.weight('b', 'int8', [k, n], int8Weights(n, k, rng)), g.constFloat('bs', new Array(n).fill(1e-3))],
        'y',
        {},
        MS,
      ),
  },
  {
    name: 'DynamicQuantizeMatMul u8·u8',
    build: (g, x, n, k, rng) =>
      g.op(
        'DynamicQuantizeMatMul',
        [
          x,
          g.weight(
            'b',
            'uint8',
            [k, n],
            Uint8Array.from({ length: k * n }, () => rng.nextU32() & 255),
          ),
          g.constFloat('bs', new Array(n).fill(1e-3)),
          g.weight('bz', 'uint8', [n], new Uint8Array(n).fill(128)),
        ],
        'y',
        {},
        MS,
      ),
  },
  {
    name: 'int8 path (rows scaled, then u8·s8)',
    build: (g, x, n, k, rng) => {
      const amax = g.op('ReduceMax', [g.op('Abs', [x], 'abs'), g.constInt64('axis', [1])], 'amax', { keepdims: 1 });
      const unit = g.op('Div', [x, amax], 'unit');
      const y = g.op(
        'DynamicQuantizeMatMul',
        [unit, g.weight('b', 'int8', [k, n], int8Weights(n, k, rng)), g.constFloat('bs', new Array(n).fill(1e-3))],
        'y0',
        {},
        MS,
      );
      return g.op('Mul', [y, amax], 'y');
    },
  },
  {
    name: 'MatMulInteger s8·s8 (rows quantised per axis)',
    build: (g, x, n, k, rng) => {
      const amax = g.op('ReduceMax', [g.op('Abs', [x], 'abs'), g.constInt64('axis', [1])], 'amax', { keepdims: 1 });
      const scale = g.op('Div', [amax, g.constFloat('c127', [127], [])], 'scale');
      const q = g.op('QuantizeLinear', [x, g.op('Reshape', [scale, g.constInt64('flat', [-1])], 'scale1')], 'xq', {
        axis: 0,
        output_dtype: 3,
      });
      const acc = g.op('MatMulInteger', [q, g.weight('b', 'int8', [k, n], int8Weights(n, k, rng))], 'acc');
      const f = g.op('Cast', [acc], 'accf', { to: 1 });
      return g.op('Mul', [g.op('Mul', [f, scale], 'rows'), g.constFloat('bs', new Array(n).fill(1e-3))], 'y');
    },
  },
];

async function time(dir: string, v: Variant, m: number, n: number, k: number): Promise<number> {
  const g = new GraphBuilder(dir, `${v.name.replace(/\W+/g, '_')}-${m}-${n}-${k}`);
  g.useOpset(MS, 1);
  const x = g.input('x', 'float', ['m', k]);
  g.output(v.build(g, x, n, k, new Rng(7)), 'float', ['m', n]);
  const session = await ort.InferenceSession.create(g.save(), {
    intraOpNumThreads: availableParallelism(),
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
  });
  const feeds = { x: new ort.Tensor('float32', new Rng(8).fillNormal(new Float32Array(m * k), 1), [m, k]) };
  for (let i = 0; i < 2; i++) await session.run(feeds);
  const ms: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t0 = performance.now();
    await session.run(feeds);
    ms.push(performance.now() - t0);
  }
  await session.release();
  return median(ms);
}

function cpuFlags(): string {
  try {
    const flags = new Set((readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:.*$/m)?.[0] ?? '').split(/\s+/));
    return ['avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile', 'amx_int8', 'amx_bf16']
      .map((f) => `${f} ${flags.has(f) ? 'yes' : 'no'}`)
      .join(', ');
  } catch {
    return 'unknown (no /proc/cpuinfo)';
  }
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-bench-linear-'));
  const header = ['kernel', ...ROWS.map((m) => `GFLOP/s M=${m}`)];
  const lines = [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`];
  try {
    for (const v of variants) {
      const cells: string[] = [];
      for (const m of ROWS) {
        // GFLOP/s over the three shapes together (their summed time), the mix of one decoder layer.
        let ms = 0;
        let flops = 0;
        for (const s of SHAPES) {
          ms += await time(dir, v, m, s.n, s.k);
          flops += 2 * m * s.n * s.k;
        }
        cells.push((flops / (ms / 1000) / 1e9).toFixed(0));
      }
      const line = `| ${v.name} | ${cells.join(' | ')} |`;
      console.log(line);
      lines.push(line);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const text = [
    `Command: \`node dist/bench/linear-kernels.js --runs ${RUNS} --rows ${ROWS.join(',')}\`. One linear layer as a one-node`,
    `graph, for the \`small\` preset's qkv (1536×1024), gate+up (5632×1024) and down (1024×2816) weights; GFLOP/s of the`,
    `three together (2·M·N·K over their summed median times of ${RUNS} runs), ${availableParallelism()} threads.`,
    `CPU: ${cpus()[0]?.model ?? 'unknown'}; ${cpuFlags()}.`,
    '',
    ...lines,
  ].join('\n');
  if (!args.includes('--no-write')) writeBenchSection('Linear kernels', text);
}

await main();
