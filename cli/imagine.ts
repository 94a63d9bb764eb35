// `emu3 imagine`: text → image through the coordinator (TASK_GENERATE_IMAGE). Draws a progress bar on stderr as rows
// of the code grid arrive, writes the final PNG to --out (and the code grid to --codes), then a summary line.
import { writeFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { UsageError } from './args.js';
import { emu3Client } from './chat.js';
import { explainError, type FinalLike, summaryLine } from './chat-request.js';
import { imagineRequest, imagineSpec, progressBar } from './imagine-request.js';
import type { Command } from './main.js';

interface ImageResponse {
  progress?: { rowsDone: number; rows: number };
  final?: FinalLike & {
    image?: { png: Buffer; width: number; height: number; gridHeight: number; gridWidth: number; codes: number[] };
  };
}

export const command: Command = {
  spec: imagineSpec,
  async run(flags, positionals) {
    if (positionals.length !== 1) throw new UsageError('imagine: give the prompt as one quoted argument');
    const out = flags.required('out');
    const codesFile = flags.string('codes');
    const request = imagineRequest(flags, positionals[0]);
    const deadlineMs = flags.int('deadline-ms', 1);
    const quiet = flags.bool('quiet');
    const address = flags.required('addr');
    const client = emu3Client(address);
    const call = (
      client as unknown as {
        Generate: (req: unknown, opts: grpc.CallOptions) => grpc.ClientReadableStream<ImageResponse>;
      }
    ).Generate(request, deadlineMs ? { deadline: Date.now() + deadlineMs } : {});
    process.once('SIGINT', () => call.cancel());
    const tty = process.stderr.isTTY;
    return await new Promise<number>((resolve) => {
      let status = 0;
      call.on('data', (m: ImageResponse) => {
        if (m.progress && !quiet) {
          const bar = progressBar(m.progress.rowsDone, m.progress.rows);
          if (tty) process.stderr.write(`\r${bar}`);
          else if (m.progress.rowsDone === m.progress.rows) process.stderr.write(`${bar}\n`);
        }
        const img = m.final?.image;
        if (m.final && img) {
          if (tty && !quiet) process.stderr.write('\n');
          writeFileSync(out, img.png);
          if (codesFile)
            writeFileSync(
              codesFile,
              `${JSON.stringify({ height: img.gridHeight, width: img.gridWidth, codes: img.codes })}\n`,
            );
          if (!quiet) process.stderr.write(`wrote ${out} (${img.width}x${img.height} px)\n${summaryLine(m.final)}\n`);
        } else if (m.final) {
          process.stderr.write(`emu3 imagine: the answer ended (${m.final.finishReason}) without an image\n`);
          status = 1;
        }
      });
      call.on('error', (err: grpc.ServiceError) => {
        process.stderr.write(
          `\nemu3 imagine: ${explainError(grpc.status[err.code] ?? String(err.code), err.details, address)}\n`,
        );
        client.close();
        resolve(1);
      });
      call.on('end', () => {
        client.close();
        resolve(status);
      });
    });
  },
};
