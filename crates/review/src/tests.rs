use super::*;
use std::sync::atomic::{AtomicI64, Ordering};
use tollgate_store::{RecorderOptions, SqliteStore};

struct Fx {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    recorder: Recorder,
    reviews: Arc<Reviews>,
    clock: Arc<AtomicI64>,
}

fn recorder(store: &Arc<dyn Store>, dir: &std::path::Path, name: &str) -> Recorder {
    Recorder::start(
        store.clone(),
        format!("gw-{name}"),
        RecorderOptions {
            journal: dir.join(format!("{name}.events.log")),
            stall_limit: Duration::from_secs(5),
            durability: Default::default(),
        },
    )
    .unwrap()
}

fn settings(approvers: &[&str]) -> ResourceSettings {
    let approvers: Vec<String> = approvers.iter().map(|s| s.to_string()).collect();
    ResourceSettings {
        unmask_approvers: approvers.clone(),
        access_approvers: approvers,
        max_access: Duration::from_secs(8 * 3600),
    }
}

/// A file store, a recorder, and reviews with admins `ops`; `mock_clock` pins time to the
/// returned counter (otherwise real time, for tests that wait).
fn fx(mock_clock: bool) -> Fx {
    fx_with(mock_clock, Principals::default())
}

fn fx_with(mock_clock: bool, principals: Principals) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap());
    let recorder = recorder(&store, dir.path(), "a");
    let clock = Arc::new(AtomicI64::new(now_ms()));
    let mut reviews = Reviews::new(
        store.clone(),
        recorder.clone(),
        Notifier::none(),
        Some("https://gw.example:8443/".into()),
    )
    .with_admin_groups(vec!["ops".into()])
    .with_principals(principals)
    .with_resource("orders", settings(&["dba"]))
    .with_resource(
        "people",
        ResourceSettings {
            unmask_approvers: vec!["privacy".into()],
            ..settings(&["dba"])
        },
    );
    if mock_clock {
        let c = clock.clone();
        reviews = reviews.with_clock(move || c.load(Ordering::SeqCst));
    }
    Fx {
        dir,
        store,
        recorder,
        reviews: Arc::new(reviews),
        clock,
    }
}

/// Someone with a client certificate whose CN is `subject`.
fn person(subject: &str, groups: &[&str]) -> Identity {
    Identity {
        subject: subject.into(),
        principal: Principal::certificate(subject),
        groups: groups.iter().map(|s| s.to_string()).collect(),
        method: tollgate_identity::AuthMethod::Cert,
        cert_fingerprint: None,
        cert_not_after: None,
        expires_at: None,
    }
}

/// Someone presenting the static token of `subject`.
fn token(subject: &str, groups: &[&str]) -> Identity {
    Identity {
        principal: Principal::token(subject),
        method: tollgate_identity::AuthMethod::Token,
        ..person(subject, groups)
    }
}

fn command(min_approvals: u32, timeout: Duration) -> NewReview {
    NewReview {
        kind: ReviewKind::Command,
        session_id: Some("sess-1".into()),
        resource: "orders".into(),
        requester: Reviewer::from(&person("agent-7", &["agents"])),
        rule: Some("agent-writes".into()),
        statement: Some("delete from orders where id = $1".into()),
        statement_sha256: Some("ab".repeat(32)),
        approvers: vec!["sre".into()],
        min_approvals,
        timeout,
        reason: None,
        access_for: None,
    }
}

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn ids_are_short_url_safe_and_distinct() {
    let ids: std::collections::HashSet<String> = (0..2000).map(|_| new_review_id()).collect();
    assert_eq!(ids.len(), 2000);
    for id in ids.iter().take(50) {
        assert_eq!(id.len(), 15, "{id}");
        assert!(id.starts_with("rv_"));
        assert!(
            id[3..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)),
            "{id}"
        );
    }
}

#[test]
fn a_request_is_stored_pending_with_a_console_url_and_a_clipped_statement() {
    let f = fx(true);
    let mut r = command(1, MINUTE);
    r.statement = Some("x".repeat(MAX_STATEMENT_CHARS + 10));
    let review = f.reviews.request(r).unwrap();
    assert_eq!(review.status, "pending");
    assert_eq!(
        review.url.as_deref(),
        Some(format!("https://gw.example:8443/reviews/{}", review.id).as_str())
    );
    let stmt = review.statement.clone().unwrap();
    assert!(
        stmt.ends_with("… [clipped]") && stmt.starts_with(&"x".repeat(MAX_STATEMENT_CHARS)),
        "{}",
        stmt.len()
    );
    assert_eq!(
        review.expires_at_unix_ms - review.created_at_unix_ms,
        60_000
    );
    assert_eq!(f.reviews.get(&review.id).unwrap().unwrap(), review);
    let pending = f
        .reviews
        .list(&ReviewFilter {
            status: Some("pending".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(pending, [review]);
    assert!(matches!(
        f.reviews.request(command(0, MINUTE)),
        Err(ReviewError::Invalid(_))
    ));
}

#[test]
fn the_requester_can_never_approve_even_as_an_admin() {
    let f = fx(true);
    let mut r = command(1, MINUTE);
    r.requester = Reviewer::from(&person("root", &["ops", "sre"]));
    let review = f.reviews.request(r).unwrap();
    let e = f
        .reviews
        .decide(&review.id, &person("root", &["ops", "sre"]), true, None)
        .unwrap_err();
    assert!(matches!(e, ReviewError::SelfApproval), "{e}");
    assert_eq!(f.reviews.get(&review.id).unwrap().unwrap().votes, []);
}

#[test]
fn only_approver_groups_and_admins_may_decide() {
    let f = fx(true);
    let review = f.reviews.request(command(1, MINUTE)).unwrap();
    let e = f
        .reviews
        .decide(&review.id, &person("mallory", &["dev"]), true, None)
        .unwrap_err();
    match &e {
        ReviewError::NotAnApprover { groups } => assert_eq!(groups, &["sre", "ops"]),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("allowed groups: sre, ops"), "{e}");
    let done = f
        .reviews
        .decide(&review.id, &person("olga", &["ops"]), true, None)
        .unwrap();
    assert_eq!(
        (done.status.as_str(), done.decided_by.as_deref()),
        ("approved", Some("olga"))
    );
    let e = f
        .reviews
        .decide("rv_nope", &person("olga", &["ops"]), true, None)
        .unwrap_err();
    assert!(matches!(e, ReviewError::NotFound(_)), "{e}");
}

#[test]
fn two_approvals_need_two_distinct_reviewers() {
    let f = fx(true);
    let review = f.reviews.request(command(2, MINUTE)).unwrap();
    let bob = person("bob", &["sre"]);
    let r = f
        .reviews
        .decide(&review.id, &bob, true, Some("looks fine".into()))
        .unwrap();
    assert_eq!((r.status.as_str(), r.approvals), ("pending", 1));
    let e = f.reviews.decide(&review.id, &bob, true, None).unwrap_err();
    assert!(
        matches!(&e, ReviewError::AlreadyVotedBy(who) if who == "bob"),
        "{e}"
    );
    let r = f
        .reviews
        .decide(&review.id, &person("carol", &["sre"]), true, None)
        .unwrap();
    assert_eq!((r.status.as_str(), r.approvals), ("approved", 2));
    assert_eq!(
        r.votes
            .iter()
            .map(|v| v.reviewer.as_str())
            .collect::<Vec<_>>(),
        ["bob", "carol"]
    );
    assert_eq!(r.votes[0].reason.as_deref(), Some("looks fine"));
    let e = f
        .reviews
        .decide(
            &review.id,
            &person("dave", &["sre"]),
            false,
            Some("no".into()),
        )
        .unwrap_err();
    assert!(
        matches!(&e, ReviewError::NotPending(s) if s == "approved"),
        "{e}"
    );
}

#[test]
fn one_deny_ends_it_and_needs_a_reason() {
    let f = fx(true);
    let review = f.reviews.request(command(2, MINUTE)).unwrap();
    f.reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap();
    let e = f
        .reviews
        .decide(
            &review.id,
            &person("carol", &["sre"]),
            false,
            Some("  ".into()),
        )
        .unwrap_err();
    assert!(matches!(e, ReviewError::Invalid(_)), "{e}");
    let r = f
        .reviews
        .decide(
            &review.id,
            &person("carol", &["sre"]),
            false,
            Some("not on a Friday".into()),
        )
        .unwrap();
    assert_eq!(r.status, "denied");
    assert_eq!(r.decided_by.as_deref(), Some("carol"));
    assert_eq!(r.decision_reason.as_deref(), Some("not on a Friday"));
}

#[test]
fn a_review_past_its_deadline_is_expired_when_listed_or_voted_on() {
    let f = fx(true);
    let a = f.reviews.request(command(1, MINUTE)).unwrap();
    let b = f.reviews.request(command(1, 3 * MINUTE)).unwrap();
    f.clock.fetch_add(61_000, Ordering::SeqCst);
    let pending = f
        .reviews
        .list(&ReviewFilter {
            status: Some("pending".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        pending.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [b.id.as_str()]
    );
    assert_eq!(f.reviews.get(&a.id).unwrap().unwrap().status, "expired");
    f.clock.fetch_add(3 * 60_000, Ordering::SeqCst);
    let e = f
        .reviews
        .decide(&b.id, &person("bob", &["sre"]), true, None)
        .unwrap_err();
    assert!(
        matches!(&e, ReviewError::NotPending(s) if s == "expired"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_resolves_on_approval_and_consumes_it_once() {
    let f = fx(false);
    let review = f.reviews.request(command(1, MINUTE)).unwrap();
    let (reviews, id) = (f.reviews.clone(), review.id.clone());
    let waiter = tokio::spawn(async move { reviews.wait(&id).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    let started = std::time::Instant::now();
    f.reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap();
    let verdict = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        verdict,
        Verdict::Approved {
            reviewers: vec!["bob".into()]
        }
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "woken, not polled: {:?}",
        started.elapsed()
    );
    assert!(f
        .reviews
        .get(&review.id)
        .unwrap()
        .unwrap()
        .used_at_unix_ms
        .is_some());
    let sha = "ab".repeat(32);
    assert_eq!(
        f.reviews
            .take_approved_rerun("agent-7", "orders", &sha, MINUTE),
        None,
        "already used by its waiter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_reports_a_deny_with_reviewer_and_reason() {
    let f = fx(false);
    let review = f.reviews.request(command(1, MINUTE)).unwrap();
    let (reviews, id) = (f.reviews.clone(), review.id.clone());
    let waiter = tokio::spawn(async move { reviews.wait(&id).await });
    f.reviews
        .decide(
            &review.id,
            &person("bob", &["sre"]),
            false,
            Some("too broad".into()),
        )
        .unwrap();
    let verdict = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        verdict,
        Verdict::Denied {
            reviewer: "bob".into(),
            reason: Some("too broad".into())
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_expires_at_the_deadline_and_persists_it() {
    let f = fx(false);
    let review = f
        .reviews
        .request(command(1, Duration::from_millis(300)))
        .unwrap();
    let started = std::time::Instant::now();
    let verdict = tokio::time::timeout(Duration::from_secs(5), f.reviews.wait(&review.id))
        .await
        .unwrap();
    assert_eq!(verdict, Verdict::Expired);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        f.store.review(&review.id).unwrap().unwrap().status,
        "expired"
    );
    let e = f
        .reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap_err();
    assert!(
        matches!(&e, ReviewError::NotPending(s) if s == "expired"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdraw_ends_the_wait_and_blocks_later_votes() {
    let f = fx(false);
    let review = f.reviews.request(command(1, MINUTE)).unwrap();
    let (reviews, id) = (f.reviews.clone(), review.id.clone());
    let waiter = tokio::spawn(async move { reviews.wait(&id).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.reviews.withdraw(&review.id);
    let verdict = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(verdict, Verdict::Withdrawn);
    let e = f
        .reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap_err();
    assert!(
        matches!(&e, ReviewError::NotPending(s) if s == "withdrawn"),
        "{e}"
    );
}

/// Another gateway process (its own `Reviews` and recorder on the same store file) decides:
/// the waiter sees it by polling the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_made_by_another_process_reaches_the_waiter() {
    let f = fx(false);
    let other_store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(f.dir.path().join("t.db")).unwrap());
    let other = Reviews::new(
        other_store.clone(),
        recorder(&other_store, f.dir.path(), "b"),
        Notifier::none(),
        None,
    );
    let review = f.reviews.request(command(1, MINUTE)).unwrap();
    let (reviews, id) = (f.reviews.clone(), review.id.clone());
    let waiter = tokio::spawn(async move { reviews.wait(&id).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    other
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap();
    let verdict = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        verdict,
        Verdict::Approved {
            reviewers: vec!["bob".into()]
        }
    );
}

#[test]
fn an_approved_statement_may_be_rerun_once_within_the_window() {
    let f = fx(true);
    let sha = "ab".repeat(32);
    let review = f.reviews.request(command(1, MINUTE)).unwrap();
    assert_eq!(
        f.reviews
            .take_approved_rerun("agent-7", "orders", &sha, 15 * MINUTE),
        None,
        "still pending"
    );
    f.reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap();
    f.clock.fetch_add(10 * 60_000, Ordering::SeqCst);
    assert_eq!(
        f.reviews
            .take_approved_rerun("mallory", "orders", &sha, 15 * MINUTE),
        None
    );
    assert_eq!(
        f.reviews
            .take_approved_rerun("agent-7", "orders", &"cd".repeat(32), 15 * MINUTE),
        None
    );
    let rerun = f
        .reviews
        .take_approved_rerun("agent-7", "orders", &sha, 15 * MINUTE)
        .unwrap();
    assert_eq!(rerun.id, review.id);
    assert_eq!(
        f.reviews
            .take_approved_rerun("agent-7", "orders", &sha, 15 * MINUTE),
        None,
        "once"
    );

    let late = f.reviews.request(command(1, MINUTE)).unwrap();
    f.reviews
        .decide(&late.id, &person("bob", &["sre"]), true, None)
        .unwrap();
    f.clock.fetch_add(16 * 60_000, Ordering::SeqCst);
    assert_eq!(
        f.reviews
            .take_approved_rerun("agent-7", "orders", &sha, 15 * MINUTE),
        None,
        "outside the window"
    );
}

#[test]
fn just_in_time_access_grants_until_its_duration_ends() {
    let f = fx(true);
    let me = person("agent-7", &["agents"]);
    let e = f
        .reviews
        .request_access(&me, "orders", 9 * 3600 * Duration::from_secs(1), "incident")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "9h is longer than this resource allows (8h, its max_access)"
    );
    assert!(matches!(
        f.reviews.request_access(&me, "billing", MINUTE, "x"),
        Err(ReviewError::UnknownResource(_))
    ));
    assert!(matches!(
        f.reviews.request_access(&me, "orders", MINUTE, " "),
        Err(ReviewError::Invalid(_))
    ));

    let review = f
        .reviews
        .request_access(&me, "orders", Duration::from_secs(3600), "INC-42")
        .unwrap();
    assert_eq!(
        (review.kind.as_str(), review.approvers.as_slice()),
        ("access", &["dba".to_string()][..])
    );
    assert_eq!(review.access_for_ms, Some(3_600_000));
    assert_eq!(
        f.reviews.active_grant("agent-7", "orders"),
        None,
        "pending grants nothing"
    );
    let e = f
        .reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap_err();
    assert!(
        matches!(e, ReviewError::NotAnApprover { .. }),
        "sre is not an access approver: {e}"
    );
    let t0 = f.clock.load(Ordering::SeqCst);
    let r = f
        .reviews
        .decide(&review.id, &person("dora", &["dba"]), true, None)
        .unwrap();
    assert_eq!(r.grant_until_unix_ms, Some(t0 + 3_600_000));
    let g = f.reviews.active_grant("agent-7", "orders").unwrap();
    assert_eq!(g.review_id, review.id);
    assert_eq!(
        g.until,
        UNIX_EPOCH + Duration::from_millis((t0 + 3_600_000) as u64)
    );
    assert_eq!(f.reviews.active_grant("someone-else", "orders"), None);
    f.clock.fetch_add(3_599_000, Ordering::SeqCst);
    assert!(f.reviews.active_grant("agent-7", "orders").is_some());
    f.clock.fetch_add(1_000, Ordering::SeqCst);
    assert_eq!(f.reviews.active_grant("agent-7", "orders"), None, "expired");
}

#[test]
fn concurrent_decisions_have_exactly_one_winner() {
    let f = fx(false);
    for _ in 0..10 {
        let review = f.reviews.request(command(1, MINUTE)).unwrap();
        let results: Vec<Result<Review, ReviewError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let (reviews, id) = (&f.reviews, review.id.clone());
                    s.spawn(move || {
                        let who = person(&format!("r{i}"), &["sre"]);
                        reviews.decide(&id, &who, i % 2 == 0, Some(format!("r{i}")))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<&Review> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, ReviewError::NotPending(_)), "{e}");
            }
        }
        let stored = f.reviews.get(&review.id).unwrap().unwrap();
        assert_eq!(stored.votes.len(), 1);
        assert_eq!(stored.status, winners[0].status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_is_an_audit_event_with_reviewer_and_reason() {
    let f = fx(false);
    let a = f.reviews.request(command(2, MINUTE)).unwrap();
    f.reviews
        .decide(
            &a.id,
            &person("bob", &["sre"]),
            true,
            Some("ok by me".into()),
        )
        .unwrap();
    f.reviews
        .decide(
            &a.id,
            &person("carol", &["sre", "x"]),
            false,
            Some("not now".into()),
        )
        .unwrap();
    let b = f
        .reviews
        .request(command(1, Duration::from_millis(100)))
        .unwrap();
    assert_eq!(f.reviews.wait(&b.id).await, Verdict::Expired);
    let c = f.reviews.request(command(1, MINUTE)).unwrap();
    f.reviews.withdraw(&c.id);
    f.recorder.flush().await.unwrap();
    let events = f.store.events(f.reviews.audit_session()).unwrap();
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.payload["review"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            (EVENT_REQUESTED, a.id.as_str()),
            (EVENT_VOTE, a.id.as_str()),
            (EVENT_VOTE, a.id.as_str()),
            (EVENT_DECIDED, a.id.as_str()),
            (EVENT_REQUESTED, b.id.as_str()),
            (EVENT_EXPIRED, b.id.as_str()),
            (EVENT_REQUESTED, c.id.as_str()),
            (EVENT_WITHDRAWN, c.id.as_str()),
        ]
    );
    let requested = &events[0].payload;
    assert_eq!(requested["requester"], "agent-7");
    assert_eq!(requested["statement"], "delete from orders where id = $1");
    assert_eq!(requested["session"], "sess-1");
    let vote = &events[2].payload;
    assert_eq!(
        (
            vote["reviewer"].as_str(),
            vote["approve"].as_bool(),
            vote["reason"].as_str()
        ),
        (Some("carol"), Some(false), Some("not now"))
    );
    assert_eq!(vote["groups"], serde_json::json!(["sre", "x"]));
    let decided = &events[3].payload;
    assert_eq!(
        (
            decided["status"].as_str(),
            decided["decided_by"].as_str(),
            decided["reason"].as_str()
        ),
        (Some("denied"), Some("carol"), Some("not now"))
    );
    assert_eq!(
        events[7].payload["reason"],
        "the client disconnected while the command was held"
    );
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn an_unmask_review_is_approved_by_unmask_approvers_and_grants_until_it_ends() {
    let f = fx(true);
    let me = person("agent-7", &["agents"]);
    let e = f
        .reviews
        .request_unmask(&me, "people", 9 * HOUR, "GDPR export")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "9h is longer than this resource allows (8h, its max_access)"
    );
    assert!(matches!(
        f.reviews.request_unmask(&me, "billing", MINUTE, "x"),
        Err(ReviewError::UnknownResource(_))
    ));
    let e = f
        .reviews
        .request_unmask(&me, "people", MINUTE, "  ")
        .unwrap_err();
    assert_eq!(e.to_string(), "an unmask request needs a reason");
    assert!(matches!(
        f.reviews.request_unmask(&me, "people", Duration::ZERO, "x"),
        Err(ReviewError::Invalid(_))
    ));

    let review = f
        .reviews
        .request_unmask(&me, "people", HOUR, " GDPR export ")
        .unwrap();
    assert_eq!(
        (
            review.kind.as_str(),
            review.status.as_str(),
            review.approvers.as_slice(),
            review.min_approvals
        ),
        ("unmask", "pending", &["privacy".to_string()][..], 1)
    );
    assert_eq!(
        (review.access_for_ms, review.reason.as_deref()),
        (Some(3_600_000), Some("GDPR export"))
    );
    assert_eq!(
        review.expires_at_unix_ms - review.created_at_unix_ms,
        ACCESS_REVIEW_TIMEOUT.as_millis() as i64
    );
    assert_eq!(
        f.reviews.active_unmask("agent-7", "people"),
        None,
        "pending"
    );

    // The access approvers of this resource (dba) are not its unmask approvers; the requester
    // never decides; a deny needs a reason.
    let e = f
        .reviews
        .decide(&review.id, &person("dora", &["dba"]), true, None)
        .unwrap_err();
    match &e {
        ReviewError::NotAnApprover { groups } => assert_eq!(groups, &["privacy", "ops"]),
        other => panic!("{other}"),
    }
    let e = f
        .reviews
        .decide(&review.id, &person("agent-7", &["privacy"]), true, None)
        .unwrap_err();
    assert!(matches!(e, ReviewError::SelfApproval), "{e}");
    let e = f
        .reviews
        .decide(&review.id, &person("pia", &["privacy"]), false, None)
        .unwrap_err();
    assert!(matches!(e, ReviewError::Invalid(_)), "{e}");

    let t0 = f.clock.load(Ordering::SeqCst);
    let r = f
        .reviews
        .decide(&review.id, &person("pia", &["privacy"]), true, None)
        .unwrap();
    assert_eq!(
        (
            r.status.as_str(),
            r.decided_by.as_deref(),
            r.grant_until_unix_ms
        ),
        ("approved", Some("pia"), Some(t0 + 3_600_000))
    );
    assert_eq!(r.used_at_unix_ms, None, "an unmask grant is not consumed");
    let g = f.reviews.active_unmask("agent-7", "people").unwrap();
    assert_eq!(g.review_id, review.id);
    assert_eq!(
        g.until,
        UNIX_EPOCH + Duration::from_millis((t0 + 3_600_000) as u64)
    );
    assert_eq!(f.reviews.active_unmask("someone-else", "people"), None);
    assert_eq!(f.reviews.active_unmask("agent-7", "orders"), None);
    assert_eq!(
        f.reviews.active_grant("agent-7", "people"),
        None,
        "unmasking does not let anyone reach the resource"
    );

    // Expiry: the grant holds to its last millisecond, then ends.
    f.clock.fetch_add(3_599_999, Ordering::SeqCst);
    assert!(f.reviews.active_unmask("agent-7", "people").is_some());
    f.clock.fetch_add(1, Ordering::SeqCst);
    assert_eq!(f.reviews.active_unmask("agent-7", "people"), None, "ended");
}

#[test]
fn access_and_unmask_grants_never_stand_in_for_each_other() {
    let f = fx(true);
    let me = person("agent-7", &["agents"]);
    let dora = person("dora", &["dba"]);

    // Approved access grants no unmasked view.
    let access = f
        .reviews
        .request_access(&me, "orders", 2 * HOUR, "INC-42")
        .unwrap();
    f.reviews.decide(&access.id, &dora, true, None).unwrap();
    assert_eq!(
        f.reviews
            .active_grant("agent-7", "orders")
            .unwrap()
            .review_id,
        access.id
    );
    assert_eq!(f.reviews.active_unmask("agent-7", "orders"), None);

    // Unmask approvers default to the access approvers (here: dba). Each lookup answers with
    // its own review, even while the other kind's grant also holds.
    let unmask = f
        .reviews
        .request_unmask(&me, "orders", HOUR, "INC-42 customer data")
        .unwrap();
    assert_eq!(unmask.approvers, ["dba"]);
    f.reviews.decide(&unmask.id, &dora, true, None).unwrap();
    assert_eq!(
        f.reviews
            .active_unmask("agent-7", "orders")
            .unwrap()
            .review_id,
        unmask.id
    );
    assert_eq!(
        f.reviews
            .active_grant("agent-7", "orders")
            .unwrap()
            .review_id,
        access.id
    );

    // The unmask grant ends first; access goes on, still without unmasking.
    f.clock.fetch_add(HOUR.as_millis() as i64, Ordering::SeqCst);
    assert_eq!(f.reviews.active_unmask("agent-7", "orders"), None);
    assert!(f.reviews.active_grant("agent-7", "orders").is_some());

    // Denied, expired and listed: a denied unmask review grants nothing; `kind` filters.
    let denied = f
        .reviews
        .request_unmask(&me, "orders", HOUR, "again")
        .unwrap();
    f.reviews
        .decide(&denied.id, &dora, false, Some("use the export job".into()))
        .unwrap();
    let lapsed = f
        .reviews
        .request_unmask(&me, "orders", HOUR, "later")
        .unwrap();
    f.clock
        .fetch_add(ACCESS_REVIEW_TIMEOUT.as_millis() as i64, Ordering::SeqCst);
    assert_eq!(
        f.reviews.get(&lapsed.id).unwrap().unwrap().status,
        "expired"
    );
    assert_eq!(
        f.reviews
            .decide(&lapsed.id, &dora, true, None)
            .unwrap_err()
            .to_string(),
        "the review is already expired"
    );
    assert_eq!(f.reviews.active_unmask("agent-7", "orders"), None);
    let mut kinds: Vec<(String, String)> = f
        .reviews
        .list(&ReviewFilter {
            kind: Some("unmask".into()),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect();
    kinds.sort();
    let mut expected = vec![
        (unmask.id.clone(), "approved".to_string()),
        (denied.id.clone(), "denied".to_string()),
        (lapsed.id.clone(), "expired".to_string()),
    ];
    expected.sort();
    assert_eq!(kinds, expected);
}

#[test]
fn a_command_review_cannot_be_asked_for_as_a_grant() {
    let f = fx(true);
    let e = f
        .reviews
        .request_grant(
            ReviewKind::Command,
            &person("agent-7", &["agents"]),
            "orders",
            HOUR,
            "x",
        )
        .unwrap_err();
    assert!(matches!(e, ReviewError::Invalid(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmask_review_is_recorded_and_notified_as_unmask() {
    let f = fx(false);
    let review = f
        .reviews
        .request_unmask(&person("agent-7", &["agents"]), "people", HOUR, "GDPR-7")
        .unwrap();
    f.reviews
        .decide(
            &review.id,
            &person("pia", &["privacy"]),
            true,
            Some("scoped to ticket GDPR-7".into()),
        )
        .unwrap();
    f.recorder.flush().await.unwrap();
    let events = f.store.events(f.reviews.audit_session()).unwrap();
    let kinds: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e.kind.as_str(),
                e.payload["review"].as_str().unwrap(),
                e.payload["review_kind"].as_str().unwrap(),
            )
        })
        .collect();
    let id = review.id.as_str();
    assert_eq!(
        kinds,
        [
            (EVENT_REQUESTED, id, "unmask"),
            (EVENT_VOTE, id, "unmask"),
            (EVENT_DECIDED, id, "unmask"),
        ]
    );
    let requested = &events[0].payload;
    assert_eq!(requested["requester"], "agent-7");
    assert_eq!(requested["reason"], "GDPR-7");
    assert_eq!(requested["access_for_ms"], 3_600_000);
    assert_eq!(requested["approvers"], serde_json::json!(["privacy"]));
    assert_eq!(events[1].payload["reviewer"], "pia");
    assert_eq!(events[1].payload["reason"], "scoped to ticket GDPR-7");
    let decided = &events[2].payload;
    assert_eq!(
        (decided["status"].as_str(), decided["decided_by"].as_str()),
        (Some("approved"), Some("pia"))
    );
    assert_eq!(
        decided["grant_until_unix_ms"].as_i64(),
        f.reviews.get(id).unwrap().unwrap().grant_until_unix_ms
    );

    let body = Notifier::none().body(&review);
    assert_eq!(body["review"]["kind"], "unmask");
    assert_eq!(
        body["text"],
        "agent-7 asks to see people without masking for 1h: GDPR-7"
    );
}

/// alice has a SPIFFE certificate, a CN certificate and a token named "alice"; bob a
/// certificate and the token "bob-ci". Nobody else is mapped.
fn alice_and_bob() -> Principals {
    let mapping =
        |name: &str, certificates: &[&str], tokens: &[&str]| tollgate_config::PrincipalMapping {
            name: name.into(),
            certificates: certificates.iter().map(|c| c.to_string()).collect(),
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            oidc: vec![],
        };
    Principals::new(&[
        mapping("alice", &["spiffe://corp/alice", "cn:alice"], &["alice"]),
        mapping("bob", &["cn:bob"], &["bob-ci"]),
    ])
}

fn requested_by(f: &Fx, who: &Identity, min_approvals: u32) -> Review {
    let mut r = command(min_approvals, MINUTE);
    r.requester = Reviewer::from(who);
    f.reviews.request_by(r, &who.principal).unwrap()
}

#[test]
fn another_credential_of_the_requester_cannot_approve() {
    let f = fx_with(true, alice_and_bob());
    let review = requested_by(&f, &person("alice", &["agents"]), 1);
    // Shown by subject, compared by principal.
    assert_eq!(review.requester, "alice");
    assert_eq!(review.requester_principal.as_deref(), Some("alice"));
    for other_credential in [
        token("alice", &["sre"]),
        person("spiffe://corp/alice", &["sre"]),
    ] {
        let e = f
            .reviews
            .decide(&review.id, &other_credential, true, None)
            .unwrap_err();
        assert!(matches!(e, ReviewError::SelfApproval), "{e}");
    }
    let review = f
        .reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap();
    assert_eq!(review.status, "approved");
}

#[test]
fn two_credentials_of_one_principal_count_once() {
    let f = fx_with(true, alice_and_bob());
    let review = requested_by(&f, &person("agent-7", &["agents"]), 2);
    f.reviews
        .decide(&review.id, &person("bob", &["sre"]), true, None)
        .unwrap();
    let e = f
        .reviews
        .decide(&review.id, &token("bob-ci", &["sre"]), true, None)
        .unwrap_err();
    assert!(
        matches!(&e, ReviewError::AlreadyVotedBy(who) if who == "bob-ci"),
        "{e}"
    );
    let review = f.reviews.get(&review.id).unwrap().unwrap();
    assert_eq!((review.status.as_str(), review.approvals), ("pending", 1));
    let review = f
        .reviews
        .decide(&review.id, &token("alice", &["sre"]), true, None)
        .unwrap();
    assert_eq!(review.status, "approved");
    let mut principals: Vec<&str> = review.votes.iter().map(|v| v.principal.as_str()).collect();
    principals.sort();
    assert_eq!(principals, ["alice", "bob"]);
}

#[test]
fn an_unmapped_certificate_and_token_of_one_name_are_two_principals() {
    let f = fx(true);
    // A token named like the requester's CN is someone else: it is not a self-approval ...
    let review = requested_by(&f, &person("carol", &["agents"]), 2);
    assert_eq!(review.requester_principal.as_deref(), Some("cert:cn:carol"));
    f.reviews
        .decide(&review.id, &token("carol", &["sre"]), true, None)
        .unwrap();
    // ... and a token cannot vote in a certificate user's name: cert "dave" still votes
    // after token "dave" did, each counted, each recorded with its own principal.
    let review = requested_by(&f, &person("agent-7", &["agents"]), 2);
    f.reviews
        .decide(&review.id, &token("dave", &["sre"]), true, None)
        .unwrap();
    let review = f
        .reviews
        .decide(&review.id, &person("dave", &["sre"]), true, None)
        .unwrap();
    assert_eq!(review.status, "approved");
    let mut votes: Vec<(&str, &str)> = review
        .votes
        .iter()
        .map(|v| (v.reviewer.as_str(), v.principal.as_str()))
        .collect();
    votes.sort();
    assert_eq!(votes, [("dave", "cert:cn:dave"), ("dave", "token:dave")]);
}

#[test]
fn a_requester_without_a_principal_is_compared_by_subject() {
    let f = fx(true);
    let review = f.reviews.request(command(1, MINUTE)).unwrap();
    assert_eq!(review.requester_principal, None);
    let e = f
        .reviews
        .decide(&review.id, &token("agent-7", &["sre"]), true, None)
        .unwrap_err();
    assert!(matches!(e, ReviewError::SelfApproval), "{e}");
}

#[test]
fn grants_belong_to_the_requesters_principal() {
    let f = fx_with(true, alice_and_bob());
    let hour = Duration::from_secs(3600);
    let review = f
        .reviews
        .request_access(&person("alice", &["agents"]), "orders", hour, "INC-1")
        .unwrap();
    let namesake = f
        .reviews
        .request_access(&person("carol", &["agents"]), "orders", hour, "INC-2")
        .unwrap();
    for id in [&review.id, &namesake.id] {
        f.reviews
            .decide(id, &person("dora", &["dba"]), true, None)
            .unwrap();
    }
    // alice's other credentials hold her grant ...
    for alice in [token("alice", &[]), person("spiffe://corp/alice", &[])] {
        let g = f.reviews.active_grant_for(&alice, "orders").unwrap();
        assert_eq!(g.review_id, review.id);
    }
    // ... a token that merely shares carol's CN does not hold carol's.
    assert_eq!(
        f.reviews
            .active_grant_for(&person("carol", &[]), "orders")
            .unwrap()
            .review_id,
        namesake.id
    );
    assert_eq!(
        f.reviews.active_grant_for(&token("carol", &[]), "orders"),
        None
    );
    assert_eq!(
        f.reviews.active_unmask_for(&person("carol", &[]), "orders"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_listed_and_revoked_once_with_who_and_why() {
    let f = fx(true);
    let agent = person("agent-7", &["agents"]);
    let access = f
        .reviews
        .request_access(&agent, "orders", Duration::from_secs(3600), "INC-42")
        .unwrap();
    let unmask = f
        .reviews
        .request_unmask(&agent, "people", Duration::from_secs(600), "INC-43")
        .unwrap();
    let pending = f
        .reviews
        .request_access(&person("eve", &[]), "orders", MINUTE, "x")
        .unwrap();
    let dora = person("dora", &["dba", "privacy"]);
    f.reviews.decide(&access.id, &dora, true, None).unwrap();
    f.reviews.decide(&unmask.id, &dora, true, None).unwrap();

    let all = f.reviews.grants(&GrantFilter::default()).unwrap();
    let ids: Vec<&str> = all.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "a pending review grants nothing: {ids:?}");
    assert!(!ids.contains(&pending.id.as_str()));
    let g = all.iter().find(|g| g.id == access.id).unwrap();
    assert_eq!(
        (g.kind.as_str(), g.subject.as_str(), g.resource.as_str()),
        ("access", "agent-7", "orders")
    );
    assert_eq!(g.granted_by.as_deref(), Some("dora"));
    assert!(g.active && g.revoked.is_none());
    assert!(f.reviews.is_holder(g, &agent));
    assert!(!f.reviews.is_holder(g, &dora));
    let only_unmask = f
        .reviews
        .grants(&GrantFilter {
            kind: Some(ReviewKind::Unmask),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(only_unmask.len(), 1);
    assert_eq!(only_unmask[0].id, unmask.id);

    // Not a grant; someone else's; then revoked once.
    assert!(matches!(
        f.reviews.revoke_grant(&pending.id, &dora, Some("x".into())),
        Err(ReviewError::NotAGrant(_))
    ));
    assert!(matches!(
        f.reviews
            .revoke_grant(&access.id, &person("eve", &[]), Some("x".into())),
        Err(ReviewError::NotAnApprover { .. })
    ));
    f.clock.fetch_add(1_000, Ordering::SeqCst);
    f.reviews
        .revoke_grant(&access.id, &dora, Some("INC-42 closed".into()))
        .unwrap();
    let e = f
        .reviews
        .revoke_grant(&access.id, &dora, Some("again".into()))
        .unwrap_err();
    assert!(
        matches!(e, ReviewError::GrantEnded { revoked: true, .. }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("the grant of review {} was already revoked", access.id)
    );
    let active = f.reviews.grants(&GrantFilter {
        active: Some(true),
        ..Default::default()
    });
    assert_eq!(active.unwrap().len(), 1);
    let ended = f
        .reviews
        .grants(&GrantFilter {
            active: Some(false),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(ended.len(), 1);
    let r = ended[0].revoked.clone().expect("revoked");
    assert_eq!(
        (r.by.as_deref(), r.reason.as_deref()),
        (Some("dora"), Some("INC-42 closed"))
    );

    // Another process (no memory of the revocation) finds who and why in the audit trail.
    f.recorder.flush().await.unwrap();
    let other = Reviews::new(f.store.clone(), f.recorder.clone(), Notifier::none(), None);
    let seen = other
        .grants(&GrantFilter {
            subject: Some("agent-7".into()),
            resource: Some("orders".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].revoked, Some(r));

    // A grant that ran out is not revoked, and cannot be revoked any more.
    f.clock.fetch_add(600_000, Ordering::SeqCst);
    let e = f
        .reviews
        .revoke_grant(&unmask.id, &dora, Some("late".into()))
        .unwrap_err();
    assert!(
        matches!(e, ReviewError::GrantEnded { revoked: false, .. }),
        "{e}"
    );
    let g = f.reviews.grants(&GrantFilter::default()).unwrap();
    assert!(g.iter().all(|g| !g.active));
    assert!(g
        .iter()
        .find(|g| g.id == unmask.id)
        .unwrap()
        .revoked
        .is_none());
}

#[test]
fn may_decide_answers_as_decide_would() {
    let f = fx(true);
    let mut r = command(2, MINUTE);
    r.requester = Reviewer::from(&person("agent-7", &["agents", "sre"]));
    let review = f.reviews.request(r).unwrap();
    let (alice, olga) = (person("alice", &["sre"]), person("olga", &["ops"]));
    assert!(f.reviews.may_decide(&review, &alice));
    assert!(f.reviews.may_decide(&review, &olga), "admins may");
    assert!(!f.reviews.may_decide(&review, &person("mallory", &["dev"])));
    assert!(
        !f.reviews
            .may_decide(&review, &person("agent-7", &["agents", "sre"])),
        "not the requester, even as an approver"
    );
    let review = f.reviews.decide(&review.id, &alice, true, None).unwrap();
    assert!(!f.reviews.may_decide(&review, &alice), "voted already");
    assert!(f.reviews.may_decide(&review, &olga));
    let review = f.reviews.decide(&review.id, &olga, true, None).unwrap();
    assert_eq!(review.status, "approved");
    assert!(!f.reviews.may_decide(&review, &person("sam", &["sre"])));
}
