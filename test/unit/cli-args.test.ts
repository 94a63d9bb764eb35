import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { type CommandSpec, Flags, formatHelp, parseArgs, UsageError } from '../../cli/args.js';
import { chatRequest, chatSpec, explainError, summaryLine, tokensPerSecond } from '../../cli/chat-request.js';
import { DEFAULT_RESTART_POLICY, describeExit, onFailure } from '../../cli/restart-policy.js';
import { upOptions, upSpec } from '../../cli/up-options.js';
import { protoRoot } from '../../lib/rpc/proto.js';
import { validateGenerateRequest } from '../../services/coordinator/request-validation.js';

const spec: CommandSpec = {
  name: 'demo',
  summary: 'a demo command',
  usage: 'emu3 demo [flags] TEXT',
  flags: {
    seed: { help: 'RNG seed', default: '0' },
    image: { help: 'an image file', repeatable: true },
    verbose: { help: 'more output', boolean: true },
    precision: { help: 'fp32|int4', default: 'fp32' },
  },
};

test('parses flags in both spellings, positionals and defaults', () => {
  const p = parseArgs(spec, ['--image', 'a.png', 'hello', '--image=b.png', '--verbose']);
  const f = new Flags('demo', p);
  assert.deepEqual(f.all('image'), ['a.png', 'b.png']);
  assert.equal(f.bool('verbose'), true);
  assert.equal(f.int('seed'), 0);
  assert.equal(f.oneOf('precision', ['fp32', 'int4'] as const), 'fp32');
  assert.deepEqual(p.positionals, ['hello']);
});

test('every misuse is a UsageError naming the flag', () => {
  assert.throws(
    () => parseArgs(spec, ['--sed', '1']),
    (e: Error) => e instanceof UsageError && /--sed/.test(e.message),
  );
  assert.throws(() => parseArgs(spec, ['--seed']), /--seed needs a value/);
  assert.throws(() => parseArgs(spec, ['--seed', '1', '--seed', '2']), /--seed given more than once/);
  assert.throws(() => parseArgs(spec, ['--verbose=yes']), /--verbose takes no value/);
  const f = new Flags('demo', parseArgs(spec, ['--seed', '1.5', '--precision', 'int8']));
  assert.throws(() => f.int('seed'), /--seed must be an integer, got "1.5"/);
  assert.throws(() => f.oneOf('precision', ['fp32', 'int4'] as const), /--precision must be one of fp32\|int4/);
  assert.throws(
    () => new Flags('demo', parseArgs(spec, ['--seed', '9'])).int('seed', 0, 5),
    /--seed must be in \[0, 5\]/,
  );
  assert.throws(() => new Flags('demo', parseArgs(spec, [])).required('image'), /--image is required/);
});

test('help lists every flag with its default', () => {
  const help = formatHelp(spec);
  for (const name of Object.keys(spec.flags)) assert.match(help, new RegExp(`--${name}`));
  assert.match(help, /RNG seed \(default: 0\)/);
  assert.equal(parseArgs(spec, ['--help']).help, true);
});

test('every flag of every command shows its default in --help (or says it is required)', async () => {
  const { commandSpecs } = await import('../../cli/main.js');
  for (const s of await commandSpecs()) {
    const help = formatHelp(s);
    for (const [name, flag] of Object.entries(s.flags)) {
      assert.match(help, new RegExp(`--${name} `), `${s.name} --${name} listed`);
      const shown = flag.default !== undefined || flag.boolean || /default|required/i.test(flag.help);
      assert.ok(shown, `emu3 ${s.name} --${name}: its help names no default`);
    }
  }
});

test('emu3 --version prints the version in package.json', async () => {
  const { run } = await import('../../cli/main.js');
  const pkg = JSON.parse(readFileSync(join(dirname(protoRoot()), 'package.json'), 'utf8'));
  const printed: string[] = [];
  const log = console.log;
  console.log = (line: string) => printed.push(line);
  try {
    assert.equal(await run(['--version']), 0);
  } finally {
    console.log = log;
  }
  assert.deepEqual(printed, [`emu3-serve ${pkg.version}`]);
});

// emu3 chat: the CLI must accept exactly what the API accepts for the fields with fixed ranges; the API's own
// validation (services/coordinator/request-validation.ts) is the truth.
function chatFlags(argv: string[]): Flags {
  return new Flags('chat', parseArgs(chatSpec, argv));
}

test('chat: every request field has a flag, and the request carries them under the proto field names', () => {
  const req = chatRequest(
    chatFlags([
      '--temperature=0.7',
      '--top-k=40',
      '--top-p=0.9',
      '--min-p=0.05',
      '--repetition-penalty=1.1',
      '--seed=7',
      '--max-new-tokens=12',
      '--stop=END',
      '--stop=\n\n',
      '--ignore-eos',
      '--request-id=r-1',
      '--return-token-ids',
      '--top-logprobs=3',
    ]),
    'Hi',
    [{ data: Buffer.from([1, 2]), mimeType: 'image/png' }],
  );
  assert.deepEqual(req, {
    parts: [{ image: { data: Buffer.from([1, 2]), mimeType: 'image/png' } }, { text: 'Hi' }],
    sampling: {
      temperature: 0.7,
      topK: 40,
      topP: 0.9,
      minP: 0.05,
      repetitionPenalty: 1.1,
      seed: 7,
      maxNewTokens: 12,
      stop: ['END', '\n\n'],
      ignoreEos: true,
    },
    requestId: 'r-1',
    returnTokenIds: true,
    topLogprobs: 3,
  });
  const v = validateGenerateRequest(req as never);
  assert.equal(v.sampling.minP, 0.05);
  assert.equal(v.topLogprobs, 3);
  assert.deepEqual(chatRequest(chatFlags([]), 'Hi', []), { parts: [{ text: 'Hi' }], sampling: {} });
});

test('chat: --seed -1 is refused by the CLI with a message naming the flag and the range', () => {
  assert.throws(
    () => chatRequest(chatFlags(['--seed', '-1']), 'Hi', []),
    (e: Error) => e instanceof UsageError && /--seed must be in \[0, 4294967295\], got -1/.test(e.message),
  );
});

test('chat: the CLI accepts a value exactly when the API does', () => {
  const cases: [string, string, string[]][] = [
    ['temperature', 'temperature', ['-0.1', '0', '1', '100', '100.5', 'NaN', 'Infinity']],
    ['top-p', 'topP', ['0', '0.0001', '1', '1.01', '-1']],
    ['min-p', 'minP', ['-0.01', '0', '0.5', '1', '1.5']],
    ['repetition-penalty', 'repetitionPenalty', ['0', '0.01', '1', '10', '10.5']],
    ['seed', 'seed', ['-1', '0', '4294967295', '4294967296', '1.5']],
    ['max-new-tokens', 'maxNewTokens', ['-1', '1', '100', '2.5']],
    ['top-k', 'topK', ['-1', '0', '2048', '1.5']],
    ['top-logprobs', 'topLogprobs', ['-1', '0', '20', '0.5']],
  ];
  for (const [flag, field, values] of cases) {
    for (const value of values) {
      let cli: boolean;
      try {
        chatRequest(chatFlags([`--${flag}=${value}`]), 'Hi', []);
        cli = true;
      } catch (e) {
        assert.ok(e instanceof UsageError, String(e));
        assert.match(e.message, new RegExp(`--${flag}`));
        cli = false;
      }
      const n = Number(value);
      const req =
        field === 'topLogprobs'
          ? { parts: [{ text: 'Hi' }], topLogprobs: n }
          : { parts: [{ text: 'Hi' }], sampling: { [field]: n } };
      let api: boolean;
      try {
        validateGenerateRequest(req as never);
        api = true;
      } catch {
        api = false;
      }
      assert.equal(
        cli,
        api,
        `--${flag}=${value}: CLI ${cli ? 'accepts' : 'refuses'}, API ${api ? 'accepts' : 'refuses'}`,
      );
    }
  }
  assert.throws(() => chatRequest(chatFlags(['--stop=']), 'Hi', []), /--stop must not be empty/);
});

test('chat: the closing line gives seed, TTFT and tokens/s', () => {
  const line = summaryLine({
    finishReason: 'FINISH_REASON_LENGTH',
    seed: 1234,
    requestId: 'abc',
    usage: { promptTokens: 15, cachedTokens: 4, completionTokens: 11 },
    timings: { queueMs: 1, vqMs: 0, ttftMs: 123.45, decodeMs: 200 },
  });
  assert.match(line, /seed 1234/);
  assert.match(line, /TTFT 123\.5 ms/);
  assert.match(line, /50\.0 tokens\/s/); // 10 tokens after the first in 200 ms
  assert.match(line, /11 tokens generated after a 15-token prompt \(4 cached\)/);
  assert.match(line, /request abc/);
  assert.equal(tokensPerSecond(1, 100), undefined);
  assert.match(summaryLine({ finishReason: 'FINISH_REASON_EOS' }), /seed 0, TTFT 0\.0 ms, n\/a tokens\/s/);
});

test('chat: a channel that never connected says nothing answers at the address, without the empty note', () => {
  const msg = explainError(
    'UNAVAILABLE',
    'No connection established. Last error: connect ECONNREFUSED 127.0.0.1:50051. Resolution note: ',
    '127.0.0.1:50051',
  );
  assert.match(msg, /^nothing answers at 127\.0\.0\.1:50051: is `npm start` \(emu3 up\) running\?/);
  assert.match(msg, /ECONNREFUSED/);
  assert.doesNotMatch(msg, /Resolution note/);
  // An UNAVAILABLE the server sent (its vq is down) is the server's own words, not "nothing answers".
  assert.equal(
    explainError('UNAVAILABLE', 'vq: connect ECONNREFUSED 127.0.0.1:1', 'x:1'),
    'UNAVAILABLE: vq: connect ECONNREFUSED 127.0.0.1:1',
  );
});

test('up: restarts back off 250, 500, 1000, 2000, 4000 ms and give up at the sixth death within the window', () => {
  const failures: number[] = [];
  const delays = [0, 1, 2, 3, 4].map((i) => {
    const d = onFailure(DEFAULT_RESTART_POLICY, failures, 1000 + i * 100);
    assert.equal(d.action, 'restart');
    return d.action === 'restart' ? d.delayMs : -1;
  });
  assert.deepEqual(delays, [250, 500, 1000, 2000, 4000]);
  assert.deepEqual(onFailure(DEFAULT_RESTART_POLICY, failures, 2000), { action: 'give-up', failures: 6 });
  // Deaths older than the window are forgotten: a child that stayed up a minute starts over.
  const later: number[] = [0, 10_000, 20_000];
  assert.deepEqual(onFailure(DEFAULT_RESTART_POLICY, later, 85_000), { action: 'restart', delayMs: 250, attempt: 1 });
  const capped = { ...DEFAULT_RESTART_POLICY, maxRestarts: 20 };
  const many: number[] = [];
  let last = onFailure(capped, many, 0);
  for (let i = 1; i < 12; i++) last = onFailure(capped, many, i);
  assert.deepEqual(last, { action: 'restart', delayMs: 8000, attempt: 12 });
  assert.equal(onFailure({ ...DEFAULT_RESTART_POLICY, maxRestarts: 0 }, [], 0).action, 'give-up');
  assert.equal(describeExit(null, 'SIGKILL'), 'killed by SIGKILL');
  assert.equal(describeExit(1, null), 'exit code 1');
});

test('up: every flag is checked before anything starts', () => {
  const work = mkdtempSync(join(tmpdir(), 'emu3-up-args-'));
  try {
    const model = join(work, 'm');
    mkdirSync(join(model, 'vq'), { recursive: true });
    writeFileSync(join(model, 'config.json'), '{}');
    writeFileSync(join(model, 'vq', 'config.json'), '{}');
    const up = (argv: string[]) =>
      upOptions(new Flags('up', parseArgs(upSpec, argv.includes('--model') ? argv : ['--model', model, ...argv])));
    const ok = up([]);
    assert.equal(ok.listen, '127.0.0.1:50051');
    assert.equal(ok.generateModel, false);
    assert.deepEqual(ok.restart, DEFAULT_RESTART_POLICY);
    assert.equal(ok.drainTimeoutMs, 30_000);
    assert.deepEqual(ok.vqArgs, []);
    const gpu = up(['--device', 'webgpu', '--shard-arg=--max-slots=8']);
    assert.deepEqual(gpu.vqArgs, ['--device', 'webgpu']);
    assert.deepEqual(gpu.shardArgs, ['--device', 'webgpu', '--max-slots=8']);
    const refused: [string[], RegExp][] = [
      [
        ['--listen', '127.0.0.1:99999'],
        /--listen: .*"127\.0\.0\.1:99999" must be host:port with a port in \[0, 65535\]/,
      ],
      [['--listen', 'nowhere'], /--listen: .*"nowhere" must be host:port/],
      [['--model', join(work, 'none')], /--model .*none: no config\.json there/],
      [['--vq', join(work, 'none')], /--vq .*none: no config\.json there/],
      [['--precision', 'int8'], /--precision must be one of fp32\|int4/],
      [['--shards', '0'], /--shards must be in \[1, 1024\]/],
      [['--max-restarts', '-1'], /--max-restarts must be in/],
      [['--restart-backoff-ms', '9000'], /--max-restart-backoff-ms must be at least --restart-backoff-ms/],
      [['--coordinator-arg', 'max-queue=8'], /--coordinator-arg "max-queue=8" must be a flag/],
    ];
    for (const [argv, pattern] of refused)
      assert.throws(
        () => up(argv),
        (e: Error) => e instanceof UsageError && pattern.test(e.message),
        argv.join(' '),
      );
    rmSync(join(model, 'vq', 'config.json'));
    assert.throws(() => up([]), /vq: no config\.json there \(give the VQ directory with --vq DIR\)/);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});
