// `emu3 up` as a real process for the integration tests: an emu3-tiny written to a temporary directory, `up` started
// on it with the given flags, every line it prints kept, and the pid and address of each child read from its
// "<name> started (pid N) on ADDR" / "<name> restarted (pid N) on ADDR" lines.
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { binPath } from '../../cli/system.js';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';
import { writeTokenizerFiles } from '../../lib/tokenizer/files.js';
import { writeTinyVq } from '../../lib/vq/tiny.js';

export async function writeTinyModel(): Promise<{ work: string; modelDir: string }> {
  const work = mkdtempSync(join(tmpdir(), 'emu3-up-'));
  const modelDir = join(work, 'emu3-tiny');
  writeTinyEmu3(modelDir, { seed: 0, preset: 'tiny', dtype: 'f32', shards: 1 });
  await writeTokenizerFiles(modelDir);
  writeTinyVq(join(modelDir, 'vq'), { seed: 0, preset: 'tiny' });
  return { work, modelDir };
}

export interface UpProcess {
  proc: ChildProcess;
  /** Every line of stdout and stderr, in order of arrival. */
  lines: string[];
  /** The latest pid of each child by name. */
  pids: Map<string, number>;
  addresses: Map<string, string>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Resolves with the first line matching `pattern` (also one already printed); rejects after `timeoutMs`. */
  waitFor(pattern: RegExp, timeoutMs: number, from?: number): Promise<string>;
  /** SIGKILL to `up` and every child it reported. */
  killAll(): void;
}

/** The repository root: `up` runs there, as `npm start` does. */
export const repoRoot = dirname(dirname(binPath()));

/** `group`: `up` leads a process group of its own, so a test can signal the group as a terminal's Ctrl-C does. */
export function spawnUp(args: string[], opts: { group?: boolean } = {}): UpProcess {
  // A free port for the HTTP API unless the test chooses one: several `up`s may run one after another.
  const http = args.some((a) => a.startsWith('--http-listen')) ? [] : ['--http-listen', '127.0.0.1:0'];
  const proc = spawn(process.execPath, [binPath(), 'up', ...http, ...args], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: opts.group ?? false,
  });
  const lines: string[] = [];
  const pids = new Map<string, number>();
  const addresses = new Map<string, string>();
  const waiters = new Set<() => void>();
  const onLine = (line: string) => {
    lines.push(line);
    const m = /^emu3 up: (\S+) (?:re)?started \(pid (\d+)\) on (\S+)$/.exec(line);
    if (m) {
      pids.set(m[1], Number(m[2]));
      addresses.set(m[1], m[3]);
    }
    for (const w of waiters) w();
  };
  if (proc.stdout) createInterface({ input: proc.stdout }).on('line', onLine);
  if (proc.stderr) createInterface({ input: proc.stderr }).on('line', onLine);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const waitFor = (pattern: RegExp, timeoutMs: number, from = 0) =>
    new Promise<string>((resolve, reject) => {
      const check = () => {
        const hit = lines.slice(from).find((l) => pattern.test(l));
        if (hit === undefined) return false;
        cleanup();
        resolve(hit);
        return true;
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`no line matching ${pattern} within ${timeoutMs} ms; up printed:\n${lines.join('\n')}`));
      }, timeoutMs);
      const onExit = () =>
        setTimeout(() => {
          if (check()) return;
          cleanup();
          reject(new Error(`up exited before printing ${pattern}; it printed:\n${lines.join('\n')}`));
        }, 100);
      const cleanup = () => {
        clearTimeout(timer);
        waiters.delete(waiter);
        proc.off('exit', onExit);
      };
      const waiter = () => void check();
      if (check()) return;
      waiters.add(waiter);
      proc.once('exit', onExit);
    });
  const killAll = () => {
    for (const pid of [proc.pid, ...pids.values()]) {
      try {
        if (pid) process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  };
  return { proc, lines, pids, addresses, exited, waitFor, killAll };
}

/** Starts `up` and waits for its "emu3 is serving ... on ADDR" line; returns the public address too. */
export async function startUp(
  args: string[],
  timeoutMs = 120_000,
  opts: { group?: boolean } = {},
): Promise<UpProcess & { address: string }> {
  const up = spawnUp(args, opts);
  try {
    const line = await up.waitFor(/^emu3 is serving .* on (\S+) \(/, timeoutMs);
    const address = /on (\S+) \(/.exec(line)![1];
    return Object.assign(up, { address });
  } catch (err) {
    up.killAll();
    throw err;
  }
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export function removeWork(work: string): void {
  rmSync(work, { recursive: true, force: true });
}
