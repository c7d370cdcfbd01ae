import { connect, createServer, type Server, type Socket } from "node:net";
import { waitFor } from "@ferry/nats-sites";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { TestLinkProxy } from "./test-link-proxy.js";

/** A loopback echo server: what the proxy forwards to. */
async function echoServer(): Promise<{ server: Server; port: number }> {
  const server = createServer((socket) => {
    socket.on("error", () => {});
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  if (!address || typeof address !== "object") throw new Error("no port");
  return { server, port: address.port };
}

/** A client socket that records what it receives and whether it has been closed. */
async function dial(port: number) {
  const socket: Socket = connect({ host: "127.0.0.1", port });
  const state = { received: "", closed: false, socket };
  socket.setEncoding("utf8");
  socket.on("data", (chunk: string) => {
    state.received += chunk;
  });
  socket.on("error", () => {});
  socket.on("close", () => {
    state.closed = true;
  });
  // A refused connection may be reset before "connect" is even emitted.
  await new Promise<void>((resolve) => {
    socket.once("connect", resolve);
    socket.once("close", resolve);
  });
  return state;
}

describe("TestLinkProxy", () => {
  let echo: { server: Server; port: number };
  let proxy: TestLinkProxy;
  const clients: Socket[] = [];
  beforeEach(async () => {
    echo = await echoServer();
    proxy = await TestLinkProxy.start({ port: echo.port });
  });
  afterEach(async () => {
    for (const socket of clients.splice(0)) socket.destroy();
    await proxy.close();
    await new Promise((resolve) => echo.server.close(resolve));
  });

  it("forwards both ways, cuts every connection on a reset partition, and forwards again after heal", async () => {
    const before = await dial(proxy.port);
    clients.push(before.socket);
    before.socket.write("ping");
    await waitFor("the echo", () => before.received === "ping");

    proxy.partition("reset");
    await waitFor("the open connection to be cut", () => before.closed);
    const during = await dial(proxy.port);
    clients.push(during.socket);
    await waitFor("a new connection to be refused", () => during.closed);
    expect(proxy.connections).toBe(0);

    proxy.heal();
    const after = await dial(proxy.port);
    clients.push(after.socket);
    after.socket.write("pong");
    await waitFor("the echo after heal", () => after.received === "pong");
  });

  it("swallows bytes under a blackhole, then resets the connections that lost bytes on heal", async () => {
    const idle = await dial(proxy.port);
    const talking = await dial(proxy.port);
    clients.push(idle.socket, talking.socket);
    await waitFor("both connections", () => proxy.connections === 2);

    proxy.partition("blackhole");
    talking.socket.write("lost");
    const held = await dial(proxy.port);
    clients.push(held.socket);
    held.socket.write("lost too");
    await waitFor("the held connection", () => proxy.connections === 3);
    // Nothing comes back, and nothing is closed: the ends cannot tell.
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect([talking.received, held.received, talking.closed, held.closed]).toEqual(["", "", false, false]);

    proxy.heal();
    await waitFor("connections that lost bytes to be reset", () => talking.closed && held.closed);
    expect(idle.closed).toBe(false);
    idle.socket.write("intact");
    await waitFor("the untouched connection to work again", () => idle.received === "intact");
  });
});
