//! One suite, two stores: every check below runs against the embedded SQLite store and against
//! the PostgreSQL store on a throwaway TLS cluster (verify-full, SCRAM, password from a file).
//! A store passes when it gives the same answers, so the gateway cannot tell them apart.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tollgate_store::review::*;
use tollgate_store::{
    checkpoint_digest, event_hash, open_store, ChainPoint, EventInput, HashedEvent, HashedFields,
    PinSeen, SessionFilter, Store, StoreError, GENESIS_HASH, KIND_AUDIT_CHECKPOINT,
    KIND_SESSION_CLOSE, KIND_SESSION_OPEN,
};
use tollgate_testsupport::{ClusterOptions, PgCluster};

/// A store under test: how to open another handle on the same database (another replica) and
/// how to run SQL behind the store's back (a tamperer with write access to the database).
struct Subject {
    url: String,
    tamper: Box<dyn Fn(&str)>,
}

impl Subject {
    fn open(&self) -> Arc<dyn Store> {
        open_store(&self.url).unwrap()
    }
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn ev(session: &str, kind: &str, ms: u64, payload: Value) -> EventInput {
    EventInput {
        session_id: session.into(),
        kind: kind.into(),
        at: at(ms),
        payload,
    }
}

fn open_ev(session: &str, ms: u64, subject: &str) -> EventInput {
    ev(
        session,
        KIND_SESSION_OPEN,
        ms,
        json!({"subject": subject, "resource": "orders", "listener": "postgres", "client_addr": "127.0.0.1:5000", "auth_method": "cert"}),
    )
}

fn close_ev(session: &str, ms: u64, outcome: &str) -> EventInput {
    ev(session, KIND_SESSION_CLOSE, ms, json!({"outcome": outcome}))
}

fn cmd(session: &str, ms: u64, text: &str) -> EventInput {
    ev(session, "command", ms, json!({"text": text, "n": ms}))
}

fn run_suite(s: &Subject) {
    append_read_back_and_filters(&*s.open());
    import_is_idempotent(&*s.open());
    verify_checks_checkpoints_and_reports_tampering(s);
    prune_reanchors_and_verifies(&*s.open());
    reviews_votes_grants_and_reruns(&*s.open());
    concurrent_votes_from_two_replicas_finalize_once(s);
    chains_of_two_replicas_interleave_and_verify(s);
    mcp_pins_are_first_come_and_changes_wait_for_approval(s);
    one_time_values_are_claimed_once_across_replicas(s);
}

/// SAML request ids, the assertion replay cache and login codes: a key is claimed once (by one
/// of several replicas racing for it), read while live, taken once, and free again once expired.
fn one_time_values_are_claimed_once_across_replicas(s: &Subject) {
    let store = s.open();
    let now = 1_000_000;
    assert!(store
        .once_put("saml.assertion", "_a1", "", now + 60_000, now)
        .unwrap());
    assert!(
        !store
            .once_put("saml.assertion", "_a1", "x", now + 60_000, now + 1)
            .unwrap(),
        "a replay"
    );
    assert!(
        store
            .once_put("saml.request", "_a1", "v", now + 60_000, now)
            .unwrap(),
        "kinds are separate"
    );
    assert_eq!(
        store
            .once_get("saml.request", "_a1", now)
            .unwrap()
            .as_deref(),
        Some("v")
    );
    assert_eq!(
        store
            .once_get("saml.request", "_a1", now)
            .unwrap()
            .as_deref(),
        Some("v"),
        "get leaves it"
    );
    assert_eq!(
        store
            .once_take("saml.request", "_a1", now)
            .unwrap()
            .as_deref(),
        Some("v")
    );
    assert_eq!(
        store.once_take("saml.request", "_a1", now).unwrap(),
        None,
        "taken once"
    );
    // Expired: invisible, not takeable, and the key can be claimed again.
    assert!(store
        .once_put("saml.code", "c", "v", now + 10, now)
        .unwrap());
    assert_eq!(store.once_get("saml.code", "c", now + 10).unwrap(), None);
    assert_eq!(store.once_take("saml.code", "c", now + 10).unwrap(), None);
    assert!(store
        .once_put("saml.assertion", "_a2", "", now + 10, now)
        .unwrap());
    assert!(
        store
            .once_put("saml.assertion", "_a2", "", now + 90_000, now + 20)
            .unwrap(),
        "expired entries are reclaimable"
    );
    // Eight replicas race for one key: exactly one wins.
    let winners: usize = (0..8)
        .map(|_| {
            let store = s.open();
            std::thread::spawn(move || {
                store
                    .once_put("saml.assertion", "_race", "", now + 60_000, now)
                    .unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| usize::from(h.join().unwrap()))
        .sum();
    assert_eq!(winners, 1);
}

fn append_read_back_and_filters(store: &dyn Store) {
    let stored = store
        .append(
            "gw-a",
            &[
                open_ev("a1", 1000, "alice"),
                open_ev("a2", 1001, "bob"),
                cmd("a1", 1002, "select 1"),
                cmd("a2", 1003, "select 2"),
                close_ev("a1", 1004, "closed"),
            ],
        )
        .unwrap();
    assert_eq!(
        stored
            .iter()
            .map(|e| (e.chain_seq, e.session_seq))
            .collect::<Vec<_>>(),
        vec![(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]
    );
    assert_eq!(stored[0].prev_hash, GENESIS_HASH);
    assert_eq!(stored[1].prev_hash, stored[0].hash);
    let more = store
        .append("gw-a", &[close_ev("a2", 1005, "error")])
        .unwrap();
    assert_eq!((more[0].chain_seq, more[0].session_seq), (6, 3));
    assert_eq!(more[0].prev_hash, stored[4].hash);

    let a1 = store.session("a1").unwrap().unwrap();
    assert_eq!(a1.subject.as_deref(), Some("alice"));
    assert_eq!(a1.resource.as_deref(), Some("orders"));
    assert_eq!(a1.client_addr.as_deref(), Some("127.0.0.1:5000"));
    assert_eq!(
        (a1.started_at_unix_ms, a1.ended_at_unix_ms),
        (1000, Some(1004))
    );
    assert_eq!(a1.outcome.as_deref(), Some("closed"));
    assert_eq!(a1.event_count, 3);
    assert_eq!(a1.close, Some(json!({"outcome": "closed"})));
    assert!(store.session("nope").unwrap().is_none());

    let ids = |f: SessionFilter| -> Vec<String> {
        store
            .sessions(&f)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect()
    };
    assert_eq!(ids(SessionFilter::default()), ["a2", "a1"]);
    let by_bob = SessionFilter {
        subject: Some("bob".into()),
        ..Default::default()
    };
    assert_eq!(ids(by_bob), ["a2"]);
    let errors = SessionFilter {
        outcome: Some("error".into()),
        ..Default::default()
    };
    assert_eq!(ids(errors), ["a2"]);
    let window = SessionFilter {
        since_unix_ms: Some(1000),
        until_unix_ms: Some(1001),
        ..Default::default()
    };
    assert_eq!(ids(window), ["a1"]);
    let page = SessionFilter {
        limit: Some(1),
        offset: Some(1),
        ..Default::default()
    };
    assert_eq!(ids(page), ["a1"]);

    let events = store.events("a1").unwrap();
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        [KIND_SESSION_OPEN, "command", KIND_SESSION_CLOSE]
    );
    assert_eq!(events[1].payload, json!({"text": "select 1", "n": 1002}));

    let page = store.events_page(0, Some(1002), Some(1004), 10).unwrap();
    assert_eq!(
        page.iter().map(|e| e.at_unix_ms).collect::<Vec<_>>(),
        [1002, 1003]
    );
    let all = store.events_page(0, None, None, 4).unwrap();
    assert_eq!(all.len(), 4);
    let rest = store.events_page(all[3].id, None, None, 10).unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|e| e.id > all[3].id));

    let heads = store.chain_heads().unwrap();
    let head = heads.iter().find(|h| h.chain_id == "gw-a").unwrap();
    assert_eq!((head.seq, head.hash.as_str()), (6, more[0].hash.as_str()));

    assert!(matches!(
        store.append("", &[cmd("a1", 1, "x")]),
        Err(StoreError::InvalidEvent(_))
    ));
    assert!(matches!(
        store.append("gw-a", &[ev("", "command", 1, json!({}))]),
        Err(StoreError::InvalidEvent(_))
    ));
    let report = store.verify().unwrap();
    assert!(report.first_break.is_none(), "{report:?}");
}

/// A journal as the recorder writes it: numbered and hashed before the store sees it.
fn journal(chain_id: &str, session: &str, n: i64) -> Vec<HashedEvent> {
    let mut prev = GENESIS_HASH.to_string();
    (1..=n)
        .map(|seq| {
            let kind = match seq {
                1 => KIND_SESSION_OPEN,
                s if s == n => KIND_SESSION_CLOSE,
                _ => "command",
            };
            let payload = match kind {
                KIND_SESSION_OPEN => r#"{"resource":"orders","subject":"carol"}"#.to_string(),
                KIND_SESSION_CLOSE => r#"{"outcome":"closed"}"#.to_string(),
                _ => format!(r#"{{"text":"select {seq}"}}"#),
            };
            let hash = event_hash(
                &prev,
                &HashedFields {
                    chain_id,
                    chain_seq: seq,
                    session_id: session,
                    session_seq: seq,
                    at_unix_ms: 2000 + seq,
                    kind,
                    payload: payload.as_bytes(),
                },
            );
            let e = HashedEvent {
                chain_id: chain_id.into(),
                chain_seq: seq,
                session_id: session.into(),
                session_seq: seq,
                at_unix_ms: 2000 + seq,
                kind: kind.into(),
                payload,
                prev_hash: std::mem::replace(&mut prev, hash.clone()),
                hash,
            };
            e
        })
        .collect()
}

fn import_is_idempotent(store: &dyn Store) {
    let events = journal("gw-imp", "imp-1", 100);
    store.import(&events[..60]).unwrap();
    // A replay after a crash overlaps what is stored; nothing doubles.
    store.import(&events[40..]).unwrap();
    store.import(&events).unwrap();
    let stored = store.events("imp-1").unwrap();
    assert_eq!(stored.len(), 100);
    assert!(stored.iter().zip(&events).all(|(s, e)| s.hash == e.hash));
    let session = store.session("imp-1").unwrap().unwrap();
    assert_eq!(session.subject.as_deref(), Some("carol"));
    assert_eq!(session.outcome.as_deref(), Some("closed"));
    assert_eq!(session.event_count, 100);
    let head = store
        .chain_heads()
        .unwrap()
        .into_iter()
        .find(|h| h.chain_id == "gw-imp")
        .unwrap();
    assert_eq!((head.seq, head.hash), (100, events[99].hash.clone()));
    let report = store.verify().unwrap();
    assert!(report.first_break.is_none(), "{report:?}");
}

fn verify_checks_checkpoints_and_reports_tampering(s: &Subject) {
    let store = s.open();
    store
        .append(
            "gw-t",
            &[
                open_ev("t1", 3000, "dave"),
                cmd("t1", 3001, "select 'secret'"),
            ],
        )
        .unwrap();
    let heads: Vec<ChainPoint> = store.chain_heads().unwrap();
    let digest = checkpoint_digest(&heads);
    store
        .append(
            "gw-t",
            &[
                ev(
                    "checkpoint-t",
                    KIND_AUDIT_CHECKPOINT,
                    3002,
                    json!({"heads": heads, "digest": digest}),
                ),
                cmd("t1", 3003, "select 3"),
                close_ev("t1", 3004, "closed"),
            ],
        )
        .unwrap();
    let report = store.verify().unwrap();
    assert!(report.first_break.is_none(), "{report:?}");
    assert!(report.checkpoints >= 1, "{report:?}");
    assert!(report.chains >= 3, "{report:?}");

    // Someone with write access to the database edits a recorded statement.
    (s.tamper)(
        "UPDATE events SET payload = '{\"text\":\"select 1\"}' WHERE chain_id = 'gw-t' AND chain_seq = 2",
    );
    let brk = store.verify().unwrap().first_break.expect("edit detected");
    assert_eq!((brk.chain_id.as_str(), brk.chain_seq), ("gw-t", 2));
    assert_eq!(brk.session_id, "t1");
    assert_eq!(brk.reason, "hash mismatch: event content was altered");

    // ... or deletes the last event of a chain: the head in the chains table still names it.
    (s.tamper)("DELETE FROM events WHERE chain_id = 'gw-imp' AND chain_seq = 100");
    let report = store.verify().unwrap();
    let brk = report.first_break.expect("break");
    assert_eq!(
        brk.chain_id, "gw-imp",
        "chains are checked in chain_id order: {brk:?}"
    );
    assert_eq!(brk.chain_seq, 100);
    assert!(brk.reason.contains("gap: chain_seq 100 missing"), "{brk:?}");
    // Put the suite's database back into a verifiable state for what follows.
    (s.tamper)("DELETE FROM events WHERE chain_id IN ('gw-t', 'gw-imp')");
    (s.tamper)("DELETE FROM chains WHERE chain_id IN ('gw-t', 'gw-imp')");
    (s.tamper)("DELETE FROM sessions WHERE id IN ('t1', 'imp-1')");
    let report = store.verify().unwrap();
    assert!(report.first_break.is_none(), "{report:?}");
}

fn prune_reanchors_and_verifies(store: &dyn Store) {
    store
        .append(
            "gw-p",
            &[
                open_ev("p1", 100, "erin"),
                close_ev("p1", 101, "closed"),
                open_ev("p2", 102, "erin"), // still open: holds back what follows
                open_ev("p3", 103, "erin"),
                close_ev("p3", 104, "closed"),
                ev("tick", "heartbeat", 50_000, json!({})),
            ],
        )
        .unwrap();
    let dry = store.prune(500, true).unwrap();
    assert!(dry.dry_run);
    assert!(
        store.session("p1").unwrap().is_some(),
        "a dry run changes nothing"
    );
    let report = store.prune(500, false).unwrap();
    let anchor = report
        .anchors
        .iter()
        .find(|a| a.chain_id == "gw-p")
        .expect("gw-p shortened");
    assert_eq!(anchor.seq, 2, "{report:?}");
    assert!(store.session("p1").unwrap().is_none());
    assert!(store.session("p2").unwrap().is_some());
    assert_eq!(store.events("p3").unwrap().len(), 2);
    let verified = store.verify().unwrap();
    assert!(verified.first_break.is_none(), "{verified:?}");
    // A replayed journal never brings pruned events back.
    let again = store.prune(500, false).unwrap();
    assert!(
        again.anchors.iter().all(|a| a.chain_id != "gw-p"),
        "{again:?}"
    );
}

fn review(id: &str, kind: &str, min: u32) -> ReviewRecord {
    ReviewRecord {
        id: id.into(),
        kind: kind.into(),
        session_id: Some("s1".into()),
        resource: "orders".into(),
        requester: "agent-7".into(),
        requester_principal: Some("cert:cn:agent-7".into()),
        requester_groups: vec!["agents".into()],
        rule: Some("deletes".into()),
        statement: Some("delete from t where id = $1".into()),
        statement_sha256: Some("ab".repeat(32)),
        approvers: vec!["sre".into()],
        min_approvals: min,
        request_reason: Some("cleanup".into()),
        access_ms: grants(kind).then_some(3_600_000),
        status: REVIEW_PENDING.into(),
        created_at_unix_ms: 1000,
        expires_at_unix_ms: 10_000,
        decided_at_unix_ms: None,
        decided_by: None,
        decision_reason: None,
        used_at_unix_ms: None,
        grant_until_unix_ms: None,
        votes: vec![],
    }
}

fn vote(id: &str, who: &str, approve: bool, at: i64) -> ReviewVote {
    ReviewVote {
        review_id: id.into(),
        reviewer: who.into(),
        principal: format!("cert:cn:{who}"),
        groups: vec!["sre".into()],
        approve,
        reason: Some(format!("{who} says so")),
        at_unix_ms: at,
    }
}

fn recorded(o: VoteOutcome) -> ReviewRecord {
    match o {
        VoteOutcome::Recorded(r) => r,
        other => panic!("expected a recorded vote, got {other:?}"),
    }
}

fn reviews_votes_grants_and_reruns(store: &dyn Store) {
    let agent = Requester::Principal("cert:cn:agent-7");
    // A command review needing two approvals.
    store
        .review_create(&review("r-cmd", REVIEW_KIND_COMMAND, 2))
        .unwrap();
    let back = store.review("r-cmd").unwrap().unwrap();
    assert_eq!(back, review("r-cmd", REVIEW_KIND_COMMAND, 2));
    assert_eq!(
        store
            .review_vote(&ReviewVote {
                principal: "cert:cn:agent-7".into(),
                ..vote("r-cmd", "agent-7", true, 2000)
            })
            .unwrap(),
        VoteOutcome::SelfApproval
    );
    let one = recorded(
        store
            .review_vote(&vote("r-cmd", "sam", true, 2001))
            .unwrap(),
    );
    assert_eq!(one.status, REVIEW_PENDING);
    assert_eq!(
        store
            .review_vote(&vote("r-cmd", "sam", true, 2002))
            .unwrap(),
        VoteOutcome::AlreadyVoted
    );
    let two = recorded(
        store
            .review_vote(&vote("r-cmd", "kim", true, 2003))
            .unwrap(),
    );
    assert_eq!(two.status, REVIEW_APPROVED);
    assert_eq!(two.decided_by.as_deref(), Some("kim"));
    assert_eq!(two.votes.len(), 2);
    assert_eq!(
        store
            .review_vote(&vote("r-cmd", "lee", false, 2004))
            .unwrap(),
        VoteOutcome::NotPending(REVIEW_APPROVED.into())
    );
    assert_eq!(
        store.review_vote(&vote("none", "lee", true, 1)).unwrap(),
        VoteOutcome::NotFound
    );
    // The approved statement runs once: a rerun takes it, the held session then cannot.
    let hash = "ab".repeat(32);
    let rerun = store
        .review_take_rerun(agent, "orders", &hash, 2000, 2500)
        .unwrap()
        .expect("approved rerun");
    assert_eq!(
        (rerun.id.as_str(), rerun.used_at_unix_ms),
        ("r-cmd", Some(2500))
    );
    assert!(store
        .review_take_rerun(agent, "orders", &hash, 2000, 2600)
        .unwrap()
        .is_none());
    assert!(!store.review_mark_used("r-cmd", 2700).unwrap());

    // Access and unmask grants: each counts only for itself; a revocation ends one at once.
    store
        .review_create(&review("r-acc", REVIEW_KIND_ACCESS, 1))
        .unwrap();
    store
        .review_create(&review("r-unm", REVIEW_KIND_UNMASK, 1))
        .unwrap();
    assert!(store.access_grant(agent, "orders", 3000).unwrap().is_none());
    let acc = recorded(
        store
            .review_vote(&vote("r-acc", "sam", true, 3000))
            .unwrap(),
    );
    assert_eq!(acc.grant_until_unix_ms, Some(3000 + 3_600_000));
    let g = store
        .access_grant(agent, "orders", 3001)
        .unwrap()
        .expect("grant");
    assert_eq!(
        (g.review_id.as_str(), g.kind.as_str()),
        ("r-acc", REVIEW_KIND_ACCESS)
    );
    assert!(store.unmask_grant(agent, "orders", 3001).unwrap().is_none());
    assert!(store
        .access_grant(Requester::Subject("agent-7"), "orders", 3001)
        .unwrap()
        .is_some());
    assert!(store
        .access_grant(agent, "billing", 3001)
        .unwrap()
        .is_none());
    recorded(
        store
            .review_vote(&vote("r-unm", "kim", true, 3002))
            .unwrap(),
    );
    assert_eq!(
        store
            .unmask_grant(agent, "orders", 3003)
            .unwrap()
            .unwrap()
            .review_id,
        "r-unm"
    );
    let revoked = store
        .review_revoke_grant("r-acc", 4000)
        .unwrap()
        .expect("was running");
    assert_eq!(revoked.grant_until_unix_ms, Some(4000));
    assert!(store.review_revoke_grant("r-acc", 4001).unwrap().is_none());
    assert!(store.access_grant(agent, "orders", 4001).unwrap().is_none());

    // Deadlines, withdrawal and listing.
    store
        .review_create(&review("r-late", REVIEW_KIND_COMMAND, 1))
        .unwrap();
    match store
        .review_vote(&vote("r-late", "sam", true, 10_000))
        .unwrap()
    {
        VoteOutcome::Expired(r) => assert_eq!(r.status, REVIEW_EXPIRED),
        other => panic!("expected expiry, got {other:?}"),
    }
    store
        .review_create(&review("r-due", REVIEW_KIND_COMMAND, 1))
        .unwrap();
    store
        .review_create(&review("r-wd", REVIEW_KIND_COMMAND, 1))
        .unwrap();
    let closed = store
        .review_close("r-wd", REVIEW_WITHDRAWN, 5000, Some("client left"))
        .unwrap()
        .unwrap();
    assert_eq!(closed.decision_reason.as_deref(), Some("client left"));
    assert!(store
        .review_close("r-wd", REVIEW_EXPIRED, 5001, None)
        .unwrap()
        .is_none());
    let due = store.review_expire_due(20_000).unwrap();
    assert_eq!(
        due.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["r-due"]
    );
    assert!(store.review_expire_due(20_000).unwrap().is_empty());
    let approved = store
        .reviews(&ReviewFilter {
            status: Some(REVIEW_APPROVED.into()),
            ..Default::default()
        })
        .unwrap();
    let mut ids: Vec<&str> = approved.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["r-acc", "r-cmd", "r-unm"]);
    let access = store
        .reviews(&ReviewFilter {
            kind: Some(REVIEW_KIND_ACCESS.into()),
            limit: Some(1),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(access.len(), 1);
    assert_eq!(access[0].votes.len(), 1);
}

/// Two replicas' reviewers vote on the same two-approval review at once: exactly one vote
/// decides it, and the review ends with exactly two votes.
fn concurrent_votes_from_two_replicas_finalize_once(s: &Subject) {
    let (a, b) = (s.open(), s.open());
    for round in 0..5 {
        let id = format!("race-{round}");
        a.review_create(&review(&id, REVIEW_KIND_ACCESS, 2))
            .unwrap();
        recorded(a.review_vote(&vote(&id, "first", true, 2000)).unwrap());
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = [(a.clone(), "sam"), (b.clone(), "kim")]
            .into_iter()
            .map(|(store, who)| {
                let (id, barrier) = (id.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.review_vote(&vote(&id, who, true, 2001)).unwrap()
                })
            })
            .collect();
        let outcomes: Vec<VoteOutcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let decided = outcomes
            .iter()
            .filter(|o| matches!(o, VoteOutcome::Recorded(r) if r.status == REVIEW_APPROVED))
            .count();
        assert_eq!(decided, 1, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| *o == VoteOutcome::NotPending(REVIEW_APPROVED.into())),
            "{outcomes:?}"
        );
        let rec = b.review(&id).unwrap().unwrap();
        assert_eq!(rec.votes.len(), 2);
        assert_eq!(rec.grant_until_unix_ms, Some(2001 + 3_600_000));
    }
}

/// Two replicas import their own chains into one store at the same time; both verify.
fn chains_of_two_replicas_interleave_and_verify(s: &Subject) {
    let handles: Vec<_> = ["gw-r1", "gw-r2"]
        .into_iter()
        .map(|chain| {
            let store = s.open();
            std::thread::spawn(move || {
                let events = journal(chain, &format!("{chain}-s"), 400);
                for batch in events.chunks(37) {
                    store.import(batch).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let store = s.open();
    let report = store.verify().unwrap();
    assert!(report.first_break.is_none(), "{report:?}");
    let heads = store.chain_heads().unwrap();
    for chain in ["gw-r1", "gw-r2"] {
        assert_eq!(heads.iter().find(|h| h.chain_id == chain).unwrap().seq, 400);
    }
}

/// The first listing pins a tool's definition (on whichever replica lists it first); a changed
/// definition is recorded as seen, never pinned, until approved; the pinned one listed again
/// clears what was seen.
fn mcp_pins_are_first_come_and_changes_wait_for_approval(s: &Subject) {
    let (a, b) = (s.open(), s.open());
    let first = a.mcp_pin_see("tickets", "echo", "aa", 10).unwrap();
    assert!(matches!(first, PinSeen::New(_)), "{first:?}");
    // Another replica listing another definition does not re-pin: it sees a change.
    let other = b.mcp_pin_see("tickets", "echo", "bb", 20).unwrap();
    let PinSeen::Changed(p) = &other else {
        panic!("{other:?}")
    };
    assert_eq!(p.pinned_sha256, "aa");
    assert_eq!(p.changed(), Some("bb"));
    assert_eq!(p.seen_at_unix_ms, Some(20));
    // The same change listed again keeps its first sighting.
    let again = a.mcp_pin_see("tickets", "echo", "bb", 30).unwrap();
    assert_eq!(again.record().seen_at_unix_ms, Some(20));
    // Approving a definition that was not seen changes nothing.
    assert!(!a
        .mcp_pin_approve("tickets", "echo", "cc", 40, "root")
        .unwrap());
    let listed = b.mcp_pins(Some("tickets")).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pinned_sha256, "aa");
    assert_eq!(listed[0].changed(), Some("bb"));
    // The pinned definition listed again clears the change.
    let back = a.mcp_pin_see("tickets", "echo", "aa", 50).unwrap();
    assert!(
        matches!(&back, PinSeen::Same(p) if p.changed().is_none()),
        "{back:?}"
    );
    b.mcp_pin_see("tickets", "echo", "bb", 60).unwrap();
    assert!(b
        .mcp_pin_approve("tickets", "echo", "bb", 70, "root")
        .unwrap());
    assert!(
        !a.mcp_pin_approve("tickets", "echo", "bb", 71, "root")
            .unwrap(),
        "approved once"
    );
    let now = a.mcp_pin_see("tickets", "echo", "bb", 80).unwrap();
    let PinSeen::Same(p) = now else {
        panic!("{now:?}")
    };
    assert_eq!(
        (p.pinned_by.as_deref(), p.pinned_at_unix_ms),
        (Some("root"), 70)
    );
    // Pins are per resource.
    assert!(matches!(
        a.mcp_pin_see("other", "echo", "bb", 90).unwrap(),
        PinSeen::New(_)
    ));
    assert_eq!(a.mcp_pins(None).unwrap().len(), 2);
    // Two replicas pinning a new tool at once pin one definition.
    let handles: Vec<_> = ["x1", "x2"]
        .into_iter()
        .map(|sha| {
            let store = s.open();
            std::thread::spawn(move || store.mcp_pin_see("tickets", "race", sha, 100).unwrap())
        })
        .collect();
    let seen: Vec<PinSeen> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        seen.iter().filter(|s| matches!(s, PinSeen::New(_))).count(),
        1,
        "{seen:?}"
    );
}

#[test]
fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let url = format!("sqlite://{}", path.display());
    let tamper_path = path.clone();
    run_suite(&Subject {
        url,
        tamper: Box::new(move |sql| {
            let c = rusqlite::Connection::open(&tamper_path).unwrap();
            c.busy_timeout(Duration::from_secs(5)).unwrap();
            c.execute_batch(sql).unwrap();
        }),
    });
}

fn pg_cluster() -> PgCluster {
    PgCluster::start(ClusterOptions {
        database: "tollgate_store".into(),
        user: "tollgate_store".into(),
        ..Default::default()
    })
    .expect("start a throwaway PostgreSQL")
}

/// The store URL for `pg`: verify-full against its CA, the password in a 0600 file.
fn pg_url(pg: &PgCluster, dir: &Path) -> String {
    let pw = dir.join("store.password");
    std::fs::write(&pw, format!("{}\n", pg.password)).unwrap();
    format!(
        "postgres://{}@localhost:{}/{}?sslrootcert={}&password_file={}",
        pg.user,
        pg.port,
        pg.database,
        pg.ca_cert.display(),
        pw.display()
    )
}

#[test]
fn postgres_store_conforms() {
    let pg = Arc::new(pg_cluster());
    let dir = tempfile::tempdir().unwrap();
    let url = pg_url(&pg, dir.path());
    let tamper_pg = pg.clone();
    run_suite(&Subject {
        url,
        tamper: Box::new(move |sql| {
            tamper_pg.psql(sql).unwrap();
        }),
    });
}

/// Replicas that start together on an empty database migrate one after the other (advisory
/// lock): every one opens, and the schema is created once, at the version this build knows.
#[test]
fn postgres_replicas_starting_at_once_migrate_once() {
    let pg = pg_cluster();
    let dir = tempfile::tempdir().unwrap();
    let url = pg_url(&pg, dir.path());
    let barrier = Arc::new(std::sync::Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                open_store(&url).map(|s| s.ping())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap().unwrap();
    }
    let versions = pg
        .psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations")
        .unwrap();
    assert_eq!(
        versions.trim(),
        (1..=tollgate_store::postgres::PG_SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    // A database migrated by a newer tollgate is refused, not misread.
    pg.psql("INSERT INTO schema_migrations VALUES (999, 0)")
        .unwrap();
    let err = open_store(&url).err().unwrap();
    assert!(err.to_string().contains("schema is version 999"), "{err}");
}

/// TLS is verified by default: a CA that did not sign the server's certificate is refused,
/// and so is a host name the certificate does not carry. Errors never show the password.
#[test]
fn postgres_store_verifies_the_server_and_keeps_the_password_out_of_errors() {
    let pg = pg_cluster();
    let dir = tempfile::tempdir().unwrap();
    let other_ca = dir.path().join("other-ca");
    tollgate_tls::pki::init_ca(&other_ca, "someone else").unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, &pg.password).unwrap();
    let url = |host: &str, ca: &Path| {
        format!(
            "postgres://{}@{host}:{}/{}?sslrootcert={}&password_file={}",
            pg.user,
            pg.port,
            pg.database,
            ca.display(),
            pw.display()
        )
    };
    let wrong_ca = open_store(&url("localhost", &other_ca.join("ca.crt")))
        .err()
        .unwrap()
        .to_string();
    assert!(wrong_ca.contains("cannot connect"), "{wrong_ca}");
    assert!(!wrong_ca.contains(&pg.password), "{wrong_ca}");
    // The certificate names localhost and 127.0.0.1, not 127.0.0.2.
    let wrong_name = open_store(&url("127.0.0.2", &pg.ca_cert))
        .err()
        .unwrap()
        .to_string();
    assert!(wrong_name.contains("cannot connect"), "{wrong_name}");
    std::fs::write(&pw, "not-the-password").unwrap();
    let bad_pw = open_store(&url("localhost", &pg.ca_cert))
        .err()
        .unwrap()
        .to_string();
    assert!(
        bad_pw.contains("password authentication failed"),
        "{bad_pw}"
    );
    assert!(!bad_pw.contains("not-the-password"), "{bad_pw}");
}

/// `store migrate`: a SQLite trail with imported and appended chains, a prune anchor and
/// decided reviews moves into an empty PostgreSQL store; both verify, with the same chains,
/// sessions and reviews, and the copied chains go on growing in PostgreSQL.
#[test]
fn sqlite_store_migrates_to_postgres_with_chains_intact() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    let sqlite = open_store(&format!("sqlite://{}", db.display())).unwrap();
    append_read_back_and_filters(&*sqlite);
    import_is_idempotent(&*sqlite);
    prune_reanchors_and_verifies(&*sqlite);
    reviews_votes_grants_and_reruns(&*sqlite);
    let before = sqlite.verify().unwrap();
    assert!(before.first_break.is_none(), "{before:?}");

    let pg = pg_cluster();
    let url = pg_url(&pg, dir.path());
    let target = tollgate_store::PgStore::open(&url).unwrap();
    let report = tollgate_store::migrate::sqlite_to_postgres(&db, &target).unwrap();
    let copied: std::collections::HashMap<String, u64> = report.tables.into_iter().collect();
    assert_eq!(copied["events"], before.events, "{copied:?}");
    let after = target.verify().unwrap();
    assert!(after.first_break.is_none(), "{after:?}");
    assert_eq!((after.chains, after.events), (before.chains, before.events));
    assert_eq!(target.chain_heads().unwrap(), sqlite.chain_heads().unwrap());
    let all = SessionFilter::default();
    let ids = |s: &dyn Store| -> Vec<String> {
        s.sessions(&all)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(ids(&target), ids(&*sqlite));
    let every = ReviewFilter::default();
    assert_eq!(
        target.reviews(&every).unwrap(),
        sqlite.reviews(&every).unwrap()
    );
    assert_eq!(
        target
            .events("a1")
            .unwrap()
            .iter()
            .map(|e| &e.hash)
            .collect::<Vec<_>>(),
        sqlite
            .events("a1")
            .unwrap()
            .iter()
            .map(|e| &e.hash)
            .collect::<Vec<_>>()
    );

    // The chain goes on from its copied head, and new events get new ids.
    let max_id = target
        .events_page(0, None, None, 10_000)
        .unwrap()
        .last()
        .unwrap()
        .id;
    let next = target
        .append("gw-a", &[cmd("a3", 9000, "select 9")])
        .unwrap();
    assert_eq!(next[0].chain_seq, 7);
    assert!(next[0].id > max_id);
    assert!(target.verify().unwrap().first_break.is_none());

    // A second migration into a store that is no longer empty is refused.
    let err = tollgate_store::migrate::sqlite_to_postgres(&db, &target)
        .unwrap_err()
        .to_string();
    assert!(err.contains("migrate into an empty store"), "{err}");
}

/// LISTEN/NOTIFY: a vote that decides a review on one replica's store, and a revocation, reach
/// the review changes of another replica's store.
#[test]
fn postgres_review_changes_reach_other_replicas() {
    let pg = pg_cluster();
    let dir = tempfile::tempdir().unwrap();
    let url = pg_url(&pg, dir.path());
    let (a, b) = (
        tollgate_store::PgStore::open(&url).unwrap(),
        tollgate_store::PgStore::open(&url).unwrap(),
    );
    let mut changes = a
        .review_changes()
        .expect("the PostgreSQL store reports changes");
    // The LISTEN connection comes up in the background: decide reviews on b until a hears one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut round = 0;
    let heard = 'outer: loop {
        round += 1;
        let id = format!("n-{round}");
        b.review_create(&review(&id, REVIEW_KIND_ACCESS, 1))
            .unwrap();
        recorded(b.review_vote(&vote(&id, "sam", true, 2000)).unwrap());
        let wait_until = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < wait_until {
            match changes.try_recv() {
                Ok(c) => break 'outer c,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no review change heard"
        );
    };
    // A decision (perhaps of an earlier round, heard late).
    assert!(heard.review_id.starts_with("n-"), "{heard:?}");
    assert!(!heard.revoked);
    let id = heard.review_id;
    b.review_revoke_grant(&id, 3000)
        .unwrap()
        .expect("running grant");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match changes.try_recv() {
            Ok(c) if c.revoked => {
                assert_eq!(c.review_id, id);
                break;
            }
            _ => {
                assert!(std::time::Instant::now() < deadline, "revocation not heard");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Event ids are assigned in commit order: while one replica's import is still open (it holds
/// an id, commits late), another replica's import waits, so an export paging by id meanwhile
/// cannot pass the open one's id and skip its event once it commits.
#[test]
fn postgres_export_pages_never_skip_an_event_committed_late() {
    let pg = Arc::new(pg_cluster());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&pg_url(&pg, dir.path())).unwrap();
    store.import(&journal("gw-early", "early-1", 3)).unwrap();
    // A slow importer, as the store's own take the lock first: one event, two seconds, commit.
    let slow = {
        let pg = pg.clone();
        std::thread::spawn(move || {
            pg.psql(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({}); \
                 INSERT INTO events (chain_id, chain_seq, session_id, session_seq, at_unix_ms, \
                 kind, payload, prev_hash, hash) VALUES ('gw-slow', 1, 'slow-1', 1, 2001, \
                 'command', '{{}}', 'p', 'h'); SELECT pg_sleep(2); COMMIT;",
                tollgate_store::postgres::EVENTS_LOCK
            ))
            .unwrap();
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pg
        .psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(2)%' AND state = 'active' AND pid <> pg_backend_pid()")
        .unwrap()
        .trim()
        != "1"
    {
        assert!(std::time::Instant::now() < deadline, "the slow import never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another replica imports meanwhile; an export takes its first page meanwhile.
    let fast = {
        let store = open_store(&pg_url(&pg, dir.path())).unwrap();
        std::thread::spawn(move || store.import(&journal("gw-fast", "fast-1", 3)).unwrap())
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut exported = store.events_page(0, None, None, 1000).unwrap();
    slow.join().unwrap();
    fast.join().unwrap();
    loop {
        let after = exported.last().map_or(0, |e| e.id);
        let page = store.events_page(after, None, None, 2).unwrap();
        if page.is_empty() {
            break;
        }
        exported.extend(page);
    }
    let mut chains: Vec<&str> = exported.iter().map(|e| e.chain_id.as_str()).collect();
    chains.sort();
    assert_eq!(
        chains,
        ["gw-early", "gw-early", "gw-early", "gw-fast", "gw-fast", "gw-fast", "gw-slow"],
        "an export page passed an event that committed later"
    );
}
