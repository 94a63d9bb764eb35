// Reads ORT's verbose session log (logSeverityLevel 0) for its node placement summary: how many nodes each execution
// provider was given. ORT writes either "All nodes placed on [EP]. Number of nodes: N" or one
// "Node(s) placed on [EP]. Number of nodes: N" line per provider.
export function parsePlacement(log: string): Map<string, number> {
  const counts = new Map<string, number>();
  for (const m of log.matchAll(/(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)/g))
    counts.set(m[1], (counts.get(m[1]) ?? 0) + Number(m[2]));
  return counts;
}
