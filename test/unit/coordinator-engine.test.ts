// The engine loop against an in-process pipeline that obeys shard.proto's KV contract strictly: every slot holds the
// token ids of its positions (the "KV"), an item must start exactly where its slot ends, copy_prefix copies, free
// clears; the next-token distribution is a hash of the slot's whole token sequence, so any KV mistake (a skipped
// prefill, a bad copy, a stale slot) changes the answer. Results come back a few micro-batches late, as from a
// pipeline of stages.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { KvCommand, MicroBatch, StageError, StepResult, Tensor } from '../../lib/rpc/shard-wire.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import type { Emu3Tokenizer } from '../../lib/tokenizer/tokenizer.js';
import { Engine, type EngineEvent, type GenerateJob, type Outgoing } from '../../services/coordinator/engine.js';
import {
  InternalError,
  ResourceExhaustedError,
  StageRefusedError,
  UnavailableError,
} from '../../services/coordinator/errors.js';
import { chatDefaults, type ValidSampling } from '../../services/coordinator/request-validation.js';
import { makeTokenizerDir, removeDir } from './tokenizer-fixture.js';

let dir: string;
let tok: Emu3Tokenizer;
before(async () => {
  dir = await makeTokenizerDir();
  tok = loadTokenizer(dir);
});
after(() => removeDir(dir));

const EOS = 151850;
// The toy model's vocabulary: a few ordinary tokens and eos.
const WORDS = [' the', ' cat', ' sat', ' on', ' a', ' mat', '.', ' dog', ' ran', ' far'];

function hash(ids: readonly number[]): number {
  let h = 2166136261;
  for (const id of ids) h = Math.imul(h ^ id, 16777619) >>> 0;
  return h;
}

class FakePipeline {
  readonly slots: number[][];
  /** The last stage's penalised set per slot, kept from SamplingSide deltas as a real last stage keeps it. */
  readonly penalised: Set<number>[];
  readonly log: Outgoing[] = [];
  /** Requests not yet applied, in stream order (a KvCommand takes effect after the batches sent before it). */
  private readonly pending: Outgoing[] = [];
  private batchesPending = 0;
  engine!: Engine;
  constructor(
    slots: number,
    private readonly stages: number,
    private readonly ids: number[],
  ) {
    this.slots = Array.from({ length: slots }, () => []);
    this.penalised = Array.from({ length: slots }, () => new Set());
  }
  send(r: Outgoing): void {
    if ('heartbeat' in r) return;
    this.log.push(r);
    this.pending.push(r);
    if (!('batch' in r)) {
      if (this.batchesPending === 0) this.applyKvCommands();
      return;
    }
    this.batchesPending++;
    if (this.batchesPending >= this.stages) setImmediate(() => this.deliver());
    else setTimeout(() => this.deliver(), 1);
  }
  private applyKvCommands(): void {
    while (this.pending.length > 0 && 'kv' in this.pending[0]) {
      const { kv } = this.pending.shift() as { kv: KvCommand };
      for (const c of kv.copies) this.slots[c.to_slot] = this.slots[c.from_slot].slice(0, c.length);
      for (const s of kv.free_slots) {
        this.slots[s] = [];
        this.penalised[s].clear();
      }
    }
  }
  /** The next micro-batch is lost on its way (a StepResult with this error). */
  failNext: StageError | null = null;
  /** Items this stage refuses (removed from the batch and reported as REFUSED, the rest runs). */
  refuse: (sequenceId: number) => boolean = () => false;
  /** Every stage restarts: KV and queued work are gone. */
  crash(): void {
    this.pending.length = 0;
    this.batchesPending = 0;
    for (let i = 0; i < this.slots.length; i++) {
      this.slots[i] = [];
      this.penalised[i].clear();
    }
  }
  tokensInUse(): number {
    return this.slots.reduce((n, s) => n + s.length, 0);
  }
  private deliver(): void {
    this.applyKvCommands();
    const next = this.pending.shift();
    if (!next || !('batch' in next)) return;
    this.batchesPending--;
    const b = next.batch;
    if (this.failNext) {
      const error = this.failNext;
      this.failNext = null;
      this.engine.onStepResult({
        micro_batch_id: b.micro_batch_id,
        results: [],
        stage_compute_ms: [],
        error,
        refusals: [],
      });
      return;
    }
    let at = 0;
    const results: StepResult['results'] = [];
    const refusals: StageError[] = [];
    // Image rows are answered once every item's tokens are in (a guided row reads its partner's KV).
    const imageRows: (() => void)[] = [];
    let side = 0;
    for (const [index, item] of b.items.entries()) {
      if (this.refuse(item.sequence_id)) {
        at += item.token_count;
        if (item.sample) side++;
        refusals.push({
          kind: 'STAGE_ERROR_KIND_REFUSED',
          message: `stage [0, 2): items[?].slot ${item.slot} refused for the test`,
          sequence_id: item.sequence_id,
          status_code: 3,
        });
        continue;
      }
      if (item.copy_prefix) {
        assert.equal(item.copy_prefix.length, item.start_position, 'copy_prefix.length = start_position');
        this.slots[item.slot] = this.slots[item.copy_prefix.from_slot].slice(0, item.copy_prefix.length);
      }
      const kv = this.slots[item.slot];
      assert.equal(item.start_position, kv.length, `sequence ${item.sequence_id}: item starts where its KV ends`);
      kv.push(...b.token_ids.slice(at, at + item.token_count));
      at += item.token_count;
      if (!item.sample) continue;
      const s: MicroBatch['sampling'][number] = b.sampling[side++];
      assert.equal(s.sequence_id, item.sequence_id);
      if (s.mask === 'MASK_KIND_IMAGE_LAYOUT') {
        const partner = s.cfg_uncond_sequence_id ?? 0;
        if (partner) {
          const next = b.items[index + 1];
          assert.equal(next?.sequence_id, partner, 'the unconditional item follows its conditional item');
          assert.equal(s.guidance_scale, this.expectScale);
        } else assert.equal(s.top_k, 1, 'the unconditional row asks for one candidate');
        this.imageSteps++;
        imageRows.push(() => {
          const partnerKv = partner ? this.slots[b.items[index + 1].slot] : [];
          results.push({ sequence_id: item.sequence_id, ...this.layoutRow([...kv, -1, ...partnerKv], s) });
        });
        continue;
      }
      assert.equal(s.mask, 'MASK_KIND_TEXT');
      if (s.repetition_penalty !== 1) {
        if (s.penalty_reset) this.penalised[item.slot].clear();
        for (const id of s.penalised_ids) this.penalised[item.slot].add(id);
        assert.deepEqual(
          [...this.penalised[item.slot]].sort((x, y) => x - y),
          [...new Set(kv)].sort((x, y) => x - y),
          `sequence ${item.sequence_id}: the kept penalised set is its whole history`,
        );
      } else assert.deepEqual(s.penalised_ids, []);
      results.push({ sequence_id: item.sequence_id, ...this.row(kv, s.top_k, s.full_row, s.temperature) });
    }
    for (const answer of imageRows) answer();
    this.applyKvCommands();
    this.engine.onStepResult({
      micro_batch_id: b.micro_batch_id,
      results,
      stage_compute_ms: [1, 1],
      error: null,
      refusals,
    });
  }
  /** The guidance scale every guided row must carry. */
  expectScale = 3;
  imageSteps = 0;
  /** A toy guided row: candidates inside the allowed range only, most likely first, from a hash of both KVs. */
  private layoutRow(kv: number[], s: MicroBatch['sampling'][number]) {
    const begin = s.allow_begin ?? 0;
    const range = (s.allow_end ?? 0) - begin;
    assert.ok(range === 1 || (begin === 151854 && range === 32768), `allowed [${begin}, ${begin + range})`);
    const h = hash(kv);
    const k = Math.min(s.top_k, range);
    const ids = Array.from({ length: k }, (_, j) => begin + (((h % range) + j * 7) % range));
    assert.equal(new Set(ids).size, k, 'distinct candidates');
    const lp = ids.map((_, j) => (k === 1 ? 0 : -1 - j * 0.3));
    return {
      candidate_ids: tensor(Buffer.from(Int32Array.from(ids).buffer), 'DTYPE_INT32'),
      logprobs: tensor(Buffer.from(Float32Array.from(lp).buffer), 'DTYPE_FLOAT32'),
    };
  }
  private row(kv: number[], k: number, full: boolean, temperature: number) {
    const h = hash(kv);
    const t = temperature > 0 ? temperature : 1;
    const logits = this.ids.map((_, i) => (((h >>> (i % 24)) ^ (i * 2654435761)) % 1000) / 250 / t);
    const max = Math.max(...logits);
    const lse = max + Math.log(logits.reduce((a, x) => a + Math.exp(x - max), 0));
    const lp = logits.map((x) => x - lse);
    if (full) {
      const rowValues = new Float32Array(tok.vocabSize).fill(Number.NEGATIVE_INFINITY);
      this.ids.forEach((id, i) => {
        rowValues[id] = lp[i];
      });
      return { candidate_ids: null, logprobs: tensor(Buffer.from(rowValues.buffer), 'DTYPE_FLOAT32') };
    }
    const order = this.ids.map((id, i) => ({ id, lp: lp[i] })).sort((a, b) => b.lp - a.lp || a.id - b.id);
    const top = order.slice(0, k);
    return {
      candidate_ids: tensor(Buffer.from(Int32Array.from(top.map((x) => x.id)).buffer), 'DTYPE_INT32'),
      logprobs: tensor(Buffer.from(Float32Array.from(top.map((x) => x.lp)).buffer), 'DTYPE_FLOAT32'),
    };
  }
}

function tensor(data: Buffer, dtype: Tensor['dtype']): Tensor {
  return { data, dtype, shape: [data.length / 4] };
}

function setup(
  opts: {
    slots?: number;
    tokens?: number;
    cache?: number;
    queue?: number;
    stages?: number;
    onFailure?: () => void;
  } = {},
) {
  const ids = [...WORDS.map((w) => tok.encode(w)[0]), EOS];
  const pipe = new FakePipeline(opts.slots ?? 48, opts.stages ?? 2, ids);
  const engine = new Engine(
    {
      scheduler: {
        stages: opts.stages ?? 2,
        maxBatchTokens: 32,
        maxBatchSeqs: 16,
        maxRunning: opts.slots ?? 48,
        prefixCacheEntries: opts.cache ?? 0,
        minPrefixMatch: 4,
      },
      kv: { slots: opts.slots ?? 48, tokens: opts.tokens ?? 48 * 256 },
      maxQueue: opts.queue ?? 64,
      tokenizer: tok,
      eosId: EOS,
      replyTo: 'test',
      onPipelineFailure: opts.onFailure,
    },
    pipe,
  );
  pipe.engine = engine;
  return { pipe, engine };
}

function sampling(s: Partial<ValidSampling> = {}): ValidSampling {
  return { ...chatDefaults, seed: null, maxNewTokensExplicit: false, stop: [], ignoreEos: false, ...s };
}

interface Answer {
  text: string;
  ids: number[];
  final?: Extract<EngineEvent, { type: 'final' }>;
  error?: Error;
}

function run(engine: Engine, prompt: number[], s: ValidSampling, maxNewTokens: number, seed = 0) {
  const answer: Answer = { text: '', ids: [] };
  let resolve!: (a: Answer) => void;
  const done = new Promise<Answer>((r) => {
    resolve = r;
  });
  const job: GenerateJob = {
    prompt,
    maxNewTokens,
    sampling: s,
    seed,
    topLogprobs: 0,
    returnTokenIds: true,
    onEvent: (e) => {
      if (e.type === 'delta') {
        answer.text += e.text;
        answer.ids.push(...e.tokenIds);
      } else if (e.type === 'final') {
        answer.final = e;
        resolve(answer);
      } else if (e.type === 'error') {
        answer.error = e.error;
        resolve(answer);
      }
    },
  };
  const handle = engine.submit(job);
  return { done, handle, answer };
}

const prompt = (n: number, salt: number) => [
  151849,
  ...Array.from({ length: n }, (_, i) => 100 + ((i * 7 + salt) % 500)),
];

test('32 concurrent requests of mixed lengths each equal their solo run, and free every slot', async () => {
  const solo: Answer[] = [];
  for (let i = 0; i < 32; i++) {
    const { engine } = setup();
    solo.push(await run(engine, prompt(5 + ((i * 13) % 70), i), sampling({ ignoreEos: true }), 3 + (i % 9)).done);
  }
  const { engine, pipe } = setup();
  const together = await Promise.all(
    Array.from(
      { length: 32 },
      (_, i) => run(engine, prompt(5 + ((i * 13) % 70), i), sampling({ ignoreEos: true }), 3 + (i % 9)).done,
    ),
  );
  together.forEach((a, i) => {
    assert.equal(a.error, undefined);
    assert.deepEqual(a.ids, solo[i].ids, `request ${i}`);
    assert.equal(a.text, solo[i].text);
    assert.equal(a.final!.finishReason, 'FINISH_REASON_LENGTH');
    assert.equal(a.final!.usage.completionTokens, 3 + (i % 9));
  });
  assert.equal(pipe.tokensInUse(), 0);
  assert.equal(engine.stats().kvSlotsInUse, 0);
  // Several sequences shared micro-batches, and chunked prefill kept batches within 32 tokens.
  const batches = pipe.log.flatMap((r) => ('batch' in r ? [r.batch] : []));
  assert.ok(batches.some((b) => b.items.length > 4));
  assert.ok(batches.every((b) => b.token_ids.length <= 32));
});

test('a seeded sampled answer repeats exactly with different batch neighbours', async () => {
  const s = sampling({ temperature: 0.9, topK: 5, ignoreEos: true });
  const alone = await run(setup().engine, prompt(20, 1), s, 12, 1234).done;
  const { engine } = setup();
  const others = Array.from({ length: 6 }, (_, i) => run(engine, prompt(10 + i, 50 + i), s, 8, i).done);
  const crowded = await run(engine, prompt(20, 1), s, 12, 1234).done;
  await Promise.all(others);
  assert.deepEqual(crowded.ids, alone.ids);
  const otherSeed = await run(setup().engine, prompt(20, 1), s, 12, 99).done;
  assert.notDeepEqual(otherSeed.ids, alone.ids, 'the seed matters');
  const full = sampling({ temperature: 1, topP: 0.9, ignoreEos: true });
  const a = await run(setup().engine, prompt(9, 3), full, 5, 7).done;
  const b = await run(engine, prompt(9, 3), full, 5, 7).done;
  assert.deepEqual(a.ids, b.ids, 'full-row sampling repeats too');
});

test('a repeated prompt is served from the prefix cache: same answer, prefill skipped, cache slots accounted', async () => {
  const { engine, pipe } = setup({ cache: 4 });
  const p = prompt(60, 9);
  const first = await run(engine, p, sampling({ ignoreEos: true }), 6).done;
  assert.equal(first.final!.usage.cachedTokens, 0);
  assert.equal(pipe.tokensInUse(), p.length, 'only the cached prompt holds KV after the first answer');
  assert.equal(engine.stats().cacheTokens, p.length);
  const sent = pipe.log.length;
  const second = await run(engine, p, sampling({ ignoreEos: true }), 6).done;
  assert.deepEqual(second.ids, first.ids);
  assert.equal(second.final!.usage.cachedTokens, p.length - 1);
  const prefilled = pipe.log
    .slice(sent)
    .flatMap((r) => ('batch' in r ? r.batch.items : []))
    .filter((i) => i.token_count > 1);
  assert.deepEqual(prefilled, [], 'no multi-token prefill for the repeated prompt');
  // A prompt sharing only the first 30 tokens reuses those.
  const third = await run(engine, [...p.slice(0, 30), 7, 8, 9], sampling({ ignoreEos: true }), 2).done;
  assert.equal(third.final!.usage.cachedTokens, 30);
  assert.equal(pipe.tokensInUse(), engine.stats().cacheTokens);
});

test('cancel (queued or running) and a full queue: KV is freed, RESOURCE_EXHAUSTED beyond the bound', async () => {
  const { engine, pipe } = setup({ slots: 2, queue: 1 });
  const a = run(engine, prompt(40, 1), sampling({ ignoreEos: true }), 500);
  const b = run(engine, prompt(40, 2), sampling({ ignoreEos: true }), 500);
  await new Promise((r) => setTimeout(r, 5));
  const c = run(engine, prompt(40, 3), sampling({ ignoreEos: true }), 500); // queued: both slots are taken
  assert.throws(() => run(engine, prompt(5, 4), sampling(), 5), ResourceExhaustedError);
  await new Promise((r) => setTimeout(r, 20));
  c.handle.cancel();
  a.handle.cancel();
  b.handle.cancel();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(engine.stats().running, 0);
  assert.equal(engine.stats().queued, 0);
  assert.equal(pipe.tokensInUse(), 0);
  const d = await run(engine, prompt(5, 5), sampling({ ignoreEos: true }), 3).done;
  assert.equal(d.final?.usage.completionTokens, 3, 'the next request runs');
});

test('stop strings end the answer before the match; eos ends it without text', async () => {
  const { engine } = setup();
  const full = await run(engine, prompt(12, 4), sampling({ ignoreEos: true }), 20).done;
  const words = full.text.split(' ').filter((w) => w);
  assert.ok(words.length >= 3);
  const stop = ` ${words[2]}`;
  const cut = await run(engine, prompt(12, 4), sampling({ ignoreEos: true, stop: [stop] }), 20).done;
  assert.equal(cut.final!.finishReason, 'FINISH_REASON_STOP');
  assert.equal(cut.final!.stopString, stop);
  assert.equal(cut.text, full.text.slice(0, full.text.indexOf(stop)));
  const withEos = await run(engine, prompt(12, 4), sampling(), 200).done;
  if (withEos.final!.finishReason === 'FINISH_REASON_EOS') {
    assert.equal(withEos.ids[withEos.ids.length - 1], EOS);
    assert.equal(withEos.text, tok.decode(withEos.ids, { skipSpecialTokens: true }));
  }
});

test('a pipeline failure mid-answer: sequences are prefilled again from their history, same tokens, no error', async () => {
  const reqs = (engine: Engine) =>
    Array.from({ length: 6 }, (_, i) =>
      run(
        engine,
        prompt(15 + i * 11, 20 + i),
        sampling(i % 2 ? { ignoreEos: true } : { temperature: 0.8, topK: 4, ignoreEos: true }),
        25,
        i + 1,
      ),
    );
  const calm = await Promise.all(reqs(setup().engine).map((r) => r.done));
  const { engine, pipe } = setup({ cache: 4 });
  const stormy = reqs(engine);
  while (stormy.filter((r) => r.answer.ids.length > 0).length < 3) await new Promise((r) => setImmediate(r));
  assert.ok(engine.stats().running === 6, 'the failure hits decoding sequences');
  pipe.crash();
  engine.pipelineLost('test: every stage restarted');
  assert.throws(
    () => run(engine, prompt(5, 1), sampling(), 3),
    UnavailableError,
    'new requests are refused while down',
  );
  await new Promise((r) => setTimeout(r, 10));
  engine.resume();
  const answers = await Promise.all(stormy.map((r) => r.done));
  answers.forEach((a, i) => {
    assert.equal(a.error, undefined);
    assert.deepEqual(a.ids, calm[i].ids, `request ${i}`);
  });
});

test('LRU eviction under a full prefix cache never loses a cached prefix still to be copied', async () => {
  const shared = prompt(20, 77);
  const requests = Array.from({ length: 12 }, (_, i) => [...shared, 300 + i, 301 + i, 302 + i]);
  const plain: Answer[] = [];
  for (const p of requests) plain.push(await run(setup().engine, p, sampling({ ignoreEos: true }), 4).done);
  const { engine, pipe } = setup({ cache: 3, slots: 6 });
  for (const [i, p] of requests.entries()) {
    const a = await run(engine, p, sampling({ ignoreEos: true }), 4).done;
    assert.deepEqual(a.ids, plain[i].ids, `request ${i}`);
    if (i > 0) assert.ok(a.final!.usage.cachedTokens >= 20, `request ${i} reuses the shared prefix`);
  }
  const together = await Promise.all(requests.map((p) => run(engine, p, sampling({ ignoreEos: true }), 4).done));
  together.forEach((a, i) => assert.deepEqual(a.ids, plain[i].ids, `concurrent request ${i}`));
  assert.ok(engine.stats().cacheEntries <= 3);
  assert.equal(pipe.tokensInUse(), engine.stats().cacheTokens);
});

const lost: StageError = {
  kind: 'STAGE_ERROR_KIND_STAGE_LOST',
  message: 'stage [0, 2) lost micro-batch: Forward stream to 127.0.0.1:1 ended',
  sequence_id: 0,
  status_code: 0,
};

test('a lost micro-batch: the engine suspends, the pipeline is reset, answers continue unchanged', async () => {
  const s = sampling({ temperature: 0.7, topK: 8, ignoreEos: true });
  const calm = await Promise.all([1, 2, 3].map((i) => run(setup().engine, prompt(30 + i, i), s, 20, i).done));
  let failures = 0;
  const box: { engine?: Engine; pipe?: FakePipeline } = {};
  const { engine, pipe } = setup({
    onFailure: () => {
      failures++;
      box.pipe!.crash();
      setTimeout(() => box.engine!.resume(), 5);
    },
  });
  Object.assign(box, { engine, pipe });
  const stormy = [1, 2, 3].map((i) => run(engine, prompt(30 + i, i), s, 20, i));
  while (stormy.every((r) => r.answer.ids.length < 5)) await new Promise((r) => setImmediate(r));
  pipe.failNext = lost;
  const answers = await Promise.all(stormy.map((r) => r.done));
  assert.equal(failures, 1);
  answers.forEach((a, i) => {
    assert.equal(a.error, undefined);
    assert.deepEqual(a.ids, calm[i].ids);
  });
  // Without a recovery handler the batch's sequences fail, naming the stage, and the rest carry on.
  const bare = setup();
  const doomed = run(bare.engine, prompt(10, 1), s, 50, 1);
  while (doomed.answer.ids.length < 2) await new Promise((r) => setImmediate(r));
  bare.pipe.failNext = lost;
  const failed = await doomed.done;
  assert.ok(failed.error instanceof UnavailableError);
  assert.match(failed.error.message, /stage \[0, 2\) lost micro-batch/);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(bare.pipe.tokensInUse(), 0);
});

test('top_logprobs: each token comes with its logprob and the n best alternatives, most likely first', async () => {
  const { engine } = setup();
  const deltas: Extract<EngineEvent, { type: 'delta' }>[] = [];
  await new Promise<void>((resolve) => {
    engine.submit({
      prompt: prompt(10, 2),
      maxNewTokens: 5,
      sampling: sampling({ ignoreEos: true }),
      seed: 0,
      topLogprobs: 3,
      returnTokenIds: false,
      onEvent: (e) => {
        if (e.type === 'delta') deltas.push(e);
        if (e.type === 'final' || e.type === 'error') resolve();
      },
    });
  });
  const lps = deltas.flatMap((d) => d.logprobs);
  assert.equal(lps.length, 5);
  for (const lp of lps) {
    assert.equal(lp.top.length, 3);
    assert.equal(lp.top[0].tokenId, lp.tokenId, 'greedy picks the most likely');
    assert.ok(Math.abs(lp.top[0].logprob - lp.logprob) < 1e-6);
    assert.ok(lp.top[0].logprob >= lp.top[1].logprob && lp.top[1].logprob >= lp.top[2].logprob);
    assert.ok(lp.logprob <= 0);
  }
});

test('a refusal inside a batch of 8 ends only that request, with the stage status; the other 7 are untouched', async () => {
  const s = sampling({ ignoreEos: true });
  const prompts = Array.from({ length: 8 }, (_, i) => prompt(6 + i, 40 + i));
  const solo: Answer[] = [];
  for (const p of prompts) solo.push(await run(setup().engine, p, s, 12).done);
  let failures = 0;
  const { engine, pipe } = setup({ onFailure: () => failures++ });
  const reqs = prompts.map((p) => run(engine, p, s, 12));
  const victim = Number(reqs[3].handle.id);
  let sent = 0;
  pipe.refuse = (id) => id === victim && ++sent === 3; // refused mid-answer, in a batch with the others
  const answers = await Promise.all(reqs.map((r) => r.done));
  assert.ok(answers[3].error instanceof StageRefusedError);
  assert.equal((answers[3].error as StageRefusedError).code, 3);
  assert.match(answers[3].error!.message, /stage \[0, 2\).*refused for the test/);
  answers.forEach((a, i) => {
    if (i === 3) return;
    assert.equal(a.error, undefined, `request ${i}`);
    assert.deepEqual(a.ids, solo[i].ids, `request ${i} is unchanged`);
  });
  assert.equal(failures, 0, 'a refusal never resets the pipeline');
  assert.equal(engine.stats().refusals, 1);
  assert.equal(pipe.tokensInUse(), 0);
});

test('an INTERNAL batch error ends that batch with INTERNAL, later requests run, the pipeline is not reset', async () => {
  let failures = 0;
  const { engine, pipe } = setup({ onFailure: () => failures++ });
  const doomed = run(engine, prompt(8, 2), sampling({ ignoreEos: true }), 30);
  while (doomed.answer.ids.length < 2) await new Promise((r) => setImmediate(r));
  pipe.failNext = {
    kind: 'STAGE_ERROR_KIND_INTERNAL',
    message: 'stage [2, 4): ORT failed',
    sequence_id: 0,
    status_code: 0,
  };
  const failed = await doomed.done;
  assert.ok(failed.error instanceof InternalError);
  assert.match(failed.error.message, /ORT failed/);
  const next = await run(engine, prompt(8, 3), sampling({ ignoreEos: true }), 4).done;
  assert.equal(next.final?.usage.completionTokens, 4);
  assert.equal(failures, 0);
  assert.equal(pipe.tokensInUse(), 0);
});

test('the queue bound counts only requests that cannot be admitted now; cached prefixes give their slots up', async () => {
  const { engine, pipe } = setup({ slots: 4, cache: 8, queue: 4 });
  for (let i = 0; i < 4; i++) await run(engine, prompt(20, 200 + i), sampling({ ignoreEos: true }), 2).done;
  // The 4th prompt's copy needs a slot beside its own: one older entry made room.
  assert.equal(engine.stats().cacheEntries, 3, 'cached prompts hold three of the four slots');
  const reqs: ReturnType<typeof run>[] = [];
  let refused = 0;
  for (let i = 0; i < 40; i++) {
    try {
      reqs.push(run(engine, prompt(10, 300 + i), sampling({ ignoreEos: true }), 3));
    } catch (err) {
      assert.ok(err instanceof ResourceExhaustedError);
      assert.match(err.message, /--max-queue = 4/);
      refused++;
    }
  }
  assert.equal(reqs.length, 8, '4 running (the cache gave its slots up) + 4 waiting');
  assert.equal(refused, 32);
  for (const a of await Promise.all(reqs.map((r) => r.done))) assert.equal(a.final?.usage.completionTokens, 3);
  assert.equal(pipe.tokensInUse(), engine.stats().cacheTokens);
});

test('the repetition penalty set goes once, then as deltas, and whole again after lost KV', async () => {
  const s = sampling({ repetitionPenalty: 1.3, temperature: 0.7, topK: 6, ignoreEos: true });
  const calm = await run(setup().engine, prompt(25, 4), s, 30, 5).done;
  const { engine, pipe } = setup();
  const r = run(engine, prompt(25, 4), s, 30, 5);
  while (r.answer.ids.length < 10) await new Promise((res) => setImmediate(res));
  pipe.crash();
  engine.pipelineLost('test: every stage restarted');
  await new Promise((res) => setTimeout(res, 5));
  engine.resume();
  const a = await r.done;
  assert.deepEqual(a.ids, calm.ids, 'same tokens through the recovery');
  const sides = pipe.log.flatMap((m) => ('batch' in m ? m.batch.sampling : []));
  assert.equal(sides.filter((x) => x.penalty_reset).length, 2, 'the whole set twice: at the start and after the loss');
  assert.ok(
    sides.filter((x) => !x.penalty_reset).every((x) => x.penalised_ids.length <= 1),
    'then one id a step',
  );
});

test('10,000 cancelled requests (queued, prefilling, decoding) leave no KV held anywhere', async () => {
  const { engine, pipe } = setup({ slots: 16, queue: 10_000 });
  const handles = [];
  for (let i = 0; i < 10_000; i++) {
    handles.push(run(engine, prompt(4 + (i % 30), i), sampling({ ignoreEos: true }), 50));
    if (i % 7 === 0) await new Promise((r) => setImmediate(r));
    if (i % 3 === 0) handles[i - (i % 5)].handle.cancel();
  }
  for (const h of handles) h.handle.cancel();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(engine.stats().running, 0);
  assert.equal(engine.stats().queued, 0);
  assert.equal(engine.stats().kvSlotsInUse, 0);
  assert.equal(pipe.tokensInUse(), 0);
  const next = await run(engine, prompt(6, 1), sampling({ ignoreEos: true }), 3).done;
  assert.equal(next.final?.usage.completionTokens, 3);
});

test('drain: new requests are refused, waiting ones end CANCELLED, running ones finish or end CANCELLED', async () => {
  const { engine, pipe } = setup({ slots: 2 });
  const a = run(engine, prompt(8, 1), sampling({ ignoreEos: true }), 6);
  const b = run(engine, prompt(8, 2), sampling({ ignoreEos: true }), 5000);
  const waiting = run(engine, prompt(8, 3), sampling({ ignoreEos: true }), 5);
  while (b.answer.ids.length < 3) await new Promise((r) => setImmediate(r));
  engine.beginDrain();
  assert.throws(() => run(engine, prompt(4, 4), sampling(), 2), UnavailableError);
  assert.equal((await waiting.done).final?.finishReason, 'FINISH_REASON_CANCELLED');
  assert.equal((await a.done).final?.finishReason, 'FINISH_REASON_LENGTH', 'a short answer finishes');
  engine.cancelRunning();
  const cut = await b.done;
  assert.equal(cut.final?.finishReason, 'FINISH_REASON_CANCELLED');
  assert.equal(cut.final?.usage.completionTokens, cut.ids.length);
  await new Promise((r) => setTimeout(r, 10));
  assert.ok(engine.idle);
  assert.equal(pipe.tokensInUse(), 0);
});

// Emu3-Gen in the engine: a job with `image` runs as a guidance pair. The fake last stage answers a guided row from a
// hash of both sides' KV, inside the allowed range, so a KV mistake on either side changes the codes.

interface ImageAnswer {
  progress: number[];
  final?: Extract<EngineEvent, { type: 'final' }>;
  error?: Error;
}

function imageRun(engine: Engine, text: number, grid: { height: number; width: number }, seed: number, scale = 3) {
  const answer: ImageAnswer = { progress: [] };
  let resolve!: (a: ImageAnswer) => void;
  const done = new Promise<ImageAnswer>((r) => {
    resolve = r;
  });
  const handle = engine.submit({
    prompt: prompt(8 + text, text),
    image: { grid, negativePrompt: prompt(30, 999), guidanceScale: scale },
    maxNewTokens: grid.height * (grid.width + 1) + 3,
    sampling: sampling({ temperature: 1, topK: 16 }),
    seed,
    topLogprobs: 0,
    returnTokenIds: false,
    onEvent: (e) => {
      if (e.type === 'progress') answer.progress.push(e.rowsDone);
      else if (e.type === 'final') {
        answer.final = e;
        resolve(answer);
      } else if (e.type === 'error') {
        answer.error = e.error;
        resolve(answer);
      }
    },
  });
  return { done, handle, answer };
}

test('images run as guidance pairs: 6 beside 6 chats each equal their solo run; progress per row; every slot freed', async () => {
  const grid = { height: 3, width: 5 };
  const solo: ImageAnswer[] = [];
  for (let i = 0; i < 6; i++) solo.push(await imageRun(setup().engine, i, grid, 100 + i).done);
  for (const [i, a] of solo.entries()) {
    assert.equal(a.error, undefined);
    assert.equal(a.final?.usage.promptTokens, 9 + i + 31, 'usage counts both prompts');
    assert.deepEqual(a.progress, [1, 2, 3]);
    assert.equal(a.final?.finishReason, 'FINISH_REASON_EOS');
    assert.equal(a.final?.image?.codes.length, 15);
    assert.equal(a.final?.usage.completionTokens, 3 * 6 + 3);
  }
  assert.notDeepEqual(solo[0].final?.image?.codes, solo[1].final?.image?.codes, 'the prompts matter');
  const { engine, pipe } = setup({ cache: 4 });
  // a first image leaves the unconditional prompt cached; the six after it copy it
  const warm = await imageRun(engine, 50, grid, 1).done;
  assert.equal(warm.final?.usage.cachedTokens, 0);
  const images = Array.from({ length: 6 }, (_, i) => imageRun(engine, i, grid, 100 + i));
  const chats = Array.from({ length: 6 }, (_, i) =>
    run(engine, prompt(10 + i, 70 + i), sampling({ ignoreEos: true }), 20),
  );
  const got = await Promise.all(images.map((r) => r.done));
  await Promise.all(chats.map((c) => c.done));
  got.forEach((a, i) => {
    assert.equal(a.error, undefined, `image ${i}`);
    assert.deepEqual(
      a.final?.image?.codes,
      solo[i].final?.image?.codes,
      `image ${i}: the same codes beside other work`,
    );
  });
  // every later pair copied the unconditional prompt from the cache
  assert.ok(
    got.slice(1).some((a) => a.final!.usage.cachedTokens >= 30),
    'the negative prompt came from the prefix cache',
  );
  for (const c of chats) assert.equal((await c.done).ids.length, 20);
  const stats = engine.stats();
  assert.equal(stats.kvSlotsInUse, stats.cacheEntries, 'only cached prefixes hold slots');
  // the guidance scale reaches the last stage as given
  const { engine: e2, pipe: p2 } = setup();
  p2.expectScale = 1.5;
  assert.equal((await imageRun(e2, 0, grid, 1, 1.5).done).error, undefined);
  assert.ok(pipe.imageSteps > 0);
});

test('an image ends whole: a refused unconditional side fails it, a cancel mid-image frees both, a lost pipeline replays it', async () => {
  const grid = { height: 4, width: 4 };
  // refused unconditional side → the image fails with the stage's status; nothing is held
  {
    const { engine, pipe } = setup();
    const r = imageRun(engine, 1, grid, 5);
    const uncond = Number(r.handle.id) + 1;
    let seen = 0;
    pipe.refuse = (id) => id === uncond && ++seen === 4;
    const a = await r.done;
    assert.ok(a.error instanceof StageRefusedError, String(a.error));
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(pipe.tokensInUse(), 0);
    assert.equal(engine.stats().kvSlotsInUse, 0);
  }
  // cancel after two rows → both slots freed on the pipeline
  {
    const { engine, pipe } = setup();
    const r = imageRun(engine, 2, grid, 6);
    while (r.answer.progress.length < 2) await new Promise((res) => setImmediate(res));
    r.handle.cancel();
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(engine.stats().kvSlotsInUse, 0);
    assert.equal(pipe.tokensInUse(), 0);
    // queued, not yet admitted: cancelling drops both sides
    const { engine: e3 } = setup({ slots: 2 });
    const first = imageRun(e3, 3, grid, 7);
    const queued = imageRun(e3, 4, grid, 8);
    assert.equal(e3.stats().queued, 2, 'the second pair waits, both sides');
    queued.handle.cancel();
    assert.equal(e3.stats().queued, 0);
    assert.equal((await first.done).error, undefined);
  }
  // lost pipeline mid-image: both sides are prefilled again and the codes do not change
  {
    const calm = await imageRun(setup().engine, 9, grid, 11).done;
    const { engine, pipe } = setup({ cache: 2 });
    const r = imageRun(engine, 9, grid, 11);
    while (r.answer.progress.length < 2) await new Promise((res) => setImmediate(res));
    pipe.crash();
    engine.pipelineLost('test: every stage restarted');
    await new Promise((res) => setTimeout(res, 10));
    engine.resume();
    const a = await r.done;
    assert.equal(a.error, undefined);
    assert.deepEqual(a.final?.image?.codes, calm.final?.image?.codes);
  }
});
