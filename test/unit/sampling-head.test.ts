// The last stage's in-graph sampling head (lib/onnx/sampling-head.ts) run by ORT against the float64 reference of the
// same row processing (services/coordinator/logits.ts): mask, repetition penalty, temperature, log-softmax over the
// whole row, top-K order (ties by lower id) and the full row. Both variants: the CPU graph (float64 log-sum-exp) and the
// on-device one for webgpu (float32, every node on the device), the latter on the webgpu provider (lavapipe without a
// GPU; see stage-webgpu.test.ts).
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import * as ort from 'onnxruntime-node';
import { GraphBuilder } from '../../lib/onnx/graph.js';
import {
  addSamplingHead,
  deviceSamplingFeeds,
  runTopK,
  type SamplingRow,
  samplingFeeds,
  samplingIo,
} from '../../lib/onnx/sampling-head.js';
import { Rng } from '../../lib/util/rng.js';
import { type LastStageParams, processLastStageRow } from '../../services/coordinator/logits.js';
import { guidedScores, keepOnly, logSoftmax64 } from '../reference/gen-f64.js';

const V = 184622; // the real vocabulary: float32 error in the log-sum-exp grows with it
const VISUAL = [151854, 151854 + 32768];
const dir = mkdtempSync(join(tmpdir(), 'emu3-sampling-head-'));
type Variant = 'cpu' | 'webgpu';
const sessions = new Map<Variant, Promise<ort.InferenceSession>>();

/** Each variant's session, opened on first use (so the cpu tests run where no Vulkan device is). */
function session(variant: Variant): Promise<ort.InferenceSession> {
  let s = sessions.get(variant);
  if (!s) {
    process.env.XDG_RUNTIME_DIR ??= tmpdir();
    const g = new GraphBuilder(dir, `head-${variant}`);
    const logits = g.input('logits', 'float', ['batch', V]);
    addSamplingHead(g, logits, V, { onDevice: variant === 'webgpu' });
    s = ort.InferenceSession.create(g.save(), { executionProviders: [variant] });
    sessions.set(variant, s);
  }
  return s;
}

after(async () => {
  for (const s of sessions.values()) await (await s).release();
  rmSync(dir, { recursive: true, force: true });
});

async function runHead(variant: Variant, logits: Float32Array, rows: SamplingRow[], fetchFull: boolean) {
  const feeds: Record<string, ort.Tensor> = {
    logits: new ort.Tensor('float32', logits, [rows.length, V]),
  };
  const head = variant === 'webgpu' ? deviceSamplingFeeds(samplingFeeds(rows, V)) : samplingFeeds(rows, V);
  for (const [name, t] of Object.entries(head)) feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
  const fetches = [samplingIo.topIds, samplingIo.topLogprobs, ...(fetchFull ? [samplingIo.logprobs] : [])];
  const out = await (await session(variant)).run(feeds, fetches);
  return {
    k: runTopK(rows, V),
    ids: out[samplingIo.topIds].data as BigInt64Array,
    logprobs: out[samplingIo.topLogprobs].data as Float32Array,
    full: fetchFull ? (out[samplingIo.logprobs].data as Float32Array) : undefined,
    fetched: Object.keys(out),
  };
}

function referenceParams(row: SamplingRow, fullRow: boolean): LastStageParams {
  return {
    mask: row.maskEnd > row.maskBegin ? { kind: 'exclude', start: row.maskBegin, end: row.maskEnd } : { kind: 'none' },
    temperature: row.temperature,
    repetitionPenalty: row.repetitionPenalty,
    penalisedIds: row.penalisedIds,
    topK: row.topK,
    fullRow,
  };
}

function randomLogits(rng: Rng, rows: number, offset = 0, scale = 4): Float32Array {
  const x = rng.fillNormal(new Float32Array(rows * V), scale);
  for (let i = 0; i < x.length; i++) x[i] += offset;
  return x;
}

const rows: SamplingRow[] = [
  { maskBegin: 0, maskEnd: 0, repetitionPenalty: 1, penalisedIds: [], temperature: 1, topK: 1, fullRow: false },
  {
    maskBegin: VISUAL[0],
    maskEnd: VISUAL[1],
    repetitionPenalty: 1,
    penalisedIds: [],
    temperature: 1,
    topK: 40,
    fullRow: false,
  },
  {
    maskBegin: 0,
    maskEnd: 0,
    repetitionPenalty: 1.3,
    penalisedIds: [5, 17, 5, V - 1, 0, 1234, 17, 88, 160000, 42],
    temperature: 1,
    topK: 25,
    fullRow: false,
  },
  { maskBegin: 0, maskEnd: 0, repetitionPenalty: 1, penalisedIds: [], temperature: 0.6, topK: 64, fullRow: false },
  {
    maskBegin: 100,
    maskEnd: V - 100,
    // ids inside the mask stay -inf after the penalty
    repetitionPenalty: 1.8,
    penalisedIds: [3, 150, V - 50, V - 1, 7],
    temperature: 1.7,
    topK: 64,
    fullRow: false,
  },
];

test('samplingFeeds refuses what the graph cannot take, naming the row and field', () => {
  assert.throws(() => samplingFeeds([{ ...rows[0], temperature: 0 }], V), /row 0: temperature 0/);
  assert.throws(() => samplingFeeds([rows[0], { ...rows[2], penalisedIds: [V] }], V), /row 1: penalised id 184622/);
  assert.throws(() => samplingFeeds([{ ...rows[0], repetitionPenalty: Number.NaN }], V), /repetitionPenalty NaN/);
});

for (const variant of ['cpu', 'webgpu'] as const) {
  test(
    `${variant}: top-K ids and logprobs equal the float64 reference per row (mask, penalty, temperature, K per row)`,
    { timeout: 120_000 },
    async () => {
      const rng = new Rng(11);
      const logits = randomLogits(rng, rows.length);
      const out = await runHead(variant, logits, rows, false);
      assert.equal(out.k, 64);
      assert.deepEqual(out.fetched.sort(), [samplingIo.topIds, samplingIo.topLogprobs].sort());
      rows.forEach((row, b) => {
        const want = processLastStageRow(logits.subarray(b * V, (b + 1) * V), referenceParams(row, false));
        assert.equal(want.kind, 'candidates');
        if (want.kind !== 'candidates') return;
        const gotIds = Array.from(out.ids.subarray(b * out.k, b * out.k + row.topK), Number);
        assert.deepEqual(gotIds, Array.from(want.candidates.ids), `row ${b} ids`);
        for (let j = 0; j < row.topK; j++) {
          const diff = Math.abs(out.logprobs[b * out.k + j] - want.candidates.logprobs[j]);
          assert.ok(diff < 1e-5, `row ${b} candidate ${j}: |Δ logprob| = ${diff}`);
        }
        if (row.maskEnd > row.maskBegin)
          for (const id of gotIds) assert.ok(id < row.maskBegin || id >= row.maskEnd, `row ${b}: masked id ${id}`);
      });
    },
  );

  test(
    `${variant}: the full row equals the reference log-softmax; masked ids are exactly -inf`,
    { timeout: 120_000 },
    async () => {
      const rng = new Rng(12);
      const logits = randomLogits(rng, rows.length);
      const out = await runHead(variant, logits, rows, true);
      assert.ok(out.full);
      rows.forEach((row, b) => {
        const want = processLastStageRow(logits.subarray(b * V, (b + 1) * V), referenceParams(row, true));
        assert.equal(want.kind, 'full');
        if (want.kind !== 'full' || !out.full) return;
        let mass = 0;
        for (let id = 0; id < V; id++) {
          const got: number = out.full[b * V + id];
          if (want.logprobs[id] === Number.NEGATIVE_INFINITY) {
            assert.equal(got, Number.NEGATIVE_INFINITY, `row ${b} id ${id}`);
            continue;
          }
          assert.ok(Math.abs(got - want.logprobs[id]) < 1e-5, `row ${b} id ${id}: ${got} vs ${want.logprobs[id]}`);
          mass += Math.exp(got);
        }
        assert.ok(Math.abs(mass - 1) < 1e-4, `row ${b}: probabilities sum to ${mass}`);
      });
    },
  );

  test(
    `${variant}: log-softmax is stable for logits beyond exp() range of float32 (offset 100)`,
    { timeout: 120_000 },
    async () => {
      const rng = new Rng(13);
      const row: SamplingRow = { ...rows[0], topK: 10 };
      const logits = randomLogits(rng, 1, 100, 3);
      const out = await runHead(variant, logits, [row], true);
      const want = processLastStageRow(logits, referenceParams(row, true));
      assert.ok(want.kind === 'full' && out.full);
      for (let id = 0; id < V; id++) {
        assert.ok(Number.isFinite(out.full[id]));
        assert.ok(
          Math.abs(out.full[id] - want.logprobs[id]) < 1e-5,
          `id ${id}: ${out.full[id]} vs ${want.logprobs[id]}`,
        );
      }
    },
  );

  test(`${variant}: equal logits are ranked by lower id first`, { timeout: 120_000 }, async () => {
    const logits = new Float32Array(V).fill(-5);
    for (const id of [2500, 7, 1200, 300, 170000]) logits[id] = 2;
    logits[40] = 3;
    const row: SamplingRow = { ...rows[0], topK: 6 };
    const out = await runHead(variant, logits, [row], false);
    assert.deepEqual(Array.from(out.ids, Number), [40, 7, 300, 1200, 2500, 170000]);
    const want = processLastStageRow(logits, referenceParams(row, false));
    assert.ok(want.kind === 'candidates');
    assert.deepEqual(Array.from(want.candidates.ids), [40, 7, 300, 1200, 2500, 170000]);
  });

  test(
    `${variant}: guidance and the layout keep range equal the float64 reference (scale·(lc − lu) + lu, then keep, then top-K)`,
    { timeout: 120_000 },
    async () => {
      const rng = new Rng(21);
      // rows: 0 guided by 1 (visual ids kept), 1 the unconditional row (left as it is), 2 a text row, 3 guided by 2 with
      // one id kept (a row end), 4 guided by 1 at scale 0 (= the unconditional row)
      const logits = randomLogits(rng, 5, 3);
      const plain = {
        maskBegin: 0,
        maskEnd: 0,
        repetitionPenalty: 1,
        penalisedIds: [],
        temperature: 1,
        fullRow: false,
      };
      const head: SamplingRow[] = [
        { ...plain, topK: 50, keepBegin: VISUAL[0], keepEnd: VISUAL[1], cfg: { partnerRow: 1, scale: 3 } },
        { ...plain, topK: 1, keepBegin: VISUAL[0], keepEnd: VISUAL[1] },
        { ...plain, topK: 8, maskBegin: VISUAL[0], maskEnd: VISUAL[1] },
        { ...plain, topK: 3, keepBegin: 151846, keepEnd: 151847, cfg: { partnerRow: 2, scale: 1.5 }, temperature: 0.7 },
        { ...plain, topK: 20, cfg: { partnerRow: 1, scale: 0 } },
      ];
      const out = await runHead(variant, logits, head, true);
      const row = (b: number) => logits.subarray(b * V, (b + 1) * V);
      const want = (b: number): Float64Array => {
        const r = head[b];
        const base = r.cfg ? guidedScores(row(b), row(r.cfg.partnerRow), r.cfg.scale) : Float64Array.from(row(b));
        if (r.maskEnd > r.maskBegin) for (let i = r.maskBegin; i < r.maskEnd; i++) base[i] = Number.NEGATIVE_INFINITY;
        keepOnly(base, r.keepBegin ?? 0, r.keepEnd ?? V);
        for (let i = 0; i < V; i++) base[i] /= r.temperature;
        return logSoftmax64(base);
      };
      head.forEach((r, b) => {
        const ref = want(b);
        const order = Array.from(ref.keys()).sort((x, y) => ref[y] - ref[x] || x - y);
        const finite = order.filter((i) => ref[i] > Number.NEGATIVE_INFINITY).length;
        const n = Math.min(r.topK, finite);
        const got = Array.from(out.ids.subarray(b * out.k, b * out.k + n), Number);
        assert.deepEqual(got, order.slice(0, n), `row ${b} ids`);
        for (let j = 0; j < n; j++) {
          const diff = Math.abs(out.logprobs[b * out.k + j] - ref[order[j]]);
          assert.ok(diff < 2e-4, `row ${b} candidate ${j}: |Δ logprob| = ${diff}`);
        }
        for (let j = n; j < r.topK; j++)
          assert.equal(out.logprobs[b * out.k + j], Number.NEGATIVE_INFINITY, `row ${b}`);
      });
      // the row-end row keeps exactly one id, with logprob 0
      assert.equal(Number(out.ids[3 * out.k]), 151846);
      assert.equal(out.logprobs[3 * out.k], 0);
      // a guided row at scale 0 is the unconditional row's log-softmax
      const u = logSoftmax64(row(1));
      for (const i of [0, 77, 151900, V - 1])
        assert.ok(Math.abs(out.full![4 * V + i] - u[i]) < 2e-4, `scale 0 id ${i}`);
    },
  );
}

test('samplingFeeds refuses a guidance partner outside the run or an empty keep range', () => {
  const plain: SamplingRow = { ...rows[0], topK: 1 };
  assert.throws(() => samplingFeeds([{ ...plain, cfg: { partnerRow: 0, scale: 3 } }], V), /partner row 0/);
  assert.throws(() => samplingFeeds([plain, { ...plain, cfg: { partnerRow: 2, scale: 3 } }], V), /partner row 2/);
  assert.throws(() => samplingFeeds([{ ...plain, keepBegin: 5, keepEnd: 5 }], V), /keep range \[5, 5\)/);
  assert.throws(
    () => samplingFeeds([plain, { ...plain, cfg: { partnerRow: 0, scale: Number.NaN } }], V),
    /guidance scale NaN/,
  );
});
