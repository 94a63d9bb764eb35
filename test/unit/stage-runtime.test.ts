// The stage graph + runtime against a float64 reference of Emu3 (docs/model.md, "Forward pass") on emu3-tiny (fp32 and
// bf16): full-model logits, greedy decoding with the KV cache, splits into stages, mixed batches and slot reuse.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';
import { type ForwardItem, StageRuntime } from '../../lib/runtime/stage-runtime.js';
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

after(() => rmSync(root, { recursive: true, force: true }));
