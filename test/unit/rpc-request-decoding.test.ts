import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import type * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { protoRoot } from '../../lib/rpc/proto.js';
import { RequestDecodeError, requestDecoder } from '../../lib/rpc/request-decoding.js';
import { InvalidArgumentError } from '../../services/coordinator/errors.js';
import { type GenerateRequestLike, validateGenerateRequest } from '../../services/coordinator/request-validation.js';

// The public service loaded as the coordinator loads it (services/coordinator/server.ts publicPackage).
const root = protoRoot();
const pkg = protoLoader.loadSync([join(root, 'emu3/v1/emu3.proto')], {
  keepCase: false,
  defaults: false,
  oneofs: true,
  longs: Number,
  enums: String,
  bytes: Buffer,
  includeDirs: [root],
});
const service = pkg['emu3.v1.Emu3'] as grpc.ServiceDefinition;
const generate = service.Generate as grpc.MethodDefinition<unknown, unknown>;
const decode = requestDecoder(generate);

function varint(n: bigint): number[] {
  const out: number[] = [];
  let v = n;
  while (v >= 128n) {
    out.push(Number(v & 127n) | 128);
    v >>= 7n;
  }
  out.push(Number(v));
  return out;
}

test('valid requests decode exactly as proto-loader decodes them', () => {
  const requests = [
    {},
    { parts: [{ text: 'hello' }, { image: { data: Buffer.from([1, 2, 3]), mimeType: 'image/png' } }] },
    { task: 'TASK_UNDERSTAND', requestId: 'r1', returnTokenIds: true, topLogprobs: 5 },
    { task: 'TASK_GENERATE_IMAGE' },
    {
      sampling: {
        temperature: 0.7,
        topK: 50,
        topP: 0.9,
        minP: 0.05,
        repetitionPenalty: 1.1,
        seed: 4294967295,
        maxNewTokens: 7,
        stop: ['a', 'b'],
        ignoreEos: true,
      },
    },
    { sampling: { topK: -3, temperature: 0 } },
  ];
  for (const r of requests) {
    const bytes = generate.requestSerialize(r);
    assert.deepEqual(decode(bytes), generate.requestDeserialize(bytes), JSON.stringify(r));
  }
});

test('wide varints in 32-bit fields arrive as sent and are refused by validation naming the field', () => {
  const text = [0x0a, 0x03, 0x0a, 0x01, 0x61]; // parts: [{ text: 'a' }]
  // task = 2^40 + 1: grpc-js's decoding threw "index out of range" (INTERNAL)
  const task = decode(Buffer.from([...text, 0x10, ...varint(2n ** 40n + 1n)])) as GenerateRequestLike;
  assert.equal(task.task, 2 ** 40 + 1);
  assert.throws(
    () => validateGenerateRequest(task),
    (e: unknown) => e instanceof InvalidArgumentError && e.field === 'task',
  );
  // seed = 2^32: proto-loader truncates it to 0
  const seedField = [0x30, ...varint(2n ** 32n)];
  const seed = Buffer.from([...text, 0x1a, seedField.length, ...seedField]);
  assert.deepEqual(generate.requestDeserialize(seed), {
    parts: [{ text: 'a', kind: 'text' }],
    sampling: { seed: 0, _seed: 'seed' },
  });
  const wide = decode(seed) as GenerateRequestLike;
  assert.equal(wide.sampling?.seed, 2 ** 32);
  assert.throws(
    () => validateGenerateRequest(wide),
    (e: unknown) =>
      e instanceof InvalidArgumentError && e.field === 'sampling.seed' && /\[0, 4294967295\]/.test(e.message),
  );
  // uint32 top_logprobs beyond 2^53
  const big = decode(Buffer.from([...text, 0x30, ...varint(2n ** 60n)])) as Parameters<
    typeof validateGenerateRequest
  >[0];
  assert.throws(
    () => validateGenerateRequest(big),
    (e: unknown) => e instanceof InvalidArgumentError && e.field === 'top_logprobs',
  );
  // a 6-byte (non-minimal) encoding of top_k = 1 followed by max_new_tokens = 5: both read, nothing skipped
  const padded = [0x10, 0x81, 0x80, 0x80, 0x80, 0x80, 0x00, 0x38, 0x05];
  const both = decode(Buffer.from([0x1a, padded.length, ...padded])) as {
    sampling: { topK: number; maxNewTokens: number };
  };
  assert.equal(both.sampling.topK, 1);
  assert.equal(both.sampling.maxNewTokens, 5);
  // known enum values still arrive by name, unknown ones as their number
  assert.deepEqual(decode(Buffer.from([0x10, 0x01])), { task: 'TASK_UNDERSTAND' });
  assert.deepEqual(decode(Buffer.from([0x10, 0x07])), { task: 7 });
  assert.deepEqual(decode(Buffer.from([0x10, ...varint(2n ** 64n - 1n)])), { task: -1 });
});

test('malformed bytes throw RequestDecodeError naming the message type', () => {
  for (const bad of [
    [0x0a, 0x05, 0x0a], // length beyond the end
    [0x10], // varint cut off
    [0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // 11-byte varint
    [0x0f], // wire type 7
    [0x1a, 0x02, 0x09, 0x00], // a fixed64 cut off inside sampling
  ]) {
    assert.throws(
      () => decode(Buffer.from(bad)),
      (e: unknown) => e instanceof RequestDecodeError && /^GenerateRequest: /.test(e.message),
      Buffer.from(bad).toString('hex'),
    );
  }
});
