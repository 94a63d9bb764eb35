// The `emu3` command: one entry point that starts any service or client. Each subcommand lives in its own module
// and is imported only when run, so `emu3 --help` stays fast and a client never loads ORT.
import { type CommandSpec, Flags, formatHelp, parseArgs, UsageError } from './args.js';
import { packageVersion } from './version.js';

export interface Command {
  spec: CommandSpec;
  run(flags: Flags, positionals: string[]): Promise<number>;
}

interface Entry {
  name: string;
  summary: string;
  load: () => Promise<Command>;
}

const commands: Entry[] = [
  // Each area adds its command here: { name, summary, load: async () => (await import('./x.js')).command },
  {
    name: 'make-tiny',
    summary: 'write emu3-tiny: a random-weight Emu3 + VQ in the upstream layout',
    load: async () => (await import('./make-tiny.js')).command,
  },
  {
    name: 'logits',
    summary: 'print the top logits and greedy continuation of a model for given token ids',
    load: async () => (await import('./logits.js')).command,
  },
  {
    name: 'tokenize',
    summary: 'show the token ids of a text and the piece each decodes to',
    load: async () => (await import('./tokenize.js')).command,
  },
  {
    name: 'vq',
    summary: 'VQ image tokenizer service (images ⇄ codes), or encode / decode one image',
    load: async () => (await import('./vq.js')).command,
  },
  {
    name: 'shard',
    summary: 'serve decoder layers [A, B) as one pipeline stage',
    load: async () => (await import('./shard.js')).command,
  },
  {
    name: 'coordinator',
    summary: 'public Generate API in front of the shards',
    load: async () => (await import('./coordinator.js')).command,
  },
  {
    name: 'up',
    summary: 'start vq + shards + coordinator on loopback (npm start)',
    load: async () => (await import('./up.js')).command,
  },
  {
    name: 'gateway',
    summary: 'OpenAI-compatible HTTP API in front of the coordinator',
    load: async () => (await import('./gateway.js')).command,
  },
  {
    name: 'load',
    summary: 'bounded load on Generate: TTFT, inter-token and end-to-end latency percentiles, tokens/s',
    load: async () => (await import('./load.js')).command,
  },
  {
    name: 'chat',
    summary: 'stream an answer about images and text from the coordinator',
    load: async () => (await import('./chat.js')).command,
  },
  {
    name: 'imagine',
    summary: 'generate an image from text (Emu3-Gen) with a progress bar; writes a PNG',
    load: async () => (await import('./imagine.js')).command,
  },
];

/** Every command's flag spec (loads every command module). */
export async function commandSpecs(): Promise<CommandSpec[]> {
  return Promise.all(commands.map(async (c) => (await c.load()).spec));
}

function topHelp(): string {
  const width = Math.max(...commands.map((c) => c.name.length)) + 2;
  return [
    'emu3: serve BAAI Emu3 models as gRPC microservices',
    '',
    'usage: emu3 <command> [flags]    (emu3 <command> --help for its flags; emu3 --version)',
    '',
    'commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
  ].join('\n');
}

export async function run(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    console.log(topHelp());
    return name === undefined ? 2 : 0;
  }
  if (name === '--version' || name === '-V' || name === 'version') {
    const { name: pkg, version } = packageVersion();
    console.log(`${pkg} ${version}`);
    return 0;
  }
  const entry = commands.find((c) => c.name === name);
  if (!entry) {
    console.error(`emu3: unknown command "${name}"\n\n${topHelp()}`);
    return 2;
  }
  const command = await entry.load();
  try {
    const parsed = parseArgs(command.spec, rest);
    if (parsed.help) {
      console.log(formatHelp(command.spec));
      return 0;
    }
    return await command.run(new Flags(command.spec.name, parsed), parsed.positionals);
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`emu3 ${err.message}`);
      return 2;
    }
    console.error(`emu3 ${name}: ${err instanceof Error ? err.message : String(err)}`);
    if (process.env.EMU3_DEBUG) console.error(err);
    return 1;
  }
}
