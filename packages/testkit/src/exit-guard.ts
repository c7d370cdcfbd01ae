/**
 * Last-resort cleanup when the test process exits without having called a harness's `stop()` (a
 * worker torn down after a timeout, an uncaught error): each guard runs synchronously from
 * `process.on("exit")`. It must only ever touch what its owner started or created.
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
