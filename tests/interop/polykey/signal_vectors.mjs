// Hole-punch signalling test vectors made and checked by Polykey 1.15.1's own
// code, for polykey's Python implementation to be tested against.
//
// Reads one JSON object on stdin, writes one JSON object on stdout.
//
// Nothing here re-implements Polykey: the signatures, encodings and checks
// are Polykey's own functions and handlers, run in-process.  Three real
// `NodeConnectionManager` objects (initiator = "source", "signaller",
// "target") are constructed but never started (no socket is bound); their
// connection maps are filled with stand-in connections whose RPC client
// methods call the real handler of the peer, with the request and the reply
// passed through JSON text exactly as js-rpc puts them on a stream (an error
// reply is built as js-rpc's RPCServer builds it, with Polykey's
// `networkUtils.fromError`, and decoded on the calling side with Polykey's
// `networkUtils.toError`).  Only the last step of each side is replaced by a
// recorder: the initiator's QUIC dial (`createConnection`) and the target's
// UDP punch (`holePunch`).
//
// Input (hex keys are Ed25519: 32-byte seeds, as Polykey's KeyRing keeps in
// `keyPair.privateKey`, or 64-byte libsodium secret keys seed||public):
//   {
//     "keys": {"source": HEX, "target": HEX, "signaller": HEX, ...more names},
//     "address": {"host": H, "port": P},        // the initiator's address as the
//                                              // signaller's QUIC stream sees it
//                                              // (meta.remoteHost / remotePort)
//     "targetAddress": {"host": H, "port": P}, // optional, the signaller's
//                                              // connection to the target
//                                              // (default 127.0.0.1:55555)
//     "checks": [CHECK, ...]                   // optional
//   }
// CHECK is one of
//   {"kind": "signalInitial", "peer": NAME, "params": {...},
//    "remote": {"host","port"}?, "signaller": NAME?, "targetConnected": bool?,
//    "repeat": N?, "targetReply": JSON_TEXT?, "targetResetCode": N?}
//      runs the signaller's real NodesConnectionSignalInitial handler (the
//      QUIC peer's certificate is made from keys[peer]); returns the reply or
//      the error, and the nodesConnectionSignalFinal params it relayed.
//      "repeat" calls it N times (same signaller, for the rate limiter).
//      "targetReply" makes the target answer the relay with that JSON text
//      instead of running Polykey's handler; "targetResetCode" makes it reset
//      the stream with that code.  "relaySettled" then tells whether Polykey's
//      signaller swallows the outcome or lets it reject (unhandled in Polykey).
//   {"kind": "signalFinal", "peer": NAME, "params": {...}, "target": NAME?,
//    "peerCerts": false?}
//      runs the target's real NodesConnectionSignalFinal handler; returns the
//      reply or the error, and the punch it started (host, port).
//      "peerCerts": false gives the connection no certificates (so the
//      handler cannot tell who relayed).
//   In both, params may instead be given as "paramsJson" (raw JSON text), to
//   test key order as it arrives on the wire.
//   {"kind": "verify", "nodeId": "v...", "dataHex": HEX, "signature": B64URL}
//      keysUtils.verifyWithPublicKey(publicKeyFromNodeId(nodeId), data, sig).
//   {"kind": "clientCall", "method": M, "params": {...}, "replyJson": TEXT}
//      a unary call by Polykey's real RPCClient (configured as NodeConnection
//      configures it, so an error reply is decoded by networkUtils.toError)
//      whose peer answers with the JSON text replyJson; returns "ok" and the
//      "result", or "clientSees": what the call threw (a plain object is
//      reported as {"thrownPlainObject": true, "type", "value"}), and
//      "wire": the exact request text the client wrote.
//
// Output:
//   {
//     "nodeIds": {NAME: "v..."}, "publicKeys": {NAME: HEX},
//     "flow": {            // a whole source -> signaller -> target exchange,
//                          // made when keys source, signaller, target and
//                          // address are given
//       "signalInitialWire": the exact bytes (as text) the initiator's
//                            RPCClient writes, params.metadata included,
//       "signalInitialRequest": the same request re-serialised by the vectors
//                               script (jsonrpc, method, params, id order),
//       "request": {"signedHex", "signature", "signatureHex", "verifies"},
//                                                         // by the source
//       "signalInitialReply": JSON text the signaller answers,
//       "signalFinalWire": the exact bytes (as text) the signaller's
//                          RPCClient writes to the target,
//       "signalFinalRequest": the same, re-serialised as above,
//       "relay": {"addressJson", "signedHex", "signature", "signatureHex",
//                 "verifies"},
//                                                         // by the signaller
//       "signalFinalReply": JSON text the target answers,
//       "relaySettled": how the signaller's fire-and-forget relay ended,
//       "punch": {"host","port"} | null,     // what the target punched
//       "dial": {"nodeIds","host","port"} | null  // what the initiator dialled
//     },
//     "hosts": {"canonical": toCanonicalHost(address.host)},
//     "checks": [RESULT, ...]
//   }
// An error RESULT ("ok": false) has "reply": {"type", "message",
// "description", "exitCode", "wire": the exact JSON text of the error reply,
// "clientSees": what a Polykey caller's toError turns it into}.
// The flow's two hops (initiator -> signaller, signaller -> target) and the
// signaller's relays in signalInitial checks go through Polykey's real
// RPCClient over an in-memory stream, so their "...Wire" texts are what a
// Polykey caller writes: {"method","jsonrpc","id","params"} with
// params.metadata = {"timeout": ms | null} added by js-rpc's middleware.  The
// handlers get those params, metadata included, as on a real stream.  Other
// request texts are plain JSON-RPC envelopes of the params.
//
//   echo '{"keys": {...}, "address": {...}}' | node signal_vectors.mjs
//
// Live mode ({"live": {"host"?: H}}): real PolykeyAgents over js-quic; see
// live() below.  Output: the raw request and reply bytes (as text) of
// nodesConnectionSignalInitial (bad signature, target not connected, good),
// nodesClosestActiveConnectionsGet, the nodesConnectionSignalFinal request the
// target received, and the signaller's unhandled rejections.
import { createRequire } from 'node:module';
import path from 'node:path';
import url from 'node:url';

const here = path.dirname(url.fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, 'noop.js'));
const keysUtils = require('polykey/dist/keys/utils');
const nodesUtils = require('polykey/dist/nodes/utils');
const networkUtils = require('polykey/dist/network/utils');
const ids = require('polykey/dist/ids');
const { default: NodeConnectionManager } = require('polykey/dist/nodes/NodeConnectionManager');
const { default: NodesConnectionSignalInitial } = require(
  'polykey/dist/nodes/agent/handlers/NodesConnectionSignalInitial',
);
const { default: NodesConnectionSignalFinal } = require(
  'polykey/dist/nodes/agent/handlers/NodesConnectionSignalFinal',
);
const { default: agentClientManifest } = require('polykey/dist/nodes/agent/callers');
const { RPCClient, middleware: rpcMiddleware } = require('@matrixai/rpc');
const asyncInitUtils = require('@matrixai/async-init/dist/utils');
const { default: Logger, LogLevel } = require('@matrixai/logger');

const logger = new Logger('signal_vectors', LogLevel.SILENT, []);

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf-8'));
}

function keyPairFromHex(hex) {
  const raw = Buffer.from(hex, 'hex');
  if (raw.length !== 32 && raw.length !== 64) {
    throw new Error(`key must be 32 or 64 bytes, got ${raw.length}`);
  }
  const privateKey = Buffer.from(raw.subarray(0, 32));
  const publicKey = keysUtils.publicKeyFromPrivateKeyEd25519(privateKey);
  if (raw.length === 64 && !raw.subarray(32).equals(publicKey)) {
    throw new Error('64-byte key: last 32 bytes are not the public key of the seed');
  }
  return keysUtils.makeKeyPair(publicKey, privateKey);
}

const certIdGen = ids.createCertIdGenerator();

class Peer {
  static async create(name, keyPair) {
    const cert = await keysUtils.generateCertificate({
      certId: certIdGen(),
      subjectKeyPair: keyPair,
      issuerPrivateKey: keyPair.privateKey,
      duration: 3600,
    });
    return new Peer(name, keyPair, cert);
  }

  constructor(name, keyPair, cert) {
    this.name = name;
    this.keyPair = keyPair;
    this.nodeId = keysUtils.publicKeyToNodeId(keyPair.publicKey);
    this.nodeIdEncoded = nodesUtils.encodeNodeId(this.nodeId);
    this.certDER = keysUtils.certToASN1(cert);
    this.tlsConfig = {
      keyPrivatePem: keysUtils.privateKeyToPEM(keyPair.privateKey),
      certChainPem: keysUtils.certToPEM(cert),
    };
  }

  /** A real, never-started NodeConnectionManager with this peer's keys. */
  manager() {
    const keyPair = this.keyPair;
    const nodeId = this.nodeId;
    const ncm = new NodeConnectionManager({
      keyRing: { keyPair, getNodeId: () => nodeId },
      tlsConfig: this.tlsConfig,
      logger,
    });
    // Mark it running so the `ready` guards pass; nothing is bound.
    ncm[asyncInitUtils._running] = true;
    return ncm;
  }
}

/** Puts a stand-in connection into a manager's connection map. */
function addConnection(ncm, nodeId, { host, port }, methods) {
  const connection = {
    // NodeConnection canonicalises its host in its constructor
    host: networkUtils.toCanonicalHost(host),
    port,
    hostname: undefined,
    connectionId: 'vectors',
    getClient: () => ({ methods }),
    destroy: async () => {},
  };
  ncm.connections.set(nodeId.toString(), {
    activeConnection: 'vectors',
    connections: { vectors: { connection, timer: null, usageCount: 0 } },
  });
}

function describeError(e) {
  if (e == null || typeof e !== 'object') return { thrown: e };
  if (!(e instanceof Error)) {
    return { thrownPlainObject: true, type: e.type, value: e };
  }
  const out = { type: e.constructor.name, message: e.message };
  if ('description' in e) out.description = e.description;
  if ('exitCode' in e) out.exitCode = e.exitCode;
  if (e.cause != null) out.cause = describeError(e.cause);
  return out;
}

/**
 * One unary call over the "wire": the request params and the reply go
 * through JSON text as on a js-rpc stream.  On a handler error the reply is
 * built as js-rpc's RPCServer builds it (code -32006, data = fromError(e),
 * id null) and the caller gets what Polykey's RPCClient throws:
 * networkUtils.toError(error.data, metadata).
 */
async function callUnary(method, handler, params, meta, paramsJson) {
  const requestJson =
    paramsJson != null
      ? `{"jsonrpc":"2.0","method":"${method}","params":${paramsJson},"id":null}`
      : JSON.stringify({ jsonrpc: '2.0', method, params, id: null });
  const input = JSON.parse(requestJson).params;
  try {
    const result = await handler.handle(input, () => {}, meta, {});
    const replyJson = JSON.stringify({ jsonrpc: '2.0', result, id: null });
    return { ok: true, requestJson, replyJson, result: JSON.parse(replyJson).result };
  } catch (e) {
    const replyJson = JSON.stringify({
      jsonrpc: '2.0',
      error: { code: -32006, message: e.message, data: networkUtils.fromError(e) },
      id: null,
    });
    const reply = JSON.parse(replyJson);
    const clientError = networkUtils.toError(reply.error.data, {
      remoteHost: meta.localHost,
      remotePort: meta.localPort,
      command: method,
    });
    return {
      ok: false,
      requestJson,
      replyJson,
      error: e,
      clientError,
      result: { ...describeError(e), wire: replyJson, clientSees: describeError(clientError) },
    };
  }
}

function metaFor(peer, remote, local) {
  return {
    remoteCertsChain: [peer.certDER],
    remoteHost: remote.host,
    remotePort: remote.port,
    localHost: local.host,
    localPort: local.port,
  };
}

const LOCAL = { host: '127.0.0.1', port: 1314 };

/** The caller's side of a QUIC stream's metadata, as js-quic gives it. */
function streamMeta(local, remote) {
  return {
    localHost: local.host,
    localPort: local.port,
    remoteHost: remote.host,
    remotePort: remote.port,
  };
}

/**
 * A unary call made by Polykey's real RPCClient, configured as NodeConnection
 * configures it, over an in-memory stream.  The far end collects the request
 * bytes exactly as the client writes them; once they form one JSON value it
 * hands their text to `serve`, writes back the reply text `serve` returns and
 * ends the stream.  `record.wireJson` gets the request text; returns the
 * result or throws what Polykey's client throws.
 */
async function polykeyUnary(method, params, ctx, meta, serve, record = {}) {
  let controller;
  const readable = new ReadableStream({
    start: (c) => {
      controller = c;
    },
  });
  const chunks = [];
  let served = false;
  const writable = new WritableStream({
    write: (chunk) => {
      chunks.push(Buffer.from(chunk));
      if (served) return;
      const text = Buffer.concat(chunks).toString('utf-8');
      try {
        JSON.parse(text);
      } catch {
        return;
      }
      served = true;
      record.wireJson = text;
      // Not awaited: the client reads the reply while its write settles.
      void Promise.resolve()
        .then(() => serve(text))
        .then(
          (reply) => {
            controller.enqueue(Buffer.from(reply, 'utf-8'));
            controller.close();
          },
          (e) => controller.error(e),
        );
    },
  });
  const stream = {
    readable,
    writable,
    cancel: (reason) => {
      try {
        controller.error(reason);
      } catch {
        // already ended
      }
    },
    meta,
  };
  const client = new RPCClient({
    manifest: agentClientManifest,
    middlewareFactory: rpcMiddleware.defaultClientMiddlewareWrapper(),
    streamFactory: async () => stream,
    toError: networkUtils.toError,
    logger,
  });
  return await client.methods[method](params, ctx);
}

/** Target side: a NodesConnectionSignalFinal handler whose punches are recorded. */
function targetSide(targetPeer) {
  const ncm = targetPeer.manager();
  const punches = [];
  // A real punch runs for the whole connect timeout (15 s); the recorder's
  // stays pending until settle(), so that coalescing behaves as in Polykey.
  let release;
  const held = new Promise((resolve) => {
    release = resolve;
  });
  ncm.holePunch = async (host, port) => {
    punches.push({ host, port });
    await held;
  };
  const handler = new NodesConnectionSignalFinal({ nodeConnectionManager: ncm, logger });
  const settle = async () => {
    // Let the semaphore-wrapped punch start, then end it.
    await new Promise((resolve) => setImmediate(resolve));
    release();
    await Promise.allSettled([...ncm.activeHolePunchPs.values()]);
  };
  return { ncm, handler, punches, settle };
}

/**
 * Signaller side: a NodesConnectionSignalInitial handler on a manager that has
 * a connection to the target (unless targetConnected is false); its relayed
 * nodesConnectionSignalFinal goes to the target's real handler.
 */
function signallerSide(
  signallerPeer,
  targetPeer,
  targetAddress,
  { targetConnected = true, targetReply, targetResetCode } = {},
) {
  const ncm = signallerPeer.manager();
  const target = targetSide(targetPeer);
  const relays = [];
  if (targetConnected) {
    addConnection(ncm, targetPeer.nodeId, targetAddress, {
      nodesConnectionSignalFinal: async (params, ctx) => {
        const requestJson = JSON.stringify({
          jsonrpc: '2.0',
          method: 'nodesConnectionSignalFinal',
          params,
          id: null,
        });
        if (targetResetCode != null) {
          // The target resets the stream: js-quic hands Polykey's codeToReason
          // result to the reader, and the RPC client throws it.
          relays.push({ requestJson, replyJson: null });
          throw nodesUtils.codeToReason('read', targetResetCode);
        }
        if (targetReply != null) {
          // A canned reply from a target that is not Polykey: decoded as
          // Polykey's RPCClient decodes the first message of a stream.
          relays.push({ requestJson, replyJson: targetReply });
          const reply = JSON.parse(targetReply);
          if ('error' in reply) {
            throw networkUtils.toError(reply.error.data, {
              remoteHost: targetAddress.host,
              remotePort: targetAddress.port,
              command: 'nodesConnectionSignalFinal',
            });
          }
          return reply.result;
        }
        const record = {};
        relays.push(record);
        return await polykeyUnary(
          'nodesConnectionSignalFinal',
          params,
          ctx,
          streamMeta(LOCAL, targetAddress),
          async (wireJson) => {
            const call = await callUnary(
              'nodesConnectionSignalFinal',
              target.handler,
              JSON.parse(wireJson).params,
              metaFor(signallerPeer, LOCAL, targetAddress),
            );
            Object.assign(record, call);
            return call.replyJson;
          },
          record,
        );
      },
    });
  }
  const handler = new NodesConnectionSignalInitial({ nodeConnectionManager: ncm });
  const relayOutcomes = watchRelays(ncm);
  return { ncm, handler, relays, target, relayOutcomes };
}

/**
 * Records how the signaller's fire-and-forget relays end.  In Polykey nothing
 * awaits them until stop(): a rejection there is an unhandled promise
 * rejection in the signaller's process.  Here a handler is attached as each
 * one is added, so the outcome can be reported.
 */
function watchRelays(ncm) {
  const outcomes = [];
  const set = ncm.activeSignalFinalPs;
  const add = set.add.bind(set);
  set.add = (p) => {
    outcomes.push(
      p.then(
        () => ({ status: 'fulfilled' }),
        (e) => ({ status: 'rejected', unhandledInPolykey: true, error: describeError(e) }),
      ),
    );
    return add(p);
  };
  return () => Promise.all(outcomes);
}

async function flow(peers, address, targetAddress) {
  const source = peers.source;
  const signaller = peers.signaller;
  const target = peers.target;
  const side = signallerSide(signaller, target, targetAddress);
  const initiator = source.manager();
  const out = {};
  let initialCall;
  const initialRecord = {};
  addConnection(initiator, signaller.nodeId, { host: '127.0.0.1', port: 1 }, {
    nodesConnectionSignalInitial: (params, ctx) =>
      polykeyUnary(
        'nodesConnectionSignalInitial',
        params,
        ctx,
        streamMeta(address, LOCAL),
        async (wireJson) => {
          initialCall = await callUnary(
            'nodesConnectionSignalInitial',
            side.handler,
            JSON.parse(wireJson).params,
            metaFor(source, address, LOCAL),
          );
          return initialCall.replyJson;
        },
        initialRecord,
      ),
  });
  let dial = null;
  initiator.createConnection = async (nodeIds, host, port) => {
    dial = { nodeIds: nodeIds.map((n) => nodesUtils.encodeNodeId(n)), host, port };
    return dial;
  };
  try {
    await initiator.createConnectionPunch(target.nodeId, signaller.nodeId);
  } catch (e) {
    out.initiatorError = describeError(e);
  }
  const relaySettled = await side.relayOutcomes();
  await side.target.settle();
  out.signalInitialWire = initialRecord.wireJson;
  out.signalInitialRequest = initialCall?.requestJson;
  const sigInit = JSON.parse(initialCall.requestJson).params.signature;
  const requestData = Buffer.concat([source.nodeId, target.nodeId]);
  out.request = {
    signedHex: requestData.toString('hex'),
    signature: sigInit,
    signatureHex: Buffer.from(sigInit, 'base64url').toString('hex'),
    // Polykey's verify over exactly these bytes, with the source's key
    verifies: keysUtils.verifyWithPublicKey(
      keysUtils.publicKeyFromNodeId(source.nodeId),
      requestData,
      Buffer.from(sigInit, 'base64url'),
    ),
  };
  out.signalInitialReply = initialCall?.replyJson;
  const relay = side.relays[0];
  if (relay != null) {
    out.signalFinalWire = relay.wireJson;
    out.signalFinalRequest = relay.requestJson;
    const p = JSON.parse(relay.requestJson).params;
    const addressJson = JSON.stringify(p.address);
    const relayData = Buffer.concat([
      source.nodeId,
      target.nodeId,
      Buffer.from(addressJson, 'utf-8'),
      Buffer.from(p.requestSignature, 'base64url'),
    ]);
    out.relay = {
      addressJson,
      signedHex: relayData.toString('hex'),
      signature: p.relaySignature,
      signatureHex: Buffer.from(p.relaySignature, 'base64url').toString('hex'),
      // Polykey's verify over exactly these bytes, with the signaller's key
      verifies: keysUtils.verifyWithPublicKey(
        keysUtils.publicKeyFromNodeId(signaller.nodeId),
        relayData,
        Buffer.from(p.relaySignature, 'base64url'),
      ),
    };
    out.signalFinalReply = relay.replyJson;
  }
  out.relaySettled = relaySettled;
  out.punch = side.target.punches[0] ?? null;
  out.dial = dial;
  return out;
}

async function runCheck(check, peers, input) {
  const peerOf = (name) => {
    const peer = peers[name];
    if (peer == null) throw new Error(`unknown key name ${name}`);
    return peer;
  };
  switch (check.kind) {
    case 'verify': {
      const nodeId = ids.decodeNodeId(check.nodeId);
      if (nodeId == null) return { kind: 'verify', error: 'bad nodeId' };
      const valid = keysUtils.verifyWithPublicKey(
        keysUtils.publicKeyFromNodeId(nodeId),
        Buffer.from(check.dataHex, 'hex'),
        Buffer.from(check.signature, 'base64url'),
      );
      return { kind: 'verify', valid };
    }
    case 'signalInitial': {
      const peer = peerOf(check.peer ?? 'source');
      const signaller = peerOf(check.signaller ?? 'signaller');
      const target = peerOf(check.target ?? 'target');
      const side = signallerSide(
        signaller,
        target,
        input.targetAddress ?? { host: '127.0.0.1', port: 55555 },
        check,
      );
      const remote = check.remote ?? input.address;
      const results = [];
      for (let i = 0; i < (check.repeat ?? 1); i++) {
        const call = await callUnary(
          'nodesConnectionSignalInitial',
          side.handler,
          check.params,
          metaFor(peer, remote, LOCAL),
          check.paramsJson,
        );
        results.push({ ok: call.ok, reply: call.ok ? call.result : call.result });
      }
      const relaySettled = await side.relayOutcomes();
      await side.target.settle();
      const out = { kind: 'signalInitial' };
      if ((check.repeat ?? 1) === 1) {
        Object.assign(out, results[0]);
      } else {
        out.okCount = results.filter((r) => r.ok).length;
        out.firstFailure = results.findIndex((r) => !r.ok);
        out.failure = results.find((r) => !r.ok)?.reply ?? null;
      }
      out.relayed = side.relays.map((r) => r.requestJson);
      out.relayedWire = side.relays.map((r) => r.wireJson ?? null);
      out.relayReplies = side.relays.map((r) => r.replyJson);
      out.relaySettled = relaySettled;
      out.punches = side.target.punches;
      return out;
    }
    case 'signalFinal': {
      const peer = peerOf(check.peer ?? 'signaller');
      const target = targetSide(peerOf(check.target ?? 'target'));
      const meta = metaFor(peer, LOCAL, input.targetAddress ?? { host: '127.0.0.1', port: 55555 });
      // A connection without certificates: nodeIdFromMeta finds no NodeId.
      if (check.peerCerts === false) meta.remoteCertsChain = [];
      const call = await callUnary(
        'nodesConnectionSignalFinal',
        target.handler,
        check.params,
        meta,
        check.paramsJson,
      );
      await target.settle();
      return {
        kind: 'signalFinal',
        ok: call.ok,
        reply: call.result,
        punches: target.punches,
      };
    }
    case 'clientCall': {
      const record = {};
      const meta = streamMeta(LOCAL, { host: '127.0.0.1', port: 55555 });
      try {
        const result = await polykeyUnary(
          check.method,
          check.params,
          undefined,
          meta,
          () => check.replyJson,
          record,
        );
        return { kind: 'clientCall', ok: true, result, wire: record.wireJson };
      } catch (e) {
        const clientSees = describeError(e);
        return { kind: 'clientCall', ok: false, clientSees, wire: record.wireJson };
      }
    }
    default:
      return { kind: check.kind, error: 'unknown kind' };
  }
}

/**
 * Live mode: real PolykeyAgents in this process, talking js-rpc over js-quic
 * on 127.0.0.1.  Run it in a private network namespace with loopback up:
 *   unshare -n sh -c 'ip link set lo up && node signal_vectors.mjs' <<< '{"live": {}}'
 * (the agents' mDNS binds UDP on every interface and cannot be switched off).
 * Agents: "initiator" and "target" both dial "signaller".  The initiator then
 * opens raw streams to the signaller and records the exact bytes that come
 * back; the target records the exact bytes of the nodesConnectionSignalFinal
 * request that arrives from the signaller.
 */
async function live(options) {
  const fs = await import('node:fs');
  const os = await import('node:os');
  const { default: PolykeyAgent } = require('polykey/dist/PolykeyAgent');
  const base = fs.mkdtempSync(path.join(options.dir ?? os.tmpdir(), 'signal-vectors-'));
  const agentLogger = new Logger('agent', LogLevel.ERROR, []);
  // "host": the agents' bind host; with "::" (Polykey's default) the sockets
  // are dual-stack and IPv4 peers appear as ::ffff:a.b.c.d.
  const bindHost = options.host ?? '127.0.0.1';
  const dialHost = bindHost === '::' ? '127.0.0.1' : bindHost;
  const unhandled = [];
  process.on('unhandledRejection', (reason) => {
    unhandled.push(describeError(reason));
  });
  const start = (name) =>
    PolykeyAgent.createPolykeyAgent({
      password: 'interop-password',
      options: {
        nodePath: path.join(base, name),
        agentServiceHost: bindHost,
        agentServicePort: 0,
        clientServiceHost: '127.0.0.1',
        clientServicePort: 0,
        seedNodes: {},
        workers: 0,
        keys: { passwordOpsLimit: 1, passwordMemLimit: 8192, strictMemoryLock: false },
      },
      logger: agentLogger,
    });
  const [initiator, signaller, target] = await Promise.all([
    start('initiator'),
    start('signaller'),
    start('target'),
  ]);
  const out = {
    agents: Object.fromEntries(
      Object.entries({ initiator, signaller, target }).map(([name, agent]) => [
        name,
        {
          nodeId: nodesUtils.encodeNodeId(agent.keyRing.getNodeId()),
          host: agent.agentServiceHost,
          port: agent.agentServicePort,
        },
      ]),
    ),
  };
  // The target keeps the raw bytes of every request stream it serves.
  const targetRequests = [];
  const targetRpc = target.nodeConnectionManager.rpcServer;
  const handleStream = targetRpc.handleStream.bind(targetRpc);
  targetRpc.handleStream = (stream) => {
    const chunks = [];
    targetRequests.push(chunks);
    const tee = new TransformStream({
      transform(chunk, controller) {
        chunks.push(Buffer.from(chunk));
        controller.enqueue(chunk);
      },
    });
    return handleStream({
      readable: stream.readable.pipeThrough(tee),
      writable: stream.writable,
      cancel: (reason) => stream.cancel(reason),
      get meta() {
        return stream.meta;
      },
    });
  };
  const signallerNodeId = signaller.keyRing.getNodeId();
  for (const agent of [initiator, target]) {
    await agent.nodeConnectionManager.createConnection(
      [signallerNodeId],
      dialHost,
      signaller.agentServicePort,
    );
  }
  // Wait until the signaller has registered both reverse connections.
  for (let i = 0; i < 100; i++) {
    if (
      signaller.nodeConnectionManager.hasConnection(initiator.keyRing.getNodeId()) &&
      signaller.nodeConnectionManager.hasConnection(target.keyRing.getNodeId())
    )
      break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const conn = initiator.nodeConnectionManager.getConnection(signallerNodeId).connection;
  const raw = async (method, params) => {
    const stream = await conn.rpcClient.streamFactory();
    const writer = stream.writable.getWriter();
    const request = JSON.stringify({ jsonrpc: '2.0', method, params, id: null });
    await writer.write(Buffer.from(request));
    await writer.close();
    const chunks = [];
    for await (const chunk of stream.readable) chunks.push(Buffer.from(chunk));
    return { request, reply: Buffer.concat(chunks).toString('utf-8') };
  };
  const nodeIdI = initiator.keyRing.getNodeId();
  const nodeIdT = target.keyRing.getNodeId();
  const goodSignature = keysUtils
    .signWithPrivateKey(initiator.keyRing.keyPair, Buffer.concat([nodeIdI, nodeIdT]))
    .toString('base64url');
  out.badSignature = await raw('nodesConnectionSignalInitial', {
    targetNodeIdEncoded: nodesUtils.encodeNodeId(nodeIdT),
    signature: Buffer.alloc(64).toString('base64url'),
  });
  const strangerKeyPair = keysUtils.generateKeyPair();
  const stranger = keysUtils.publicKeyToNodeId(strangerKeyPair.publicKey);
  out.targetNotConnected = await raw('nodesConnectionSignalInitial', {
    targetNodeIdEncoded: nodesUtils.encodeNodeId(stranger),
    signature: keysUtils
      .signWithPrivateKey(initiator.keyRing.keyPair, Buffer.concat([nodeIdI, stranger]))
      .toString('base64url'),
  });
  out.good = await raw('nodesConnectionSignalInitial', {
    targetNodeIdEncoded: nodesUtils.encodeNodeId(nodeIdT),
    signature: goodSignature,
  });
  out.closestActiveConnections = await raw('nodesClosestActiveConnectionsGet', {
    nodeIdEncoded: nodesUtils.encodeNodeId(nodeIdT),
  });
  out.closestActiveConnectionsBadNodeId = await raw('nodesClosestActiveConnectionsGet', {
    nodeIdEncoded: 'vbogus',
  });
  // Give the fire-and-forget relay time to reach the target.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  out.targetReceived = targetRequests.map((chunks) => Buffer.concat(chunks).toString('utf-8'));
  out.targetActivePunches = [...target.nodeConnectionManager.activeHolePunchPs.keys()];
  // The target now fails its nodesConnectionSignalFinal handler: what does the
  // signaller do with the error reply to its fire-and-forget relay?
  target.nodeConnectionManager.handleNodesConnectionSignalFinal = () => {
    throw new Error('target refuses (vectors)');
  };
  out.goodTargetFails = await raw('nodesConnectionSignalInitial', {
    targetNodeIdEncoded: nodesUtils.encodeNodeId(nodeIdT),
    signature: goodSignature,
  });
  await new Promise((resolve) => setTimeout(resolve, 1000));
  out.unhandledRejections = unhandled;
  await Promise.allSettled([initiator.stop(), target.stop()]);
  await signaller.stop();
  fs.rmSync(base, { recursive: true, force: true });
  return out;
}

const input = await readStdin();
if (input.live != null) {
  process.stdout.write(JSON.stringify(await live(input.live), null, 1) + '\n');
  process.exit(0);
}
const peers = {};
for (const [name, hex] of Object.entries(input.keys ?? {})) {
  peers[name] = await Peer.create(name, keyPairFromHex(hex));
}
const output = { nodeIds: {}, publicKeys: {} };
for (const [name, peer] of Object.entries(peers)) {
  output.nodeIds[name] = peer.nodeIdEncoded;
  output.publicKeys[name] = Buffer.from(peer.keyPair.publicKey).toString('hex');
}
const targetAddress = input.targetAddress ?? { host: '127.0.0.1', port: 55555 };
if (input.address != null) {
  let canonical;
  try {
    canonical = networkUtils.toCanonicalHost(input.address.host);
  } catch (e) {
    canonical = null;
  }
  output.hosts = { canonical };
}
if (peers.source && peers.signaller && peers.target && input.address != null) {
  output.flow = await flow(peers, input.address, targetAddress);
}
output.checks = [];
for (const check of input.checks ?? []) {
  output.checks.push(await runCheck(check, peers, input));
}
process.stdout.write(JSON.stringify(output, null, 1) + '\n');
// The managers' rate limiter and connection timers would keep the loop alive.
process.exit(0);
