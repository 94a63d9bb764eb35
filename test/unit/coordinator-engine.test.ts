// The engine loop against an in-process pipeline that obeys shard.proto's KV contract strictly: every slot holds the
// token ids of its positions (the "KV"), an item must start exactly where its slot ends, copy_prefix copies, free
// clears; the next-token distribution is a hash of the slot's whole token sequence, so any KV mistake (a skipped
// prefill, a bad copy, a stale slot) changes the answer. Results come back a few micro-batches late, as from a
// pipeline of stages.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { ForwardRequest, KvCommand, MicroBatch, StepResult, Tensor } from '../../lib/rpc/shard-wire.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import type { Emu3Tokenizer } from '../../lib/tokenizer/tokenizer.js';
import { Engine, type EngineEvent, type GenerateJob } from '../../services/coordinator/engine.js';
import { ResourceExhaustedError } from '../../services/coordinator/errors.js';
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
  readonly log: ForwardRequest[] = [];
  /** Requests not yet applied, in stream order (a KvCommand takes effect after the batches sent before it). */
  private readonly pending: ForwardRequest[] = [];
  private batchesPending = 0;
  engine!: Engine;
  constructor(
    slots: number,
    private readonly stages: number,
    private readonly ids: number[],
  ) {
    this.slots = Array.from({ length: slots }, () => []);
  }
  send(r: ForwardRequest): void {
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
      for (const s of kv.free_slots) this.slots[s] = [];
    }
  }
  /** The next micro-batch is lost on its way (a StepResult with an error). */
  failNext = false;
  /** Every stage restarts: KV and queued work are gone. */
  crash(): void {
    this.pending.length = 0;
    this.batchesPending = 0;
    for (let i = 0; i < this.slots.length; i++) this.slots[i] = [];
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
      this.failNext = false;
      const error = `stage [0, 2) could not pass micro-batch ${b.micro_batch_id} on: stream ended`;
      this.engine.onStepResult({
        micro_batch_id: b.micro_batch_id,
        results: [],
        stage_compute_ms: [],
        error: { kind: 'STAGE_ERROR_KIND_STAGE_LOST', message: error, sequence_id: 0, status_code: 0 },
        refusals: [],
      });
      return;
    }
    let at = 0;
    const results: StepResult['results'] = [];
    let side = 0;
    for (const item of b.items) {
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
      assert.equal(s.mask, 'MASK_KIND_TEXT');
      results.push({ sequence_id: item.sequence_id, ...this.row(kv, s.top_k, s.full_row, s.temperature) });
    }
    this.applyKvCommands();
    this.engine.onStepResult({
      micro_batch_id: b.micro_batch_id,
      results,
      stage_compute_ms: [1, 1],
      error: null,
      refusals: [],
    });
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
      scheduler: { stages: opts.stages ?? 2, maxBatchTokens: 32, maxBatchSeqs: 16, maxRunning: opts.slots ?? 48 },
      kv: { slots: opts.slots ?? 48, tokens: opts.tokens ?? 48 * 256 },
      blockSize: 16,
      maxQueue: opts.queue ?? 64,
      prefixCacheEntries: opts.cache ?? 0,
      minPrefixMatch: 4,
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
  engine.suspend();
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
  pipe.failNext = true;
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
  bare.pipe.failNext = true;
  const failed = await doomed.done;
  assert.match(failed.error?.message ?? '', /could not finish micro-batch \d+: stage \[0, 2\)/);
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
