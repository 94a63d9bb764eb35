// `emu3 chat`: a terminal client of emu3.v1.Emu3/Generate. Streams the answer to stdout as it arrives; the summary
// (seed, TTFT, tokens/s, usage, timings), token ids and logprobs go to stderr at the end.
import { readFileSync } from 'node:fs';
import { extname, join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { type ClientCredentials, clientSecurity } from '../lib/rpc/client.js';
import { protoRoot } from '../lib/rpc/proto.js';
import { UsageError } from './args.js';
import { chatRequest, chatSpec, explainError, type FinalLike, summaryLine } from './chat-request.js';
import type { Command } from './main.js';
import { clientAuthFlags } from './security-flags.js';

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
  delta?: { text: string; tokenIds: number[]; logprobs: { tokenId: number; logprob: number; top: TopLogprob[] }[] };
  final?: FinalLike;
}

interface TopLogprob {
  tokenId: number;
  logprob: number;
}

export function emu3Client(
  address: string,
  channelOptions: grpc.ChannelOptions = {},
  credentials?: ClientCredentials,
): grpc.Client {
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
  const security = clientSecurity(credentials);
  return new Emu3(address, security.channel, {
    'grpc.max_send_message_length': 128 * 1024 * 1024,
    'grpc.max_receive_message_length': 128 * 1024 * 1024,
    ...channelOptions,
    ...security.options,
  });
}

export const command: Command = {
  spec: chatSpec,
  async run(flags, positionals) {
    if (positionals.length !== 1) throw new UsageError('chat: give the text as one quoted argument');
    const images = flags.all('image').map((file) => {
      let data: Buffer;
      try {
        data = readFileSync(file);
      } catch (err) {
        throw new Error(`--image ${file}: ${(err as Error).message}`);
      }
      return { data, mimeType: MIME[extname(file).toLowerCase()] ?? '' };
    });
    const request = chatRequest(flags, positionals[0], images);
    const deadlineMs = flags.int('deadline-ms', 1);
    const quiet = flags.bool('quiet');
    const address = flags.required('addr');
    const client = emu3Client(address, {}, clientAuthFlags(flags, 'chat'));
    const call = (
      client as unknown as {
        Generate: (req: unknown, opts: grpc.CallOptions) => grpc.ClientReadableStream<GenerateResponse>;
      }
    ).Generate(request, deadlineMs ? { deadline: Date.now() + deadlineMs } : {});
    process.once('SIGINT', () => call.cancel());
    const ids: number[] = [];
    const logprobs: string[] = [];
    return await new Promise<number>((resolve) => {
      call.on('data', (m: GenerateResponse) => {
        if (m.delta) {
          process.stdout.write(m.delta.text);
          ids.push(...m.delta.tokenIds);
          for (const lp of m.delta.logprobs)
            logprobs.push(
              `${lp.tokenId} ${lp.logprob.toFixed(4)}  top: ${lp.top.map((t) => `${t.tokenId}:${t.logprob.toFixed(4)}`).join(' ')}`,
            );
        }
        if (m.final) {
          process.stdout.write('\n');
          if (request.returnTokenIds) process.stderr.write(`token ids: ${ids.join(' ')}\n`);
          if (logprobs.length > 0)
            process.stderr.write(`logprobs (token logprob  top: id:logprob ...):\n${logprobs.join('\n')}\n`);
          if (!quiet) process.stderr.write(`${summaryLine(m.final)}\n`);
        }
      });
      call.on('error', (err: grpc.ServiceError) => {
        process.stderr.write(
          `\nemu3 chat: ${explainError(grpc.status[err.code] ?? String(err.code), err.details, address)}\n`,
        );
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
