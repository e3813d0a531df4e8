use super::record::*;
use crate::etcd::fake::FakeEtcd;
use crate::etcd::Answer;
use crate::guard::{Figure, Window};
use proptest::prelude::*;

fn call<T>(
    etcd: &FakeEtcd,
    r: &crate::etcd::Request,
    parse: fn(&Answer) -> Result<T, crate::etcd::Error>,
) -> Result<T, crate::etcd::Error> {
    let (status, body) = etcd.call(r);
    parse(&Answer {
        status,
        body: &body,
    })
}

fn full() -> Record {
    Record {
        state: State::Aborted,
        percent: Some(1250),
        updated_ms: 1_764_620_000_000,
        by: "fleet:0123456789abcdef".to_string(),
        reason: "errors 23.1% (231/1000) vs stable 0.4% (4/1000), 2 windows of 10 s \"q\""
            .to_string(),
        window: Some(FleetWindow {
            window: 176_462_000,
            window_s: 10,
            envoys: 3,
            bad_windows: 2,
            bad_errors: true,
            bad_latency: false,
            quantile: 9990,
            stable: Figure {
                requests: 1000,
                errors: 4,
                quantile_us: 12_345,
            },
            canary: Figure {
                requests: 1000,
                errors: 231,
                quantile_us: 1_000,
            },
        }),
    }
}

#[test]
fn a_record_reads_back_as_written() {
    let r = full();
    assert_eq!(Record::decode(&r.encode()), Ok(r.clone()));
    let text = String::from_utf8(r.encode()).unwrap();
    assert!(text.contains(r#""percent":12.5"#), "{text}");
    assert!(text.contains(r#""quantile_ms":12.345"#), "{text}");
    assert!(text.contains(r#""quantile":0.999"#), "{text}");
    let plain = Record::absent().resumed(5, "handoffctl");
    assert_eq!(Record::decode(&plain.encode()), Ok(plain));
}

#[test]
fn readers_ignore_unknown_keys_and_take_defaults() {
    let r = Record::decode(br#"{"state":"active","future":{"x":1}}"#).unwrap();
    assert_eq!(r, Record::absent());
    let r = Record::decode(br#"{"state":"aborted","percent":30,"by":"handoffctl"}"#).unwrap();
    assert_eq!((r.state, r.percent), (State::Aborted, Some(3000)));
}

#[test]
fn bad_records_name_the_field() {
    for (bytes, field) in [
        (&b"not json"[..], ""),
        (br#"[1]"#, ""),
        (br#"{"percent":3}"#, "state"),
        (br#"{"state":"paused"}"#, "state"),
        (br#"{"state":"active","percent":101}"#, "percent"),
        (br#"{"state":"active","percent":"30"}"#, "percent"),
        (br#"{"state":"active","updated_ms":-1}"#, "updated_ms"),
        (br#"{"state":"active","by":3}"#, "by"),
        (
            br#"{"state":"active","window":{"window":1}}"#,
            "window.stable",
        ),
        (br#"{"state":"active","state":"aborted"}"#, "state"),
    ] {
        let e = Record::decode(bytes).unwrap_err();
        assert!(
            e.contains(field),
            "{e} for {}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn a_long_reason_is_cut_on_a_character() {
    let r = Record::absent().aborted(1, "handoffctl", &"é".repeat(400));
    let back = Record::decode(&r.encode()).unwrap();
    assert_eq!(back.reason.len(), MAX_REASON);
}

#[test]
fn transitions_keep_what_they_do_not_change() {
    let r = full();
    let resumed = r.resumed(9, "handoffctl");
    assert_eq!(resumed.state, State::Active);
    assert_eq!((resumed.percent, &resumed.window), (r.percent, &r.window));
    let p = resumed.with_percent(3000, 10, "handoffctl");
    assert_eq!(
        (p.state, p.percent, p.updated_ms),
        (State::Active, Some(3000), 10)
    );
    let a = p.aborted(11, "envoy:ab", "why");
    assert_eq!(
        (a.state, a.percent, a.window),
        (State::Aborted, Some(3000), r.window)
    );
}

#[test]
fn writes_are_compare_and_swap() {
    let etcd = FakeEtcd::new();
    let (p, s) = (DEFAULT_PREFIX, "exp");
    let first = call(&etcd, &read(p, s), parse_read).unwrap();
    assert_eq!(first.record, None);
    assert_eq!(first.in_force(), Some(Record::absent()));
    let a = Record::absent().aborted(1, "handoffctl", "test");
    let Written::Done(rev) = call(&etcd, &write(p, s, &a, None), parse_write).unwrap() else {
        panic!("first write lost")
    };
    // A second writer that still thinks the record is absent loses, and learns it.
    let b = Record::absent().with_percent(3000, 2, "handoffctl");
    match call(&etcd, &write(p, s, &b, None), parse_write).unwrap() {
        Written::Lost(read) => {
            assert_eq!(read.revision, Some(rev));
            assert_eq!(read.in_force(), Some(a.clone()));
        }
        other => panic!("{other:?}"),
    }
    let c = a.resumed(3, "handoffctl");
    assert!(matches!(
        call(&etcd, &write(p, s, &c, Some(rev)), parse_write).unwrap(),
        Written::Done(_)
    ));
    let now = call(&etcd, &read(p, s), parse_read).unwrap();
    assert_eq!(now.in_force(), Some(c));
    assert_eq!(
        etcd.value(&record_key(p, s)),
        Some(now.record.unwrap().unwrap().encode())
    );
}

#[test]
fn garbage_in_the_key_is_not_in_force() {
    let etcd = FakeEtcd::new();
    etcd.apply_silently(&crate::etcd::put("/p/s", b"\xff garbage", None));
    let r = call(&etcd, &read("/p/", "s"), parse_read).unwrap();
    assert!(r.revision.is_some());
    assert!(matches!(r.record, Some(Err(_))));
    assert_eq!(r.in_force(), None);
}

#[test]
fn keys() {
    assert_eq!(record_key("/h/", "s1"), "/h/s1");
    assert_eq!(counts_key("/h/", "s1", "00ff"), "/h/s1/counts/00ff");
    assert!(counts_key("/h/", "s1", "00ff").starts_with(&counts_prefix("/h/", "s1")));
    assert_eq!(leader_key("/h/", "s1"), "/h/s1/leader");
}

#[test]
fn counts_read_back() {
    let mut w = Window::default();
    w.stable.record(1_200, false);
    w.stable.record(90_000, true);
    w.canary.record(500_000_000, true);
    let b = encode_counts(42, &w);
    assert_eq!(decode_counts(&b), Some((42, w)));
    assert_eq!(decode_counts(&b[..b.len() - 1]), None);
    assert_eq!(decode_counts(&[b, vec![0]].concat()), None);
    assert!(
        decode_counts(&encode_counts(1, &Window::default()))
            .unwrap()
            .0
            == 1
    );
}

proptest! {
    #[test]
    fn any_bytes_decode_without_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Record::decode(&b);
        let _ = decode_counts(&b);
    }

    #[test]
    fn any_text_record_decodes_without_panic(s in r#"\{"state":"(active|aborted)"(,"[a-z_]{1,10}":(-?[0-9.e]{1,8}|"[^"]{0,5}"|\{\}|null|true))*\}"#) {
        let _ = Record::decode(s.as_bytes());
    }
}

mod control {
    use crate::canary::{Assignment, Reason, Variant};
    use crate::rollout::{poller, Control};
    use crate::shared::Step;

    fn hashed(bucket: u32, threshold: u32) -> Assignment {
        Assignment {
            variant: if bucket < threshold {
                Variant::Canary
            } else {
                Variant::Stable
            },
            reason: Reason::Hash,
            bucket: Some(bucket),
            set_cookie: None,
            override_rejected: false,
        }
    }

    #[test]
    fn a_percent_moves_users_one_way_only() {
        let up = Control {
            aborted: false,
            threshold: Some(3000),
        };
        let down = Control {
            aborted: false,
            threshold: Some(500),
        };
        for b in (0..10_000).step_by(7) {
            let before = hashed(b, 1000);
            let raised = up.apply(before.clone());
            let lowered = down.apply(before.clone());
            if before.variant == Variant::Canary {
                assert_eq!(raised.variant, Variant::Canary, "{b}");
            } else {
                assert_eq!(lowered.variant, Variant::Stable, "{b}");
            }
            assert_eq!(raised.variant == Variant::Canary, b < 3000);
        }
    }

    #[test]
    fn an_abort_is_the_guards_and_explicit_choices_stay() {
        let abort = Control {
            aborted: true,
            threshold: Some(10_000),
        };
        let a = abort.apply(hashed(1, 5000));
        assert_eq!((a.variant, a.reason), (Variant::Stable, Reason::Aborted));
        let all = Control {
            aborted: false,
            threshold: Some(10_000),
        };
        for reason in [Reason::Deny, Reason::Override, Reason::Unidentified] {
            let a = Assignment {
                reason,
                variant: Variant::Stable,
                ..hashed(1, 0)
            };
            assert_eq!(all.apply(a).variant, Variant::Stable, "{reason:?}");
        }
        assert_eq!(Control::default().apply(hashed(1, 5000)), hashed(1, 5000));
    }

    #[test]
    fn control_reads_back() {
        for c in [
            Control::default(),
            Control {
                aborted: true,
                threshold: Some(3000),
            },
            Control {
                aborted: false,
                threshold: Some(0),
            },
        ] {
            assert_eq!(Control::decode(&c.encode()), Some(c));
        }
        assert_eq!(Control::decode(&[1, 2]), None);
        assert_eq!(Control::decode(&[1, 0, 1]), None);
        assert_eq!(Control::decode(&[]), None);
    }

    #[test]
    fn one_poller_until_its_hold_lapses() {
        let Step::Write(mine, true) = poller(None, 1, 1000, 500) else {
            panic!("free")
        };
        assert!(matches!(
            poller(Some(&mine), 2, 1400, 500),
            Step::Keep(false)
        ));
        assert!(matches!(
            poller(Some(&mine), 1, 1400, 500),
            Step::Write(_, true)
        ));
        assert!(matches!(
            poller(Some(&mine), 2, 1500, 500),
            Step::Write(_, true)
        ));
        assert!(matches!(
            poller(Some(b"junk"), 2, 0, 500),
            Step::Write(_, true)
        ));
    }
}

mod config {
    use crate::config::Config;
    use serde_json::{json, Value};

    fn with_control(etcd: Value) -> Result<Config, String> {
        let v = json!({"canary": {"salt": "s", "percent": 10, "user_id": [{"header": "x-user-id"}],
            "control": {"etcd": etcd}}});
        Config::parse(v.to_string().as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = with_control(json!({"cluster": "etcd", "authority": "etcd.local"})).unwrap();
        let e = c.canary.unwrap().control.unwrap();
        assert_eq!(e.prefix, "/handoff/rollout/");
        assert_eq!((e.poll_ms, e.timeout_ms, e.lease_ttl_s), (1000, 250, 10));
        assert_eq!(e.authority, "etcd.local");
    }

    #[test]
    fn each_rejection_names_its_field() {
        let base = json!({"cluster": "etcd", "authority": "etcd"});
        for (key, bad) in [
            ("cluster", json!("")),
            ("authority", json!("")),
            ("prefix", json!("/no-slash")),
            ("prefix", json!("rel/")),
            ("poll_ms", json!(99)),
            ("poll_ms", json!(60_001)),
            ("timeout_ms", json!(0)),
            ("timeout_ms", json!(1000)),
            ("lease_ttl_s", json!(1)),
            ("lease_ttl_s", json!(301)),
            ("poll_ms", json!("1s")),
            ("extra", json!(1)),
        ] {
            let mut etcd = base.clone();
            etcd[key] = bad.clone();
            let e = with_control(etcd).unwrap_err();
            let path = if key == "extra" {
                "canary.control.etcd".to_string()
            } else {
                format!("canary.control.etcd.{key}")
            };
            assert!(e.contains(&path), "{key}={bad}: {e}");
        }
        for missing in ["cluster", "authority"] {
            let mut etcd = base.clone();
            etcd.as_object_mut().unwrap().remove(missing);
            let e = with_control(etcd).unwrap_err();
            assert!(
                e.contains("canary.control.etcd") && e.contains(missing),
                "{e}"
            );
        }
    }
}
