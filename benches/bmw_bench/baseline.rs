//! Figure 1: the raw JetStream ceiling with async-nats on the same kind of
//! server, small messages, file storage. Every other figure is a ratio to it.
//!
//! The stream is a plain work queue (one subject, acks delete), the raw
//! counterpart of `BMW_ASYNC`. A drain ends when the queue is empty: every
//! ack applied, as bmw's figures count a task done only once its ack is
//! confirmed or about to be. Tables before 2026-11-25 used a limits stream,
//! where an ack only moves the consumer's floor: about 1.4x faster to drain,
//! and not what a task queue does.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::env::Server;
use crate::report::{Samples, percentile};

const STREAM: &str = "BENCH_RAW";
const SUBJECT: &str = "bench.raw";
/// Outstanding publish acks.
pub(crate) const WINDOW: usize = 512;
/// About the size of a create command.
const MESSAGE_BYTES: usize = 128;
/// Concurrent awaiting publishers: the raw counterpart of the bridge's 64 connections.
pub(crate) const CONCURRENCY: usize = 64;

/// What the baseline measured, one sample per run.
#[derive(Debug, Default)]
pub(crate) struct Baseline {
    /// Async publish with a window of outstanding acks, msg/s.
    pub(crate) publish: Samples,
    /// Pull + ack of what was published, msg/s.
    pub(crate) drain: Samples,
    /// Publish and drain at once, msg/s (until the last one is acked).
    pub(crate) both: Samples,
    /// The nats-server's CPU time per message (µs) in that run.
    pub(crate) both_server_us: Samples,
    /// 64 publishers each awaiting its ack, msg/s.
    pub(crate) sync64: Samples,
    /// Their p50 latency, ms.
    pub(crate) sync64_p50: Samples,
    /// Their p99 latency, ms.
    pub(crate) sync64_p99: Samples,
}

async fn fresh_stream(js: &jetstream::Context) -> anyhow::Result<stream::Stream> {
    fresh_stream_with(js, stream::RetentionPolicy::WorkQueue).await
}

async fn fresh_stream_with(
    js: &jetstream::Context,
    retention: stream::RetentionPolicy,
) -> anyhow::Result<stream::Stream> {
    let _ = js.delete_stream(STREAM).await;
    Ok(js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            storage: stream::StorageType::File,
            retention,
            ..Default::default()
        })
        .await?)
}

async fn consumer(s: &stream::Stream) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    Ok(s.create_consumer(pull::Config {
        durable_name: Some("drain".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        max_ack_pending: 10_000,
        ..Default::default()
    })
    .await?)
}

async fn publish(js: &jetstream::Context, n: usize, deadline: Instant) -> anyhow::Result<()> {
    let payload = bytes::Bytes::from(vec![b'x'; MESSAGE_BYTES]);
    let mut pending = FuturesUnordered::new();
    for _ in 0..n {
        let ack = js.publish(SUBJECT, payload.clone()).await?;
        pending.push(ack.into_future());
        while pending.len() >= WINDOW {
            pending.next().await.context("ack")??;
        }
        if Instant::now() > deadline {
            bail!("publish did not finish in time");
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(())
}

/// Pulls and acks until `n` distinct messages came (checking there were no
/// gaps), then waits until the server has applied every ack: the work queue
/// is empty. (Up to 2026-12-06 the drain ended with the last message
/// received; its acks, sent without waiting, were still queued at the
/// server. With `sync_interval: always`, where every ack is a write and an
/// fsync, that made 1b look 20 times faster than the acks were applied.)
async fn drain(
    client: &async_nats::Client,
    c: &jetstream::consumer::PullConsumer,
    n: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut seen = vec![false; n + 1];
    let mut distinct = 0;
    let mut messages = c.stream().max_messages_per_batch(500).messages().await?;
    while distinct < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("drain: {distinct} of {n} before the deadline"))?
            .context("consumer ended")??;
        let seq = m
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence as usize;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(seq >= 1 && seq <= n, "unexpected stream sequence {seq}");
        if !seen[seq] {
            seen[seq] = true;
            distinct += 1;
        }
    }
    client.flush().await?;
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream(STREAM).await?;
    let retention = stream.cached_info().config.retention;
    let mut c = c.clone();
    loop {
        // A work queue is empty once every ack is applied; a limits stream
        // keeps its messages, and its consumer's floor reaches the last.
        let left = match retention {
            stream::RetentionPolicy::WorkQueue => stream.info().await?.state.messages,
            _ => {
                let floor = c.info().await?.ack_floor.stream_sequence;
                (n as u64).saturating_sub(floor)
            }
        };
        if left == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "drain: {left} acks not applied by the deadline"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs every baseline measurement `runs` times with `n` messages each.
pub(crate) async fn run(server: &Server, n: usize, runs: usize) -> anyhow::Result<Baseline> {
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    let mut out = Baseline::default();
    for run in 0..runs {
        let deadline = Instant::now() + Duration::from_secs(60);

        let s = fresh_stream(&js).await?;
        let t = Instant::now();
        publish(&js, n, deadline).await?;
        out.publish.push(n as f64 / t.elapsed().as_secs_f64());
        let c = consumer(&s).await?;
        let t = Instant::now();
        drain(&client, &c, n, deadline).await?;
        out.drain.push(n as f64 / t.elapsed().as_secs_f64());

        let s = fresh_stream(&js).await?;
        let c = consumer(&s).await?;
        let server_cpu = || -> f64 {
            crate::async_tasks::server_pids()
                .iter()
                .map(|p| crate::async_tasks::cpu_seconds(p))
                .sum()
        };
        let (t, cpu) = (Instant::now(), server_cpu());
        let producer = {
            let js = js.clone();
            tokio::spawn(async move { publish(&js, n, deadline).await })
        };
        drain(&client, &c, n, deadline).await?;
        producer.await??;
        out.both.push(n as f64 / t.elapsed().as_secs_f64());
        out.both_server_us
            .push((server_cpu() - cpu) * 1e6 / n as f64);

        fresh_stream(&js).await?;
        let (rate, mut lat) = sync_publishers(&js, n, deadline).await?;
        out.sync64.push(rate);
        out.sync64_p50.push(percentile(&mut lat, 50.0));
        out.sync64_p99.push(percentile(&mut lat, 99.0));
        let info = js.get_stream(STREAM).await?.info().await?.state.messages;
        ensure!(info as usize == n, "stream holds {info} messages, not {n}");
        eprintln!(
            "  baseline run {}: publish {:.0}/s, drain {:.0}/s, both {:.0}/s, 64 awaiting {:.0}/s",
            run + 1,
            out.publish.0[run],
            out.drain.0[run],
            out.both.0[run],
            out.sync64.0[run]
        );
    }
    let _ = js.delete_stream(STREAM).await;
    Ok(out)
}

/// Figure 9's raw measurements, once, `n` messages each, msg/s: pull + ack
/// after the publish (1b), publish and drain at once (1c), and 64 awaiting
/// publishers (1d).
pub(crate) async fn drain_both_sync64(server: &Server, n: usize) -> anyhow::Result<[f64; 3]> {
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = fresh_stream(&js).await?;
    publish(&js, n, deadline).await?;
    let c = consumer(&s).await?;
    let t = Instant::now();
    drain(&client, &c, n, deadline).await?;
    let drained = n as f64 / t.elapsed().as_secs_f64();
    let both = both_once(server, n, stream::RetentionPolicy::WorkQueue).await?;
    fresh_stream(&js).await?;
    let (sync64, _) = sync_publishers(&js, n, deadline).await?;
    let _ = js.delete_stream(STREAM).await;
    Ok([drained, both, sync64])
}

/// Publish and drain at once (1c), `n` messages, msg/s, on a stream of
/// `retention`: figure 10 runs it on a work queue (what bmw's `BMW_ASYNC`
/// is) and on a limits stream (what apalis-nats creates: an ack only moves
/// the consumer's floor, no message is deleted).
pub(crate) async fn both_once(
    server: &Server,
    n: usize,
    retention: stream::RetentionPolicy,
) -> anyhow::Result<f64> {
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = fresh_stream_with(&js, retention).await?;
    let c = consumer(&s).await?;
    let t = Instant::now();
    let producer = {
        let js = js.clone();
        tokio::spawn(async move { publish(&js, n, deadline).await })
    };
    drain(&client, &c, n, deadline).await?;
    producer.await??;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = js.delete_stream(STREAM).await;
    Ok(rate)
}

/// 64 publishers, each awaiting its ack before the next publish; returns
/// msg/s and every latency in ms.
async fn sync_publishers(
    js: &jetstream::Context,
    n: usize,
    deadline: Instant,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (js, next) = (js.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let payload = bytes::Bytes::from(vec![b'x'; MESSAGE_BYTES]);
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                if Instant::now() > deadline {
                    bail!("publishers did not finish in time");
                }
                let t = Instant::now();
                js.publish(SUBJECT, payload.clone()).await?.await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for task in tasks {
        all.extend(task.await??);
    }
    ensure!(all.len() == n, "{} of {n} publishes", all.len());
    Ok((n as f64 / t.elapsed().as_secs_f64(), all))
}
