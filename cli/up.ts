// `emu3 up` (= `npm start`): the whole system on this machine as separate processes on loopback: vq, N shards and the
// coordinator, kept running. Generates emu3-tiny first when the default model directory is missing.
//
// Supervision: a process that dies is started again at the same address after a short, growing delay (the
// coordinator keeps its answers and prefills them again once a stage is back); the others keep running. After
// --max-restarts deaths within --restart-window-ms it gives up on that process: on vq, `up` keeps serving text-only
// requests and says that image requests will fail; on a shard or the coordinator nothing can be answered any more,
// so it stops everything and exits 1.
//
// Stopping: the children run in their own process group, so a terminal's Ctrl-C reaches only `up`. The first
// SIGINT/SIGTERM sends SIGTERM to the coordinator (it stops admission and lets running answers finish within
// --drain-timeout-ms), then, once it has exited, to the shards and vq. A second Ctrl-C kills everything at once.
import { spawn } from 'node:child_process';
import { basename, dirname, join, relative } from 'node:path';
import { loadEmu3Config } from '../lib/model/config.js';
import { TokenFile } from '../lib/rpc/auth.js';
import { createLogger } from '../lib/rpc/log.js';
import { checkListenable, parseAddress } from '../lib/rpc/serve.js';
import { type RunningGateway, startGateway } from '../services/gateway/server.js';
import { UsageError } from './args.js';
import type { Command } from './main.js';
import { binPath, type Child, ChildFailed, freePort, type RunningSystem, startSystem } from './system.js';
import { makeThrowawayPki, type ThrowawayPki } from './throwaway-pki.js';
import { upOptions, upSpec } from './up-options.js';

/** A repeat of the same signal this soon is the same Ctrl-C (npm and the shell may pass it on too). */
const SAME_SIGNAL_MS = 500;
/** After the coordinator's drain timeout, how long `up` still waits for it before SIGKILL. */
const DRAIN_MARGIN_MS = 10_000;

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

/** The committed sample image, as a path to paste from the current directory. */
function sampleImage(): string {
  const file = join(dirname(binPath()), '..', 'examples', 'cat.png');
  const rel = relative(process.cwd(), file);
  return rel.startsWith('..') ? file : rel;
}

/** The /metrics URLs, the coordinator's first. */
function metricsLines(children: Child[]): string[] {
  const ordered = [...children].sort((a, b) => Number(b.name === 'coordinator') - Number(a.name === 'coordinator'));
  const urls = ordered.filter((c) => c.metricsUrl);
  return urls.length === 0 ? [] : ['  metrics:', ...urls.map((c) => `    ${c.name.padEnd(12)} ${c.metricsUrl}`)];
}

export const command: Command = {
  spec: upSpec,
  async run(flags) {
    const opts = upOptions(flags);
    let listen = opts.listen;
    try {
      await checkListenable(listen);
      if (opts.httpListen) await checkListenable(opts.httpListen);
    } catch (err) {
      console.error(`emu3 up: ${(err as Error).message}`);
      return 1;
    }
    const { host, port } = parseAddress(listen);
    if (port === 0) listen = `${host}:${await freePort()}`;
    if (opts.generateModel) await makeTiny(opts.modelDir);
    const config = loadEmu3Config(opts.modelDir);
    if (opts.shards > config.numHiddenLayers)
      throw new UsageError(
        `up: --shards ${opts.shards} must be in [1, ${config.numHiddenLayers}] (the model's layers)`,
      );

    let pki: ThrowawayPki | undefined;
    if (opts.tls) {
      pki = makeThrowawayPki([host, ...(opts.httpListen ? [parseAddress(opts.httpListen).host] : [])]);
      console.log(`emu3 up: --tls: throwaway CA ${pki.tls.ca} (removed when up stops)`);
    }
    const removePki = () => pki?.remove();
    process.once('exit', removePki);

    let finish!: (code: number) => void;
    const finished = new Promise<number>((res) => {
      finish = res;
    });
    let system: RunningSystem | undefined;
    let gateway: RunningGateway | undefined;
    let stopping = false;
    const stop = async (why: string, code: number): Promise<void> => {
      if (stopping || !system) return;
      stopping = true;
      console.log(
        `emu3 up: ${why}: draining (running answers may take up to ${opts.drainTimeoutMs} ms; Ctrl-C again kills everything) ...`,
      );
      await Promise.all([gateway?.close(), system.stop(opts.drainTimeoutMs + DRAIN_MARGIN_MS)]);
      finish(code);
    };
    const onGiveUp = (child: Child) => {
      if (child.name === 'vq') {
        console.error(
          'emu3 up: ERROR vq is down for good: requests with images now fail (UNAVAILABLE); text-only requests are still served. Restart `emu3 up` to bring vq back.',
        );
        return;
      }
      console.error(
        `emu3 up: ERROR ${child.name} cannot be kept running, so nothing can be answered; stopping all processes`,
      );
      void stop(`${child.name} is down for good`, 1);
    };
    try {
      system = await startSystem(
        {
          modelDir: opts.modelDir,
          vqDir: opts.vqDir,
          shards: opts.shards,
          precision: opts.precision,
          listen,
          logDir: opts.logDir,
          readyTimeoutMs: opts.readyTimeoutMs,
          coordinatorArgs: [...opts.coordinatorArgs, '--drain-timeout-ms', String(opts.drainTimeoutMs)],
          shardArgs: opts.shardArgs,
          vqArgs: opts.vqArgs,
          progress: (line) => console.log(`emu3 up: ${line}`),
          supervise: {
            ...opts.restart,
            problem: (line) => console.error(`emu3 up: ${line}`),
            onGiveUp,
          },
          metrics: opts.metrics,
          authTokenFile: opts.authTokenFile,
          tls: pki?.tls,
        },
        config,
      );
    } catch (err) {
      removePki();
      if (err instanceof ChildFailed) {
        console.error(`emu3 up: ${err.message}`);
        return 1;
      }
      throw err;
    }
    const running = system;
    const publicTokens = opts.authTokenFile ? new TokenFile(opts.authTokenFile) : undefined;
    if (opts.httpListen)
      gateway = await startGateway({
        listen: opts.httpListen,
        coordinator: running.address,
        modelDir: opts.modelDir,
        drainTimeoutMs: opts.drainTimeoutMs,
        log: createLogger('gateway', { level: 'warn' }),
        authTokens: publicTokens,
        coordinatorCredentials: {
          token: publicTokens ? () => publicTokens.first() : undefined,
          tls: pki ? { ca: pki.tls.ca } : undefined,
        },
        tls: pki ? { cert: pki.tls.cert, key: pki.tls.key } : undefined,
      });
    let lastSignal = 0;
    const onSignal = (sig: NodeJS.Signals) => {
      const now = Date.now();
      if (!stopping) {
        lastSignal = now;
        void stop(`${sig}`, 0);
        return;
      }
      if (now - lastSignal < SAME_SIGNAL_MS) return;
      console.log(`emu3 up: ${sig} again: killing all processes`);
      void running.kill().then(() => finish(130));
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);

    const addr = running.address;
    // What the printed commands need to get in: the token file, the CA.
    const chatCreds = [
      ...(opts.authTokenFile ? [`--auth-token-file ${opts.authTokenFile}`] : []),
      ...(pki ? [`--tls-ca ${pki.tls.ca}`] : []),
    ].join(' ');
    const bearer = opts.authTokenFile ? ` -H "authorization: Bearer $(head -n1 ${opts.authTokenFile})"` : '';
    // buf curl sends -H headers on its reflection calls only when told to; reflection needs the token too.
    const bufBearer = bearer ? `${bearer} --reflect-header '*'` : '';
    const buf = pki ? `--cacert ${pki.tls.ca}` : '--http2-prior-knowledge';
    const scheme = pki ? 'https' : 'http';
    const curlCa = pki ? ` --cacert ${pki.tls.ca}` : '';
    console.log(
      [
        '',
        `emu3 is serving ${opts.modelDir} on ${addr} (emu3.v1.Emu3, grpc.health.v1, server reflection)`,
        `  vq ${running.vqAddress}; shards ${running.shardAddresses.join(' → ')}`,
        ...(gateway ? [`  OpenAI-compatible HTTP API: ${gateway.baseUrl} (docs/openai.md)`] : []),
        ...metricsLines(running.children),
        '',
        'try:',
        `  npx emu3 chat --addr ${addr}${chatCreds ? ` ${chatCreds}` : ''} --image ${sampleImage()} "Describe the image."`,
        `  npx buf curl --protocol grpc ${buf}${bufBearer} -d '{"parts":[{"text":"Hello!"}],"sampling":{"maxNewTokens":16}}' ${scheme}://${addr}/emu3.v1.Emu3/Generate`,
        `  npx buf curl --protocol grpc ${buf}${bufBearer} ${scheme}://${addr}/emu3.v1.Emu3/GetModelInfo`,
        ...(gateway
          ? [
              `  curl${curlCa} ${gateway.baseUrl}/chat/completions${bearer} -H 'content-type: application/json' -d '{"model":"${basename(opts.modelDir)}","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'`,
            ]
          : []),
        '',
        'Ctrl-C drains and stops everything; a second Ctrl-C kills at once.',
      ].join('\n'),
    );
    const code = await finished;
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    console.log('emu3 up: stopped');
    return code;
  },
};
