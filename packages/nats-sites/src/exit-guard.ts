/**
 * Last-resort cleanup when a process exits without having called `stop()` on what it started (a
 * test worker torn down after a timeout, an uncaught error, a command that exits early): each
 * guard runs synchronously from `process.on("exit")`. It must only ever touch what its owner
 * started or created.
 */
const guards = new Set<() => void>();
let installed = false;

function runGuards(): void {
  for (const guard of guards) {
    try {
      guard();
    } catch {
      // The process is exiting; there is no one left to tell.
    }
  }
  guards.clear();
}

/** Register `guard` to run at process exit; call the returned function once it is no longer needed. */
export function onExit(guard: () => void): () => void {
  if (!installed) {
    process.on("exit", runGuards);
    installed = true;
  }
  guards.add(guard);
  return () => {
    guards.delete(guard);
  };
}
