// `emu3 chat`: a terminal client of emu3.v1.Emu3/Generate. Streams the answer to stdout as it arrives; usage and
// timings go to stderr at the end.
import { readFileSync } from 'node:fs';
import { extname, join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { protoRoot } from '../lib/rpc/proto.js';
import { type CommandSpec, UsageError } from './args.js';
import type { Command } from './main.js';

const spec: CommandSpec = {
  name: 'chat',
  summary: 'ask the coordinator about images and text; the answer streams to the terminal',
  usage: 'emu3 chat [--addr HOST:PORT] [--image FILE]... [--temperature T] [--seed N] [--max-new-tokens N] "text"',
  flags: {
    addr: { help: 'coordinator address', default: '127.0.0.1:50051' },
    image: { help: 'an image file to ask about (repeatable; images come before the text)', repeatable: true },
    temperature: { help: 'sampling temperature (unset: the server default, greedy)' },
    'top-k': { help: 'keep the k most likely tokens (unset: off)' },
    'top-p': { help: 'nucleus sampling mass (unset: off)' },
    seed: { help: 'sampling seed (unset: chosen by the server)' },
    'max-new-tokens': { help: 'most tokens to generate (unset: the server default, 1024 fitted to the context)' },
    stop: { help: 'a stop string (repeatable)', repeatable: true },
    'deadline-ms': { help: 'give up after this many milliseconds (unset: no deadline)' },
  },
};

const MIME: Record<string, string> = {
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.webp': 'image/webp',
  '.gif': 'image/gif',
  '.avif': 'image/avif',
  '.tif': 'image/tiff',
  '.tiff': 'image/tiff',
};

interface GenerateResponse {
  delta?: { text: string };
  final?: {
    finishReason: string;
    usage?: { promptTokens: number; cachedTokens: number; completionTokens: number };
    timings?: { queueMs: number; vqMs: number; ttftMs: number; decodeMs: number };
  };
}

export function emu3Client(address: string, channelOptions: grpc.ChannelOptions = {}): grpc.Client {
  const root = protoRoot();
  const pkg = protoLoader.loadSync(join(root, 'emu3/v1/emu3.proto'), {
    keepCase: false,
    defaults: true,
    oneofs: true,
    longs: Number,
    enums: String,
    includeDirs: [root],
  });
  const v1 = (grpc.loadPackageDefinition(pkg).emu3 as grpc.GrpcObject).v1 as grpc.GrpcObject;
  const Emu3 = v1.Emu3 as grpc.ServiceClientConstructor;
  return new Emu3(address, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': 128 * 1024 * 1024,
    'grpc.max_receive_message_length': 128 * 1024 * 1024,
    ...channelOptions,
  });
}

export const command: Command = {
  spec,
  async run(flags, positionals) {
    if (positionals.length !== 1) throw new UsageError('chat: give the text as one quoted argument');
    const parts: unknown[] = flags.all('image').map((file) => {
      let data: Buffer;
      try {
        data = readFileSync(file);
      } catch (err) {
        throw new Error(`--image ${file}: ${(err as Error).message}`);
      }
      return { image: { data, mimeType: MIME[extname(file).toLowerCase()] ?? '' } };
    });
    parts.push({ text: positionals[0] });
    const sampling: Record<string, unknown> = {};
    const num = (flag: string, key: string) => {
      const v = flags.number(flag);
      if (v !== undefined) sampling[key] = v;
    };
    num('temperature', 'temperature');
    num('top-k', 'topK');
    num('top-p', 'topP');
    num('seed', 'seed');
    num('max-new-tokens', 'maxNewTokens');
    if (flags.all('stop').length > 0) sampling.stop = flags.all('stop');
    const client = emu3Client(flags.required('addr'));
    const deadlineMs = flags.int('deadline-ms', 1);
    const call = (
      client as unknown as {
        Generate: (req: unknown, opts: grpc.CallOptions) => grpc.ClientReadableStream<GenerateResponse>;
      }
    ).Generate({ parts, sampling }, deadlineMs ? { deadline: Date.now() + deadlineMs } : {});
    process.once('SIGINT', () => call.cancel());
    return await new Promise<number>((resolve) => {
      call.on('data', (m) => {
        if (m.delta) process.stdout.write(m.delta.text);
        if (m.final) {
          const u = m.final.usage ?? { promptTokens: 0, cachedTokens: 0, completionTokens: 0 };
          const t = m.final.timings ?? { queueMs: 0, vqMs: 0, ttftMs: 0, decodeMs: 0 };
          process.stdout.write('\n');
          process.stderr.write(
            `[${m.final.finishReason}] prompt ${u.promptTokens} tokens (${u.cachedTokens} cached), ` +
              `${u.completionTokens} generated; queue ${fmt(t.queueMs)} ms, vq ${fmt(t.vqMs)} ms, ` +
              `first token ${fmt(t.ttftMs)} ms, decode ${fmt(t.decodeMs)} ms\n`,
          );
        }
      });
      call.on('error', (err: grpc.ServiceError) => {
        process.stderr.write(`\nemu3 chat: ${grpc.status[err.code] ?? err.code}: ${err.details}\n`);
        client.close();
        resolve(1);
      });
      call.on('end', () => {
        client.close();
        resolve(0);
      });
    });
  },
};

function fmt(ms: number | undefined): string {
  return (ms ?? 0).toFixed(1);
}
