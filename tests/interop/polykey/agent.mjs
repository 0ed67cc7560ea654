// Runs a Polykey 1.15 agent (Polykey's own TypeScript node) as a reference
// peer for polykey's tests. Prints one JSON line {nodeId, host, port}, then
// answers one JSON command per stdin line with one JSON line, until stdin
// closes; then stops the agent cleanly.
//
//   {"op": "find", "nodeId": N}  -> {"op": "find", "nodeId": N, "address": [host, port] | null}
//   {"op": "alive"}              -> {"op": "alive", "connections": count}
//   {"op": "ping", "nodeId": N, "host": H, "port": P}
//                                -> {"op": "ping", "ok": bool, "ms": elapsed}
//     Polykey's pingNodeAddress: a connection to N at H:P (handshake and
//     both certificate checks; no RPC), timed in this process.
//
//   node agent.mjs [OPTIONS] NODE_PATH [SEED_NODE_ID@HOST:PORT ...]
//
// Options (each `--name=value`, before or among the positional arguments):
//   --host=H        agentServiceHost (default 127.0.0.1; `::` is Polykey's
//                   own default, dual stack; `0.0.0.0` is IPv4 only)
//   --port=P        agentServicePort (default 0: any free port)
//   --log-level=L   debug, info, warn (default) or error; logs go to stderr
//
// Run it inside a private network namespace (`unshare -n`): the agent's
// mDNS binds UDP on every interface and cannot be switched off.
import { createRequire } from 'node:module';
import path from 'node:path';
import url from 'node:url';

const here = path.dirname(url.fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, 'noop.js'));
const { default: PolykeyAgent } = require('polykey/dist/PolykeyAgent');
const { default: Logger, LogLevel, StreamHandler } = require('@matrixai/logger');

const options = { host: '127.0.0.1', port: '0', 'log-level': 'warn' };
const positional = [];
for (const arg of process.argv.slice(2)) {
  const option = /^--([a-z-]+)=(.*)$/.exec(arg);
  if (option === null) {
    positional.push(arg);
  } else if (option[1] in options) {
    options[option[1]] = option[2];
  } else {
    process.stderr.write(`agent.mjs: unknown option ${arg}\n`);
    process.exit(64);
  }
}
const logLevel = LogLevel[options['log-level'].toUpperCase()];
const agentServicePort = Number(options.port);
if (logLevel === undefined || !Number.isInteger(agentServicePort) || positional.length < 1) {
  process.stderr.write('usage: agent.mjs [--host=H] [--port=P] [--log-level=L] NODE_PATH [SEED ...]\n');
  process.exit(64);
}
const [nodePath, ...seeds] = positional;
const seedNodes = {};
for (const seed of seeds) {
  const [nodeId, address] = seed.split('@');
  const colon = address.lastIndexOf(':');
  seedNodes[nodeId] = [address.slice(0, colon), Number(address.slice(colon + 1))];
}

const logger = new Logger('agent', logLevel, [new StreamHandler()]);
const agent = await PolykeyAgent.createPolykeyAgent({
  password: 'interop-password',
  options: {
    nodePath,
    agentServiceHost: options.host,
    agentServicePort,
    clientServiceHost: '127.0.0.1',
    clientServicePort: 0,
    seedNodes,
    workers: 0,
    keys: { passwordOpsLimit: 1, passwordMemLimit: 8192, strictMemoryLock: false },
  },
  logger,
});
const nodeId = agent.keyRing.getNodeId();
const { default: nodesUtils } = { default: require('polykey/dist/nodes/utils') };
process.stdout.write(JSON.stringify({
  nodeId: nodesUtils.encodeNodeId(nodeId),
  host: agent.agentServiceHost,
  port: agent.agentServicePort,
}) + '\n');
async function answer(command) {
  if (command.op === 'find') {
    const target = nodesUtils.decodeNodeId(command.nodeId);
    let found;
    try {
      found = await agent.nodeManager.findNode({ nodeId: target }, { timer: 20000 });
    } catch (e) {
      found = undefined;
    }
    return { op: 'find', nodeId: command.nodeId, address: found ? found[0] : null };
  }
  if (command.op === 'ping') {
    const target = nodesUtils.decodeNodeId(command.nodeId);
    const start = performance.now();
    const ok = await agent.nodeManager.pingNodeAddress(
      target, command.host, command.port, { timer: 20000 });
    return { op: 'ping', ok, ms: performance.now() - start };
  }
  if (command.op === 'alive') {
    return { op: 'alive', connections: agent.nodeConnectionManager.connectionsActive() };
  }
  return { op: command.op, error: 'unknown op' };
}

const readline = await import('node:readline');
const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  process.stdout.write(JSON.stringify(await answer(JSON.parse(line))) + '\n');
}
await agent.stop();
process.exit(0);
