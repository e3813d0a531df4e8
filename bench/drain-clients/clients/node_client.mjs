// One closed loop of `make drain-clients` for Node.js: the built-in fetch (undici, HTTP/1.1
// keep-alive) or node:http2 with the usual session handling: one session, replaced by a new
// one as soon as it receives GOAWAY, closes or fails (node:http2 has no pool of its own).
//
//   node node_client.mjs --lib fetch|http2 --url URL --concurrency N
//
// GET requests back to back until stdin closes. Prints READY once a request succeeded, then
// one JSON line: versions and one record per request
// [start unix ms, duration ms, status (0 on a transport error), error, retry-after].
import http2 from 'node:http2';
import { performance } from 'node:perf_hooks';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, v, i, a) => (i % 2 === 0 ? [...acc, [v.replace(/^--/, ''), a[i + 1]]] : acc), []));
const url = new URL(args.url);
const concurrency = Number(args.concurrency || 4);
let stopped = false;
process.stdin.on('data', () => {});
process.stdin.on('end', () => { stopped = true; });
process.stdin.resume();

const errorClass = (e) => {
  let c = e;
  while (c && c.cause) c = c.cause;
  return `${c?.code || c?.name || 'Error'}: ${String(c?.message || c).slice(0, 120)}`;
};

async function fetchOnce() {
  const r = await fetch(url);
  await r.arrayBuffer();
  return [r.status, r.headers.get('retry-after')];
}

let session = null;
let sessions = 0;
function currentSession() {
  if (session && !session.closed && !session.destroyed) return session;
  const s = http2.connect(url.origin);
  sessions += 1;
  const drop = () => { if (session === s) session = null; };
  s.on('goaway', drop);
  s.on('close', drop);
  s.on('error', drop);
  session = s;
  return s;
}

function http2Once() {
  return new Promise((resolve, reject) => {
    let req;
    try {
      req = currentSession().request({ ':method': 'GET', ':path': url.pathname + url.search });
    } catch (e) { reject(e); return; }
    let status = 0;
    let ra = null;
    req.on('response', (h) => { status = h[':status']; ra = h['retry-after'] ?? null; });
    req.on('data', () => {});
    req.on('end', () => resolve([status, ra]));
    req.on('error', reject);
    req.end();
  });
}

const once = args.lib === 'http2' ? http2Once : fetchOnce;
const records = [];
const deadline = Date.now() + 30000;
for (;;) {
  try { if ((await once())[0] < 300) break; } catch (e) { /* retry */ }
  if (Date.now() > deadline) { console.error(`no 2xx from ${url}`); process.exit(1); }
  await new Promise((r) => setTimeout(r, 50));
}
console.log('READY');

async function loop() {
  while (!stopped) {
    const start = performance.now();
    const t = performance.timeOrigin + start;
    try {
      const [status, ra] = await once();
      records.push([t, performance.now() - start, status, '', ra]);
    } catch (e) {
      records.push([t, performance.now() - start, 0, errorClass(e), null]);
    }
  }
}
await Promise.all(Array.from({ length: concurrency }, loop));
if (session) session.close();
const versions = { node: process.versions.node };
if (args.lib === 'fetch') versions.undici = process.versions.undici;
else versions.nghttp2 = process.versions.nghttp2;
// Exit once the pipe took the whole line (a pipe write is asynchronous in Node).
process.stdout.write(JSON.stringify({ versions, sessions: args.lib === 'http2' ? sessions : undefined, records }) + '\n',
  () => process.exit(0));
