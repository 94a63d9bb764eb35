// The cpu-tiny overlay executed, not only parsed: the rendered pods' init containers, commands, args, env and ports
// run as local processes, as the kubelet would run them from the image (the runtime stage's files laid out by its
// COPY instructions, its ENTRYPOINT and ENV), and a Generate passes through the Service's port.
//
// What stands in for the cluster: every pod gets its own loopback address (127.0.10.x) and binds its ports there
// (`0.0.0.0:P` in the rendered args becomes `<pod address>:P`); the cluster DNS names (the LeaderWorkerSet's pod names
// under its headless Service, the Services) are answered by test/deploy/dns-hook.ts, loaded into each process with
// `node --import`; each volume is a directory of the pod's (mount paths in args and env are rewritten to it); the
// LWS_* variables are set as the LeaderWorkerSet controller sets them; `/usr/bin/tini --` is left out (no tini
// here: node receives SIGTERM directly, which is what tini forwards). The NetworkPolicies, resources and
// read-only mounts are not enforced (test/unit/deploy-manifests.test.ts checks what they say).
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { splitLayers, stageCosts } from '../../cli/system.js';
import { loadEmu3Config } from '../../lib/model/config.js';
import { createClient, unaryCall } from '../../lib/rpc/client.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../../lib/rpc/health.js';
import { protoRoot } from '../../lib/rpc/proto.js';
import { copyOf, envOf, execForm, parseDockerfile } from '../deploy/dockerfile.js';
import { type K8sObject, render } from '../deploy/kustomize.js';
import {
  type Container,
  configMapsOf,
  containerArgv,
  containerEnv,
  type PodTemplate,
  podTemplates,
} from '../deploy/pods.js';
import { generate, picture, singleStageGreedy, unary } from './pipeline-harness.js';

const repo = join(protoRoot(), '..');
const NAMESPACE = 'default';
const work = mkdtempSync(join(tmpdir(), 'emu3-deploy-'));
const objects = render(join(repo, 'deploy/k8s/overlays/cpu-tiny'));
const stages = parseDockerfile(readFileSync(join(repo, 'Dockerfile'), 'utf8'));
const runtime = stages[stages.length - 1];
const image = {
  entrypoint: execForm(runtime.instructions.find((i) => i.keyword === 'ENTRYPOINT')!),
  cmd: execForm(runtime.instructions.find((i) => i.keyword === 'CMD')!),
  env: envOf(runtime),
  workdir: runtime.instructions.filter((i) => i.keyword === 'WORKDIR').at(-1)!.args,
};

/** The runtime stage's files under `<work>/app`, copied as its COPY instructions say. */
function layOutImage(): string {
  const app = join(work, 'app');
  mkdirSync(app, { recursive: true });
  // What the build stage compiles: the TypeScript directories it copies, built into dist/ (this checkout's build).
  const built = stages[0].instructions
    .filter((i) => i.keyword === 'COPY')
    .flatMap((i) => copyOf(i).sources)
    .filter((s) => ['lib', 'services', 'cli'].includes(s));
  for (const ins of runtime.instructions.filter((i) => i.keyword === 'COPY')) {
    const { from, sources, dest } = copyOf(ins);
    const target = join(app, dest);
    if (from === 'build') {
      assert.deepEqual(sources, ['/src/dist']);
      for (const dir of built) cpSync(join(repo, 'dist', dir), join(target, dir), { recursive: true });
      continue;
    }
    for (const src of sources) {
      const into = dest.endsWith('/') ? join(target, src.split('/').at(-1)!) : target;
      mkdirSync(dirname(into), { recursive: true });
      cpSync(join(repo, src), into, { recursive: true });
    }
  }
  // npm ci --omit=dev in the image; here the shared install (a superset) stands in for it.
  symlinkSync(join(repo, 'node_modules'), join(app, 'node_modules'));
  return app;
}

interface Pod {
  name: string;
  ip: string;
  template: PodTemplate;
  lws: Record<string, string>;
  dir: string;
  running?: Running;
}

interface Running {
  proc: ChildProcess;
  log: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

let app: string;
const pods: Pod[] = [];
const hosts: Record<string, string> = {};

function planPods(): void {
  const templates = podTemplates(objects);
  let next = 1;
  for (const t of templates) {
    const owner = t.workload.metadata.name;
    if (t.role === 'pod') {
      pods.push({ name: `${owner}-0`, ip: `127.0.10.${next++}`, template: t, lws: {}, dir: '' });
      continue;
    }
    // biome-ignore lint/suspicious/noExplicitAny: plain JSON
    const size = (t.workload.spec as any).leaderWorkerTemplate.size as number;
    const leader = `${owner}-0`;
    const leaderAddress = `${leader}.${owner}.${NAMESPACE}`;
    const indices = t.role === 'leader' ? [0] : Array.from({ length: size - 1 }, (_, i) => i + 1);
    for (const w of indices) {
      const name = w === 0 ? leader : `${leader}-${w}`;
      const ip = `127.0.10.${next++}`;
      hosts[`${name}.${owner}.${NAMESPACE}`] = ip;
      pods.push({
        name,
        ip,
        template: t,
        lws: { LWS_LEADER_ADDRESS: leaderAddress, LWS_GROUP_SIZE: String(size), LWS_WORKER_INDEX: String(w) },
        dir: '',
      });
    }
  }
  for (const p of pods) p.dir = join(work, 'pods', p.name);
  // Each Service's name (short and namespaced) leads to the pod it selects.
  for (const s of objects.filter((o) => o.kind === 'Service')) {
    const pod = podOf(s);
    hosts[s.metadata.name] = pod.ip;
    hosts[`${s.metadata.name}.${NAMESPACE}.svc.cluster.local`] = pod.ip;
  }
}

function podOf(service: K8sObject): Pod {
  // biome-ignore lint/suspicious/noExplicitAny: plain JSON
  const selector = (service.spec as any).selector as Record<string, string>;
  const hit = pods.filter((p) => Object.entries(selector).every(([k, v]) => p.template.labels[k] === v));
  assert.equal(hit.length, 1, `Service/${service.metadata.name} selects one pod here`);
  return hit[0];
}

/** The pod's view of a path or address: volume mounts, the image's /app, and its own address for 0.0.0.0. */
function localize(pod: Pod, c: Container, s: string): string {
  if (s.startsWith('0.0.0.0:')) return `${pod.ip}:${s.slice('0.0.0.0:'.length)}`;
  if (s === image.workdir || s.startsWith(`${image.workdir}/`)) return app + s.slice(image.workdir.length);
  for (const m of c.volumeMounts ?? [])
    if (s === m.mountPath || s.startsWith(`${m.mountPath}/`))
      return join(pod.dir, 'volumes', m.name) + s.slice(m.mountPath.length);
  return s;
}

function start(pod: Pod, c: Container): Running {
  for (const v of pod.template.spec.volumes ?? []) {
    assert.ok('emptyDir' in v, `${pod.name}: volume ${v.name} is an emptyDir in cpu-tiny`);
    mkdirSync(join(pod.dir, 'volumes', v.name as string), { recursive: true });
  }
  const env = containerEnv(c, {
    configMaps: configMapsOf(objects),
    fields: { 'metadata.name': pod.name },
    injected: { ...Object.fromEntries(image.env), ...pod.lws },
  });
  const argv = containerArgv(c, image, env);
  assert.deepEqual(argv.slice(0, 2), ['/usr/bin/tini', '--'], `${pod.name} ${c.name}: tini is PID 1`);
  const [file, ...args] = argv.slice(2).map((a) => localize(pod, c, a));
  const childEnv: Record<string, string> = {};
  for (const [k, v] of env) childEnv[k] = localize(pod, c, v);
  Object.assign(childEnv, {
    PATH: `${dirname(process.execPath)}:/usr/bin:/bin`,
    NODE_OPTIONS: `--import=${pathToFileURL(join(repo, 'dist/test/deploy/dns-hook.js')).href}`,
    EMU3_TEST_HOSTS: JSON.stringify(hosts),
  });
  const proc = spawn(file === 'node' ? process.execPath : file, args, {
    cwd: app,
    env: childEnv,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const log: string[] = [];
  for (const s of [proc.stdout, proc.stderr]) createInterface({ input: s! }).on('line', (l) => log.push(l));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.once('exit', (code, signal) => resolve({ code, signal })),
  );
  return { proc, log, exited };
}

const tail = (r: Running) => r.log.slice(-15).join('\n');

async function healthy(pod: Pod, port: number, timeoutMs: number): Promise<void> {
  const client = createClient(HEALTH_PROTO, HEALTH_SERVICE, `${pod.ip}:${port}`);
  let exit: { code: number | null } | undefined;
  void pod.running!.exited.then((e) => {
    exit = e;
  });
  const until = Date.now() + timeoutMs;
  try {
    for (;;) {
      if (exit) throw new Error(`${pod.name} exited (${exit.code}) before SERVING:\n${tail(pod.running!)}`);
      try {
        const r = await unaryCall<object, { status: string }>(client, 'Check', { service: '' }, { deadlineMs: 1000 });
        if (r.status === 'SERVING') return;
      } catch (err) {
        const code = (err as grpc.ServiceError).code;
        if (code !== grpc.status.UNAVAILABLE && code !== grpc.status.DEADLINE_EXCEEDED) throw err;
      }
      if (Date.now() > until) throw new Error(`${pod.name} not SERVING within ${timeoutMs} ms:\n${tail(pod.running!)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    client.close();
  }
}

let client: grpc.Client;
const grpcPort = (p: Pod) => p.template.spec.containers[0].ports!.find((q) => q.name === 'grpc')!.containerPort;

before(
  async () => {
    app = layOutImage();
    assert.ok(statSync(join(app, 'deploy/lws-entry.sh')).mode & 0o111, 'lws-entry.sh is executable in the image');
    planPods();
    // Init containers first (each pod's in order), then every main container at once, as the kubelet does.
    await Promise.all(
      pods.map(async (pod) => {
        for (const c of pod.template.spec.initContainers ?? []) {
          const r = start(pod, c);
          const e = await r.exited;
          assert.equal(e.code, 0, `${pod.name} init ${c.name}:\n${tail(r)}`);
        }
      }),
    );
    for (const pod of pods) pod.running = start(pod, pod.template.spec.containers[0]);
    // The startup probes: gRPC health SERVING on each pod's grpc port (a tiny model builds its graphs in seconds).
    await Promise.all(pods.map((pod) => healthy(pod, grpcPort(pod), 90_000)));
    const service = objects.find((o) => o.kind === 'Service' && o.metadata.name === 'emu3-api')!;
    // biome-ignore lint/suspicious/noExplicitAny: plain JSON
    const port = (service.spec as any).ports[0];
    const target = podOf(service);
    assert.equal(
      target.template.spec.containers[0].ports!.find((q) => q.name === port.targetPort)!.containerPort,
      port.port,
    );
    client = emu3Client(`${target.ip}:${port.port}`);
  },
  { timeout: 180_000 },
);

after(async () => {
  client?.close();
  for (const p of pods) if (p.running && p.running.proc.exitCode === null) p.running.proc.kill('SIGKILL');
  rmSync(work, { recursive: true, force: true });
});

test(
  'the pipeline the pods formed: stages from their LeaderWorkerSet indices, layers split as emu3 up splits them',
  { timeout: 60_000 },
  async () => {
    const info = await unary<{
      numLayers: number;
      stages: { address: string; layerBegin: number; layerEnd: number }[];
    }>(client, 'GetModelInfo', {});
    const leader = pods.find((p) => p.template.role === 'leader')!;
    const config = loadEmu3Config(join(leader.dir, 'volumes/models/emu3'));
    const workers = pods.filter((p) => p.template.role === 'worker');
    assert.equal(info.stages.length, workers.length);
    assert.deepEqual(
      info.stages.map((s) => [s.layerBegin, s.layerEnd]),
      splitLayers(config.numHiddenLayers, workers.length, stageCosts(config)),
    );
    assert.deepEqual(
      info.stages.map((s) => s.address),
      workers.map((w) => `${w.name}.emu3.${NAMESPACE}:50061`),
      'the coordinator dials the stable DNS names, in worker order',
    );
  },
);

test(
  'a Generate with an image passes through the Service, vq and both shards: the single-stage greedy answer',
  { timeout: 120_000 },
  async () => {
    const parts = [
      { image: { data: await picture(96, 80, 1), mimeType: 'image/png' } },
      { text: 'Describe the image.' },
    ];
    const { tokenIds } = await unary<{ tokenIds: number[] }>(client, 'Tokenize', { parts });
    const answer = await generate(client, { parts, sampling: { maxNewTokens: 6, ignoreEos: true } }).done;
    assert.equal(answer.final.usage.promptTokens, tokenIds.length);
    assert.equal(answer.ids.length, 6);
    assert.ok(answer.final.timings.vqMs > 0, 'the image went to vq');
    const info = await unary<{ visualTokenBegin: number; visualTokenEnd: number }>(client, 'GetModelInfo', {});
    const leader = pods.find((p) => p.template.role === 'leader')!;
    const reference = await singleStageGreedy(join(leader.dir, 'volumes/models/emu3'), tokenIds, 6, {
      begin: info.visualTokenBegin,
      end: info.visualTokenEnd,
    });
    assert.deepEqual(answer.ids, reference);
  },
);

test("every pod's metrics port (the scrape annotations') answers /metrics", { timeout: 30_000 }, async () => {
  for (const pod of pods) {
    const port = pod.template.annotations['prometheus.io/port'];
    const res = await fetch(`http://${pod.ip}:${port}${pod.template.annotations['prometheus.io/path']}`);
    assert.equal(res.status, 200, pod.name);
    assert.match(await res.text(), /^# HELP emu3_/m, pod.name);
  }
});

test(
  'SIGTERM (what tini forwards) drains every pod: coordinator first, then the rest, each exits 0 in its grace period',
  { timeout: 120_000 },
  async () => {
    const ordered = [
      ...pods.filter((p) => p.template.role === 'leader'),
      ...pods.filter((p) => p.template.role !== 'leader'),
    ];
    for (const pod of ordered) {
      const r = pod.running!;
      r.proc.kill('SIGTERM');
      const grace = pod.template.spec.terminationGracePeriodSeconds as number;
      const timer = setTimeout(() => r.proc.kill('SIGKILL'), grace * 1000);
      const e = await r.exited;
      clearTimeout(timer);
      assert.deepEqual(e, { code: 0, signal: null }, `${pod.name}:\n${tail(r)}`);
    }
  },
);
