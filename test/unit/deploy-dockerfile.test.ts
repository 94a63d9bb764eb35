// Lints the Dockerfile without a docker engine: its stages, the runtime install (production dependencies only, with
// .ci/run's offline-safe settings), the non-root USER, PID 1 and its signal handling, the GPU environment, and that
// every COPY source exists in the repository and is not excluded from the build context by .dockerignore.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { protoRoot } from '../../lib/rpc/proto.js';
import { copyOf, dockerIgnored, envOf, execForm, parseDockerfile } from '../deploy/dockerfile.js';

const repo = join(protoRoot(), '..');
const dockerfile = readFileSync(join(repo, 'Dockerfile'), 'utf8');
const ignore = readFileSync(join(repo, '.dockerignore'), 'utf8');
const stages = parseDockerfile(dockerfile);
const runtime = stages[stages.length - 1];
const runs = (stage: (typeof stages)[number]) =>
  stage.instructions.filter((i) => i.keyword === 'RUN').map((i) => i.args);

test('two stages: build (all dependencies, tsc) and runtime (the last, copying dist from build)', () => {
  assert.deepEqual(
    stages.map((s) => s.name),
    ['build', 'runtime'],
  );
  for (const s of stages) assert.match(s.from, /^node:20[.-]/, 'the Node major the project targets (engines >=20.10)');
  const build = stages[0];
  assert.ok(runs(build).some((r) => /\bnpx tsc -p tsconfig\.json\b/.test(r)));
  const fromBuild = runtime.instructions.filter((i) => i.keyword === 'COPY' && copyOf(i).from === 'build');
  assert.deepEqual(
    fromBuild.map((i) => copyOf(i).sources),
    [['/src/dist']],
  );
});

test('every npm ci uses .ci/run settings; the runtime one omits dev dependencies', () => {
  const ci = readFileSync(join(repo, '.ci/run'), 'utf8');
  const ciInstall = /^npm ci (.*)$/m.exec(ci);
  assert.ok(ciInstall, '.ci/run has an npm ci line');
  const ciFlags = ciInstall[1].split(/\s+/);
  assert.match(ci, /export ONNXRUNTIME_NODE_INSTALL=skip/);
  for (const stage of stages) {
    const installs = runs(stage).filter((r) => /\bnpm ci\b/.test(r));
    assert.equal(installs.length, 1, `${stage.name}: one npm ci`);
    for (const f of ciFlags) assert.ok(installs[0].includes(f), `${stage.name}: npm ci has ${f} as .ci/run does`);
    // No dependency install script runs (allowScripts in .ci/run's npm 11; --ignore-scripts for any npm): the
    // prepare script (tsc, a dev dependency) must not run in the runtime stage either.
    assert.match(installs[0], /--ignore-scripts\b/, `${stage.name}: npm ci --ignore-scripts`);
    assert.equal(envOf(stage).get('ONNXRUNTIME_NODE_INSTALL'), 'skip', `${stage.name}: ONNXRUNTIME_NODE_INSTALL=skip`);
  }
  assert.match(runs(runtime).find((r) => r.includes('npm ci')) as string, /--omit=dev\b/);
  assert.doesNotMatch(runs(stages[0]).find((r) => r.includes('npm ci')) as string, /--omit=dev/);
});

test('runtime: non-root USER matching the manifests, tini as PID 1 in exec form, GPU and cache environment', () => {
  const users = runtime.instructions.filter((i) => i.keyword === 'USER');
  assert.equal(users.length, 1);
  const [uid, gid] = users[0].args.split(':').map(Number);
  assert.ok(uid > 0 && gid > 0, 'numeric non-root uid:gid (runAsNonRoot can only verify a numeric user)');
  const pipeline = JSON.parse(readFileSync(join(repo, 'deploy/k8s/base/pipeline.json'), 'utf8'));
  const podSecurity = pipeline.spec.leaderWorkerTemplate.workerTemplate.spec.securityContext;
  assert.equal(podSecurity.runAsUser, uid);
  assert.equal(podSecurity.runAsGroup, gid);
  const last = runtime.instructions[runtime.instructions.length - 1];
  const entrypoint = runtime.instructions.filter((i) => i.keyword === 'ENTRYPOINT');
  assert.equal(entrypoint.length, 1);
  assert.deepEqual(execForm(entrypoint[0]), ['/usr/bin/tini', '--', 'node', '/app/bin/emu3.js']);
  assert.equal(last.keyword, 'CMD');
  assert.ok(runs(runtime).some((r) => /apt-get install[^&]*\btini\b/.test(r) && /\blibvulkan1\b/.test(r)));
  const env = envOf(runtime);
  assert.equal(env.get('NVIDIA_DRIVER_CAPABILITIES'), 'compute,utility,graphics');
  assert.equal(env.get('NODE_ENV'), 'production');
  assert.equal(env.get('EMU3_CACHE_DIR'), '/var/cache/emu3');
  const workdir = runtime.instructions.filter((i) => i.keyword === 'WORKDIR').map((i) => i.args);
  assert.deepEqual(workdir, ['/app']);
  // The LeaderWorkerSet pods run /app/deploy/lws-entry.sh: the image must hold it at that path.
  const copies = runtime.instructions.filter((i) => i.keyword === 'COPY').map(copyOf);
  assert.ok(copies.some((c) => c.sources.includes('deploy/lws-entry.sh') && c.dest === './deploy/lws-entry.sh'));
});

test('every COPY source from the context exists in the repository and is not excluded by .dockerignore', () => {
  let n = 0;
  for (const stage of stages) {
    for (const ins of stage.instructions.filter((i) => i.keyword === 'COPY' || i.keyword === 'ADD')) {
      assert.equal(ins.keyword, 'COPY', `line ${ins.line}: ADD is not used (no remote or archive sources)`);
      const { from, sources } = copyOf(ins);
      if (from) continue;
      for (const src of sources) {
        n++;
        assert.ok(existsSync(join(repo, src)), `line ${ins.line}: ${src} does not exist`);
        assert.ok(!dockerIgnored(src, ignore), `line ${ins.line}: ${src} is excluded by .dockerignore`);
      }
    }
  }
  assert.ok(n >= 8);
  // The build context leaves out local state and the shared install.
  for (const p of ['node_modules', 'dist', 'models/emu3-tiny/config.json', '.git', 'lib/x/.emu3-cache/a'])
    assert.ok(dockerIgnored(p, ignore), `${p} stays out of the build context`);
});

test('the build stage compiles what the runtime runs: bin/emu3.js loads dist/cli/main.js, protos from proto/', () => {
  const bin = readFileSync(join(repo, 'bin/emu3.js'), 'utf8');
  assert.match(bin, /'dist', 'cli', 'main\.js'/);
  const buildCopies = stages[0].instructions.filter((i) => i.keyword === 'COPY').flatMap((i) => copyOf(i).sources);
  for (const dir of ['lib', 'services', 'cli', 'proto', 'tsconfig.json']) assert.ok(buildCopies.includes(dir), dir);
});

test('the runtime needs no dev dependency: every package the compiled code imports is in "dependencies"', () => {
  const pkg = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8'));
  const deps = new Set(Object.keys(pkg.dependencies));
  const dirs = stages[0].instructions
    .filter((i) => i.keyword === 'COPY')
    .flatMap((i) => copyOf(i).sources)
    .filter((s) => statSync(join(repo, s)).isDirectory() && s !== 'proto');
  assert.deepEqual(dirs.sort(), ['cli', 'lib', 'services']);
  const imported = new Set<string>();
  for (const dir of dirs)
    for (const f of readdirSync(join(repo, dir), { recursive: true, encoding: 'utf8' }).filter((p) =>
      p.endsWith('.ts'),
    ))
      for (const m of readFileSync(join(repo, dir, f), 'utf8').matchAll(
        /^\s*(?:import|export)\b[^;]*?\bfrom\s+'([^']+)'|\bimport\('([^']+)'\)/gm,
      ))
        if (!(m[1] ?? m[2]).startsWith('.')) imported.add(m[1] ?? m[2]);
  assert.ok(imported.has('onnxruntime-node') && imported.has('@grpc/grpc-js'), 'the scan sees the imports');
  for (const spec of imported) {
    if (spec.startsWith('node:')) continue;
    const name = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0];
    assert.ok(deps.has(name), `${spec}: ${name} must be a dependency (npm ci --omit=dev leaves dev dependencies out)`);
  }
});
