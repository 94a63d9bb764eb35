// When `emu3 up` restarts a child that died, and when it gives up: pure bookkeeping over the times of its failures.
// A failure is a death after the child was healthy, or a restart that died before becoming healthy. The delay
// doubles with each failure inside the window (bounded), and the (maxRestarts + 1)-th failure inside the window
// means the child cannot stay up: give up on it.

export interface RestartPolicy {
  /** Restarts allowed within `windowMs`; one more failure in the window gives up. 0: never restart. */
  maxRestarts: number;
  windowMs: number;
  /** Delay before the first restart in a window; doubled for each further one. */
  backoffMs: number;
  /** Longest delay. */
  maxBackoffMs: number;
}

export const DEFAULT_RESTART_POLICY: RestartPolicy = {
  maxRestarts: 5,
  windowMs: 60_000,
  backoffMs: 250,
  maxBackoffMs: 8_000,
};

export type RestartDecision =
  | { action: 'restart'; delayMs: number; attempt: number }
  | { action: 'give-up'; failures: number };

/** Records a failure at `now` in `failures` (times, kept to the window) and says what to do. */
export function onFailure(policy: RestartPolicy, failures: number[], now: number): RestartDecision {
  failures.push(now);
  while (failures.length > 0 && failures[0] <= now - policy.windowMs) failures.shift();
  if (failures.length > policy.maxRestarts) return { action: 'give-up', failures: failures.length };
  const attempt = failures.length;
  const delayMs = Math.min(policy.maxBackoffMs, policy.backoffMs * 2 ** (attempt - 1));
  return { action: 'restart', delayMs, attempt };
}

/** "killed by SIGKILL", "exit code 1": how a child process ended, for the log line. */
export function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  if (signal) return `killed by ${signal}`;
  return `exit code ${code}`;
}
