import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import * as protoLoader from '@grpc/proto-loader';
import { validateGenerateRequest } from '../../services/coordinator/request-validation.js';

const root = join(fileURLToPath(import.meta.url), '../../../../proto');
const publicProto = 'emu3/v1/emu3.proto';
const shardProto = 'emu3/internal/v1/shard.proto';
// The options the services are expected to load with: camelCase fields, unset optionals stay undefined.
const options: protoLoader.Options = { keepCase: false, defaults: false, oneofs: true, longs: String, enums: String };

function load(file: string) {
  return protoLoader.loadSync(file, { ...options, includeDirs: [root] });
}

// biome-ignore lint/suspicious/noExplicitAny: decoded proto messages are plain untyped objects
type Decoded = any;

function method(pkg: protoLoader.PackageDefinition, service: string, name: string) {
  const m = (pkg[service] as protoLoader.ServiceDefinition)[name];
  return {
    ...m,
    requestDeserialize: (b: Buffer): Decoded => m.requestDeserialize(b),
    responseDeserialize: (b: Buffer): Decoded => m.responseDeserialize(b),
  };
}

test('public service: Generate is server-streaming, Tokenize and GetModelInfo unary', () => {
  const pkg = load(publicProto);
  const gen = method(pkg, 'emu3.v1.Emu3', 'Generate');
  assert.equal(gen.requestStream, false);
  assert.equal(gen.responseStream, true);
  for (const name of ['Tokenize', 'GetModelInfo']) {
    const m = method(pkg, 'emu3.v1.Emu3', name);
    assert.equal(m.requestStream || m.responseStream, false, name);
  }
});

test('a GenerateRequest round-trips with explicit zeros kept apart from unset, and validates', () => {
  const gen = method(load(publicProto), 'emu3.v1.Emu3', 'Generate');
  const bytes = gen.requestSerialize({
    parts: [{ image: { data: Buffer.from([1, 2, 3]), mimeType: 'image/png' } }, { text: 'What is this?' }],
    task: 'TASK_UNDERSTAND',
    sampling: { temperature: 0, topP: 0.9, seed: 7, stop: ['\n\n'] },
    requestId: 'r1',
    topLogprobs: 2,
  });
  const req = gen.requestDeserialize(bytes);
  assert.equal(req.sampling.temperature, 0, 'an explicit 0 is present');
  assert.equal(req.sampling.topK, undefined, 'an unset optional stays unset');
  assert.equal(req.parts[0].kind, 'image');
  const v = validateGenerateRequest(req);
  assert.equal(v.sampling.topP, 0.9);
  assert.equal(v.sampling.seed, 7);
  assert.equal(v.sampling.maxNewTokens, 1024);
  assert.deepEqual(
    v.parts.map((p) => p.kind),
    ['image', 'text'],
  );
  assert.equal(v.topLogprobs, 2);
  const neg = gen.requestDeserialize(gen.requestSerialize({ parts: [{ text: 'x' }], sampling: { topK: -1 } }));
  assert.throws(() => validateGenerateRequest(neg), /sampling.top_k: -1/, 'a negative top_k reaches validation');
});

test('a GenerateResponse carries either a delta or the final message', () => {
  const gen = method(load(publicProto), 'emu3.v1.Emu3', 'Generate');
  const final = gen.responseDeserialize(
    gen.responseSerialize({
      final: {
        finishReason: 'FINISH_REASON_STOP',
        usage: { promptTokens: 10, cachedTokens: 4, completionTokens: 3 },
        timings: { queueMs: 1.5, vqMs: 0, ttftMs: 20, decodeMs: 30 },
        stopString: '\n\n',
      },
    }),
  );
  assert.equal(final.event, 'final');
  assert.equal(final.final.finishReason, 'FINISH_REASON_STOP');
  assert.equal(final.final.usage.cachedTokens, 4);
  const delta = gen.responseDeserialize(gen.responseSerialize({ delta: { text: 'Hi', tokenIds: [9, 10] } }));
  assert.equal(delta.event, 'delta');
  assert.deepEqual(delta.delta.tokenIds, [9, 10]);
});

test('shard service: Forward is bidirectional; results go to the coordinator through ResultSink', () => {
  const pkg = load(shardProto);
  const fwd = method(pkg, 'emu3.internal.v1.Shard', 'Forward');
  assert.equal(fwd.requestStream && fwd.responseStream, true);
  for (const name of ['Info', 'Free', 'Reset']) assert.ok(method(pkg, 'emu3.internal.v1.Shard', name), name);
  const deliver = method(pkg, 'emu3.internal.v1.ResultSink', 'Deliver');
  assert.equal(deliver.requestStream, true);
  const hidden = new Float32Array([1.5, -2, 0.25, 8]);
  const msg = fwd.requestDeserialize(
    fwd.requestSerialize({
      batch: {
        microBatchId: 3,
        items: [{ sequenceId: 11, slot: 2, startPosition: 5, tokenCount: 2, sample: true }],
        hiddenStates: { data: Buffer.from(hidden.buffer), dtype: 'DTYPE_FLOAT32', shape: [2, 2] },
        sampling: [{ sequenceId: 11, mask: 'MASK_KIND_TEXT', temperature: 0.7, topK: 40, penalisedIds: [1, 2] }],
        replyTo: '127.0.0.1:50060',
      },
    }),
  );
  assert.equal(msg.kind, 'batch');
  assert.equal(msg.batch.microBatchId, '3');
  const data: Buffer = msg.batch.hiddenStates.data;
  assert.deepEqual(new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.length)), hidden);
  assert.equal(msg.batch.sampling[0].mask, 'MASK_KIND_TEXT');
});

// Every field and enum value carries a comment on the line(s) just above it.
function undocumented(file: string): { members: number; missing: string[] } {
  const lines = readFileSync(join(root, file), 'utf8').split('\n');
  const missing: string[] = [];
  let members = 0;
  let depth = 0;
  lines.forEach((line, i) => {
    const t = line.trim();
    const isMember = depth > 0 && /^(optional |repeated )?[\w.]+(<[^>]*>)? \w+ = \d+|^\w+ = \d+;/.test(t);
    if (isMember) members++;
    if (isMember && !lines[i - 1].trim().startsWith('//')) missing.push(`${file}:${i + 1}: ${t}`);
    depth += (t.match(/{/g) ?? []).length - (t.match(/}/g) ?? []).length;
  });
  return { members, missing };
}

test('every field and enum value is documented', () => {
  const pub = undocumented(publicProto);
  const shard = undocumented(shardProto);
  // The line parser must see every numbered member (counted independently here).
  const numbered = (file: string) =>
    readFileSync(join(root, file), 'utf8').match(/= \d+( \[packed = true\])?;/g)!.length;
  assert.equal(pub.members, numbered(publicProto));
  assert.equal(shard.members, numbered(shardProto));
  assert.deepEqual([...pub.missing, ...shard.missing], []);
});
