//! The settings' resolution and checks, without a server.

use super::*;
use secrecy::{ExposeSecret, SecretString};

#[test]
fn flags_win_over_file_and_defaults() {
    let flags = ConfigOverrides {
        heartbeat: Some("2s".into()),
        ..Default::default()
    };
    let file: ConfigOverrides = toml::from_str("heartbeat = \"3s\"\nclaim-ttl = \"6s\"").unwrap();
    let c = Config::resolve(flags.or(file)).unwrap();
    assert_eq!(c.heartbeat, Duration::from_secs(2));
    assert_eq!(c.claim_ttl, Duration::from_secs(6));
    assert_eq!(c.retry_base, DEFAULT_RETRY_BASE);
    assert_eq!(c.http_addr.port(), 10211);
    assert_eq!(c.metrics_addr, Some(DEFAULT_METRICS_ADDR.parse().unwrap()));
}

#[test]
fn metrics_addr_is_an_address_or_off() {
    let with = |v: &str| {
        Config::resolve(ConfigOverrides {
            metrics_addr: Some(v.into()),
            ..Default::default()
        })
    };
    assert_eq!(with("off").unwrap().metrics_addr, None);
    assert_eq!(with(" OFF ").unwrap().metrics_addr, None);
    assert_eq!(
        with("127.0.0.1:9100").unwrap().metrics_addr,
        Some("127.0.0.1:9100".parse().unwrap())
    );
    let e = with("nowhere").unwrap_err().to_string();
    assert!(e.contains("metrics-addr") && e.contains("`off`"), "{e}");
}

#[test]
fn otlp_endpoint_is_off_by_default_and_an_http_url_when_given() {
    let with = |v: Option<&str>| {
        Config::resolve(ConfigOverrides {
            otlp_endpoint: v.map(Into::into),
            ..Default::default()
        })
    };
    assert_eq!(with(None).unwrap().otlp_endpoint, None);
    assert_eq!(with(Some(" ")).unwrap().otlp_endpoint, None);
    assert_eq!(
        with(Some("http://127.0.0.1:4318"))
            .unwrap()
            .otlp_endpoint
            .as_deref(),
        Some("http://127.0.0.1:4318")
    );
    let e = with(Some("https://collector:4318"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("otlp-endpoint") && e.contains("http://"), "{e}");
}

#[test]
fn bad_settings_are_named() {
    let cases = [
        (
            ConfigOverrides {
                claim_ttl: Some("1500ms".into()),
                ..Default::default()
            },
            "claim-ttl",
        ),
        (
            ConfigOverrides {
                heartbeat: Some("20s".into()),
                ..Default::default()
            },
            "heartbeat",
        ),
        (
            ConfigOverrides {
                http_addr: Some("nowhere".into()),
                ..Default::default()
            },
            "http-addr",
        ),
        (
            ConfigOverrides {
                grace: Some("later".into()),
                ..Default::default()
            },
            "grace",
        ),
    ];
    for (given, name) in cases {
        match Config::resolve(given) {
            Err(ConfigError::Invalid { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(toml::from_str::<ConfigOverrides>("no-such-key = 1").is_err());
}

#[test]
fn bridge_settings_are_checked_together() {
    let c = Config::default();
    assert!(c.http_addr.ip().is_loopback(), "{}", c.http_addr);
    assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
    assert!(c.api_tokens.is_empty() && c.tls.is_none());
    let cases = [
        (
            ConfigOverrides {
                reply_timeout: Some("30s".into()),
                ..Default::default()
            },
            "request-timeout",
        ),
        (
            ConfigOverrides {
                max_concurrent_requests: Some(0),
                ..Default::default()
            },
            "max-concurrent-requests",
        ),
        (
            ConfigOverrides {
                tls_cert: Some("cert.pem".into()),
                ..Default::default()
            },
            "tls-key",
        ),
        (
            ConfigOverrides {
                tls_key: Some("key.pem".into()),
                ..Default::default()
            },
            "tls-cert",
        ),
        (
            ConfigOverrides {
                metrics_require_token: Some(true),
                ..Default::default()
            },
            "metrics-require-token",
        ),
        (
            ConfigOverrides {
                api_token: Some(vec!["ro:".into()]),
                ..Default::default()
            },
            "api-token",
        ),
    ];
    for (given, name) in cases {
        match Config::resolve(given) {
            Err(ConfigError::Invalid { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    let file: ConfigOverrides =
        toml::from_str("api-token = [\"ro:a\", \"b\"]\nrequest-timeout = \"10s\"").unwrap();
    let c = Config::resolve(file).unwrap();
    let access: Vec<_> = c.api_tokens.iter().map(ApiToken::access).collect();
    assert_eq!(access, [TokenAccess::ReadOnly, TokenAccess::ReadWrite]);
    assert_eq!(c.request_timeout, Duration::from_secs(10));
}

#[test]
fn an_exposed_bridge_needs_a_token_or_the_insecure_flag() {
    let exposed = |extra: ConfigOverrides| {
        Config::resolve(ConfigOverrides {
            http_addr: Some("0.0.0.0:10211".into()),
            ..extra
        })
        .unwrap()
        .check_bridge_exposure()
    };
    let err = exposed(ConfigOverrides::default()).unwrap_err().to_string();
    for needle in [
        "http-addr",
        "--insecure-no-auth",
        "--api-token",
        "not a loopback",
    ] {
        assert!(err.contains(needle), "{err}");
    }
    assert!(
        exposed(ConfigOverrides {
            api_token: Some(vec!["rw:secret".into()]),
            ..Default::default()
        })
        .is_ok()
    );
    assert!(
        exposed(ConfigOverrides {
            insecure_no_auth: Some(true),
            ..Default::default()
        })
        .is_ok()
    );
    for loopback in ["127.0.0.1:1", "127.9.9.9:1", "[::1]:1"] {
        let c = Config::resolve(ConfigOverrides {
            http_addr: Some(loopback.into()),
            ..Default::default()
        })
        .unwrap();
        assert!(c.check_bridge_exposure().is_ok(), "{loopback}");
    }
}

#[test]
fn settings_out_of_range_are_refused() {
    let cases = [
        (
            ConfigOverrides {
                async_ack_wait: Some("0s".into()),
                ..Default::default()
            },
            "async-ack-wait",
        ),
        (
            ConfigOverrides {
                retry_max: Some("100000000years".into()),
                ..Default::default()
            },
            "retry-max",
        ),
        (
            ConfigOverrides {
                async_retry_max: Some("31days".into()),
                ..Default::default()
            },
            "async-retry-max",
        ),
        (
            ConfigOverrides {
                concurrency: Some(usize::MAX),
                ..Default::default()
            },
            "concurrency",
        ),
        (
            ConfigOverrides {
                queues: Some(vec!["a=4294967295".into()]),
                ..Default::default()
            },
            "queues",
        ),
        (
            ConfigOverrides {
                max_task_delay: Some("101years".into()),
                ..Default::default()
            },
            "max-task-delay",
        ),
    ];
    for (given, name) in cases {
        match Config::resolve(given) {
            Err(ConfigError::Invalid { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    let defaults = Config::default();
    assert_eq!(defaults.limits, TaskLimits::default());
    assert_eq!(defaults.demo_kinds, None);
}

mod properties {
    use super::*;
    use crate::task::arbitrary;
    use proptest::prelude::*;

    fn setting() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![
            arbitrary::duration_text(),
            any::<String>(),
            Just("0s".to_owned())
        ])
    }

    prop_compose! {
        fn overrides()(
            durations in prop::array::uniform12(setting()),
            numbers in (prop::option::of(any::<u32>()), prop::option::of(any::<usize>()),
                        prop::option::of(any::<usize>()), prop::option::of(any::<usize>())),
            queues in prop::option::of(prop::collection::vec("[a-z=0-9 ]{0,12}", 0..4)),
            addr in prop::option::of(prop_oneof!["127.0.0.1:[0-9]{1,6}", any::<String>()]),
        ) -> ConfigOverrides {
            let [claim_ttl, heartbeat, retry_base, retry_max, grace, reply_timeout,
                 async_retry_base, async_retry_max, async_ack_wait, max_task_delay,
                 max_task_timeout, max_retention] = durations;
            let (retry_threshold, replicas, max_body, concurrency) = numbers;
            ConfigOverrides {
                http_addr: addr.clone(),
                metrics_addr: addr,
                queues,
                claim_ttl,
                heartbeat,
                retry_base,
                retry_threshold,
                retry_max,
                grace,
                reply_timeout,
                replicas,
                max_body,
                concurrency,
                async_retry_base,
                async_retry_max,
                async_ack_wait,
                max_task_delay,
                max_task_timeout,
                max_retention,
                ..Default::default()
            }
        }
    }

    proptest! {
        #![proptest_config(arbitrary::config())]

        #[test]
        fn any_settings_resolve_within_bounds_or_are_refused_by_name(given in overrides()) {
            match Config::resolve(given) {
                Ok(c) => {
                    prop_assert!(c.async_ack_wait >= Duration::from_secs(1));
                    prop_assert!(c.async_ack_wait <= MAX_WAIT_SETTING);
                    prop_assert!(c.heartbeat < c.claim_ttl && c.claim_ttl <= MAX_WAIT_SETTING);
                    prop_assert!(c.retry_max <= MAX_RETRY_DELAY && c.async_retry_max <= MAX_RETRY_DELAY);
                    prop_assert!((1..=MAX_CONCURRENCY).contains(&c.concurrency));
                    prop_assert!(c.queues.iter().all(|q| (1..=MAX_QUEUE_WEIGHT).contains(&q.weight)));
                }
                Err(ConfigError::Invalid { name, message }) => {
                    prop_assert!(!name.is_empty() && !message.is_empty());
                }
                Err(other) => prop_assert!(false, "not a setting's error: {other}"),
            }
        }
    }
}

#[test]
fn storage_budget_and_inbox_prefix_are_read_and_checked() {
    let resolve = |storage: &str, prefix: &str| {
        Config::resolve(ConfigOverrides {
            storage_max_bytes: Some(storage.into()),
            nats_inbox_prefix: Some(prefix.into()),
            ..Default::default()
        })
    };
    for (text, bytes) in [
        ("8GiB", 8u64 << 30),
        ("500 MB", 500_000_000),
        ("1048576", 1 << 20),
    ] {
        let c = resolve(text, "_INBOX_bmw-worker").unwrap();
        assert_eq!(c.storage_max_bytes, bytes, "{text}");
        assert_eq!(c.nats_inbox_prefix.as_deref(), Some("_INBOX_bmw-worker"));
    }
    for bad in ["", "lots", "4 XB", "1000", "99999999999999999999GiB"] {
        let e = resolve(bad, "_INBOX").unwrap_err().to_string();
        assert!(e.contains("storage-max-bytes"), "{bad}: {e}");
    }
    for bad in ["INBOX", "_INBOX.x", "_INBOX_*", "_INBOX_", "bmw.task"] {
        let e = resolve("4GiB", bad).unwrap_err().to_string();
        assert!(e.contains("nats-inbox-prefix"), "{bad}: {e}");
    }
    let sync = |text: &str| {
        Config::resolve(ConfigOverrides {
            nats_sync: Some(text.into()),
            ..Default::default()
        })
    };
    assert_eq!(sync("2m").unwrap().nats_sync.to_string(), "2m");
    let e = sync("sometimes").unwrap_err().to_string();
    assert!(e.contains("nats-sync"), "{e}");
    let default = Config::resolve(ConfigOverrides::default()).unwrap();
    assert_eq!(default.nats_sync, crate::nats::local::StoreSync::Always);
    let file: ConfigOverrides = toml::from_str("storage-max-bytes = \"2GiB\"").unwrap();
    assert_eq!(Config::resolve(file).unwrap().storage_max_bytes, 2 << 30);
}

#[test]
fn nats_credentials_are_one_way_and_complete() {
    let secret = |s: &str| Some(SecretString::from(s));
    let c = Config::resolve(ConfigOverrides {
        nats_user: Some("bmw".into()),
        nats_password: secret("pw"),
        nats_require_tls: Some(true),
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(c.nats_auth, NatsAuth::UserPassword { ref user, .. } if user == "bmw"));
    assert!(c.nats_tls.require);
    assert!(!format!("{c:?}").contains("pw\""), "{c:?}");
    let file: ConfigOverrides = toml::from_str("nats-token = \"t0k\"").unwrap();
    let c = Config::resolve(file).unwrap();
    assert!(matches!(c.nats_auth, NatsAuth::Token(ref t) if t.expose_secret() == "t0k"));
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    let c = Config::resolve(ConfigOverrides {
        nats_nkey: secret(&seed),
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(c.nats_auth, NatsAuth::Nkey(_)));
    let refused = [
        (
            ConfigOverrides {
                nats_password: secret("pw"),
                ..Default::default()
            },
            "nats-user",
        ),
        (
            ConfigOverrides {
                nats_token: secret("t"),
                nats_nkey: secret(&seed),
                ..Default::default()
            },
            "nats-token",
        ),
        (
            ConfigOverrides {
                nats_key: Some("Cargo.toml".into()),
                ..Default::default()
            },
            "nats-cert",
        ),
        (
            ConfigOverrides {
                nats_nkey: secret("SUnot-a-seed"),
                ..Default::default()
            },
            "nats-nkey",
        ),
    ];
    for (given, name) in refused {
        match Config::resolve(given) {
            Err(e @ ConfigError::Invalid { name: got, .. }) => {
                assert_eq!(got, name, "{e}");
                assert!(!e.to_string().contains("not-a-seed"), "{e}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}
