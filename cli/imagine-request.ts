// `emu3 imagine`'s flags → a GenerateRequest with TASK_GENERATE_IMAGE, and the progress bar it draws. Pure: no I/O.
// Ranges are the API's own coarse ones; the coordinator checks the rest (grid size against the model) by field.
import type { CommandSpec, Flags } from './args.js';
import { UsageError } from './args.js';

export const imagineSpec: CommandSpec = {
  name: 'imagine',
  summary: 'generate an image from text (Emu3-Gen) and write it as a PNG',
  usage:
    'emu3 imagine [--ratio W:H | --size WxH] [--guidance G] [--negative TEXT] [--seed N] [--addr HOST:PORT] --out FILE "prompt"',
  flags: {
    addr: { help: 'coordinator address', default: '127.0.0.1:50051' },
    out: { help: 'where to write the PNG (required)' },
    ratio: { help: 'aspect ratio "W:H", sized from the model\'s image_area (default: 1:1)' },
    size: { help: 'a size "WIDTHxHEIGHT" in pixels instead of a ratio (its ratio and area; default: none)' },
    guidance: { help: 'classifier-free guidance scale in [0, 100] (default: 3)' },
    negative: { help: "the negative prompt's text (default: upstream's)" },
    'no-quality-suffix': {
      boolean: true,
      help: 'do not append " masterpiece, film grained, best quality." to the prompt (default: appended)',
    },
    temperature: { help: 'softmax temperature in [0, 100]; 0 = greedy (default: 1)' },
    'top-k': { help: "keep the k most likely tokens; at most the server's max_top_k (default: 2048)" },
    seed: { help: 'sampling seed in [0, 2^32-1] (default: chosen by the server, printed at the end)' },
    codes: { help: 'also write the code grid as JSON to this file (default: none)' },
    'deadline-ms': { help: 'give up after this many milliseconds (default: no deadline)' },
    quiet: { boolean: true, help: 'no progress bar and no summary line (default: off)' },
  },
};

export interface ImagineRequest {
  parts: { text: string }[];
  task: 'TASK_GENERATE_IMAGE';
  sampling: Record<string, unknown>;
  image: Record<string, unknown>;
}

export function imagineRequest(flags: Flags, prompt: string): ImagineRequest {
  const image: Record<string, unknown> = {};
  const ratio = flags.string('ratio');
  const size = flags.string('size');
  if (ratio !== undefined && size !== undefined) throw new UsageError('imagine: give --ratio or --size, not both');
  if (ratio !== undefined) {
    if (!/^\d+:\d+$/.test(ratio)) throw new UsageError(`imagine: --ratio must be "W:H", e.g. 16:9, got "${ratio}"`);
    image.ratio = ratio;
  }
  if (size !== undefined) {
    const m = /^(\d+)x(\d+)$/.exec(size);
    if (!m) throw new UsageError(`imagine: --size must be "WIDTHxHEIGHT", e.g. 720x720, got "${size}"`);
    image.width = Number(m[1]);
    image.height = Number(m[2]);
  }
  const guidance = flags.number('guidance');
  if (guidance !== undefined) {
    if (!(guidance >= 0 && guidance <= 100))
      throw new UsageError(`imagine: --guidance must be in [0, 100], got ${guidance}`);
    image.guidanceScale = guidance;
  }
  const negative = flags.string('negative');
  if (negative !== undefined) image.negativePrompt = negative;
  if (flags.bool('no-quality-suffix')) image.qualitySuffix = false;
  if (flags.has('codes')) image.returnCodes = true;
  const sampling: Record<string, unknown> = {};
  const temperature = flags.number('temperature');
  if (temperature !== undefined) {
    if (!(temperature >= 0 && temperature <= 100))
      throw new UsageError(`imagine: --temperature must be in [0, 100], got ${temperature}`);
    sampling.temperature = temperature;
  }
  const topK = flags.int('top-k', 0, 2 ** 31 - 1);
  if (topK !== undefined) sampling.topK = topK;
  const seed = flags.int('seed', 0, 0xffffffff);
  if (seed !== undefined) sampling.seed = seed;
  return { parts: [{ text: prompt }], task: 'TASK_GENERATE_IMAGE', sampling, image };
}

/** "[#########-----------]  9/20 rows" in `width` bar cells. */
export function progressBar(rowsDone: number, rows: number, width = 30): string {
  const filled = rows > 0 ? Math.round((rowsDone / rows) * width) : 0;
  return `[${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${String(rowsDone).padStart(String(rows).length)}/${rows} rows`;
}
