// The BullMQ peer of bmw's bench (figure 10): one Node process holding a
// BullMQ Worker (concurrency --concurrency, a noop processor) and a producer
// (a Queue) that adds --tasks jobs with `addBulk` in chunks of --bulk while
// the worker drains them, against the redis-server at --redis-port.
//
//   node bench.mjs --redis-port 6379 --tasks 20000 --concurrency 64 --timeout 60
//
// One warm-up job runs first (the worker's connection and blocking fetch are
// up); the timer then runs from the first addBulk to the last job completed
// (the worker's `completed` event, emitted once the job is moved to
// completed in redis). Jobs are removed on completion (`removeOnComplete`),
// as a queue under load is usually run. Every job carries its index: the run
// fails (exit 1) unless each of the --tasks indices completed. Everything is
// bounded by --timeout. Prints one JSON line on stdout.

import { performance } from 'node:perf_hooks';
import { Queue, Worker } from 'bullmq';

const usage =
  'usage: node bench.mjs --redis-port PORT --tasks N [--redis-host 127.0.0.1] ' +
  '[--concurrency 64] [--timeout SECONDS] [--bulk JOBS]';

function parseArgs(argv) {
  const args = { host: '127.0.0.1', port: 0, tasks: 0, concurrency: 64, timeout: 60, bulk: 1000 };
  const names = {
    '--redis-host': 'host',
    '--redis-port': 'port',
    '--tasks': 'tasks',
    '--concurrency': 'concurrency',
    '--timeout': 'timeout',
    '--bulk': 'bulk',
  };
  for (let k = 0; k < argv.length; k += 2) {
    const key = names[argv[k]];
    const value = argv[k + 1];
    if (!key || value === undefined) throw new Error(`bad argument ${argv[k]}; ${usage}`);
    if (key === 'host') {
      args.host = value;
    } else {
      const n = Number(value);
      if (!Number.isInteger(n) || n < 0) throw new Error(`${argv[k]}: ${value}; ${usage}`);
      args[key] = n;
    }
  }
  if (!args.port || !args.tasks || !args.concurrency || !args.bulk) throw new Error(usage);
  return args;
}

async function run(args) {
  const n = args.tasks;
  const name = 'bmw-bench';
  const connection = { host: args.host, port: args.port };
  const seen = new Uint8Array(n);
  let distinct = 0;
  let duplicates = 0;
  let failed = 0;
  let last = 0;
  let warm;
  const warmed = new Promise((resolve) => (warm = resolve));
  let allDone;
  const finished = new Promise((resolve) => (allDone = resolve));

  const queue = new Queue(name, {
    connection,
    defaultJobOptions: { removeOnComplete: true, removeOnFail: 1000 },
  });
  const worker = new Worker(name, async () => {}, {
    // BullMQ's advice for a Worker's connection.
    connection: { ...connection, maxRetriesPerRequest: null },
    concurrency: args.concurrency,
  });
  worker.on('completed', (job) => {
    const i = job.data.i;
    if (i === n) {
      warm();
      return;
    }
    if (seen[i]) {
      duplicates += 1;
      return;
    }
    seen[i] = 1;
    distinct += 1;
    last = performance.now();
    if (distinct === n) allDone();
  });
  worker.on('failed', () => {
    failed += 1;
  });
  let workerError;
  worker.on('error', (e) => {
    workerError = e;
  });
  // Every wait below ends by the deadline.
  const deadline = Date.now() + args.timeout * 1000;
  const timers = [];
  const by = (promise, what) => {
    const left = Math.max(deadline - Date.now(), 0);
    return Promise.race([
      promise,
      new Promise((_, reject) => {
        timers.push(
          setTimeout(() => reject(new Error(`${what}: not done within ${args.timeout} s`)), left),
        );
      }),
    ]);
  };
  try {
    await by(worker.waitUntilReady(), 'worker connection');
    await by(queue.waitUntilReady(), 'queue connection');
    await by(queue.add('noop', { i: n }), 'warm-up add');
    await by(warmed, 'warm-up job');
    const started = performance.now();
    for (let first = 0; first < n; first += args.bulk) {
      const jobs = [];
      for (let i = first; i < Math.min(n, first + args.bulk); i++) {
        jobs.push({ name: 'noop', data: { i } });
      }
      await by(queue.addBulk(jobs), `addBulk from ${first}`);
    }
    const enqueued = (performance.now() - started) / 1000;
    await by(finished, `${n} jobs`);
    const seconds = Math.max((last - started) / 1000, 1e-6);
    if (failed > 0) throw new Error(`${failed} jobs failed`);
    return {
      peer: 'bullmq',
      tasks: n,
      done: distinct,
      duplicates,
      concurrency: args.concurrency,
      producer: `addBulk ${args.bulk}`,
      seconds,
      rate: n / seconds,
      enqueue_seconds: enqueued,
    };
  } finally {
    timers.forEach(clearTimeout);
    if (distinct < n) {
      process.stderr.write(
        `${distinct} of ${n} jobs completed, ${failed} failed, ${duplicates} duplicates` +
          (workerError ? `; worker error: ${workerError}` : '') +
          '\n',
      );
    }
    // Closing is bounded too: the process exits after it whatever happens.
    await Promise.race([
      Promise.allSettled([worker.close(true), queue.close()]),
      new Promise((resolve) => setTimeout(resolve, 5000).unref()),
    ]);
  }
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`${e.message}\n`);
    process.exit(2);
  }
  // A backstop: run() ends by its deadline, closing included.
  const timer = setTimeout(() => {
    process.stderr.write(`bullmq peer failed: still running ${args.timeout + 10} s after start\n`);
    process.exit(1);
  }, (args.timeout + 10) * 1000);
  try {
    const line = await run(args);
    process.stdout.write(`${JSON.stringify(line)}\n`);
    process.exit(0);
  } catch (e) {
    process.stderr.write(`bullmq peer failed: ${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
  } finally {
    clearTimeout(timer);
  }
}

main();
