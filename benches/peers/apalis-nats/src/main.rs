//! The apalis-nats peer of bmw's bench (figure 10): one process holding an
//! apalis worker (concurrency `--concurrency`, a pull consumer on a durable
//! JetStream consumer, as apalis-nats's `pull` example sets it up) and a
//! producer that pushes `--tasks` noop jobs through apalis-nats's own sink
//! while the worker drains them.
//!
//! ```text
//! apalis-nats-peer --nats-url nats://127.0.0.1:4222 --tasks 20000 --concurrency 64 --timeout 60
//! ```
//!
//! One warm-up job runs first (stream, consumer and the worker's pulls are
//! up); the timer then runs from the first push to the last job done (the
//! handler returned; apalis-nats acks after it). Every job carries its index:
//! the run fails (exit 1) unless each of the `--tasks` indices was run.
//! Everything is bounded by `--timeout`. Prints one JSON line on stdout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_nats::{Config, NatsJetStream};
use async_nats::jetstream::consumer::pull;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One noop job: its index (the warm-up job has index `tasks`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    i: usize,
}

/// Which jobs ran, how often, and when the last new one finished.
#[derive(Debug)]
struct Tally {
    state: Mutex<State>,
    /// Distinct measured jobs done so far.
    done: watch::Sender<usize>,
    /// Set when the warm-up job ran.
    warm: watch::Sender<bool>,
    tasks: usize,
}

#[derive(Debug)]
struct State {
    seen: Vec<bool>,
    distinct: usize,
    duplicates: usize,
    unknown: usize,
    last: Option<Instant>,
}

impl Tally {
    fn new(tasks: usize) -> Tally {
        Tally {
            state: Mutex::new(State {
                seen: vec![false; tasks],
                distinct: 0,
                duplicates: 0,
                unknown: 0,
                last: None,
            }),
            done: watch::Sender::new(0),
            warm: watch::Sender::new(false),
            tasks,
        }
    }

    fn record(&self, i: usize) {
        if i == self.tasks {
            self.warm.send_replace(true);
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.seen.get(i).copied() {
            Some(false) => {
                s.seen[i] = true;
                s.distinct += 1;
                s.last = Some(now);
                let distinct = s.distinct;
                drop(s);
                self.done.send_replace(distinct);
            }
            Some(true) => s.duplicates += 1,
            None => s.unknown += 1,
        }
    }
}

/// The job: nothing but counting it.
async fn noop(job: Job, tally: Data<Arc<Tally>>) -> Result<(), BoxDynError> {
    tally.record(job.i);
    Ok(())
}

#[derive(Debug)]
struct Args {
    url: String,
    tasks: usize,
    concurrency: usize,
    timeout: Duration,
    /// Jobs per `push_bulk`; 0: one `push` per job.
    bulk: usize,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: apalis-nats-peer --nats-url URL --tasks N [--concurrency 64] \
                 [--timeout SECONDS] [--bulk JOBS]";
    let mut args = Args {
        url: String::new(),
        tasks: 0,
        concurrency: 64,
        timeout: Duration::from_secs(60),
        bulk: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{arg} needs a value; {usage}"))
        };
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|e| format!("{arg}: {v}: {e}; {usage}"))
        };
        match arg.as_str() {
            "--nats-url" => args.url = value()?,
            "--tasks" => args.tasks = number(value()?)?,
            "--concurrency" => args.concurrency = number(value()?)?,
            "--timeout" => args.timeout = Duration::from_secs(number(value()?)? as u64),
            "--bulk" => args.bulk = number(value()?)?,
            _ => return Err(format!("unknown argument {arg}; {usage}")),
        }
    }
    if args.url.is_empty() || args.tasks == 0 || args.concurrency == 0 {
        return Err(usage.to_owned());
    }
    Ok(args)
}

type Backend = NatsJetStream<Job, pull::Config>;

/// The queue: apalis-nats's stream name and subject.
const QUEUE: &str = "bmw_bench_apalis";

async fn connect(url: &str) -> Result<async_nats::Client, String> {
    async_nats::connect(url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))
}

/// After the run (not timed): waits until the consumer holds no job that is
/// unacknowledged or undelivered, so every job was not only run but acked.
async fn settled(client: async_nats::Client, deadline: tokio::time::Instant) -> Result<(), String> {
    let js = async_nats::jetstream::new(client);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(format!("{QUEUE}-queue"), QUEUE)
        .await
        .map_err(|e| format!("consumer info: {e}"))?;
    // Bounded: at most 1,000 looks, and by the deadline.
    for _ in 0..1_000 {
        let info = consumer
            .info()
            .await
            .map_err(|e| format!("consumer info: {e}"))?;
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "all jobs ran, but {} unacknowledged and {} undelivered remain",
                info.num_ack_pending, info.num_pending
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the consumer did not settle".to_owned())
}

/// Waits until `rx` holds a value that `ok` accepts, at most until `deadline`.
async fn wait<T>(
    rx: &mut watch::Receiver<T>,
    deadline: tokio::time::Instant,
    ok: impl FnMut(&T) -> bool,
) -> bool {
    matches!(
        tokio::time::timeout_at(deadline, rx.wait_for(ok)).await,
        Ok(Ok(_))
    )
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    let deadline = tokio::time::Instant::now() + args.timeout;
    let n = args.tasks;
    // A durable pull consumer shared by every backend of this queue, as the
    // crate's `pull` example (a push consumer per backend would deliver each
    // job to every backend, the producer's included).
    let config = Config::new(QUEUE).with_pull_consumer().durable();
    // The worker and the producer each on their own connection (bmw's bench
    // publishes on another connection than its worker's, too).
    let worker_backend: Backend =
        NatsJetStream::new(connect(&args.url).await?).with_config(config.clone());
    let producer_client = connect(&args.url).await?;
    let mut producer: Backend = NatsJetStream::new(producer_client.clone()).with_config(config);
    let tally = Arc::new(Tally::new(n));
    let worker = WorkerBuilder::new("bmw-bench-apalis")
        .backend(worker_backend)
        .data(tally.clone())
        .concurrency(args.concurrency)
        .build(noop);
    let worker = tokio::spawn(worker.run());

    // Warm-up: the stream, the durable consumer and the worker's pulls.
    producer
        .push(Job { i: n })
        .await
        .map_err(|e| format!("warm-up push: {e}"))?;
    let warm_by = (tokio::time::Instant::now() + Duration::from_secs(30)).min(deadline);
    if !wait(&mut tally.warm.subscribe(), warm_by, |w| *w).await {
        return Err(if worker.is_finished() {
            format!("the worker stopped: {:?}", worker.await)
        } else {
            "the warm-up job did not run within 30 s".to_owned()
        });
    }

    let mut done = tally.done.subscribe();
    let started = Instant::now();
    if args.bulk == 0 {
        for i in 0..n {
            producer
                .push(Job { i })
                .await
                .map_err(|e| format!("push {i}: {e}"))?;
            if tokio::time::Instant::now() > deadline {
                return Err(format!("pushed {i} of {n} by the deadline"));
            }
        }
    } else {
        for first in (0..n).step_by(args.bulk) {
            let jobs = (first..n.min(first + args.bulk))
                .map(|i| Job { i })
                .collect();
            producer
                .push_bulk(jobs)
                .await
                .map_err(|e| format!("push_bulk from {first}: {e}"))?;
            if tokio::time::Instant::now() > deadline {
                return Err(format!("pushed {first} of {n} by the deadline"));
            }
        }
    }
    let enqueued = started.elapsed().as_secs_f64();
    let all = wait(&mut done, deadline, |d| *d >= n).await;
    let (seconds, distinct, duplicates) = {
        let s = tally.state.lock().unwrap_or_else(|e| e.into_inner());
        if !all {
            return Err(format!(
                "{} of {n} jobs done within {:?} ({} duplicates)",
                s.distinct, args.timeout, s.duplicates
            ));
        }
        if s.unknown > 0 {
            return Err(format!("{} jobs with an unknown index ran", s.unknown));
        }
        let last = s.last.ok_or("no job done")?;
        let seconds = last.duration_since(started).as_secs_f64().max(1e-6);
        (seconds, s.distinct, s.duplicates)
    };
    settled(producer_client, deadline).await?;
    Ok(serde_json::json!({
        "peer": "apalis-nats",
        "tasks": n,
        "done": distinct,
        "duplicates": duplicates,
        "concurrency": args.concurrency,
        "producer": if args.bulk == 0 { "push".to_owned() } else { format!("push_bulk {}", args.bulk) },
        "seconds": seconds,
        "rate": n as f64 / seconds,
        "enqueue_seconds": enqueued,
    }))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    // The whole run, connection and warm-up included, within the timeout
    // (and a little more for the connections' own time-outs).
    let limit = args.timeout + Duration::from_secs(5);
    match tokio::time::timeout(limit, run(args)).await {
        Ok(Ok(line)) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("apalis-nats peer failed: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("apalis-nats peer failed: not done within {limit:?}");
            std::process::ExitCode::FAILURE
        }
    }
}
