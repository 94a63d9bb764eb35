import assert from 'node:assert/strict';
import { test } from 'node:test';
import { StopMatcher } from '../../services/coordinator/stop.js';

function run(stops: string[], pieces: string[]) {
  const m = new StopMatcher(stops);
  const emitted: string[] = [];
  let stopped = false;
  let matched: string | undefined;
  for (const p of pieces) {
    const r = m.push(p);
    emitted.push(r.emit);
    if (r.stopped) {
      stopped = true;
      matched = r.matched;
      break;
    }
  }
  if (!stopped) emitted.push(m.flush());
  return { text: emitted.join(''), emitted, stopped, matched };
}

test('a stop string spanning several pieces ends the answer and is never emitted', () => {
  const r = run(['###'], ['Hello #', '#', '# world']);
  assert.deepEqual(r, { text: 'Hello ', emitted: ['Hello ', '', ''], stopped: true, matched: '###' });
});

test('text that only looks like a stop start is held back, then emitted exactly once', () => {
  const r = run(['</s>'], ['a<', '/', 'x', 'b']);
  assert.equal(r.stopped, false);
  assert.deepEqual(r.emitted, ['a', '', '</x', 'b', '']);
  assert.equal(r.text, 'a</xb');
});

test('held-back text is released by flush at eos', () => {
  const r = run(['STOP'], ['the end ST']);
  assert.deepEqual(r.emitted, ['the end ', 'ST']);
});

test('the earliest stop string wins; on equal start the longer one', () => {
  assert.equal(run(['bc', 'abx', 'ab'], ['xxabcd']).text, 'xx');
  assert.equal(run(['bc', 'abx', 'ab'], ['xxabcd']).matched, 'ab');
  assert.equal(run(['ab', 'abc'], ['zabc']).matched, 'abc');
});

test('random streams: output equals the text before the first stop, whatever the split', () => {
  const alphabet = 'ab#';
  let seed = 12345;
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
  for (let trial = 0; trial < 500; trial++) {
    let text = '';
    for (let i = rand(30); i > 0; i--) text += alphabet[rand(3)];
    const stops = ['a#b', '##'];
    const pieces: string[] = [];
    for (let i = 0; i < text.length; ) {
      const n = 1 + rand(4);
      pieces.push(text.slice(i, i + n));
      i += n;
    }
    const firsts = stops.map((s) => text.indexOf(s)).filter((i) => i >= 0);
    const expected = firsts.length ? text.slice(0, Math.min(...firsts)) : text;
    const r = run(stops, pieces);
    assert.equal(r.text, expected, `text ${JSON.stringify(text)} pieces ${JSON.stringify(pieces)}`);
    assert.equal(r.stopped, firsts.length > 0);
  }
});
