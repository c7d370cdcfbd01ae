/**
 * A test-only TCP proxy on one inter-site link (e.g. site B's leafnode remote → site A's leaf
 * port). It forwards bytes both ways until told to partition the link. It exists because this kernel
 * has no netem (shared/ENVIRONMENT.md) and two servers on loopback cannot otherwise be cut apart; it
 * is a fault injector for tests, never a transport.
 */
import { connect, createServer, type Server, type Socket } from "node:net";

/**
 * - `reset`: every connection is reset (RST) and new ones are refused the same way, so both ends
 *   notice at once — a peer that is down or a firewall that rejects.
 * - `blackhole`: connections stay open but every byte is dropped, and new connections are accepted
 *   and never answered — a cable cut or a firewall that drops. The ends notice only through their
 *   own keepalives (NATS: `ping_interval` × `ping_max`).
 */
export type PartitionMode = "reset" | "blackhole";

interface Pipe {
  down: Socket;
  up: Socket | undefined;
  /** Bytes were dropped: its stream is corrupt and it must not carry data after `heal()`. */
  poisoned: boolean;
}

export class TestLinkProxy {
  private mode: PartitionMode | undefined;
  private readonly pipes = new Set<Pipe>();

  private constructor(
    private readonly server: Server,
    readonly port: number,
    private readonly target: { host: string; port: number },
  ) {
    server.on("connection", (socket) => this.accept(socket));
  }

  /** Listen on a kernel-chosen loopback port and forward every connection to `target`. */
  static start(target: { host?: string; port: number }): Promise<TestLinkProxy> {
    const server = createServer();
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => {
        const address = server.address();
        if (!address || typeof address !== "object") {
          server.close();
          reject(new Error("could not read the test link proxy's port"));
          return;
        }
        resolve(new TestLinkProxy(server, address.port, { host: target.host ?? "127.0.0.1", port: target.port }));
      });
    });
  }

  /** The partition in force, if any. */
  get partitioned(): PartitionMode | undefined {
    return this.mode;
  }

  /** Connections currently held open (forwarding or, under a blackhole, swallowing). */
  get connections(): number {
    return this.pipes.size;
  }

  partition(mode: PartitionMode = "reset"): void {
    this.mode = mode;
    if (mode === "reset") for (const pipe of [...this.pipes]) this.drop(pipe, true);
  }

  /** Forward again. Connections that lost bytes in a blackhole are reset so that the ends redial. */
  heal(): void {
    this.mode = undefined;
    for (const pipe of [...this.pipes]) if (pipe.poisoned) this.drop(pipe, true);
  }

  /** Stop listening and reset every connection still open. */
  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      for (const pipe of [...this.pipes]) this.drop(pipe, true);
    });
  }

  private drop(pipe: Pipe, reset: boolean): void {
    if (!this.pipes.delete(pipe)) return;
    for (const socket of [pipe.down, pipe.up]) {
      if (socket && !socket.destroyed) {
        if (reset) socket.resetAndDestroy();
        else socket.destroy();
      }
    }
  }

  private accept(down: Socket): void {
    if (this.mode === "reset") {
      down.resetAndDestroy();
      return;
    }
    const pipe: Pipe = { down, up: undefined, poisoned: this.mode === "blackhole" };
    this.pipes.add(pipe);
    down.on("error", () => this.drop(pipe, true));
    down.on("close", () => this.drop(pipe, false));
    if (pipe.poisoned) {
      // Accepted into the void: never dialled through, everything it sends is dropped.
      down.on("data", () => {});
      return;
    }
    const up = connect(this.target);
    pipe.up = up;
    up.on("error", () => this.drop(pipe, true));
    up.on("close", () => this.drop(pipe, false));
    this.forward(pipe, down, up);
    this.forward(pipe, up, down);
  }

  private forward(pipe: Pipe, from: Socket, to: Socket): void {
    from.on("data", (chunk: Buffer) => {
      if (this.mode === "blackhole") pipe.poisoned = true;
      if (pipe.poisoned) return;
      if (!to.write(chunk)) {
        // Backpressure: stop reading until the other side has taken what we gave it.
        from.pause();
        to.once("drain", () => from.resume());
      }
    });
  }
}
