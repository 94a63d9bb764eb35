// `emu3 up` (= `npm start`): the whole system on this machine as separate processes on loopback: vq, N shards and the
// coordinator. Generates emu3-tiny first when the default model directory is missing.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { loadEmu3Config } from '../lib/model/config.js';
import type { CommandSpec } from './args.js';
import type { Command } from './main.js';
import { binPath, type Child, ChildFailed, startSystem } from './system.js';

const DEFAULT_MODEL = join('models', 'emu3-tiny');

const spec: CommandSpec = {
  name: 'up',
  summary: 'start vq, the shards and the coordinator as separate processes (emu3-tiny by default)',
  usage: 'emu3 up [--model DIR] [--vq DIR] [--shards N] [--listen HOST:PORT] [--precision fp32|int4]',
  flags: {
    model: {
      help: `model directory; generated (emu3 make-tiny) when it is the default and missing`,
      default: DEFAULT_MODEL,
    },
    vq: { help: 'VQ model directory (default: <model>/vq)' },
    shards: {
      help: 'pipeline stages, each a process; layers are split so every stage reads about the same weight bytes per token (the last stage also runs lm_head, so it gets fewer layers)',
      default: '2',
    },
    listen: { help: 'public address of the coordinator', default: '127.0.0.1:50051' },
    precision: { help: 'shard weight precision: fp32 or int4', default: 'fp32' },
    'log-dir': { help: 'write each process log to DIR/<name>.log (default: logs are kept in memory only)' },
    'ready-timeout-ms': { help: 'how long the processes may take to become healthy', default: '300000' },
    'no-metrics': { boolean: true, help: 'start no Prometheus endpoints (default: one per process on a free port)' },
  },
};

function makeTiny(dir: string): Promise<void> {
  console.log(`emu3 up: ${dir} is missing; generating emu3-tiny (random weights, real tokenizer) ...`);
  return new Promise((res, reject) => {
    const child = spawn(process.execPath, [binPath(), 'make-tiny', '--out', dir], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    child.stdout.on('data', (chunk: Buffer) => {
      for (const line of chunk.toString('utf8').split('\n')) if (line) console.log(`  make-tiny: ${line}`);
    });
    child.on('exit', (code) =>
      code === 0 ? res() : reject(new Error(`emu3 make-tiny --out ${dir} failed (exit ${code})`)),
    );
  });
}

/** The /metrics URLs, the coordinator's first. */
function metricsLines(children: Child[]): string[] {
  const ordered = [...children].sort((a, b) => Number(b.name === 'coordinator') - Number(a.name === 'coordinator'));
  const urls = ordered.filter((c) => c.metricsUrl);
  return urls.length === 0 ? [] : ['  metrics:', ...urls.map((c) => `    ${c.name.padEnd(12)} ${c.metricsUrl}`)];
}

export const command: Command = {
  spec,
  async run(flags) {
    const modelDir = flags.required('model');
    if (!existsSync(join(modelDir, 'config.json'))) {
      if (resolve(modelDir) !== resolve(DEFAULT_MODEL)) throw new Error(`--model ${modelDir}: no config.json there`);
      await makeTiny(modelDir);
    }
    const config = loadEmu3Config(modelDir);
    const shards = flags.int('shards', 1, config.numHiddenLayers)!;
    let system: Awaited<ReturnType<typeof startSystem>>;
    try {
      system = await startSystem(
        {
          modelDir,
          vqDir: flags.string('vq'),
          shards,
          precision: flags.string('precision'),
          listen: flags.required('listen'),
          logDir: flags.string('log-dir'),
          readyTimeoutMs: flags.int('ready-timeout-ms', 1000)!,
          progress: (line) => console.log(`emu3 up: ${line}`),
          metrics: !flags.bool('no-metrics'),
        },
        config,
      );
    } catch (err) {
      if (err instanceof ChildFailed) {
        console.error(`emu3 up: ${err.message}`);
        return 1;
      }
      throw err;
    }
    const addr = system.address;
    console.log(
      [
        '',
        `emu3 is serving ${modelDir} on ${addr} (emu3.v1.Emu3, grpc.health.v1, server reflection)`,
        `  vq ${system.vqAddress}; shards ${system.shardAddresses.join(' → ')}`,
        ...metricsLines(system.children),
        '',
        'try:',
        `  npx emu3 chat --addr ${addr} --image photo.png "Describe the image."`,
        `  npx buf curl --protocol grpc --http2-prior-knowledge -d '{"parts":[{"text":"Hello!"}],"sampling":{"maxNewTokens":16}}' http://${addr}/emu3.v1.Emu3/Generate`,
        `  npx buf curl --protocol grpc --http2-prior-knowledge http://${addr}/emu3.v1.Emu3/GetModelInfo`,
        '',
        'Ctrl-C stops everything.',
      ].join('\n'),
    );
    let stopping = false;
    const stop = async (why: string): Promise<void> => {
      if (stopping) return;
      stopping = true;
      console.log(`emu3 up: ${why}; stopping all processes ...`);
      await system.stop();
    };
    const signalled = new Promise<number>((res) => {
      const on = (sig: NodeJS.Signals) => {
        if (stopping) {
          for (const c of system.children) c.process.kill('SIGKILL');
          return;
        }
        void stop(sig).then(() => res(0));
      };
      process.on('SIGINT', on);
      process.on('SIGTERM', on);
    });
    const died = Promise.race(system.children.map((c) => c.exited.then((code) => ({ child: c, code })))).then(
      async ({ child, code }) => {
        if (stopping) return 0;
        console.error(`emu3 up: ${child.name} exited unexpectedly (code ${code}); its last log lines:`);
        for (const line of child.tail) console.error(`  ${line}`);
        await stop(`${child.name} died`);
        return 1;
      },
    );
    const code = await Promise.race([signalled, died]);
    console.log('emu3 up: stopped');
    return code;
  },
};
