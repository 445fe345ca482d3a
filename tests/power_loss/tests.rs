//! The power-loss tests: the filesystem's model first, then the scenarios.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use bmw::nats::local::StoreSync;

use crate::scenario;

/// `scripts/fuse-env`, once per run: fuse3 installed when missing.
fn fuse_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fuse-env");
        let out = std::process::Command::new(&script)
            .output()
            .expect("scripts/fuse-env runs");
        assert!(
            out.status.success(),
            "FUSE is not usable here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Prints the table header and a row (also appended to `power-loss-report.md`).
fn publish(outcome: &scenario::Outcome, what: &str) {
    let row = format!("| {what} {}", outcome.row());
    eprintln!(
        "| store | sync | power lost after | acknowledged creates lost, by path | lost | unsynced data dropped |\n\
         | --- | --- | --- | --- | --- | --- |\n{row}"
    );
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("power-loss-report.md");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        use std::io::Write;
        let _ = writeln!(file, "{row}");
    }
}

/// The model: synced data survives a power loss, unsynced data does not,
/// and names survive at once (a file created and never synced is empty).
#[test]
fn the_test_filesystem_keeps_only_what_was_synced() {
    fuse_ready();
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    let fs = scenario::mount(&backing, &mnt);
    let synced = std::fs::File::create(mnt.join("synced")).unwrap();
    synced.write_all_at(b"kept", 0).unwrap();
    synced.sync_all().unwrap();
    synced.write_all_at(b" and lost", 4).unwrap();
    let unsynced = std::fs::File::create(mnt.join("unsynced")).unwrap();
    unsynced.write_all_at(b"lost", 0).unwrap();
    assert_eq!(std::fs::read(mnt.join("synced")).unwrap(), b"kept and lost");
    assert_eq!(std::fs::read(mnt.join("unsynced")).unwrap(), b"lost");
    let dropped = fs.power_loss();
    assert!(
        std::fs::read(mnt.join("synced")).is_err(),
        "no I/O after the power loss"
    );
    drop((synced, unsynced));
    fs.unmount().unwrap();
    assert_eq!(dropped.files, 2, "{dropped:?}");
    assert_eq!(dropped.bytes, 9 + 4, "{dropped:?}");

    let fs = scenario::mount(&backing, &mnt);
    assert_eq!(std::fs::read(mnt.join("synced")).unwrap(), b"kept");
    assert_eq!(std::fs::read(mnt.join("unsynced")).unwrap(), b"");
    fs.unmount().unwrap();
}

/// `sync_interval: always` (bmw's default): no acknowledged create of any
/// path is lost, and the store did write durably (the test saw syncs).
#[tokio::test(flavor = "multi_thread")]
async fn durable_single_node_loses_nothing_acknowledged() {
    fuse_ready();
    let dir = tempfile::tempdir().unwrap();
    let outcome = scenario::run(dir.path(), StoreSync::Always, 1).await;
    publish(&outcome, "single node");
    for (path, (acked, _)) in &outcome.paths {
        assert!(
            *acked > 0,
            "{path}: nothing acknowledged before the power loss: {outcome:?}"
        );
    }
    assert_eq!(outcome.lost(), 0, "acknowledged creates lost: {outcome:?}");
}

/// nats-server's default, `sync_interval: 2m`: the loss is measured and
/// reported (the table of `docs/operations.md`), not asserted.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the power-loss suite: run with -- --ignored --test-threads 1 --nocapture"]
async fn interval_single_node_loss_is_reported() {
    fuse_ready();
    let dir = tempfile::tempdir().unwrap();
    let every = StoreSync::Every(std::time::Duration::from_secs(120));
    let outcome = scenario::run(dir.path(), every, 1).await;
    publish(&outcome, "single node");
    let acked: usize = outcome.paths.values().map(|(a, _)| a).sum();
    assert!(
        acked > 0,
        "nothing acknowledged before the power loss: {outcome:?}"
    );
}

/// A 3-node cluster (R3) whose nodes all lose power at once, `always`:
/// no acknowledged create lost.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the power-loss suite: run with -- --ignored --test-threads 1 --nocapture"]
async fn durable_cluster_losing_every_node_at_once_loses_nothing_acknowledged() {
    fuse_ready();
    let dir = tempfile::tempdir().unwrap();
    let outcome = scenario::run(dir.path(), StoreSync::Always, 3).await;
    publish(&outcome, "3 nodes, all at once");
    for (path, (acked, _)) in &outcome.paths {
        assert!(
            *acked > 0,
            "{path}: nothing acknowledged before the power loss: {outcome:?}"
        );
    }
    assert_eq!(outcome.lost(), 0, "acknowledged creates lost: {outcome:?}");
}

/// The same cluster at nats-server's default interval: reported.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the power-loss suite: run with -- --ignored --test-threads 1 --nocapture"]
async fn interval_cluster_losing_every_node_at_once_loss_is_reported() {
    fuse_ready();
    let dir = tempfile::tempdir().unwrap();
    let every = StoreSync::Every(std::time::Duration::from_secs(120));
    let outcome = scenario::run(dir.path(), every, 3).await;
    publish(&outcome, "3 nodes, all at once");
    let acked: usize = outcome.paths.values().map(|(a, _)| a).sum();
    assert!(
        acked > 0,
        "nothing acknowledged before the power loss: {outcome:?}"
    );
}
