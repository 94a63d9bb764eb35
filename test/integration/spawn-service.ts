// Starts one `emu3 <service>` process on 127.0.0.1:0 and waits for its "listening" log line, which names the bound
// address (lib/rpc/serve.ts). Every log line keeps arriving in `logs` (parsed JSON; `{ raw }` for anything else).
import { type ChildProcess, spawn } from 'node:child_process';
import { dirname } from 'node:path';
import { createInterface } from 'node:readline';
import { protoRoot } from '../../lib/rpc/proto.js';

export interface SpawnedService {
  proc: ChildProcess;
  address: string;
  exited: Promise<number | null>;
  logs: Record<string, unknown>[];
}

export function spawnService(args: string[], what: string, timeoutMs: number): Promise<SpawnedService> {
  const proc = spawn(process.execPath, ['bin/emu3.js', ...args], {
    cwd: dirname(protoRoot()),
    stdio: ['ignore', 'inherit', 'pipe'],
  });
  const logs: Record<string, unknown>[] = [];
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const dump = () => logs.map((l) => JSON.stringify(l)).join('\n');
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${what} did not listen within ${timeoutMs} ms; log:\n${dump()}`)),
      timeoutMs,
    );
    createInterface({ input: proc.stderr as NodeJS.ReadableStream }).on('line', (line) => {
      let record: Record<string, unknown>;
      try {
        record = JSON.parse(line);
      } catch {
        record = { raw: line };
      }
      logs.push(record);
      if (record.msg === 'listening') {
        clearTimeout(timer);
        resolve({ proc, address: String(record.address), exited, logs });
      }
    });
    proc.once('exit', (code) => reject(new Error(`${what} exited with ${code} before listening; log:\n${dump()}`)));
  });
}
