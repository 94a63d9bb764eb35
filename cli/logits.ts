// `emu3 logits`: runs a checkpoint on a list of token ids and prints the last position's top-k logits and, with
// --steps, the greedy continuation computed with the KV cache. With --layers A-B covering only part of the model,
// the remaining layers run as further stages in the same process, which is how to check a split.
import { loadEmu3Config } from '../lib/model/config.js';
import { DEVICES, defaultPrecision, PRECISIONS } from '../lib/onnx/stage-graph.js';
import { type ForwardItem, StageRuntime } from '../lib/runtime/stage-runtime.js';
import { UsageError } from './args.js';
import type { Command } from './main.js';

export const command: Command = {
  spec: {
    name: 'logits',
    summary: 'print the top logits (and a greedy continuation) of a model for given token ids',
    usage:
      'emu3 logits --model DIR --tokens 1,2,3 [--layers A-B] [--precision fp32|int4|fp16] [--device cpu|webgpu|cuda] [--top 20] [--steps N] [--cache-dir DIR]',
    flags: {
      model: { help: 'model directory (config.json + safetensors), required' },
      tokens: { help: 'comma-separated token ids of the prompt, required' },
      layers: {
        help: 'run layers [A, B) as one stage and the rest as further stages (default: all layers in one stage)',
      },
      precision: {
        help: 'weight precision: fp32, int4 (MatMulNBits, block 32) or fp16 (webgpu only; weights and KV in half); default fp16 on --device webgpu, else fp32',
      },
      device: { help: 'where ORT runs the stages: cpu, webgpu or cuda (as emu3 shard --device)', default: 'cpu' },
      top: { help: 'how many of the highest logits to print', default: '20' },
      steps: { help: 'greedy continuation length (computed with the KV cache)', default: '0' },
      'cache-dir': {
        help: 'graph cache directory (default: $EMU3_CACHE_DIR, else <model>/.emu3-cache, else ~/.cache/emu3-serve)',
      },
    },
  },
  async run(flags) {
    const modelDir = flags.required('model');
    const tokens = parseTokens(flags.required('tokens'));
    const device = flags.oneOf('device', DEVICES) ?? 'cpu';
    const precision = flags.oneOf('precision', PRECISIONS) ?? defaultPrecision(device);
    const top = flags.int('top', 1, 1_000_000) ?? 20;
    const steps = flags.int('steps', 0, 1_000_000) ?? 0;
    const config = loadEmu3Config(modelDir);
    const cuts = stageCuts(flags.string('layers'), config.numHiddenLayers);
    const log = (msg: string) => console.error(msg);
    const stages: StageRuntime[] = [];
    try {
      for (let i = 0; i + 1 < cuts.length; i++) {
        stages.push(
          await StageRuntime.open({
            modelDir,
            layers: [cuts[i], cuts[i + 1]],
            precision,
            device,
            maxSequences: 1,
            maxSequenceLength: tokens.length + Math.max(steps, 1),
            cacheDir: flags.string('cache-dir'),
            log,
          }),
        );
      }
      const run = async (item: ForwardItem, ids: number[]): Promise<Float32Array> => {
        let out = await stages[0].forward([item], { tokens: Int32Array.from(ids) });
        for (const stage of stages.slice(1)) {
          if (!('hidden' in out)) throw new Error('internal: a middle stage returned logits');
          out = await stage.forward([item], { hidden: out.hidden });
        }
        if (!('logits' in out)) throw new Error('internal: the last stage returned no logits');
        return out.logits;
      };
      const first = await run({ slot: 0, start: 0, length: tokens.length }, tokens);
      const greedy: number[] = [];
      let logits = first;
      for (let s = 0; s < steps; s++) {
        greedy.push(argmax(logits));
        if (s + 1 < steps) logits = await run({ slot: 0, start: tokens.length + s, length: 1 }, [greedy[s]]);
      }
      const result: { top: { id: number; logit: number }[]; greedy?: number[] } = { top: topK(first, top) };
      if (steps > 0) result.greedy = greedy;
      console.log(JSON.stringify(result));
      return 0;
    } finally {
      for (const s of stages) await s.close();
    }
  },
};

function parseTokens(s: string): number[] {
  const ids = s.split(',').map((t) => t.trim());
  if (ids.length === 0 || ids.some((t) => !/^\d+$/.test(t)))
    throw new UsageError(`logits: --tokens must be comma-separated non-negative integers, got "${s}"`);
  return ids.map(Number);
}

/** Stage boundaries: [0, n] by default, [0, A, B, n] (empty ranges dropped) for --layers A-B. */
export function stageCuts(spec: string | undefined, n: number): number[] {
  if (spec === undefined) return [0, n];
  const m = /^(\d+)-(\d+)$/.exec(spec);
  if (!m) throw new UsageError(`logits: --layers must look like A-B (layers [A, B)), got "${spec}"`);
  const a = Number(m[1]);
  const b = Number(m[2]);
  if (a >= b || b > n) throw new UsageError(`logits: --layers ${spec} must satisfy A < B ≤ ${n} (num_hidden_layers)`);
  return [...new Set([0, a, b, n])].sort((x, y) => x - y);
}

function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

function topK(x: Float32Array, k: number): { id: number; logit: number }[] {
  const ids = Array.from({ length: x.length }, (_, i) => i);
  ids.sort((a, b) => x[b] - x[a] || a - b);
  return ids.slice(0, Math.min(k, x.length)).map((id) => ({ id, logit: x[id] }));
}
