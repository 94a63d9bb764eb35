import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type CommandSpec, Flags, formatHelp, parseArgs, UsageError } from '../../cli/args.js';

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
