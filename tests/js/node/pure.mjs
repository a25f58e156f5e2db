// The client's pure decisions and decoder, for tests/js/test_node.py to check against the
// Python SDK: reads one JSON request on stdin, prints one JSON answer.
import { compareIds, planReconnect, reconnectDelay, unpack, connectUrl } from "../../../clients/js/relay-client.js";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const ask = JSON.parse(input);
const nearlyOne = () => 0.999999;
console.log(
  JSON.stringify({
    compare: ask.pairs.map(([a, b]) => compareIds(a, b)),
    plans: ask.codes.map((code) => [planReconnect(code, { canRenew: false }), planReconnect(code, { canRenew: true })]),
    delays: ask.delays.map(([action, attempt]) => reconnectDelay(action, attempt, 0.5, 30, nearlyOne)),
    unpacked: ask.packed.map((hex) => {
      const value = unpack(Buffer.from(hex, "hex"));
      return JSON.parse(JSON.stringify(value, (_, v) => (typeof v === "bigint" ? `big:${v}` : v instanceof Uint8Array ? `bin:${Buffer.from(v).toString("hex")}` : v)));
    }),
    urls: ask.urls.map(([url, id, opts]) => connectUrl(url, id, opts)),
  }),
);
