// Runs a Polykey 1.15 agent (Polykey's own TypeScript node) as a reference
// peer for polykey's tests. Prints one JSON line {nodeId, host, port}, then
// answers one JSON command per stdin line with one JSON line, until stdin
// closes; then stops the agent cleanly.
//
//   {"op": "find", "nodeId": N}  -> {"op": "find", "nodeId": N, "address": [host, port] | null}
//   {"op": "alive"}              -> {"op": "alive", "connections": count}
//
//   node agent.mjs NODE_PATH [SEED_NODE_ID@HOST:PORT ...]
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

const [nodePath, ...seeds] = process.argv.slice(2);
const seedNodes = {};
for (const seed of seeds) {
  const [nodeId, address] = seed.split('@');
  const colon = address.lastIndexOf(':');
  seedNodes[nodeId] = [address.slice(0, colon), Number(address.slice(colon + 1))];
}

const logger = new Logger('agent', LogLevel.WARN, [new StreamHandler()]);
const agent = await PolykeyAgent.createPolykeyAgent({
  password: 'interop-password',
  options: {
    nodePath,
    agentServiceHost: '127.0.0.1',
    agentServicePort: 0,
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
