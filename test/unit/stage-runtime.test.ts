// The stage graph + runtime against a float64 reference of Emu3 (docs/model.md, "Forward pass") on emu3-tiny (fp32 and
// bf16): full-model logits, greedy decoding with the KV cache, splits into stages, mixed batches and slot reuse.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import ort from 'onnxruntime-node';
import { Checkpoint } from '../../lib/model/checkpoint.js';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';
import { ensureStageGraph } from '../../lib/onnx/graph-cache.js';
import type { SamplingRow } from '../../lib/onnx/sampling-head.js';
import { StageExecutor, type StageSession } from '../../lib/runtime/stage-executor.js';
import { type ForwardItem, type ForwardOutput, StageRuntime } from '../../lib/runtime/stage-runtime.js';
import { Rng } from '../../lib/util/rng.js';
import { argmax, Emu3Reference } from '../reference/emu3-f64.js';

const root = mkdtempSync(join(tmpdir(), 'emu3-stage-test-'));
const cacheDir = join(root, 'cache');
const MAX_LEN = 64;

function prompt(seed: number, length: number, vocab: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length }, () => rng.nextU32() % vocab);
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Runs a pipeline of stages in sequence, as a split deployment would. */
class Pipeline {
  constructor(readonly stages: StageRuntime[]) {}

  static async open(dir: string, cuts: number[], maxSequences = 4): Promise<Pipeline> {
    const stages: StageRuntime[] = [];
    for (let i = 0; i + 1 < cuts.length; i++) {
      stages.push(
        await StageRuntime.open({
          modelDir: dir,
          layers: [cuts[i], cuts[i + 1]],
          precision: 'fp32',
          maxSequences,
          maxSequenceLength: MAX_LEN,
          cacheDir,
        }),
      );
    }
    return new Pipeline(stages);
  }

  async logits(items: ForwardItem[], tokens: number[]): Promise<Float32Array> {
    let out = await this.stages[0].forward(items, { tokens: Int32Array.from(tokens) });
    for (const stage of this.stages.slice(1)) {
      assert.ok('hidden' in out);
      out = await stage.forward(items, { hidden: out.hidden });
    }
    assert.ok('logits' in out);
    return out.logits;
  }

  /** Prefills `prompt` into `slot`, then decodes greedily; returns the tokens and the first logits. */
  async greedy(slot: number, promptIds: number[], steps: number): Promise<{ tokens: number[]; first: Float32Array }> {
    const first = await this.logits([{ slot, start: 0, length: promptIds.length }], promptIds);
    const tokens = [argmax(first)];
    while (tokens.length < steps) {
      const logits = await this.logits(
        [{ slot, start: promptIds.length + tokens.length - 1, length: 1 }],
        [tokens[tokens.length - 1]],
      );
      tokens.push(argmax(logits));
    }
    return { tokens, first };
  }

  async close(): Promise<void> {
    for (const s of this.stages) await s.close();
  }
}

for (const dtype of ['f32', 'bf16'] as const) {
  describe(`emu3-tiny ${dtype} against the float64 reference`, () => {
    const dir = join(root, `tiny-${dtype}`);
    let ref: Emu3Reference;
    let whole: Pipeline;
    before(async () => {
      writeTinyEmu3(dir, { seed: 7, preset: 'tiny', dtype, shards: dtype === 'bf16' ? 2 : 1 });
      ref = Emu3Reference.load(dir);
      whole = await Pipeline.open(dir, [0, 4]);
    });
    after(() => whole.close());

    test('logits of a 12-token prompt match within 1e-4', async () => {
      const ids = prompt(1, 12, ref.config.vocabSize);
      const got = await whole.logits([{ slot: 0, start: 0, length: 12 }], ids);
      const want = ref.logits(ids);
      const diff = maxAbsDiff(got, want);
      assert.ok(diff < 1e-4, `max |logit − reference| = ${diff}`);
    });

    test('16 greedy steps with the KV cache equal the reference recomputing from scratch', async () => {
      const ids = prompt(2, 12, ref.config.vocabSize);
      const { tokens } = await whole.greedy(1, ids, 16);
      const want = ref.greedy(ids, 16);
      assert.deepEqual(tokens, want);
      assert.ok(
        new Set(want).size > 1,
        'the reference continuation repeats one token: the tiny weights are degenerate',
      );
    });
  });
}

describe('stages and batches on emu3-tiny f32', () => {
  const dir = join(root, 'tiny-f32');
  let whole: Pipeline;
  before(async () => {
    whole = await Pipeline.open(dir, [0, 4], 8);
  });
  after(() => whole.close());

  test('a split into 2 and into 3 stages gives the logits of one stage within 1e-5', async () => {
    const ids = prompt(3, 12, 184622);
    const want = await whole.greedy(0, ids, 4);
    for (const cuts of [
      [0, 2, 4],
      [0, 1, 3, 4],
    ]) {
      const split = await Pipeline.open(dir, cuts);
      try {
        const got = await split.greedy(0, ids, 4);
        assert.ok(maxAbsDiff(got.first, want.first) < 1e-5, `cuts ${cuts}: prefill logits differ`);
        assert.deepEqual(got.tokens, want.tokens, `cuts ${cuts}`);
        // Decode-step logits too: one more step from the same history.
        const history = [...ids, ...want.tokens];
        const item = [{ slot: 0, start: history.length - 1, length: 1 }];
        const a = await split.logits(item, [history[history.length - 1]]);
        const b = await whole.logits(item, [history[history.length - 1]]);
        assert.ok(maxAbsDiff(a, b) < 1e-5, `cuts ${cuts}: decode logits differ by ${maxAbsDiff(a, b)}`);
      } finally {
        await split.close();
      }
    }
  });

  test('4 sequences of different prompt lengths decoded together equal each decoded alone', async () => {
    const lengths = [3, 12, 7, 1];
    const prompts = lengths.map((n, i) => prompt(10 + i, n, 184622));
    const alone: { tokens: number[]; first: Float32Array }[] = [];
    for (const p of prompts) alone.push(await whole.greedy(0, p, 6));
    // Slots 5, 1, 6, 3: not contiguous, so the arena has to move sequences to batch them.
    const slots = [5, 1, 6, 3];
    // One call mixing all four prefills (different lengths), then batched decode steps.
    const items = slots.map((slot, i) => ({ slot, start: 0, length: lengths[i] }));
    const first = await whole.logits(items, prompts.flat());
    const V = 184622;
    const tokens = slots.map((_, i) => [argmax(first.subarray(i * V, (i + 1) * V))]);
    slots.forEach((_, i) => assert.ok(maxAbsDiff(first.subarray(i * V, (i + 1) * V), alone[i].first) < 1e-4));
    for (let step = 1; step < 6; step++) {
      const decode = slots.map((slot, i) => ({ slot, start: lengths[i] + step - 1, length: 1 }));
      const logits = await whole.logits(
        decode,
        tokens.map((t) => t[t.length - 1]),
      );
      tokens.forEach((t, i) => t.push(argmax(logits.subarray(i * V, (i + 1) * V))));
    }
    assert.deepEqual(
      tokens,
      alone.map((a) => a.tokens),
    );
  });

  test('a prefill in chunks, mixed with a decode of another sequence, equals the whole prefill', async () => {
    const a = prompt(20, 12, 184622);
    const b = prompt(21, 5, 184622);
    const wantA = await whole.greedy(0, a, 3);
    const wantB = await whole.greedy(0, b, 2);
    await whole.logits([{ slot: 2, start: 0, length: 5 }], b);
    await whole.logits([{ slot: 4, start: 0, length: 5 }], a.slice(0, 5));
    const V = 184622;
    const mixed = await whole.logits(
      [
        { slot: 4, start: 5, length: 7 },
        { slot: 2, start: 5, length: 1 },
      ],
      [...a.slice(5), wantB.tokens[0]],
    );
    assert.equal(argmax(mixed.subarray(0, V)), wantA.tokens[0]);
    assert.equal(argmax(mixed.subarray(V, 2 * V)), wantB.tokens[1]);
    assert.ok(maxAbsDiff(mixed.subarray(0, V), wantA.first) < 1e-4);
  });

  test('freed and reused slots, and a copied prefix, give the results of fresh ones', async () => {
    const fresh = await Pipeline.open(dir, [0, 4], 8);
    try {
      const p = prompt(30, 9, 184622);
      const want = await fresh.greedy(3, p, 5);
      // Fill slot 3 with something longer, free it, reuse it for p.
      await whole.greedy(3, prompt(31, 20, 184622), 3);
      await whole.stages[0].free(3);
      const reused = await whole.greedy(3, p, 5);
      assert.deepEqual(reused.tokens, want.tokens);
      assert.ok(maxAbsDiff(reused.first, want.first) < 1e-5);
      // Prefix reuse: copy the 9 prompt positions of slot 3 into slot 7 and continue there from the last token.
      await whole.stages[0].copyKv(3, 7, 8);
      const next = await whole.logits([{ slot: 7, start: 8, length: 1 }], [p[8]]);
      assert.ok(maxAbsDiff(next, want.first) < 1e-5);
    } finally {
      await fresh.close();
    }
  });

  test('bad requests are refused with messages that name the problem', async () => {
    const rt = whole.stages[0];
    await assert.rejects(
      rt.forward([{ slot: 8, start: 0, length: 1 }], { tokens: Int32Array.of(1) }),
      /slot 8 must be an integer in \[0, 8\)/,
    );
    await assert.rejects(
      rt.forward([{ slot: 0, start: 60, length: 10 }], { tokens: new Int32Array(10) }),
      /start 60 must be in \[0, \d+\]|exceeds maxSequenceLength 64/,
    );
    await assert.rejects(
      rt.forward([{ slot: 0, start: 0, length: 2 }], { tokens: Int32Array.of(1) }),
      /tokens has 1 ids, items need 2/,
    );
    await assert.rejects(
      rt.forward([{ slot: 0, start: 0, length: 1 }], { tokens: Int32Array.of(184622) }),
      /outside the vocabulary \[0, 184622\)/,
    );
    await assert.rejects(
      rt.forward([{ slot: 0, start: 0, length: 1 }], { hidden: new Float32Array(64) }),
      /first stage takes \{ tokens \}/,
    );
  });
});

/** A stage's executor on this thread over a real ORT session, counting the session's runs (the executor's seam). */
async function countingExecutor(dir: string, layers: [number, number]) {
  const ckpt = Checkpoint.open(dir);
  let cached: ReturnType<typeof ensureStageGraph>;
  try {
    cached = ensureStageGraph(ckpt, { first: layers[0], end: layers[1], precision: 'fp32' }, { cacheDir });
  } finally {
    ckpt.close();
  }
  const session = await ort.InferenceSession.create(cached.onnxPath, { intraOpNumThreads: 1 });
  const counter = { runs: 0 };
  const counted: StageSession = {
    run: (feeds, fetches) => {
      counter.runs++;
      return session.run(feeds, fetches);
    },
  };
  const open = () => new StageExecutor(counted, cached.shape, 8, MAX_LEN);
  return { open, counter, shape: cached.shape, release: () => session.release() };
}

describe('one session run per micro-batch (emu3-tiny f32)', () => {
  const dir = join(root, 'tiny-f32');
  const V = 184622;
  // Each sequence: its cached history, then this call's new tokens. Lengths 1 are decode rows; the rest are prefill
  // chunks of different lengths, fresh (past 0) or continuing a cached prefix. Slots are not contiguous.
  const sequences = [
    { slot: 6, past: 9, fresh: 1 },
    { slot: 1, past: 0, fresh: 6 },
    { slot: 4, past: 3, fresh: 1 },
    { slot: 0, past: 4, fresh: 5 },
    { slot: 7, past: 13, fresh: 1 },
    { slot: 3, past: 0, fresh: 2 },
  ].map((s, i) => ({ ...s, ids: prompt(40 + i, s.past + s.fresh, V) }));
  const items = sequences.map((s) => ({ slot: s.slot, start: s.past, length: s.fresh }));
  const newTokens = sequences.flatMap((s) => s.ids.slice(s.past));

  /** Fills each sequence's cached history into its slot, one call per sequence. */
  async function prefillHistories(exec: StageExecutor, input: (s: (typeof sequences)[number]) => Promise<unknown>) {
    for (const s of sequences) if (s.past > 0) await input(s);
    return exec;
  }

  test('decode rows mixed with prefill chunks of several lengths equal each item alone, in ONE run per call', async () => {
    const whole = await countingExecutor(dir, [0, 4]);
    try {
      const mixed = whole.open();
      const alone = whole.open();
      for (const exec of [mixed, alone])
        await prefillHistories(exec, (s) =>
          exec.forward([{ slot: s.slot, start: 0, length: s.past }], {
            tokens: Int32Array.from(s.ids.slice(0, s.past)),
          }),
        );
      const before = whole.counter.runs;
      const out = await mixed.forward(items, { tokens: Int32Array.from(newTokens) });
      assert.equal(whole.counter.runs - before, 1, 'the mixed call ran the session once');
      assert.ok('logits' in out);
      const next: number[] = [];
      for (const [i, s] of sequences.entries()) {
        const one = await alone.forward([items[i]], { tokens: Int32Array.from(s.ids.slice(s.past)) });
        assert.ok('logits' in one);
        const diff = maxAbsDiff(out.logits.subarray(i * V, (i + 1) * V), one.logits);
        assert.ok(diff < 1e-5, `item ${i} (${s.fresh} new after ${s.past}): logits differ by ${diff}`);
        next.push(argmax(one.logits));
      }
      // The K/V the mixed call wrote serve the next step: all six decode at once, with the in-graph sampling head.
      const rows: SamplingRow[] = sequences.map((_, i) => ({
        maskBegin: 0,
        maskEnd: i === 2 ? 1000 : 0,
        repetitionPenalty: i === 1 ? 1.3 : 1,
        penalisedIds: i === 1 ? [next[1], 5] : [],
        temperature: i === 3 ? 0.7 : 1,
        topK: 4,
        fullRow: i === 4,
      }));
      const decode = sequences.map((s) => ({ slot: s.slot, start: s.past + s.fresh, length: 1 }));
      const runs = whole.counter.runs;
      const step = await mixed.forward(decode, { tokens: Int32Array.from(next) }, rows);
      assert.equal(whole.counter.runs - runs, 1);
      assert.ok('topIds' in step);
      for (let i = 0; i < sequences.length; i++) {
        const one = await alone.forward([decode[i]], { tokens: Int32Array.of(next[i]) }, [rows[i]]);
        assert.ok('topIds' in one);
        assert.deepEqual(Array.from(step.topIds.subarray(i * 4, (i + 1) * 4)), Array.from(one.topIds), `item ${i} ids`);
        const diff = maxAbsDiff(step.topLogprobs.subarray(i * 4, (i + 1) * 4), one.topLogprobs);
        assert.ok(diff < 1e-5, `item ${i}: top logprobs differ by ${diff}`);
        assert.equal(step.fullRows[i] === null, i !== 4);
        const full = step.fullRows[i];
        const fullAlone = one.fullRows[0];
        if (full && fullAlone) assert.ok(maxAbsDiff(full, fullAlone) < 1e-5, `item ${i}: full row differs`);
      }
    } finally {
      await whole.release();
    }
  });

  test('a first stage of a split returns the flat hidden states of a mixed call in item order, each as alone', async () => {
    const first = await countingExecutor(dir, [0, 2]);
    try {
      const mixed = first.open();
      const alone = first.open();
      for (const exec of [mixed, alone])
        await prefillHistories(exec, (s) =>
          exec.forward([{ slot: s.slot, start: 0, length: s.past }], {
            tokens: Int32Array.from(s.ids.slice(0, s.past)),
          }),
        );
      const before = first.counter.runs;
      const out = await mixed.forward(items, { tokens: Int32Array.from(newTokens) });
      assert.equal(first.counter.runs - before, 1);
      assert.ok('hidden' in out);
      const D = first.shape.hiddenSize;
      assert.equal(out.hidden.length, newTokens.length * D);
      let at = 0;
      for (const [i, s] of sequences.entries()) {
        const one = await alone.forward([items[i]], { tokens: Int32Array.from(s.ids.slice(s.past)) });
        assert.ok('hidden' in one);
        const diff = maxAbsDiff(out.hidden.subarray(at * D, (at + s.fresh) * D), one.hidden);
        assert.ok(diff < 1e-5, `item ${i}: hidden states differ by ${diff}`);
        at += s.fresh;
      }
    } finally {
      await first.release();
    }
  });

  test('hidden states move into the worker: a whole buffer is detached, a view into a larger one is copied', async () => {
    const split = await Pipeline.open(dir, [0, 2, 4]);
    try {
      const ids = prompt(50, 7, V);
      const item = (slot: number) => [{ slot, start: 0, length: ids.length }];
      let out: ForwardOutput = await split.stages[0].forward(item(0), { tokens: Int32Array.from(ids) });
      assert.ok('hidden' in out);
      const hidden = out.hidden;
      const copy = hidden.slice();
      out = await split.stages[1].forward(item(0), { hidden });
      assert.ok('logits' in out);
      assert.equal(hidden.byteLength, 0, "the caller's array is detached (moved, not copied)");
      const want = out.logits;
      const big = new Float32Array(copy.length + 16);
      big.set(copy, 8);
      const view = big.subarray(8, 8 + copy.length);
      out = await split.stages[1].forward(item(1), { hidden: view });
      assert.ok('logits' in out);
      assert.deepEqual(view, copy, 'a view into a larger buffer stays as it was');
      assert.equal(maxAbsDiff(out.logits, want), 0);
    } finally {
      await split.close();
    }
  });
});

after(() => rmSync(root, { recursive: true, force: true }));
