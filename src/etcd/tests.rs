use super::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;
use serde_json::Value;

fn json(r: &Request) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn ok(body: &str) -> Answer<'_> {
    Answer {
        status: Some(200),
        body: body.as_bytes(),
    }
}

// Answers as etcd 3.4's gateway writes them (checked against /usr/bin/etcd).
const HEADER: &str = r#""header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"2","raft_term":"2"}"#;
const LEASE_NOT_FOUND: &str = r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;

#[test]
fn txn_shape() {
    let r = txn(
        &[Compare::Absent("/p/k"), Compare::ModRevision("/p/j", 7)],
        &[Op::Put {
            key: "/p/k",
            value: b"rec",
            lease: Some(42),
        }],
        &[Op::Range("/p/k"), Op::Delete("/p/j")],
    );
    assert_eq!(r.path, TXN);
    let v = json(&r);
    assert_eq!(v["compare"][0]["key"], STANDARD.encode("/p/k"));
    assert_eq!(v["compare"][0]["target"], "CREATE");
    assert_eq!(v["compare"][0]["create_revision"], "0");
    assert_eq!(v["compare"][1]["target"], "MOD");
    assert_eq!(v["compare"][1]["mod_revision"], "7");
    let put = &v["success"][0]["request_put"];
    assert_eq!(put["value"], STANDARD.encode("rec"));
    assert_eq!(put["lease"], "42");
    assert_eq!(
        v["failure"][0]["request_range"]["key"],
        STANDARD.encode("/p/k")
    );
    assert_eq!(
        v["failure"][1]["request_delete_range"]["key"],
        STANDARD.encode("/p/j")
    );
    let v = json(&txn(
        &[Compare::CreateRevision("/k", 3), Compare::Value("/k", b"v")],
        &[],
        &[],
    ));
    assert_eq!(v["compare"][0]["create_revision"], "3");
    assert_eq!(v["compare"][1]["target"], "VALUE");
    assert_eq!(v["compare"][1]["value"], STANDARD.encode("v"));
    assert_eq!(v["success"], serde_json::json!([]));
}

#[test]
fn other_requests() {
    let v = json(&put("/k", b"v", None));
    assert!(v.get("lease").is_none());
    assert_eq!(v["value"], STANDARD.encode("v"));
    assert_eq!(json(&range("/k"))["key"], STANDARD.encode("/k"));
    assert_eq!(json(&lease_grant(60))["TTL"], "60");
    assert_eq!(json(&lease_keepalive(9))["ID"], "9");
    let r = lease_revoke(9);
    assert_eq!((r.path, json(&r)["ID"].clone()), (LEASE_REVOKE, "9".into()));
}

#[test]
fn parses_results() {
    let grant = format!(r#"{{{HEADER},"ID":"7587869124592123404","TTL":"60"}}"#);
    assert_eq!(
        parse_lease_grant(&ok(&grant)),
        Ok(Lease {
            id: 7587869124592123404,
            ttl_s: 60
        })
    );
    let won = format!(
        r#"{{{HEADER},"succeeded":true,"responses":[{{"response_put":{{"header":{{"revision":"2"}}}}}}]}}"#
    );
    assert_eq!(parse_txn(&ok(&won)), Ok(Txn::Succeeded { revision: 2 }));
    let lost = format!(
        r#"{{{HEADER},"responses":[{{"response_range":{{"header":{{}},"kvs":[{{"key":"eA==","create_revision":"5","mod_revision":"9","version":"2","value":"{}","lease":"1"}}],"count":"1"}}}}]}}"#,
        STANDARD.encode("record")
    );
    let kv = Kv {
        value: b"record".to_vec(),
        create_revision: 5,
        mod_revision: 9,
        lease: 1,
    };
    assert_eq!(
        parse_txn(&ok(&lost)),
        Ok(Txn::Failed {
            kv: Some(kv.clone())
        })
    );
    // An empty value and no lease are omitted.
    let bare = r#"{"responses":[{"response_range":{"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1"}],"count":"1"}}]}"#;
    match parse_txn(&ok(bare)) {
        Ok(Txn::Failed { kv: Some(k) }) => assert_eq!((k.value.len(), k.lease), (0, 0)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parse_txn(&ok(
            r#"{"header":{},"responses":[{"response_range":{"header":{}}}]}"#
        )),
        Ok(Txn::Failed { kv: None })
    );
    let ranged = format!(r#"{{{HEADER},{}}}"#, &lost[lost.find("\"kvs\"").unwrap()..]);
    assert_eq!(parse_range(&ok(&ranged)), Ok(Some(kv)));
    assert_eq!(parse_range(&ok(&format!("{{{HEADER}}}"))), Ok(None));
    assert_eq!(
        parse_keepalive(&ok(&format!(
            r#"{{"result":{{{HEADER},"ID":"9","TTL":"60"}}}}"#
        ))),
        Ok(60)
    );
    assert_eq!(parse_ok(&ok(&format!("{{{HEADER}}}"))), Ok(()));
    // Whitespace the scanner tolerates.
    assert_eq!(
        parse_txn(&ok(
            r#"{ "header": {"revision": "4"}, "succeeded" : true }"#
        )),
        Ok(Txn::Succeeded { revision: 4 })
    );
    assert_eq!(
        scan::string_field(r#"{"mod_revision":"9","revision":"3"}"#, "revision"),
        Some("3")
    );
}

#[test]
fn every_error_shape() {
    let none = Answer {
        status: None,
        body: b"",
    };
    assert_eq!(parse_txn(&none), Err(Error::Unreachable));
    let lease_gone = Answer {
        status: Some(404),
        body: LEASE_NOT_FOUND.as_bytes(),
    };
    assert_eq!(parse_txn(&lease_gone), Err(Error::LeaseNotFound));
    assert_eq!(parse_ok(&lease_gone), Err(Error::LeaseNotFound));
    // A renewal of a lease that is gone answers 200 without a TTL.
    assert_eq!(
        parse_keepalive(&ok(&format!(r#"{{"result":{{{HEADER},"ID":"12345"}}}}"#))),
        Err(Error::LeaseNotFound)
    );
    let timeout = Answer {
        status: Some(503),
        body: br#"{"error":"etcdserver: request timed out","message":"etcdserver: request timed out","code":14}"#,
    };
    let e = parse_txn(&timeout).unwrap_err();
    assert_eq!(
        e,
        Error::Server {
            status: 503,
            code: Some(14),
            message: "etcdserver: request timed out".into()
        }
    );
    assert!(e.is_transient());
    let bad = Answer {
        status: Some(400),
        body: br#"{"error":"invalid character 'g'","message":"invalid character 'g'","code":3}"#,
    };
    let e = parse_txn(&bad).unwrap_err();
    assert!(matches!(
        e,
        Error::Server {
            status: 400,
            code: Some(3),
            ..
        }
    ));
    assert!(!e.is_transient());
    // Envoy's own answer when the cluster has no healthy host: plain text.
    let envoy_503 = Answer {
        status: Some(503),
        body: b"no healthy upstream",
    };
    let e = parse_txn(&envoy_503).unwrap_err();
    assert!(matches!(
        e,
        Error::Server {
            status: 503,
            code: None,
            ..
        }
    ));
    assert!(e.is_transient());
    // A gRPC "unavailable" even behind a 4xx is transient.
    assert!(Error::Server {
        status: 429,
        code: Some(14),
        message: String::new()
    }
    .is_transient());
    assert!(Error::Unreachable.is_transient() && !Error::LeaseNotFound.is_transient());
    for body in ["not json", "", r#"{"succeeded":true}"#] {
        assert_eq!(parse_txn(&ok(body)), Err(Error::Malformed), "{body:?}");
    }
    assert_eq!(
        parse_lease_grant(&ok(r#"{"ID":"0"}"#)),
        Err(Error::Malformed)
    );
    let broken_kv =
        r#"{"kvs":[{"key":"YQ==","value":"!!","mod_revision":"2","create_revision":"1"}]}"#;
    assert_eq!(parse_range(&ok(broken_kv)), Err(Error::Malformed));
    // An error body on a 200 is still an error.
    assert!(matches!(
        parse_txn(&ok(r#"{"error":"x","code":2}"#)),
        Err(Error::Server { status: 200, .. })
    ));
    // Long messages are cut for the log, on a character boundary.
    let long = format!(r#"{{"error":"{}","code":2}}"#, "é".repeat(300));
    let a = Answer {
        status: Some(500),
        body: long.as_bytes(),
    };
    match parse_ok(&a) {
        Err(Error::Server { message, .. }) => assert!(message.len() <= 200),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #[test]
    fn parsing_any_answer_never_panics(body in ".{0,200}", status in proptest::option::of(100u16..600)) {
        let a = Answer { status, body: body.as_bytes() };
        let _ = parse_txn(&a);
        let _ = parse_range(&a);
        let _ = parse_lease_grant(&a);
        let _ = parse_keepalive(&a);
        let _ = parse_range_all(&a);
        let _ = parse_txn_range(&a);
    }

    #[test]
    fn parsing_any_list_never_panics(body in r#"\{"kvs":\[[{}\]",:a-z0-9A-Z=]{0,120}"#) {
        let _ = parse_range_all(&Answer { status: Some(200), body: body.as_bytes() });
    }

    #[test]
    fn base64_matches_the_reference(b in proptest::collection::vec(any::<u8>(), 0..100)) {
        prop_assert_eq!(b64_encode(&b), STANDARD.encode(&b));
        prop_assert_eq!(b64_decode(&STANDARD.encode(&b)), Some(b));
    }
}

#[test]
fn prefix_ranges_read_every_key() {
    let v = json(&range_prefix("/p/s/counts/"));
    assert_eq!(v["key"], STANDARD.encode("/p/s/counts/"));
    assert_eq!(v["range_end"], STANDARD.encode("/p/s/counts0"));
    // As etcd 3.4's gateway answers (checked with /usr/bin/etcd).
    let body = format!(
        r#"{{{HEADER},"kvs":[{{"key":"L3Avcy9jb3VudHMvYQ==","create_revision":"2","mod_revision":"2","version":"1","value":"aGk=","lease":"2324035752061209351"}},{{"key":"L3Avcy9jb3VudHMvYg==","create_revision":"3","mod_revision":"5","version":"1"}}],"count":"2"}}"#
    );
    let kvs = parse_range_all(&ok(&body)).unwrap();
    assert_eq!(kvs.len(), 2);
    assert_eq!(kvs[0].value, b"hi");
    assert_eq!(kvs[0].lease, 2324035752061209351);
    assert_eq!((kvs[1].value.len(), kvs[1].mod_revision), (0, 5));
    assert_eq!(
        parse_range_all(&ok(&format!("{{{HEADER}}}"))).unwrap(),
        vec![]
    );
    for bad in [
        r#"{"kvs":[{"key":"x"#,
        r#"{"kvs":{}}"#,
        r#"{"kvs":[{"value":"!!"}]}"#,
    ] {
        assert!(parse_range_all(&ok(bad)).is_err(), "{bad}");
    }
}

#[test]
fn a_transaction_that_reads_in_both_branches() {
    let won = format!(
        r#"{{{HEADER},"succeeded":true,"responses":[{{"response_put":{{"header":{{"revision":"4"}}}}}},{{"response_range":{{"header":{{"revision":"4"}}}}}}]}}"#
    );
    assert_eq!(parse_txn_range(&ok(&won)).unwrap(), (true, None));
    let lost = format!(
        r#"{{{HEADER},"responses":[{{"response_range":{{"header":{{"revision":"4"}},"kvs":[{{"key":"eA==","create_revision":"3","mod_revision":"3","version":"1","value":"aGk="}}],"count":"1"}}}}]}}"#
    );
    let (ok_, kv) = parse_txn_range(&ok(&lost)).unwrap();
    assert!(!ok_);
    assert_eq!(kv.unwrap().value, b"hi");
}

#[test]
fn the_fake_serves_prefix_ranges() {
    let etcd = fake::FakeEtcd::new();
    for k in ["/p/a", "/p/b", "/q/c"] {
        etcd.apply_silently(&put(k, k.as_bytes(), None));
    }
    let (status, body) = etcd.call(&range_prefix("/p/"));
    let kvs = parse_range_all(&Answer {
        status,
        body: &body,
    })
    .unwrap();
    let values: Vec<&[u8]> = kvs.iter().map(|k| &k.value[..]).collect();
    assert_eq!(values, vec![&b"/p/a"[..], b"/p/b"]);
}
