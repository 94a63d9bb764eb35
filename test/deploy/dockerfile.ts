// A Dockerfile reader for lint tests: instructions (line continuations joined, comments dropped), grouped by stage,
// and the exec form (JSON array) of ENTRYPOINT / CMD; plus .dockerignore matching for the simple patterns it holds.
export interface Instruction {
  keyword: string;
  args: string;
  line: number;
}

export interface Stage {
  from: string;
  name?: string;
  instructions: Instruction[];
}

export function parseDockerfile(text: string): Stage[] {
  const stages: Stage[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const start = i;
    let line = lines[i];
    if (/^\s*(#|$)/.test(line)) continue;
    while (line.endsWith('\\') && i + 1 < lines.length) {
      i++;
      // A comment line inside a continued instruction is dropped, as docker does.
      if (/^\s*#/.test(lines[i])) continue;
      line = `${line.slice(0, -1)} ${lines[i].trim()}`;
    }
    const m = /^\s*([A-Za-z]+)\s+(.*)$/.exec(line);
    if (!m) throw new Error(`Dockerfile line ${start + 1}: not an instruction: ${line}`);
    const ins: Instruction = { keyword: m[1].toUpperCase(), args: m[2].trim(), line: start + 1 };
    if (ins.keyword === 'FROM') {
      const f = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args);
      if (!f) throw new Error(`Dockerfile line ${start + 1}: bad FROM`);
      stages.push({ from: f[1], name: f[2], instructions: [] });
    } else {
      if (stages.length === 0 && ins.keyword !== 'ARG')
        throw new Error(`Dockerfile line ${start + 1}: ${ins.keyword} before FROM`);
      stages[stages.length - 1]?.instructions.push(ins);
    }
  }
  return stages;
}

/** ENV in both forms (`K=V K2=V2` and the legacy `K V`), values unquoted. */
export function envOf(stage: Stage): Map<string, string> {
  const env = new Map<string, string>();
  for (const ins of stage.instructions.filter((x) => x.keyword === 'ENV')) {
    if (!ins.args.includes('=')) {
      const [k, ...rest] = ins.args.split(/\s+/);
      env.set(k, rest.join(' '));
      continue;
    }
    for (const m of ins.args.matchAll(/([A-Za-z_][A-Za-z0-9_]*)=("([^"]*)"|\S*)/g)) env.set(m[1], m[3] ?? m[2]);
  }
  return env;
}

/** The JSON array of an exec-form instruction; throws for the shell form (signals would go to /bin/sh). */
export function execForm(ins: Instruction): string[] {
  const v = JSON.parse(ins.args) as unknown;
  if (!Array.isArray(v) || !v.every((s) => typeof s === 'string'))
    throw new Error(`line ${ins.line}: ${ins.keyword} is not in exec form`);
  return v;
}

/** COPY's sources and destination (flags such as --from= split off); the last word is the destination. */
export function copyOf(ins: Instruction): { from?: string; sources: string[]; dest: string } {
  const words = ins.args.split(/\s+/);
  let from: string | undefined;
  while (words[0]?.startsWith('--')) {
    const flag = words.shift() as string;
    if (flag.startsWith('--from=')) from = flag.slice('--from='.length);
  }
  const dest = words.pop() as string;
  return { from, sources: words, dest };
}

/** Whether `path` (relative, no ./) is excluded by .dockerignore lines (plain paths, `*` and `**` globs, no `!`). */
export function dockerIgnored(path: string, ignoreText: string): boolean {
  const patterns = ignoreText
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  return patterns.some((p) => {
    if (p.startsWith('!')) throw new Error(`.dockerignore: exceptions (${p}) are not handled here`);
    const re = new RegExp(
      `^${p
        .replace(/^\.\//, '')
        .replace(/[.+^${}()|[\]]/g, '\\$&')
        .replace(/\*\*\//g, '\u0000')
        .replace(/\*/g, '[^/]*')
        .replaceAll('\u0000', '(.*/)?')}(/.*)?$`,
    );
    return re.test(path);
  });
}
