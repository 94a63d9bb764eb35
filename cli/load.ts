// `emu3 load`: a bounded load generator for the streaming Generate API. It measures what a whole-call tool such as
// ghz cannot: time to first token, inter-token latency (between token-bearing deltas), end-to-end latency and
// tokens/s, with percentiles from HDR histograms. Fixed concurrency (closed loop) or a fixed request rate (open
// loop, capped by --max-in-flight); stops after --requests or --duration, whichever comes first.
import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { formatSummary, LoadStats, type LoadSummary, type StreamTimings } from '../lib/telemetry/load-stats.js';
import { type CommandSpec, type Flags, UsageError } from './args.js';
import { emu3Client } from './chat.js';
import type { Command } from './main.js';
import { CLIENT_AUTH_FLAGS, clientAuthFlags } from './security-flags.js';

const spec: CommandSpec = {
  name: 'load',
  summary: 'bounded load on Generate: TTFT, inter-token and end-to-end percentiles, tokens/s',
  usage:
    'emu3 load [--addr HOST:PORT] [--concurrency N | --rate R] [--requests N] [--duration S] [--image FILE]... [--text T] [--format table|json]',
  flags: {
    addr: { help: 'coordinator address', default: '127.0.0.1:50051' },
    ...CLIENT_AUTH_FLAGS,
    concurrency: { help: 'streams kept open at once (closed loop; default 1 unless --rate is given)' },
    rate: {
      help: 'requests started per second, whatever the answers do (open loop; default: none, a fixed --concurrency is used)',
    },
    'max-in-flight': {
      help: 'with --rate: most open streams; a start due beyond it is not sent (counted as NOT_SENT)',
      default: '256',
    },
    requests: { help: 'requests to start in all (default 100 unless --duration is given)' },
    duration: {
      help: 'seconds during which requests are started; open streams then finish (default: none, --requests counts)',
    },
    text: { help: 'the prompt text', default: 'Describe the scene in detail.' },
    image: { help: 'an image file to send before the text (repeatable; default: none, text only)', repeatable: true },
    unique: {
      boolean: true,
      help: 'make every prompt different (appends the request number), defeating the prefix cache',
    },
    'max-new-tokens': { help: 'tokens per answer', default: '32' },
    'ignore-eos': { boolean: true, help: 'generate max-new-tokens whatever the model says (fixed-length answers)' },
    temperature: { help: 'sampling temperature (default: greedy)' },
    seed: { help: 'sampling seed (default: the server chooses one)' },
    'deadline-ms': { help: 'deadline of each request', default: '120000' },
    format: { help: 'table or json (the summary as one JSON object on stdout)', default: 'table' },
  },
};

interface Plan {
  concurrency?: number;
  rate?: number;
  maxInFlight: number;
  requests: number;
  durationMs: number;
}

function plan(flags: Flags): Plan {
  const concurrency = flags.int('concurrency', 1, 100_000);
  const rate = flags.number('rate');
  if (concurrency !== undefined && rate !== undefined)
    throw new UsageError('load: give --concurrency or --rate, not both');
  if (rate !== undefined && !(rate > 0)) throw new UsageError(`load: --rate must be > 0, got ${rate}`);
  const duration = flags.number('duration');
  if (duration !== undefined && !(duration > 0)) throw new UsageError(`load: --duration must be > 0, got ${duration}`);
  const requests = flags.int('requests', 1, 100_000_000) ?? (duration === undefined ? 100 : Number.MAX_SAFE_INTEGER);
  return {
    concurrency: rate === undefined ? (concurrency ?? 1) : undefined,
    rate,
    maxInFlight: flags.int('max-in-flight', 1, 100_000)!,
    requests,
    durationMs: duration === undefined ? Number.POSITIVE_INFINITY : duration * 1000,
  };
}

interface Message {
  delta?: { tokenIds?: number[] };
  final?: { usage?: { completionTokens?: number } };
}

function oneStream(client: grpc.Client, request: object, deadlineMs: number): Promise<StreamTimings> {
  const startedAt = performance.now();
  const t: StreamTimings = { startedAt, deltas: [], endedAt: startedAt, status: 'OK' };
  return new Promise((resolve) => {
    const call = (
      client as unknown as { Generate(r: object, o: grpc.CallOptions): grpc.ClientReadableStream<Message> }
    ).Generate(request, { deadline: Date.now() + deadlineMs });
    call.on('data', (m: Message) => {
      const n = m.delta?.tokenIds?.length ?? 0;
      if (n > 0) t.deltas.push({ at: performance.now(), tokens: n });
      if (m.final) t.completionTokens = m.final.usage?.completionTokens ?? 0;
    });
    call.on('error', (err: grpc.ServiceError) => {
      t.endedAt = performance.now();
      t.status = grpc.status[err.code] ?? 'UNKNOWN';
      resolve(t);
    });
    call.on('end', () => {
      t.endedAt = performance.now();
      if (t.completionTokens === undefined) t.status = 'NO_FINAL';
      resolve(t);
    });
  });
}

/** Runs the plan; `request(i)` builds the i-th request. */
export async function runLoad(
  client: grpc.Client,
  p: Plan,
  request: (i: number) => object,
  deadlineMs: number,
): Promise<LoadSummary> {
  const stats = new LoadStats();
  const t0 = performance.now();
  let started = 0;
  const more = () => started < p.requests && performance.now() - t0 < p.durationMs;
  if (p.concurrency !== undefined) {
    const worker = async () => {
      while (more()) stats.add(await oneStream(client, request(started++), deadlineMs));
    };
    await Promise.all(Array.from({ length: p.concurrency }, worker));
  } else {
    const interval = 1000 / p.rate!;
    const open = new Set<Promise<void>>();
    while (more()) {
      const due = t0 + started * interval;
      const wait = due - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      if (!more()) break;
      const i = started++;
      if (open.size >= p.maxInFlight) {
        const now = performance.now();
        stats.add({ startedAt: now, deltas: [], endedAt: now, status: 'NOT_SENT' });
        continue;
      }
      const run: Promise<void> = oneStream(client, request(i), deadlineMs).then((s) => {
        stats.add(s);
        open.delete(run);
      });
      open.add(run);
    }
    await Promise.all(open);
  }
  return stats.summary(performance.now() - t0);
}

export const command: Command = {
  spec,
  async run(flags) {
    const p = plan(flags);
    const format = flags.oneOf('format', ['table', 'json'] as const)!;
    const images = flags.all('image').map((file) => {
      try {
        return readFileSync(file);
      } catch (err) {
        throw new UsageError(`load: --image ${file}: ${(err as Error).message}`);
      }
    });
    const text = flags.required('text');
    const unique = flags.bool('unique');
    const sampling: Record<string, unknown> = {
      maxNewTokens: flags.int('max-new-tokens', 1, 1_000_000)!,
      ignoreEos: flags.bool('ignore-eos'),
    };
    const temperature = flags.number('temperature');
    if (temperature !== undefined) sampling.temperature = temperature;
    const seed = flags.int('seed', 0, 2 ** 32 - 1);
    if (seed !== undefined) sampling.seed = seed;
    const request = (i: number) => ({
      parts: [...images.map((data) => ({ image: { data } })), { text: unique ? `${text} (request ${i})` : text }],
      sampling,
      returnTokenIds: true,
    });
    const client = emu3Client(flags.required('addr'), {}, clientAuthFlags(flags, 'load'));
    try {
      const summary = await runLoad(client, p, request, flags.int('deadline-ms', 1)!);
      const mode = p.rate !== undefined ? { rate: p.rate, maxInFlight: p.maxInFlight } : { concurrency: p.concurrency };
      if (format === 'json') console.log(JSON.stringify({ ...mode, ...summary }));
      else {
        const how =
          p.rate !== undefined ? `rate ${p.rate}/s (at most ${p.maxInFlight} open)` : `concurrency ${p.concurrency}`;
        console.log(`emu3 load: ${how}\n${formatSummary(summary)}`);
      }
      return summary.ok === summary.requests ? 0 : 1;
    } finally {
      client.close();
    }
  },
};
