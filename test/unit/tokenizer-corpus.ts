// A deterministic corpus of varied text for tokenizer tests and the tokenizer benchmark: several scripts, code,
// numbers, whitespace runs, emoji (incl. ZWJ sequences), CJK, CRLF, contractions, combining marks, long words.
import { Rng } from '../../lib/util/rng.js';

const FRAGMENTS = [
  'The quick brown fox jumps over the lazy dog.',
  "I'm sure you'll like it; they've said it's what we'd do. WE'LL SEE, DON'T WORRY.",
  'Ünïcödé façade naïve café résumé coöperate',
  'Größenordnung Straße Äpfel über Öl',
  'Съешь же ещё этих мягких французских булок, да выпей чаю.',
  'Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο',
  'אני יכול לאכול זכוכית וזה לא מזיק לי',
  'أنا قادر على أكل الزجاج و هذا لا يؤلمني.',
  'मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती',
  'ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ',
  '我能吞下玻璃而不伤身体。今天天气很好，我们去公园散步吧！',
  '私はガラスを食べられます。それは私を傷つけません。カタカナ　全角スペース',
  '나는 유리를 먹을 수 있어요. 그래도 아프지 않아요',
  'Tôi có thể ăn thủy tinh mà không hại gì.',
  'function add(a, b) {\n  return a + b; // sum\n}\n',
  'def f(x):\r\n    return [i ** 2 for i in range(x) if i % 3 == 0]\r\n',
  '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); return 0; }',
  'SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;',
  '<div class="a-b_c">&nbsp;&lt;tag&gt;</div>',
  '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
  'https://example.com/path?q=1&r=two#frag mailto:user@example.org',
  '3.14159265358979323846264338327950288419716939937510',
  '1,234,567.89 + 0x1F - 0b1010 = ? 12345678901234567890',
  '2024-09-27T12:34:56Z v1.2.3-rc.4 ±5% 10^9 ½ ¾ ² ³ ① Ⅻ ١٢٣ ४२',
  'emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇫🇷 ❤️ ✨🚀',
  'tabs\there\tand\tthere',
  'many     spaces      between   words   ',
  '\n\n\nblank lines\n\n\n',
  'CRLF line\r\nnext line\r\n\r\nlast',
  'mixed\r\r\n\n\r whitespace \u00a0 nbsp \u2003 em-space \u3000 ideographic',
  'zero\u200bwidth\u200cjoiners\u200d and soft\u00adhyphen',
  'e\u0301 a\u0308 o\u0302 (combining marks, NFC composes them)',
  'ﬁ ligature, Ａｂｃ fullwidth, ｶﾀｶﾅ halfwidth',
  '!!!??? ... --- *** ___ ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}',
  "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'Ve 'LL 'D ''quoted'' `backtick`",
  'supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis',
  'Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch',
  'a.b.c,d;e:f!g?h',
  '   leading and trailing   ',
  'ASCII control \u0001\u0002\u007f and DEL',
];

const WORDS = FRAGMENTS.flatMap((f) => f.split(/(?<= )/));

/** `count` strings, deterministic for a seed; none contains a special-token string, U+FEFF, U+0085 or U+017F. */
export function tokenizerCorpus(count: number, seed = 1234): string[] {
  const rng = new Rng(seed);
  const pick = <T>(a: readonly T[]): T => a[rng.nextU32() % a.length];
  const out: string[] = [...FRAGMENTS];
  while (out.length < count) {
    const kind = rng.nextU32() % 6;
    let s = '';
    if (kind === 0) {
      // Two or three whole fragments joined by random whitespace.
      const n = 2 + (rng.nextU32() % 2);
      for (let i = 0; i < n; i++) s += pick(FRAGMENTS) + pick([' ', '\n', '\r\n', '\t', '  ', '']);
    } else if (kind === 1) {
      // Shuffled words from all languages.
      const n = 3 + (rng.nextU32() % 12);
      for (let i = 0; i < n; i++) s += pick(WORDS);
    } else if (kind === 2) {
      // Random code points from interesting ranges.
      const ranges: [number, number][] = [
        [0x20, 0x7e],
        [0xa0, 0x24f],
        [0x370, 0x3ff],
        [0x400, 0x4ff],
        [0x4e00, 0x9fff],
        [0x3040, 0x30ff],
        [0xac00, 0xd7a3],
        [0x1f300, 0x1f64f],
        [0x9, 0xd],
      ];
      const n = 1 + (rng.nextU32() % 40);
      for (let i = 0; i < n; i++) {
        const [lo, hi] = pick(ranges);
        const cp = lo + (rng.nextU32() % (hi - lo + 1));
        if (cp === 0x85 || cp === 0xfeff || cp === 0x17f) continue;
        s += String.fromCodePoint(cp);
      }
    } else if (kind === 3) {
      // Digit runs and numbers with separators.
      const n = 1 + (rng.nextU32() % 30);
      for (let i = 0; i < n; i++) s += String(rng.nextU32() % 10);
      s += pick([' ', '.', ',', 'px', '%', ' apples']) + String(rng.nextU32());
    } else if (kind === 4) {
      // Whitespace runs around words.
      const ws = [' ', '  ', '\t', '\n', '\r\n', '\r', '\u00a0', '\u3000', '\u2028'];
      const n = 2 + (rng.nextU32() % 8);
      for (let i = 0; i < n; i++) s += pick(ws).repeat(1 + (rng.nextU32() % 4)) + pick(WORDS).trim();
      s += pick(ws);
    } else {
      // A long word (exercises the heap merge for pieces over 96 bytes).
      const base = pick(['abc', 'xyz', 'é', '字', 'qwerty', 'na']);
      s = base.repeat(20 + (rng.nextU32() % 60));
    }
    out.push(s);
  }
  return out.slice(0, count);
}
