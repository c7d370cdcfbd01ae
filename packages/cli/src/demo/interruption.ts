/**
 * SIGINT/SIGTERM during a demo: the running step is abandoned at once (and the tools it runs are
 * ended through `signal`), so the demo goes straight to its cleanup and then fails with
 * `Interrupted` (exit 130). The handlers stay installed until `dispose()`, so a second Ctrl-C
 * during the cleanup cannot kill the process before it has stopped what it started.
 */
import { Interrupted } from "../errors.js";

const SIGNALS = ["SIGINT", "SIGTERM"] as const;

export class Interruption {
  private readonly controller = new AbortController();
  private readonly interrupted: Promise<never>;
  private readonly onSignal = (signal: NodeJS.Signals) => {
    if (!this.controller.signal.aborted) {
      this.controller.abort(new Interrupted(`demo interrupted by ${signal}; cleaned up`));
    }
  };

  constructor() {
    for (const s of SIGNALS) process.on(s, this.onSignal);
    this.interrupted = new Promise<never>((_, reject) => {
      this.controller.signal.addEventListener("abort", () => reject(this.controller.signal.reason), { once: true });
    });
    this.interrupted.catch(() => {}); // observed by whichever step is running
  }

  /** Aborted by the first SIGINT/SIGTERM; hand it to the tools a step runs. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** `work`, or the interruption if that comes first. */
  step<T>(work: Promise<T>): Promise<T> {
    return Promise.race([work, this.interrupted]);
  }

  dispose(): void {
    for (const s of SIGNALS) process.off(s, this.onSignal);
  }
}
