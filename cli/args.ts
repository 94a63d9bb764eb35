// A small, strict argument parser: `--flag value`, `--flag=value`, boolean `--flag`, positionals.
// Unknown flags are errors naming the flag, so a typo never silently falls back to a default.

export interface FlagSpec {
  /** Description shown by --help, ending with the default if any. */
  help: string;
  /** true: takes no value. */
  boolean?: boolean;
  /** May be given several times (values collected in order). */
  repeatable?: boolean;
  default?: string;
}

export interface CommandSpec {
  name: string;
  summary: string;
  usage: string;
  flags: Record<string, FlagSpec>;
}

export interface ParsedArgs {
  flags: Map<string, string[]>;
  positionals: string[];
  help: boolean;
}

export class UsageError extends Error {}

export function parseArgs(spec: CommandSpec, argv: string[]): ParsedArgs {
  const flags = new Map<string, string[]>();
  const positionals: string[] = [];
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--help' || arg === '-h') {
      help = true;
      continue;
    }
    if (arg === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith('--')) {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
    const flag = spec.flags[name];
    if (!flag) throw new UsageError(`${spec.name}: unknown flag --${name} (see \`emu3 ${spec.name} --help\`)`);
    let value: string;
    if (flag.boolean) {
      if (eq >= 0) throw new UsageError(`${spec.name}: --${name} takes no value`);
      value = 'true';
    } else if (eq >= 0) {
      value = arg.slice(eq + 1);
    } else {
      if (i + 1 >= argv.length) throw new UsageError(`${spec.name}: --${name} needs a value`);
      value = argv[++i];
    }
    const list = flags.get(name) ?? [];
    if (list.length > 0 && !flag.repeatable) throw new UsageError(`${spec.name}: --${name} given more than once`);
    list.push(value);
    flags.set(name, list);
  }
  for (const [name, flag] of Object.entries(spec.flags)) {
    if (!flags.has(name) && flag.default !== undefined) flags.set(name, [flag.default]);
  }
  return { flags, positionals, help };
}

export function formatHelp(spec: CommandSpec): string {
  const lines = [`emu3 ${spec.name}: ${spec.summary}`, '', `usage: ${spec.usage}`, ''];
  const names = Object.keys(spec.flags);
  if (names.length > 0) lines.push('flags:');
  const width = Math.max(0, ...names.map((n) => n.length)) + 4;
  for (const name of names) {
    const f = spec.flags[name];
    const def = f.default !== undefined ? ` (default: ${f.default})` : '';
    lines.push(`  --${name.padEnd(width - 2)}${f.help}${def}`);
  }
  lines.push(`  --${'help'.padEnd(width - 2)}show this help`);
  return lines.join('\n');
}

/** Typed accessors over ParsedArgs; each error names the flag. */
export class Flags {
  constructor(
    private readonly command: string,
    private readonly parsed: ParsedArgs,
  ) {}

  has(name: string): boolean {
    return this.parsed.flags.has(name);
  }

  string(name: string): string | undefined {
    const v = this.parsed.flags.get(name);
    return v === undefined ? undefined : v[v.length - 1];
  }

  required(name: string): string {
    const v = this.string(name);
    if (v === undefined || v === '') throw new UsageError(`${this.command}: --${name} is required`);
    return v;
  }

  all(name: string): string[] {
    return this.parsed.flags.get(name) ?? [];
  }

  bool(name: string): boolean {
    return this.parsed.flags.has(name);
  }

  int(name: string, min = Number.MIN_SAFE_INTEGER, max = Number.MAX_SAFE_INTEGER): number | undefined {
    const s = this.string(name);
    if (s === undefined) return undefined;
    if (!/^-?\d+$/.test(s)) throw new UsageError(`${this.command}: --${name} must be an integer, got "${s}"`);
    const n = Number(s);
    if (n < min || n > max) throw new UsageError(`${this.command}: --${name} must be in [${min}, ${max}], got ${n}`);
    return n;
  }

  number(name: string): number | undefined {
    const s = this.string(name);
    if (s === undefined) return undefined;
    const n = Number(s);
    if (s.trim() === '' || !Number.isFinite(n))
      throw new UsageError(`${this.command}: --${name} must be a number, got "${s}"`);
    return n;
  }

  oneOf<T extends string>(name: string, choices: readonly T[]): T | undefined {
    const s = this.string(name);
    if (s === undefined) return undefined;
    if (!choices.includes(s as T))
      throw new UsageError(`${this.command}: --${name} must be one of ${choices.join('|')}, got "${s}"`);
    return s as T;
  }
}
