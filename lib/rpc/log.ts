// Structured logs: one line per record on stderr (stdout stays free for command output such as `emu3 vq encode`).
// Fields: ts (ISO time), level, service, msg, then whatever the caller adds (requests add requestId and traceId).
// Format 'json' (default): one JSON object per line; 'text': `ts LEVEL service msg key=value ...` for people.
// EMU3_LOG_LEVEL sets the threshold, EMU3_LOG_FORMAT the default format (the services' --log-format overrides it).

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type LogFields = Record<string, unknown>;
export type LogFormat = 'json' | 'text';
export const LOG_FORMATS: readonly LogFormat[] = ['json', 'text'];

const rank: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger whose lines also carry `fields` (for example the method name). */
  child(fields: LogFields): Logger;
}

export interface LoggerOptions {
  /** Default: EMU3_LOG_LEVEL, else 'info'. */
  level?: LogLevel;
  /** Where lines go. Default: process.stderr. */
  write?: (line: string) => void;
  /** Default: EMU3_LOG_FORMAT, else 'json'. */
  format?: LogFormat;
}

function envLevel(): LogLevel {
  const v = process.env.EMU3_LOG_LEVEL;
  return v === 'debug' || v === 'info' || v === 'warn' || v === 'error' ? v : 'info';
}

function envFormat(): LogFormat {
  return process.env.EMU3_LOG_FORMAT === 'text' ? 'text' : 'json';
}

/** A value as `key=value` text: bare when it has no spaces, quotes or '=', else JSON-quoted. */
function textValue(value: unknown): string {
  if (typeof value === 'string') return /^[^\s"=]+$/.test(value) ? value : JSON.stringify(value);
  return JSON.stringify(value) ?? String(value);
}

/** One record as a line of text: ts, level (upper case), service and msg, then key=value for the other fields. */
export function formatText(record: LogFields): string {
  const { ts, level, service, msg, ...rest } = record;
  const head = `${ts} ${String(level).toUpperCase().padEnd(5)} ${service} ${msg}`;
  const tail = Object.entries(rest).map(([k, v]) => `${k}=${textValue(v)}`);
  return tail.length > 0 ? `${head} ${tail.join(' ')}` : head;
}

/** Errors become { name, message, stack } so they survive JSON.stringify. */
function plain(value: unknown): unknown {
  if (value instanceof Error) return { name: value.name, message: value.message, stack: value.stack };
  if (typeof value === 'bigint') return value.toString();
  return value;
}

export function createLogger(service: string, opts: LoggerOptions = {}, base: LogFields = {}): Logger {
  const threshold = rank[opts.level ?? envLevel()];
  const write = opts.write ?? ((line: string) => process.stderr.write(line));
  const text = (opts.format ?? envFormat()) === 'text';
  const emit = (level: LogLevel, msg: string, fields?: LogFields) => {
    if (rank[level] < threshold) return;
    const record: LogFields = { ts: new Date().toISOString(), level, service, msg };
    for (const [k, v] of Object.entries(base)) record[k] = plain(v);
    if (fields) for (const [k, v] of Object.entries(fields)) record[k] = plain(v);
    write(`${text ? formatText(record) : JSON.stringify(record)}\n`);
  };
  return {
    debug: (msg, fields) => emit('debug', msg, fields),
    info: (msg, fields) => emit('info', msg, fields),
    warn: (msg, fields) => emit('warn', msg, fields),
    error: (msg, fields) => emit('error', msg, fields),
    child: (fields) => createLogger(service, opts, { ...base, ...fields }),
  };
}
