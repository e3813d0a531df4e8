//! An in-memory etcd that answers [`Request`]s as the JSON gateway does (the shapes checked
//! against etcd 3.4): single-key and prefix ranges, puts, deletes, transactions with revision compares,
//! leases. It can be taken down (no answer) or made to fail its next calls.

use super::{b64_decode, b64_encode, Request};
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
}

/// A canned answer: the status (`None`: no answer) and the body.
pub type Canned = (Option<u16>, Vec<u8>);

#[derive(Default)]
pub struct FakeEtcd {
    revision: Cell<i64>,
    keys: RefCell<BTreeMap<Vec<u8>, Entry>>,
    leases: RefCell<BTreeSet<i64>>,
    next_lease: Cell<i64>,
    down: Cell<bool>,
    canned: RefCell<VecDeque<Canned>>,
    /// Requests answered (or refused) so far, by path.
    pub calls: RefCell<Vec<&'static str>>,
    /// Of those, the ones a real etcd puts through raft: a put or delete, or a transaction
    /// holding one in either branch (whether or not its compares hold).
    pub proposals: Cell<usize>,
}

pub const UNAVAILABLE: &str = r#"{"error":"etcdserver: request timed out","message":"etcdserver: request timed out","code":14}"#;
const LEASE_NOT_FOUND: &str = r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;

impl FakeEtcd {
    pub fn new() -> FakeEtcd {
        FakeEtcd {
            revision: Cell::new(1),
            next_lease: Cell::new(7000),
            ..FakeEtcd::default()
        }
    }

    /// While down, every call gets no answer (as a refused connection or a timeout).
    pub fn set_down(&self, down: bool) {
        self.down.set(down);
    }

    /// The next call gets this answer instead of being applied.
    pub fn then_answer(&self, status: Option<u16>, body: &str) {
        self.canned
            .borrow_mut()
            .push_back((status, body.as_bytes().to_vec()));
    }

    /// Applies the request as applied by etcd, but the answer is lost (a timeout after etcd
    /// did the write).
    pub fn apply_silently(&self, r: &Request) {
        let _ = self.apply(r);
    }

    /// A key's value.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.keys
            .borrow()
            .get(key.as_bytes())
            .map(|e| e.value.clone())
    }

    /// A key's mod_revision.
    pub fn mod_revision(&self, key: &str) -> Option<i64> {
        self.keys
            .borrow()
            .get(key.as_bytes())
            .map(|e| e.mod_revision)
    }

    pub fn len(&self) -> usize {
        self.keys.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends a lease and deletes its keys, as its expiry does.
    pub fn expire_lease(&self, id: i64) {
        self.leases.borrow_mut().remove(&id);
        self.keys.borrow_mut().retain(|_, e| e.lease != id);
    }

    /// The answer etcd gives.
    pub fn call(&self, r: &Request) -> Canned {
        self.calls.borrow_mut().push(r.path);
        if is_proposal(r) {
            self.proposals.set(self.proposals.get() + 1);
        }
        if let Some(c) = self.canned.borrow_mut().pop_front() {
            return c;
        }
        if self.down.get() {
            return (None, Vec::new());
        }
        self.apply(r)
    }

    fn header(&self) -> String {
        format!(
            r#""header":{{"cluster_id":"1","member_id":"2","revision":"{}","raft_term":"2"}}"#,
            self.revision.get()
        )
    }

    fn bump(&self) -> i64 {
        self.revision.set(self.revision.get() + 1);
        self.revision.get()
    }

    fn apply(&self, r: &Request) -> Canned {
        let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
            return (
                Some(400),
                br#"{"error":"bad json","message":"bad json","code":3}"#.to_vec(),
            );
        };
        let body = match r.path {
            super::LEASE_GRANT => {
                let id = self.next_lease.get() + 1;
                self.next_lease.set(id);
                self.leases.borrow_mut().insert(id);
                let ttl = v["TTL"].as_str().unwrap_or("0");
                format!(r#"{{{},"ID":"{id}","TTL":"{ttl}"}}"#, self.header())
            }
            super::LEASE_REVOKE => {
                let id = int(&v["ID"]);
                if !self.leases.borrow().contains(&id) {
                    return (Some(404), LEASE_NOT_FOUND.as_bytes().to_vec());
                }
                self.expire_lease(id);
                self.bump();
                format!("{{{}}}", self.header())
            }
            super::LEASE_KEEPALIVE => {
                let id = int(&v["ID"]);
                let ttl = if self.leases.borrow().contains(&id) {
                    r#","TTL":"60""#
                } else {
                    ""
                };
                format!(r#"{{"result":{{{},"ID":"{id}"{ttl}}}}}"#, self.header())
            }
            super::RANGE => match self.range(&v) {
                kvs if kvs.is_empty() => format!("{{{}}}", self.header()),
                kvs => format!("{{{},{kvs}}}", self.header()),
            },
            super::PUT => match self.put(&v) {
                Ok(()) => format!("{{{}}}", self.header()),
                Err(e) => return e,
            },
            super::TXN => match self.txn(&v) {
                Ok(b) => b,
                Err(e) => return e,
            },
            _ => return (Some(404), b"Not Found".to_vec()),
        };
        (Some(200), body.into_bytes())
    }

    fn range(&self, op: &Value) -> String {
        let key = bytes(&op["key"]);
        let end = bytes(&op["range_end"]);
        let keys = self.keys.borrow();
        let found: Vec<(&Vec<u8>, &Entry)> = if end.is_empty() {
            keys.get_key_value(&key).into_iter().collect()
        } else {
            keys.range(key..end).collect()
        };
        if found.is_empty() {
            return String::new();
        }
        let kvs: Vec<String> = found
            .iter()
            .map(|(k, e)| {
                let value = if e.value.is_empty() {
                    String::new()
                } else {
                    format!(r#","value":"{}""#, b64_encode(&e.value))
                };
                let lease = if e.lease == 0 {
                    String::new()
                } else {
                    format!(r#","lease":"{}""#, e.lease)
                };
                format!(
                    r#"{{"key":"{}","create_revision":"{}","mod_revision":"{}","version":"1"{value}{lease}}}"#,
                    b64_encode(k),
                    e.create_revision,
                    e.mod_revision
                )
            })
            .collect();
        format!(r#""kvs":[{}],"count":"{}""#, kvs.join(","), kvs.len())
    }

    fn put(&self, op: &Value) -> Result<(), Canned> {
        let lease = int(&op["lease"]);
        if lease != 0 && !self.leases.borrow().contains(&lease) {
            return Err((Some(404), LEASE_NOT_FOUND.as_bytes().to_vec()));
        }
        let key = bytes(&op["key"]);
        let rev = self.bump();
        let mut keys = self.keys.borrow_mut();
        let create_revision = keys.get(&key).map_or(rev, |e| e.create_revision);
        keys.insert(
            key,
            Entry {
                value: bytes(&op["value"]),
                create_revision,
                mod_revision: rev,
                lease,
            },
        );
        Ok(())
    }

    fn holds(&self, c: &Value) -> bool {
        let keys = self.keys.borrow();
        let e = keys.get(&bytes(&c["key"]));
        match c["target"].as_str() {
            Some("CREATE") => e.map_or(0, |e| e.create_revision) == int(&c["create_revision"]),
            Some("MOD") => e.map_or(0, |e| e.mod_revision) == int(&c["mod_revision"]),
            Some("VALUE") => e.is_some_and(|e| e.value == bytes(&c["value"])),
            _ => false,
        }
    }

    fn txn(&self, v: &Value) -> Result<String, Canned> {
        let empty = Vec::new();
        let compares = v["compare"].as_array().unwrap_or(&empty);
        let succeeded = compares.iter().all(|c| self.holds(c));
        let ops = v[if succeeded { "success" } else { "failure" }]
            .as_array()
            .unwrap_or(&empty);
        // A put with a missing lease fails the whole transaction, as in etcd.
        for op in ops {
            let lease = int(&op["request_put"]["lease"]);
            if lease != 0 && !self.leases.borrow().contains(&lease) {
                return Err((Some(404), LEASE_NOT_FOUND.as_bytes().to_vec()));
            }
        }
        let mut responses = Vec::new();
        let mut wrote = false;
        for op in ops {
            if let Some(p) = op.get("request_put") {
                if !wrote {
                    self.bump();
                    wrote = true;
                }
                let rev = self.revision.get();
                let key = bytes(&p["key"]);
                let mut keys = self.keys.borrow_mut();
                let create_revision = keys.get(&key).map_or(rev, |e| e.create_revision);
                keys.insert(
                    key,
                    Entry {
                        value: bytes(&p["value"]),
                        create_revision,
                        mod_revision: rev,
                        lease: int(&p["lease"]),
                    },
                );
                responses.push(r#"{"response_put":{"header":{}}}"#.to_string());
            } else if let Some(r) = op.get("request_range") {
                responses.push(
                    format!(
                        r#"{{"response_range":{{"header":{{}},{}}}}}"#,
                        self.range(r)
                    )
                    .replace(",}}", "}}"),
                );
            } else if let Some(d) = op.get("request_delete_range") {
                if self.keys.borrow_mut().remove(&bytes(&d["key"])).is_some() && !wrote {
                    self.bump();
                    wrote = true;
                }
                responses.push(r#"{"response_delete_range":{"header":{}}}"#.to_string());
            }
        }
        let ok = if succeeded {
            r#","succeeded":true"#
        } else {
            ""
        };
        Ok(format!(
            r#"{{{}{ok},"responses":[{}]}}"#,
            self.header(),
            responses.join(",")
        ))
    }
}

fn int(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_str().and_then(b64_decode).unwrap_or_default()
}

fn is_proposal(r: &Request) -> bool {
    let has = |needle: &[u8]| r.body.windows(needle.len()).any(|w| w == needle);
    match r.path {
        "/v3/kv/put" | "/v3/kv/deleterange" => true,
        "/v3/kv/txn" => has(b"request_put") || has(b"request_delete_range"),
        _ => false,
    }
}
