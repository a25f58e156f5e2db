// Runs clients/js/relay-client.js under Node with the `ws` package, for tests/js/test_node.py.
// Every event the client reports is printed as one JSON line on stdout; closing stdin stops
// the client (exit 0); a stop by the server exits 3.
//   RELAY_WS_DIR   a directory with node_modules/ws (npm ci of tests/js/node/package-lock.json)
//   RELAY_MODULE   file URL of relay-client.js
//   RELAY_URL, RELAY_CLIENT, RELAY_FORMAT
//   RELAY_TOKEN_URL  where the token function fetches each token (or RELAY_TOKEN: a fixed one)
//   RELAY_OPTIONS  JSON of more options (pingInterval, pongTimeout, backoffBase, …)
//   RELAY_HANDLER_DELAY_MS  the message handler takes this long (a slow app)
import { createRequire } from "node:module";

const env = process.env;
const { WebSocket } = createRequire(`${env.RELAY_WS_DIR}/`)("ws");
const { RelayClient } = await import(env.RELAY_MODULE);

const print = (kind, value) =>
  process.stdout.write(JSON.stringify({ kind, at: Date.now(), ...value }) + "\n");

const client = new RelayClient({
  url: env.RELAY_URL,
  clientId: env.RELAY_CLIENT,
  format: env.RELAY_FORMAT || "json",
  WebSocket,
  token: env.RELAY_TOKEN || (async () => (await fetch(env.RELAY_TOKEN_URL)).text()),
  ...JSON.parse(env.RELAY_OPTIONS || "{}"),
});
const delay = Number(env.RELAY_HANDLER_DELAY_MS || 0);
client.on("message", (m) => {
  print("message", m);
  if (delay) return new Promise((resolve) => setTimeout(resolve, delay));
});
client.on("connected", (w) => print("connected", w));
client.on("disconnected", (d) => {
  print("disconnected", d);
  if (!d.willReconnect) setTimeout(() => process.exit(3), 50);
});
client.on("error", (e) => print("error", { error: String(e?.message ?? e?.code ?? e) }));
client.start();

process.stdin.resume();
process.stdin.on("end", async () => {
  await client.stop();
  process.exit(0);
});
