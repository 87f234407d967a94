// A real EventSource client (the `eventsource` npm package, a WHATWG-compatible
// implementation for Node) against a live imd server: the stream's auth options,
// explicit resume with Last-Event-ID, and — the point of this file — the
// library's OWN automatic reconnect after a network drop, which must send
// Last-Event-ID and get exactly the missed events, in order, once.
//
// The file starts its own server: `go build ./cmd/imd` once, then the binary on
// 127.0.0.1:0 against DATABASE_URL / REDIS_URL (scripts/test exports them; the
// defaults are the README's local services), with a fresh key prefix and, when
// `psql` is on PATH, a fresh PostgreSQL schema (CREATE SCHEMA, then
// search_path=<schema> in the URL, as internal/testenv does; dropped at the
// end). Without psql the server uses the database URL as given, normally the
// public schema; the test still works there because every run uses fresh
// usernames. Redis keys under the prefix are deleted at the end with
// `redis-cli` when it is on PATH (otherwise they expire with the event logs).
//
// Run: npm --prefix tests/node ci && npm --prefix tests/node test

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { EventSource } from 'eventsource';

const run = promisify(execFile);
const repoRoot = fileURLToPath(new URL('../..', import.meta.url));
const hex = (n) => randomBytes(n).toString('hex');

const baseDatabaseURL = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable';
const redisURL = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0';
const runID = hex(4); // usernames of this run: no clash even in a shared public schema

// Every wait in this file is bounded by this (the reconnect delay is 2 s).
const WAIT_MS = 15_000;

// ---------------------------------------------------------------------------
// The live server.

/** @type {{url: string, proc: import('node:child_process').ChildProcess, stderr: () => string, exited: Promise<number|null>}} */
let server;
let workdir;
let schema = ''; // set when we created one
const redisPrefix = `node${hex(8)}:`;

function withSearchPath(dsn, name) {
	if (!/^postgres(ql)?:\/\//.test(dsn)) return `${dsn} search_path=${name}`; // key=value form
	const u = new URL(dsn);
	u.searchParams.set('search_path', name);
	return u.toString();
}

async function psql(sql) {
	await run('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', baseDatabaseURL, '-c', sql], { timeout: 30_000 });
}

async function createSchema() {
	const name = `node_${hex(8)}`;
	try {
		await psql(`CREATE SCHEMA ${name}`);
	} catch (err) {
		if (err.code === 'ENOENT') {
			console.log('# psql not on PATH: the server uses DATABASE_URL as given (its default schema)');
			return baseDatabaseURL;
		}
		throw new Error(`psql: CREATE SCHEMA failed: ${err.stderr || err.message}`);
	}
	schema = name;
	return withSearchPath(baseDatabaseURL, name);
}

async function startServer() {
	workdir = await mkdtemp(join(tmpdir(), 'imd-node-'));
	const bin = join(workdir, 'imd');
	await run('go', ['build', '-o', bin, './cmd/imd'], { cwd: repoRoot, timeout: 300_000 });
	const env = {
		...process.env,
		IMD_ADDR: '127.0.0.1:0',
		DATABASE_URL: await createSchema(),
		REDIS_URL: redisURL,
		IMD_REDIS_PREFIX: redisPrefix,
		IMD_COOKIE_SECURE: 'false',
		IMD_SEND_RATE: '0',
		IMD_LOG_LEVEL: 'warn',
	};
	const proc = spawn(bin, ['serve'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
	let stderr = '';
	proc.stderr.setEncoding('utf8').on('data', (d) => (stderr += d));
	const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve(code ?? signal)));
	const url = await new Promise((resolve, reject) => {
		let out = '';
		const timer = setTimeout(() => reject(new Error(`server did not print its URL within 60s\n${stderr}`)), 60_000);
		proc.stdout.setEncoding('utf8').on('data', (d) => {
			out += d;
			const m = /imd: listening on (http:\/\/\S+)/.exec(out);
			if (m) {
				clearTimeout(timer);
				resolve(m[1]);
			}
		});
		proc.once('error', (err) => (clearTimeout(timer), reject(err)));
		exited.then((code) => (clearTimeout(timer), reject(new Error(`server exited (${code}) before listening\n${stderr}`))));
	});
	server = { url, proc, stderr: () => stderr, exited };
}

async function stopServer() {
	const problems = [];
	if (server) {
		server.proc.kill('SIGTERM');
		const code = await Promise.race([server.exited, sleep(20_000).then(() => 'timeout')]);
		if (code === 'timeout') {
			server.proc.kill('SIGKILL');
			problems.push('server did not exit within 20s of SIGTERM');
		} else if (code !== 0) {
			problems.push(`server exited with ${code}\n${server.stderr()}`);
		}
	}
	if (schema) {
		await psql(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).catch((err) => problems.push(`drop schema: ${err.stderr || err.message}`));
	}
	await deleteRedisKeys().catch((err) => problems.push(`redis cleanup: ${err.stderr || err.message}`));
	if (workdir) await rm(workdir, { recursive: true, force: true });
	if (problems.length) throw new Error(problems.join('\n'));
}

async function deleteRedisKeys() {
	let keys;
	try {
		({ stdout: keys } = await run('redis-cli', ['-u', redisURL, '--scan', '--pattern', `${redisPrefix}*`], { timeout: 30_000 }));
	} catch (err) {
		if (err.code === 'ENOENT') return; // no redis-cli: the keys expire with their TTL
		throw err;
	}
	const list = keys.split('\n').filter(Boolean);
	for (let i = 0; i < list.length; i += 500) {
		await run('redis-cli', ['-u', redisURL, 'UNLINK', ...list.slice(i, i + 500)], { timeout: 30_000 });
	}
}

before(startServer, { timeout: 360_000 });
after(stopServer, { timeout: 60_000 });

// ---------------------------------------------------------------------------
// REST through fetch.

async function api(method, path, { token, body, headers = {} } = {}) {
	const h = { ...headers };
	if (token) h.Authorization = `Bearer ${token}`;
	if (body !== undefined) h['Content-Type'] = 'application/json';
	const res = await fetch(server.url + path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
	const text = await res.text();
	let json;
	try {
		json = text ? JSON.parse(text) : undefined;
	} catch {
		json = undefined;
	}
	return { status: res.status, headers: res.headers, json, text };
}

async function register(name) {
	const username = `${name}-${runID}`;
	const r = await api('POST', '/v1/auth/register', { body: { username, password: `password of ${username}` } });
	assert.equal(r.status, 201, r.text);
	return { id: r.json.user.id, token: r.json.access_token };
}

/** alice and bob (fresh names) with their direct conversation. */
async function pair(tag) {
	const alice = await register(`alice-${tag}`);
	const bob = await register(`bob-${tag}`);
	const r = await api('POST', '/v1/conversations', { token: alice.token, body: { type: 'direct', member_ids: [bob.id] } });
	assert.equal(r.status, 201, r.text);
	return { alice, bob, cid: r.json.id };
}

async function send(from, cid, text) {
	const r = await api('POST', `/v1/conversations/${cid}/messages`, { token: from.token, body: { text } });
	assert.equal(r.status, 201, r.text);
	return r.json;
}

async function ticket(user) {
	const r = await api('POST', '/v1/auth/stream-tickets', { token: user.token });
	assert.equal(r.status, 201, r.text);
	assert.equal(typeof r.json.ticket, 'string');
	return r.json.ticket;
}

// ---------------------------------------------------------------------------
// EventSource helpers.

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A fetch for the eventsource package that adds headers to every request it
 * makes. The library's own headers (Accept, and Last-Event-ID once it has seen
 * an id) come after `initial`, so on a reconnect the library's Last-Event-ID
 * wins over the one we opened with. */
function fetchWith(headers, initial = {}) {
	return (input, init) => fetch(input, { ...init, headers: { ...initial, ...init.headers, ...headers } });
}

/** Records the events of one EventSource and hands them out in order. */
class Recorder {
	static TYPES = ['ready', 'resync', 'message.created'];

	constructor(es) {
		this.es = es;
		this.queue = [];
		this.waiter = null;
		this.opens = 0;
		this.errors = [];
		for (const type of Recorder.TYPES) {
			es.addEventListener(type, (e) => this.#push({ type, id: e.lastEventId, data: JSON.parse(e.data) }));
		}
		es.addEventListener('open', () => this.opens++);
		es.addEventListener('error', (e) => {
			this.errors.push({ code: e.code, message: e.message, readyState: es.readyState });
			this.#wake();
		});
	}

	#push(ev) {
		this.queue.push(ev);
		this.#wake();
	}

	#wake() {
		const w = this.waiter;
		this.waiter = null;
		w?.();
	}

	/** Resolves when cond() holds, re-checked after every event or error. */
	async until(what, cond, ms = WAIT_MS) {
		const deadline = Date.now() + ms;
		while (!cond()) {
			const left = deadline - Date.now();
			if (left <= 0) {
				throw new Error(`timed out after ${ms} ms waiting for ${what}; pending: ${JSON.stringify(this.queue)}; errors: ${JSON.stringify(this.errors)}`);
			}
			await new Promise((resolve) => {
				const t = setTimeout(resolve, left);
				this.waiter = () => (clearTimeout(t), resolve());
			});
		}
	}

	/** The next event (of any recorded type). */
	async next(ms) {
		await this.until('an event', () => this.queue.length > 0, ms);
		return this.queue.shift();
	}

	/** Events up to and including the next `ready`: [before, ready]. */
	async untilReady(ms) {
		const before = [];
		for (;;) {
			const ev = await this.next(ms);
			if (ev.type === 'ready') return [before, ev];
			before.push(ev);
		}
	}

	/** The next n events, each of which must be a message.created. */
	async messages(n, ms) {
		const out = [];
		while (out.length < n) {
			const ev = await this.next(ms);
			assert.equal(ev.type, 'message.created', `expected message.created, got ${JSON.stringify(ev)}`);
			out.push(ev);
		}
		return out;
	}
}

function open(url, init) {
	const es = new EventSource(url, init);
	return { es, rec: new Recorder(es) };
}

/** The message.created events must be exactly `sent`, in order, each with an id. */
function assertDelivered(events, sent, what) {
	assert.deepEqual(
		events.map((e) => [e.type, e.data.id, e.data.seq, e.data.text]),
		sent.map((m) => ['message.created', m.id, m.seq, m.text]),
		what,
	);
	for (const e of events) assert.match(e.id, /\S/, `${what}: a message.created without lastEventId`);
	assert.equal(new Set(events.map((e) => e.id)).size, events.length, `${what}: repeated event ids`);
}

/** Sends a sentinel and checks it is the very next event: nothing (no
 * duplicate, no stray replay) was queued after what the test already read. */
async function assertNothingElse(rec, from, cid) {
	const m = await send(from, cid, 'sentinel');
	const ev = await rec.next();
	assert.deepEqual([ev.type, ev.data.id], ['message.created', m.id], `expected only the sentinel, got ${JSON.stringify(ev)}`);
}

async function sendAll(from, cid, texts) {
	const out = [];
	for (const t of texts) out.push(await send(from, cid, t)); // sequentially: seq order = send order
	return out;
}

const texts = (prefix, n) => Array.from({ length: n }, (_, i) => `${prefix} ${i + 1}`);

// ---------------------------------------------------------------------------
// A cuttable TCP proxy, the stand-in for a network drop. It also records the
// head of the first HTTP request on every connection, so the test can see the
// headers the EventSource library itself sent when it reconnected.

class Proxy {
	constructor(target) {
		this.target = new URL(target);
		this.up = true;
		this.sockets = new Set();
		this.requests = []; // {headers: {lowercased name: value}}
		this.srv = net.createServer((client) => this.#accept(client));
	}

	async listen() {
		await new Promise((resolve) => this.srv.listen(0, '127.0.0.1', resolve));
		this.url = `http://127.0.0.1:${this.srv.address().port}`;
		return this;
	}

	#accept(client) {
		if (!this.up) {
			client.destroy(); // refused: the network is still down
			return;
		}
		const upstream = net.connect(Number(this.target.port), this.target.hostname);
		for (const s of [client, upstream]) {
			this.sockets.add(s);
			s.on('error', () => {});
			s.on('close', () => {
				this.sockets.delete(s);
				client.destroy();
				upstream.destroy();
			});
		}
		let head = '';
		const sniff = (chunk) => {
			head += chunk.toString('latin1');
			const end = head.indexOf('\r\n\r\n');
			if (end < 0) return;
			client.off('data', sniff);
			const headers = {};
			for (const line of head.slice(0, end).split('\r\n').slice(1)) {
				const i = line.indexOf(':');
				headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
			}
			this.requests.push({ line: head.slice(0, head.indexOf('\r\n')), headers });
		};
		client.on('data', sniff);
		client.pipe(upstream);
		upstream.pipe(client);
	}

	/** Cuts every open connection and refuses new ones until restore(). */
	cut() {
		this.up = false;
		for (const s of this.sockets) s.destroy();
	}

	restore() {
		this.up = true;
	}

	close() {
		this.cut();
		return new Promise((resolve) => this.srv.close(resolve));
	}
}

// ---------------------------------------------------------------------------

describe('EventSource against a live imd', { timeout: 120_000 }, () => {
	test('Authorization header (fetch option): ready, live messages, explicit resume with Last-Event-ID', async () => {
		const { alice, bob, cid } = await pair('hdr');
		const auth = { Authorization: `Bearer ${bob.token}` };

		let { es, rec } = open(`${server.url}/v1/events`, { fetch: fetchWith(auth) });
		let lastID;
		try {
			const [before, ready] = await rec.untilReady();
			assert.deepEqual(before, [], 'nothing before ready on a fresh stream');
			assert.equal(ready.id, '', 'ready carries no id');
			assert.equal(typeof ready.data.last_event_id, 'string');
			assert.equal(es.readyState, EventSource.OPEN);

			const first = await sendAll(alice, cid, texts('live', 3));
			const got = await rec.messages(3);
			assertDelivered(got, first, 'live messages');
			lastID = got.at(-1).id;
		} finally {
			es.close();
		}

		// Offline: 5 more, then a NEW EventSource that starts from the last id seen.
		const missed = await sendAll(alice, cid, texts('missed', 5));
		({ es, rec } = open(`${server.url}/v1/events`, { fetch: fetchWith(auth, { 'Last-Event-ID': lastID }) }));
		try {
			const [replayed, ready] = await rec.untilReady();
			assertDelivered(replayed, missed, 'replay after Last-Event-ID');
			assert.equal(ready.data.last_event_id, replayed.at(-1).id, 'ready carries the position after the replay');
			await assertNothingElse(rec, alice, cid);
			assert.equal(rec.opens, 1);
		} finally {
			es.close();
		}
	});

	test("the library's automatic reconnect after a network drop sends Last-Event-ID and gets exactly the missed messages", async () => {
		const { alice, bob, cid } = await pair('drop');
		const proxy = await new Proxy(server.url).listen();
		const { es, rec } = open(`${proxy.url}/v1/events`, { fetch: fetchWith({ Authorization: `Bearer ${bob.token}` }) });
		try {
			await rec.untilReady();
			const live = await sendAll(alice, cid, texts('before the drop', 3));
			const got = await rec.messages(3);
			assertDelivered(got, live, 'live messages');
			const lastID = got.at(-1).id;
			assert.equal(proxy.requests.length, 1);
			assert.equal(proxy.requests[0].headers['last-event-id'], undefined, 'the first request has no Last-Event-ID');

			// The network goes away: the library notices and goes back to CONNECTING.
			proxy.cut();
			await rec.until('the error event of the drop', () => rec.errors.length > 0);
			assert.equal(es.readyState, EventSource.CONNECTING, 'the library must be reconnecting, not closed');

			// Messages sent while bob is cut off; then the network returns and the
			// library reconnects by itself after the server's retry (2000 ms).
			const missed = await sendAll(alice, cid, texts('during the drop', 5));
			proxy.restore();
			const [replayed, ready] = await rec.untilReady();
			assertDelivered(replayed, missed, 'messages of the drop, after the automatic reconnect');
			assert.equal(ready.data.last_event_id, replayed.at(-1).id);
			await assertNothingElse(rec, alice, cid);

			// Proof that the resume was the library's own: the request that
			// succeeded after the drop carried the id of the last event received.
			const resumed = proxy.requests.at(-1);
			assert.ok(proxy.requests.length >= 2, 'the library reconnected through the proxy');
			assert.equal(resumed.headers['last-event-id'], lastID, 'automatic reconnect sends Last-Event-ID');
			assert.equal(resumed.headers.authorization, `Bearer ${bob.token}`);
			assert.equal(rec.opens, 2);
			assert.equal(es.readyState, EventSource.OPEN);
		} finally {
			es.close();
			await proxy.close();
		}
	});

	test('stream ticket (no headers): live messages; single use; resume with a fresh ticket and last_event_id', async () => {
		const { alice, bob, cid } = await pair('tkt');
		const t1 = await ticket(bob);
		const url1 = `${server.url}/v1/events?ticket=${encodeURIComponent(t1)}`;
		let { es, rec } = open(url1); // no fetch option: exactly what a browser does cross-origin
		let lastID;
		try {
			await rec.untilReady();
			const live = await sendAll(alice, cid, texts('ticket', 2));
			const got = await rec.messages(2);
			assertDelivered(got, live, 'live messages on a ticket stream');
			lastID = got.at(-1).id;
		} finally {
			es.close();
		}

		// The ticket was consumed by that stream.
		const again = await api('GET', `/v1/events?ticket=${encodeURIComponent(t1)}`, { headers: { Accept: 'text/event-stream' } });
		assert.equal(again.status, 401, again.text);
		assert.equal(again.headers.get('content-type'), 'application/problem+json');

		// A new EventSource cannot set Last-Event-ID, so it resumes with a fresh
		// ticket and the last_event_id query parameter.
		const missed = await sendAll(alice, cid, texts('after ticket stream', 2));
		const t2 = await ticket(bob);
		({ es, rec } = open(`${server.url}/v1/events?ticket=${encodeURIComponent(t2)}&last_event_id=${encodeURIComponent(lastID)}`));
		try {
			const [replayed] = await rec.untilReady();
			assertDelivered(replayed, missed, 'replay with ?last_event_id on a ticket stream');
			await assertNothingElse(rec, alice, cid);
		} finally {
			es.close();
		}
	});
});
