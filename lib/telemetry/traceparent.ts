// W3C Trace Context `traceparent` (https://www.w3.org/TR/trace-context/): version 00, 16-byte trace id, 8-byte parent
// (span) id, flags. This is what crosses process boundaries: in gRPC metadata for unary calls and in
// MicroBatch.traceparent on the long-lived Forward streams.

export interface TraceParent {
  traceId: string;
  spanId: string;
  /** Bit 0: the caller sampled (is recording) this trace. */
  sampled: boolean;
}

const PATTERN = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$/;

/** The parsed header, or null for an empty, malformed or all-zero one (which the spec says to ignore). */
export function parseTraceparent(header: string | undefined | null): TraceParent | null {
  if (!header) return null;
  const m = PATTERN.exec(header.trim().toLowerCase());
  if (!m) return null;
  const [, version, traceId, spanId, flags] = m;
  if (version === 'ff') return null;
  // Version 00 has exactly four fields; later versions may append more (kept forward-compatible, as the spec asks).
  if (version === '00' && header.trim().length !== 55) return null;
  if (/^0+$/.test(traceId) || /^0+$/.test(spanId)) return null;
  return { traceId, spanId, sampled: (Number.parseInt(flags, 16) & 1) === 1 };
}

export function formatTraceparent(p: TraceParent): string {
  return `00-${p.traceId}-${p.spanId}-${p.sampled ? '01' : '00'}`;
}
