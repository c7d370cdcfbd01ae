/**
 * One interop test's world: a temp data directory, the built `ferry` bin, a `ferry volume serve`
 * on a unix socket (and TCP when asked), and every process and directory released in `cleanup()`.
 */
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { FerryCli, type FerryServe, freePort, Sandbox } from "@ferry/testkit";

const cliPackage = createRequire(import.meta.url).resolve("@ferry/cli/package.json");
export const FERRY_BIN = join(dirname(cliPackage), "bin", "ferry.js");

export interface Extent {
  offset: number;
  length: number;
}

export class FerryFixture {
  readonly sandbox = new Sandbox();
  readonly ferry = new FerryCli(this.sandbox, FERRY_BIN);
  data = "";
  socket = "";
  serve: FerryServe | undefined;

  async setup(): Promise<void> {
    this.data = await this.sandbox.dir("ferry-interop-");
    this.socket = join(await this.sandbox.dir("ferry-sock-"), "nbd.sock");
  }

  async create(name: string, size: string): Promise<void> {
    await this.ferry.ok(["volume", "create", name, "--size", size, "--data", this.data]);
  }

  /** Start serving the data directory on the fixture's socket, plus TCP on a free port if asked. */
  async startServe({ tcp = false }: { tcp?: boolean } = {}): Promise<FerryServe> {
    const args = ["--data", this.data, "--socket", this.socket];
    if (tcp) args.push("--listen", `127.0.0.1:${await freePort()}`);
    this.serve = await this.ferry.serve(args);
    return this.serve;
  }

  uri(volume: string): string {
    return `nbd+unix:///${volume}?socket=${this.socket}`;
  }

  dirty(volume: string): Promise<Extent[]> {
    return this.ferry.json<Extent[]>(["volume", "dirty", volume, "--data", this.data]);
  }

  /** Run a tool and require exit 0; returns stdout. */
  async tool(command: string, args: readonly string[], timeoutMs = 120_000): Promise<string> {
    const result = await this.sandbox.run(command, args, { timeoutMs });
    if (result.code !== 0) {
      throw new Error(
        `${command} ${args.join(" ")} exited ${result.code ?? result.signal}:\n${result.stderr}${result.stdout}`,
      );
    }
    return result.stdout;
  }

  async cleanup(): Promise<void> {
    await this.sandbox.cleanup();
  }
}
