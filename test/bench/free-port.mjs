/** A free loopback TCP port, for the servers a bench starts. */
import { createServer } from "node:net";

/** A port the kernel just handed out and we released; the server binds it a moment later. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}
